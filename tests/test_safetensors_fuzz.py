"""Differential fuzz: fastmerge's own ``pread`` safetensors reader against the ``safetensors``
package, on generated and mutated files.

The oracle is ``safetensors.safe_open(path, framework="pt")`` with ``get_tensor`` of every key:
what ``transformers`` and mergekit use to read a checkpoint. (``safetensors.torch.load`` reads
fewer dtypes, F8_E8M0 and F4 among the missing: the file is valid, its Python table lacks them.)
For every file, fastmerge's :class:`~fastmerge.safetensors_io.Checkpoint` must accept it exactly
when the package does, and then read the same names, dtypes, shapes and bytes, through both
its ``pread`` path and its mapped path.

Files start from a valid layout (random names, dtypes, shapes, tensors laid out in a random
order, with random bytes) and then take up to three mutations: offsets shifted, retyped or
missing; shapes with negative, float, bool, huge or overflowing entries; dtypes in serde's other
forms; entries as lists; unknown, repeated or missing fields; repeated names; ``__metadata__``
of every shape; padding, BOMs, NUL bytes, deep nesting, lone surrogates, out-of-range numbers;
a wrong header length, trailing bytes, truncation, and random byte flips in the header.
Derandomized and bounded, so CI runs the same 2,500 files every time, in a few seconds.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import tempfile

import pytest
import torch

pytest.importorskip("hypothesis")
safetensors = pytest.importorskip("safetensors")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastmerge import safetensors_io as sio  # noqa: E402

EXAMPLES = 2500


class Raw:
    """JSON text written as is (NaN, -0, 1e999, a lone surrogate escape ...)."""

    def __init__(self, text):
        self.text = text


class Obj:
    """A JSON object as a list of pairs, so that keys may repeat."""

    def __init__(self, pairs):
        self.pairs = list(pairs)


def dumps(v) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, Obj):
        return "{" + ",".join(f"{dumps(k)}:{dumps(x)}" for k, x in v.pairs) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dumps(x) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False)


NAMES = ["a", "b.weight", "model.layers.0.mlp.up_proj.weight", "", "é", "😀", "x" * 90,
         "__metadata", "data_offsets"]
# the format's dtypes and their bits, as the safetensors package (0.8) lists them; written out
# here rather than taken from fastmerge, which is what is under test
FORMAT_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
               "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
               "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
               "I64": 64, "U64": 64}
DTYPES = list(FORMAT_BITS)
BAD_DTYPES = ["f32", "XX", "F8", "F32 ", "float32", Raw('"F\\u0033\\u0032"')]
DIMS = [0, 1, 2, 3, 4, 5, 7]
HUGE = [2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64]
ODD = [-1, Raw("-0"), 1.0, Raw("2e0"), 1.5, True, False, "2", None, [2], Raw("18446744073709551616")]
IGNORED = [1, -1, Raw("-0"), "x", None, [1, [2]], Obj([("k", "v")]), Raw("1e308"), Raw("1e999"),
           Raw("-1e999"), Raw("NaN"), Raw("Infinity"), Raw("1" + "0" * 309), Raw("1" + "0" * 308),
           Raw('"\\ud800"'), Raw('"\\udc00"'), Raw('"\\ud83d\\ude00"'), Raw("1e-400")]
MUTATIONS = ["offset", "offset_type", "offsets_len", "shape_type", "shape_not_list", "huge_dim",
             "dtype_form", "entry_list", "extra_field", "dup_field", "missing_field", "dup_tensor",
             "metadata", "entry_not_obj", "top_not_obj", "ws", "trailing", "truncate",
             "length_field", "flip", "deep", "surrogate_key", "odd_tail"]


def _size(dtype, shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * FORMAT_BITS.get(dtype, 8) // 8


def _as_list(v, default):
    return list(v) if isinstance(v, list) else list(default)


def make_file(rnd: random.Random) -> bytes:
    """One safetensors file: a valid layout, then up to three mutations."""
    n = rnd.randint(0, 4)
    tensors = []
    for _ in range(n):
        dtype = rnd.choice(DTYPES) if rnd.random() < 0.93 else rnd.choice(BAD_DTYPES)
        shape = [rnd.choice(DIMS) for _ in range(rnd.randint(0, 3))]
        if isinstance(dtype, str) and dtype.startswith("F4") and shape and rnd.random() < 0.7:
            shape[-1] = 2 * (shape[-1] // 2)  # mostly even, as real F4 tensors are
        tensors.append([rnd.choice(NAMES), dtype, shape])
    names = set()
    for t in tensors:  # unique names unless a mutation repeats one
        while t[0] in names:
            t[0] += "_"
        names.add(t[0])
    # lay out the data in a random order, contiguous from 0
    order = list(range(n))
    rnd.shuffle(order)
    offsets, pos = {}, 0
    for i in order:
        name, dtype, shape = tensors[i]
        size = _size(dtype if isinstance(dtype, str) else "F32", shape)
        offsets[i] = [pos, pos + size]
        pos += size
    entries = [[name, Obj([("dtype", dtype), ("shape", shape), ("data_offsets", offsets[i])])]
               for i, (name, dtype, shape) in enumerate(tensors)]
    top = Obj([])
    if rnd.random() < 0.3:
        top.pairs.append(("__metadata__", Obj([("format", "pt")])))
    top.pairs.extend((name, e) for name, e in entries)
    data_len = pos
    tail = b""
    head_pre, head_post, length_delta, truncate, flips = "", "", 0, 0, []

    for m in rnd.sample(MUTATIONS, rnd.choice([0, 0, 1, 1, 1, 2, 2, 3])):
        pick = rnd.choice(entries) if entries else None
        e = pick[1] if pick else None
        fields = dict(e.pairs) if e is not None and isinstance(e, Obj) else None
        if m == "offset" and fields:
            offs = _as_list(fields.get("data_offsets"), [0, 0])
            if len(offs) == 2 and all(type(o) is int for o in offs):
                offs[rnd.randint(0, 1)] += rnd.choice([-9, -4, -1, 1, 2, 4, 8])
                e.pairs = [(k, offs if k == "data_offsets" else v) for k, v in e.pairs]
        elif m == "offset_type" and fields:
            offs = _as_list(fields.get("data_offsets"), [0, 0])
            if offs:
                offs[rnd.randrange(len(offs))] = rnd.choice(ODD + HUGE)
            e.pairs = [(k, offs if k == "data_offsets" else v) for k, v in e.pairs]
        elif m == "offsets_len" and fields:
            offs = _as_list(fields.get("data_offsets"), [0, 0])
            offs = offs[:1] if rnd.random() < 0.5 else offs + [offs[-1] if offs else 0]
            e.pairs = [(k, offs if k == "data_offsets" else v) for k, v in e.pairs]
        elif m in ("shape_type", "huge_dim") and fields:
            shape = _as_list(fields.get("shape"), [])
            value = rnd.choice(ODD) if m == "shape_type" else rnd.choice(HUGE)
            if shape and rnd.random() < 0.7:
                shape[rnd.randrange(len(shape))] = value
            else:
                shape.insert(rnd.randint(0, len(shape)), value)
            if m == "huge_dim" and rnd.random() < 0.5:
                shape.append(0)  # a zero-sized tensor with a huge dimension: valid unless it overflows
            e.pairs = [(k, shape if k == "shape" else v) for k, v in e.pairs]
        elif m == "shape_not_list" and fields:
            bad = rnd.choice(["2", Obj([]), None, 3])
            e.pairs = [(k, bad if k == "shape" else v) for k, v in e.pairs]
        elif m == "dtype_form" and fields:
            d = fields.get("dtype")
            d = d if isinstance(d, str) else "F32"
            form = rnd.choice([Obj([(d, None)]), Obj([(d, 1)]), Obj([(d, None), ("F16", None)]),
                               Obj([(d, None), (d, None)]), Obj([]), [d], None, d.lower(), 1])
            e.pairs = [(k, form if k == "dtype" else v) for k, v in e.pairs]
        elif m == "entry_list" and fields:
            values = [fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")]
            values = rnd.choice([values, values[:2], values + [0], values[::-1]])
            pick[1] = values
            top.pairs = [(k, values if v is e else v) for k, v in top.pairs]
        elif m == "extra_field" and fields is not None:
            e.pairs.insert(rnd.randint(0, len(e.pairs)), (rnd.choice(["z", "dtypes", ""]), rnd.choice(IGNORED)))
        elif m == "dup_field" and fields:
            k = rnd.choice(list(fields))
            e.pairs.append((k, fields[k]))
        elif m == "missing_field" and fields:
            k = rnd.choice(list(fields))
            e.pairs = [(kk, v) for kk, v in e.pairs if kk != k]
        elif m == "dup_tensor" and pick:
            other = rnd.choice(entries)[1]
            top.pairs.insert(rnd.randint(0, len(top.pairs)), (pick[0], other))
        elif m == "metadata":
            value = rnd.choice([None, Obj([("a", "b"), ("a", "c")]), Obj([("a", 1)]), [], "x",
                                Obj([("a", Obj([]))]), Obj([]), Obj([("", "")])])
            top.pairs.insert(rnd.randint(0, len(top.pairs)), ("__metadata__", value))
        elif m == "entry_not_obj" and pick:
            bad = rnd.choice([None, 1, "x", [], Obj([])])
            top.pairs = [(k, bad if v is e else v) for k, v in top.pairs]
        elif m == "top_not_obj":
            top = rnd.choice([[], "x", None, Raw("[{}]")])
            break
        elif m == "ws":
            head_pre = rnd.choice(["", " ", "\n\t", "\ufeff", "\x00"])
            head_post = rnd.choice(["", "  ", "\r\n", "\x00\x00", " " * 7, "\f"])
        elif m == "trailing":
            tail = rnd.choice([b"\0", b"xyz", bytes(8)])
        elif m == "truncate":
            truncate = rnd.choice([1, 2, 7, 64])
        elif m == "length_field":
            length_delta = rnd.choice([-3, -1, 1, 2, 10**8, 2**63])
        elif m == "flip":
            flips.append((rnd.random(), rnd.randrange(256)))
        elif m == "deep" and fields is not None:
            depth = rnd.choice([120, 124, 125, 126, 127, 130])
            e.pairs.append(("deep", Raw("[" * depth + "]" * depth)))
        elif m == "surrogate_key" and pick:
            key = Raw(rnd.choice(['"\\ud800"', '"\\udfff"', '"\\ud83d\\ude00"', '"a\\u0000"']))
            top.pairs = [(key if v is e else k, v) for k, v in top.pairs]
        elif m == "odd_tail" and fields:
            shape = _as_list(fields.get("shape"), [])
            if isinstance(fields.get("dtype"), str) and fields["dtype"] in ("F4", "F6_E2M3", "F6_E3M2"):
                shape = shape + [rnd.choice([1, 3])]
                e.pairs = [(k, shape if k == "shape" else v) for k, v in e.pairs]

    header = (head_pre + dumps(top) + head_post).encode("utf-8", "surrogatepass")
    for where, byte in flips:
        if header:
            i = int(where * len(header))
            header = header[:i] + bytes([byte]) + header[i + 1:]
    data = rnd.randbytes(min(data_len, 1 << 16))
    n = len(header) + length_delta
    raw = struct.pack("<Q", max(0, n) % (1 << 64)) + header + data + tail
    if truncate:
        raw = raw[:max(0, len(raw) - truncate)]
    return raw


def _bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes; for bool its truth values (the package turns a stored 0x8b into
    True = 0x01, fastmerge keeps the byte, which torch also reads as True)."""
    if not t.numel():
        return b""
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    return bytes((raw != 0).to(torch.uint8).numpy()) if t.dtype == torch.bool else bytes(raw.numpy())


def _package_reads(path):
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - SafetensorError, or torch refusing the shape: rejected
        return None


def _fastmerge_reads(folder):
    try:
        ck = sio.Checkpoint(folder)
    except sio.FormatError:
        return None
    try:
        out = {}
        for name, e in ck.entries.items():
            buf = torch.empty(max(e.nbytes, 1), dtype=torch.uint8)
            read = ck.read(name, buf)
            mapped = ck.tensor(name)
            assert (read.dtype, read.shape) == (mapped.dtype, mapped.shape), name
            assert _bytes(read) == _bytes(mapped), name
            out[name] = read.clone()
        return out
    finally:
        ck.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tmpfs folder where there is one (thousands of small writes), else pytest's."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        path = tempfile.mkdtemp(prefix="fastmerge-fuzz-", dir="/dev/shm")
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield str(tmp_path_factory.mktemp("fuzz"))


def _compare(folder: str, raw: bytes):
    """Write ``raw`` as the folder's model.safetensors; assert both readers agree on it.
    Returns whether the package accepted it."""
    path = os.path.join(folder, "model.safetensors")
    with open(path, "wb") as f:
        f.write(raw)
    want = _package_reads(path)
    got = _fastmerge_reads(folder)
    assert (got is None) == (want is None), (
        f"safetensors {'accepts' if want is not None else 'rejects'} what fastmerge "
        f"{'accepts' if got is not None else 'rejects'}: {raw[:600]!r}")
    if want is not None:
        assert got.keys() == want.keys()
        for name, w in want.items():
            g = got[name]
            assert g.dtype == w.dtype and g.shape == w.shape, name
            assert _bytes(g) == _bytes(w), name
    return want


# Hypothesis draws one seed per example and the file generator runs on random.Random(seed):
# one draw instead of dozens keeps Hypothesis's per-choice bookkeeping (about 1 ms a choice on
# a small CI machine) out of the way, so 2,500 files take a few seconds. A failure prints the
# seed (Hypothesis) and the file's bytes (the assertion).
PER_EXAMPLE = 10
SEEDS = settings(max_examples=EXAMPLES // PER_EXAMPLE, derandomize=True, deadline=None,
                 database=None, suppress_health_check=list(HealthCheck))


@SEEDS
@given(seed=st.integers(0, 2**64 - 1))
def test_reader_accepts_exactly_what_safetensors_accepts(folder, seed):
    rnd = random.Random(seed)
    for _ in range(PER_EXAMPLE):
        _compare(folder, make_file(rnd))


def test_the_generator_covers_both_outcomes(folder):
    """The comparison is only worth something if both outcomes occur often: of 500 files, many
    the package accepts (some with non-empty tensors) and many it rejects."""
    seen = {"accepted": 0, "with_data": 0, "rejected": 0}
    rnd = random.Random(0)
    for _ in range(500):
        got = _compare(folder, make_file(rnd))
        seen["rejected" if got is None else "accepted"] += 1
        seen["with_data"] += bool(got) and any(t.numel() for t in got.values())
    assert seen["accepted"] >= 100 and seen["rejected"] >= 100 and seen["with_data"] >= 50, seen
