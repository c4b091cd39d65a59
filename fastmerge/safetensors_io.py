"""Streaming safetensors I/O for ``fastmerge merge``: zero-copy reads, offset writes.

Why not ``safetensors.safe_open`` / ``save_file``: a merge reads K+1 checkpoints once, tensor by
tensor, and must not hold them. :meth:`Checkpoint.read` ``pread``s a tensor into a buffer the
caller reuses (on a reader thread, overlapping the merge of the previous tensor), after
:meth:`Checkpoint.prefetch` asked the kernel to fetch it (``POSIX_FADV_WILLNEED``); so the
resident set stays at a few tensors however large the model. (Mapped tensors, from
:meth:`Checkpoint.tensor`, cost a page fault per 4 KiB on first touch: a 1.1B-parameter bf16
TIES merge on 2 cores took 120 s on mapped inputs, 40 s with ``pread`` under the same load;
they serve one-off passes, with :meth:`Checkpoint.release`
dropping their pages after use.) Writing lays out every shard's header up front (shapes and
dtypes are known before any tensor is merged) and ``pwrite``s each tensor at its offset as soon
as it exists, so nothing waits for a whole shard and several processes can fill the same files.
The files are plain safetensors (checked against the ``safetensors`` package in the tests).

Reading trusts nothing in a file: every header is validated as the ``safetensors`` package
validates it (:func:`parse_header`; a differential fuzz test holds the two together), every
path an index names must stay inside its model folder (:func:`confined`), and an index must
agree with its shards. Errors name the file and never quote its bytes.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

# The safetensors format's dtypes and their widths in bits, as the ``safetensors`` package
# (0.8) knows them; the torch dtype each one loads as, where torch has one (``F6_*`` have none:
# the package's own ``safe_open`` rejects them when a tensor is read, and so does fastmerge).
FORMAT_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
_TORCH_NAMES = {
    "BOOL": "bool", "F4": "float4_e2m1fn_x2", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "C64": "complex64",
    "F64": "float64", "I64": "int64", "U64": "uint64",
}
DTYPES = {k: getattr(torch, v) for k, v in _TORCH_NAMES.items() if hasattr(torch, v)}
NAMES = {v: k for k, v in DTYPES.items()}
# F4 packs two 4-bit values per byte: torch holds it as float4_e2m1fn_x2 with the last dimension
# halved (the header counts 4-bit elements), as safetensors' own loader does
PACKED = {DTYPES[k] for k in ("F4",) if k in DTYPES}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the safetensors package's limit on the JSON header
_MAX_DEPTH = 127  # serde_json's nesting limit, which the package inherits
_U64 = (1 << 64) - 1
_PAGE = mmap.PAGESIZE


class FormatError(ValueError):
    """A file that is not valid safetensors, an index that does not match its shards, or a
    folder without weights. The message names the file and never quotes its bytes."""


@dataclass(frozen=True)
class Entry:
    file: str
    dtype: torch.dtype
    shape: Tuple[int, ...]  # torch's shape (F4: the last dimension counts byte pairs)
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ------------------------------------------------------------------ header validation
#
# The header is parsed with Python's json module and then held to what the ``safetensors``
# package (serde_json + its Metadata::validate) accepts, which differs from plain json.loads:
# no NaN/Infinity, no number that overflows a double, no lone surrogate, nesting <= 127, a
# duplicate field inside a tensor entry or a second ``__metadata__`` is an error (a duplicate
# tensor name is not: the last one wins, but every one must be valid), unknown fields inside a
# tensor entry are ignored, an entry may also be the 3-element list [dtype, shape, offsets],
# a dtype may be the one-key map {"F32": null}. tests/test_safetensors_fuzz.py holds this
# against the package on generated and mutated headers.

class _Invalid(Exception):
    pass


class _Obj(list):
    """A JSON object as its list of (key, value) pairs, in order, duplicates kept."""

    __slots__ = ()


class _Negative:
    """A negative integer literal (serde reads ``-0`` as a float): never a valid size."""


_NEGATIVE = _Negative()


def _int(text: str):
    if not text.startswith("-"):
        return int(text)
    if not _number_ok(int(text)):
        raise _Invalid("header holds a number out of range")
    return _NEGATIVE


def _constant(text: str):
    raise _Invalid("header is not valid JSON (NaN or Infinity)")


# Python's json turns ``-0`` into the integer 0, serde_json into a float (never a size): a
# header with ``-0`` outside a string takes the slower decoder that marks negative literals.
_DECODER = json.JSONDecoder(object_pairs_hook=_Obj, parse_constant=_constant)
_NEG_DECODER = json.JSONDecoder(object_pairs_hook=_Obj, parse_constant=_constant, parse_int=_int)
_NEG_ZERO = re.compile(r"-0(?![0-9.eE])")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_FIELDS = ("dtype", "shape", "data_offsets")


def _number_ok(v) -> bool:
    """serde_json reads every number as u64, i64 or a double; past a double's range it fails."""
    if type(v) is float:
        return not math.isinf(v)
    if type(v) is int and not -_U64 <= v <= _U64:
        try:
            float(v)
        except OverflowError:
            return False
    return True


def _ignored_ok(v, room: int) -> bool:
    """An unknown field's value, which serde skips: still valid JSON to it, nested at most
    ``room`` levels deep."""
    if type(v) is _Obj:
        return room > 0 and all(_ignored_ok(x, room - 1) for _, x in v)
    if type(v) is list:
        return room > 0 and all(_ignored_ok(x, room - 1) for x in v)
    return _number_ok(v)


def _has_lone_surrogate(value) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if type(v) is str:
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif type(v) is list:
            stack.extend(v)
        elif type(v) is _Obj:
            for k, x in v:
                stack.append(k)
                stack.append(x)
    return False


def _usize(v) -> bool:
    return type(v) is int and 0 <= v <= _U64


def _dtype_name(v, tensor: str) -> str:
    if type(v) is _Obj and len(v) == 1 and v[0][1] is None:
        v = v[0][0]  # serde's externally tagged form of a unit variant: {"F32": null}
    if type(v) is not str or v not in FORMAT_BITS:
        raise _Invalid(f"tensor {_short(tensor)} has an unknown dtype")
    return v


def _tensor_info(v, tensor: str) -> Tuple[str, List[int], int, int]:
    if type(v) is _Obj:
        if len(v) == 3 and v[0][0] == "dtype" and v[1][0] == "shape" and v[2][0] == "data_offsets":
            (_, dtype), (_, shape), (_, offsets) = v  # the usual entry, as writers write it
        else:
            fields: dict = {}
            for k, x in v:
                if k in _FIELDS:
                    if k in fields:
                        raise _Invalid(f"tensor {_short(tensor)} has two {k!r} fields")
                    fields[k] = x
                elif not _ignored_ok(x, _MAX_DEPTH - 2):
                    raise _Invalid(f"tensor {_short(tensor)}: an unknown field nests deeper "
                                   "than 127 levels or holds a number out of range")
            missing = [k for k in _FIELDS if k not in fields]
            if missing:
                raise _Invalid(f"tensor {_short(tensor)} has no {missing[0]!r}")
            dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    elif type(v) is list and len(v) == 3:
        dtype, shape, offsets = v
    else:
        raise _Invalid(f"tensor {_short(tensor)} is not a {{dtype, shape, data_offsets}} entry")
    name = _dtype_name(dtype, tensor)
    if type(shape) is not list or not all(_usize(d) for d in shape):
        raise _Invalid(f"tensor {_short(tensor)}: shape is not a list of non-negative integers")
    if type(offsets) is not list or len(offsets) != 2 or not (_usize(offsets[0]) and _usize(offsets[1])):
        raise _Invalid(f"tensor {_short(tensor)}: data_offsets is not a [begin, end] pair of "
                       "non-negative integers")
    return name, shape, offsets[0], offsets[1]


def _short(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:77] + "...")


def parse_header(text: bytes) -> Tuple[Dict[str, Tuple[str, List[int], Tuple[int, int]]], int]:
    """Validate a safetensors JSON header (the bytes after the 8-byte length) the way the
    ``safetensors`` package does. Returns ``({name: (dtype name, shape, (begin, end))}, data
    bytes)``: offsets relative to the data section, which must be exactly ``data bytes`` long.
    Raises :class:`FormatError` (without a file name) when the package would refuse it."""
    try:
        return _parse_header(text)
    except _Invalid as exc:
        raise FormatError(str(exc)) from None


def _parse_header(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid("header is not UTF-8") from None
    try:
        top = (_NEG_DECODER if _NEG_ZERO.search(text) else _DECODER).decode(text)
    except json.JSONDecodeError as exc:
        raise _Invalid(f"header is not valid JSON (line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise _Invalid("header nests deeper than 127 levels") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(top):
        raise _Invalid("header holds an invalid \\u escape (a lone surrogate)")
    if type(top) is not _Obj:
        raise _Invalid("header is not a JSON object")
    tensors: dict = {}
    seen_metadata = False
    for key, value in top:
        if key == "__metadata__":
            if seen_metadata:
                raise _Invalid("header has two __metadata__ entries")
            seen_metadata = True
            if value is not None and not (type(value) is _Obj and all(type(x) is str for _, x in value)):
                raise _Invalid("__metadata__ is not a map of strings to strings")
            continue
        tensors[key] = _tensor_info(value, key)  # a repeated name: the last one counts
    end = 0
    for b, e, name in sorted((b, e, name) for name, (_, _, b, e) in tensors.items()):
        if b != end or e < b:
            raise _Invalid(f"tensor {_short(name)}: data_offsets are not contiguous from 0 "
                           "(out of order, overlapping or leaving a gap)")
        end = e
        dtype, shape = tensors[name][:2]
        n = 1
        for d in shape:  # in order, as the package multiplies, overflow included
            n *= d
            if n > _U64:
                raise _Invalid(f"tensor {_short(name)}: its shape's size overflows")
        bits = n * FORMAT_BITS[dtype]
        if bits > _U64:
            raise _Invalid(f"tensor {_short(name)}: its shape's size overflows")
        if bits % 8:
            raise _Invalid(f"tensor {_short(name)}: {dtype} elements do not fill whole bytes")
        if e - b != bits // 8:
            raise _Invalid(f"tensor {_short(name)}: data_offsets do not span shape x dtype size")
    return {name: (dtype, shape, (b, e)) for name, (dtype, shape, b, e) in tensors.items()}, end


def read_entries(path: str) -> Dict[str, Entry]:
    """Every tensor of the safetensors file ``path`` after validating its header against the
    file: the same files the ``safetensors`` package opens, the same tensors it reads."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{path}: not a safetensors file (shorter than the 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise FormatError(f"{path}: not a safetensors file (its header length field is over "
                              f"the format's {MAX_HEADER_BYTES // 10**6} MB limit)")
        if n > size - 8:
            raise FormatError(f"{path}: not a safetensors file, or truncated (its header length "
                              f"field runs past the end of the {size}-byte file)")
        text = f.read(n)
    if len(text) != n:
        raise FormatError(f"{path}: truncated while reading its header")
    try:
        tensors, data = parse_header(text)
    except FormatError as exc:
        raise FormatError(f"{path}: not a valid safetensors file: {exc}") from None
    start = 8 + n
    if start + data > size:
        raise FormatError(f"{path}: truncated (its tensors need {start + data - size} bytes more "
                          "than the file has)")
    if start + data < size:
        raise FormatError(f"{path}: not a valid safetensors file ({size - start - data} bytes "
                          "after its last tensor; the format has the data end the file)")
    out = {}
    for name, (dtype, shape, (b, e)) in tensors.items():
        dt = DTYPES.get(dtype)
        if dt is None:
            raise FormatError(f"{path}: tensor {_short(name)} is {dtype}, which torch cannot hold")
        if dt in PACKED:
            if not shape or shape[-1] % 2:
                raise FormatError(f"{path}: tensor {_short(name)} is {dtype} with an odd last "
                                  "dimension (two values share a byte)")
            shape = shape[:-1] + [shape[-1] // 2]
        if e == b:
            try:  # what the package's loader does; torch refuses some huge empty shapes
                empty(dt, shape)
            except (RuntimeError, ValueError, TypeError, OverflowError):
                raise FormatError(f"{path}: tensor {_short(name)} has a shape torch cannot "
                                  "hold") from None
        out[name] = Entry(path, dt, tuple(shape), start + b, start + e)
    return out


def empty(dtype: torch.dtype, shape) -> torch.Tensor:
    """An empty tensor of ``shape``, made as the ``safetensors`` package makes one (a 0-byte
    buffer viewed and reshaped), so that fastmerge accepts the same empty shapes."""
    return torch.empty(0, dtype=torch.uint8).view(dtype).reshape(tuple(shape))


def _read_json(path: str, what: str):
    """A small JSON file (an index): duplicate keys are errors; the message never quotes it."""
    def pairs(items):
        d = {}
        for k, v in items:
            if k in d:
                raise FormatError(f"{path}: {what} names {_short(k)} twice")
            d[k] = v
        return d

    try:
        with open(path, "rb") as f:
            text = f.read(MAX_HEADER_BYTES + 1)
        if len(text) > MAX_HEADER_BYTES:
            raise FormatError(f"{path}: {what} is over {MAX_HEADER_BYTES // 10**6} MB")
        return json.loads(text.decode("utf-8"), object_pairs_hook=pairs)
    except UnicodeDecodeError:
        raise FormatError(f"{path}: {what} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: {what} is not valid JSON (line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise FormatError(f"{path}: {what} nests too deeply") from None


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` (resolved) is ``folder`` (resolved) or below it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def confined(folder: str, name: str, what: str) -> str:
    """``folder/name`` once it is sure to stay inside ``folder``: ``name`` is relative with no
    ``..``, and the file it resolves to (symlinks followed) lies inside ``folder``, or, for a
    Hugging Face cache snapshot (``.../snapshots/<revision>``), inside that repository's
    ``blobs`` folder, where the cache's own links point."""
    if (not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name)
            or ".." in name.replace("\\", "/").split("/")):
        raise FormatError(f"{what} names the path {_short(str(name))}, which is not a file "
                          f"name inside {folder}")
    path = os.path.join(folder, name)
    if inside(path, folder):
        return path
    real = os.path.realpath(folder)
    snapshots = os.path.dirname(real)
    if os.path.basename(snapshots) == "snapshots" and inside(
            path, os.path.join(os.path.dirname(snapshots), "blobs")):
        return path
    raise FormatError(f"{path} resolves to a file outside {folder} (a symlink); fastmerge "
                      "reads only files inside the model folders the config names")


def _index_map(index: str) -> Dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index, checked for shape (not for sense:
    :class:`Checkpoint` holds it against the shards)."""
    if not os.path.isfile(index):
        raise FormatError(f"{index} is not a file")
    data = _read_json(index, "the index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index}: not a safetensors index (it needs a \"weight_map\" from "
                          "tensor names to file names)")
    return weight_map


class Checkpoint:
    """A Hugging Face-style folder of safetensors weights (one file or an index with shards).

    Every file read is confined to ``folder`` (:func:`confined`), every header validated
    (:func:`read_entries`). A tensor name in two files is an error. With an index, the index
    and the shards must agree: every tensor the index maps is in its shard and every shard
    holds only the tensors mapped to it; ``trust_index=True`` reads as mergekit does instead,
    each tensor from the shard the index names, ignoring whatever else the shards hold."""

    def __init__(self, folder: str, trust_index: bool = False):
        self.folder = folder
        if not os.path.isdir(folder):
            raise FileNotFoundError(folder)
        index = os.path.join(folder, INDEX_NAME)
        weight_map = None
        if os.path.lexists(index):
            confined(folder, INDEX_NAME, folder)
            weight_map = _index_map(index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            others = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            hint = (f" (it has {', '.join(others[:3])}: convert to safetensors first, e.g. "
                    "`model.save_pretrained(out, safe_serialization=True)`)") if others else ""
            raise FormatError(f"no *.safetensors weights in {folder}{hint}")
        self.entries: Dict[str, Entry] = {}
        where: Dict[str, str] = {}
        for name in files:
            path = confined(folder, name, index if weight_map is not None else folder)
            if not os.path.isfile(path):
                raise FormatError(f"{index} names {name}, which is missing from {folder}"
                                  if weight_map is not None else f"{path} is not a file")
            for key, entry in read_entries(path).items():
                if weight_map is not None and weight_map.get(key) != name:
                    if trust_index:
                        continue
                    if key not in weight_map:
                        raise FormatError(f"{path} holds tensor {_short(key)}, which {index} "
                                          "does not list (pass --trust-index to ignore it)")
                    raise FormatError(f"tensor {_short(key)} is in {path} too, but {index} "
                                      f"maps it to {weight_map[key]} (pass --trust-index to "
                                      "read it from there only)")
                if key in where:
                    raise FormatError(f"tensor {_short(key)} is in both {where[key]} and {path}")
                where[key] = path
                self.entries[key] = entry
        if weight_map is not None:
            lost = [k for k in weight_map if k not in self.entries]
            if lost:
                more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
                raise FormatError(f"{index} maps tensor {_short(lost[0])}{more} to "
                                  f"{weight_map[lost[0]]}, which does not hold it")
        self._maps: Dict[str, mmap.mmap] = {}
        self._fds: Dict[str, int] = {}

    def names(self) -> List[str]:
        return list(self.entries)

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def _map(self, path: str) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            with open(path, "rb") as f:
                # ACCESS_COPY: private pages, so torch sees a writable buffer; nothing is ever
                # written, so nothing is ever copied
                m = self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return m

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``, backed by the mapped file (no copy; read lazily by the kernel)."""
        e = self.entries[name]
        if e.nbytes == 0:
            return empty(e.dtype, e.shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(self._map(e.file), dtype=e.dtype, count=e.numel, offset=e.begin)
        return flat.view(e.shape)

    def read(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read ``name`` into the start of the contiguous CPU buffer ``out`` (any dtype, at least
        the tensor's bytes) with ``pread``; returns the tensor as a view of ``out``. A copy from
        the page cache, with no page faults on the file and the GIL released, so a reader
        thread overlaps the merge (mapped pages cost a fault each on first touch)."""
        e = self.entries[name]
        raw = out.reshape(-1).view(torch.uint8)
        if raw.numel() < e.nbytes:
            raise ValueError(f"{name}: buffer of {raw.numel()} bytes for {e.nbytes}")
        raw = raw[: e.nbytes]
        fd = self._fd(e.file)
        view, pos = memoryview(raw.numpy()) if e.nbytes else memoryview(b""), e.begin
        while view.nbytes:
            n = os.preadv(fd, [view[: 1 << 30]], pos)
            if n <= 0:
                raise FormatError(f"{e.file}: truncated (tensor {name!r} ends past the end of the file)")
            view, pos = view[n:], pos + n
        return raw.view(e.dtype).view(e.shape) if e.nbytes else empty(e.dtype, e.shape)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading ``name``'s bytes into the page cache."""
        e = self.entries[name]
        if e.nbytes and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd(e.file), e.begin, e.nbytes, os.POSIX_FADV_WILLNEED)

    def _advise(self, name: str, advice: int) -> None:
        e = self.entries[name]
        if e.nbytes == 0 or not hasattr(mmap.mmap, "madvise"):
            return
        start = e.begin - e.begin % _PAGE
        try:
            self._map(e.file).madvise(advice, start, e.end - start)
        except (OSError, ValueError):  # advice is a hint; some filesystems refuse it
            pass

    def release(self, name: str) -> None:
        """Drop the mapped pages of :meth:`tensor` ``name`` from this process (they stay in the
        page cache), so a pass over mapped tensors does not grow the resident set."""
        self._advise(name, getattr(mmap, "MADV_DONTNEED", 4))

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a tensor still views it; the map goes when that tensor does
                pass
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# ------------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class Spec:
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Layout:
    """Where every output tensor goes: ``files[i] = (file name, header bytes, data bytes)`` and
    ``place[name] = (file index, absolute offset, nbytes)``. A pure function of the specs and
    the shard size, so every process of a distributed merge computes the same layout."""

    files: List[Tuple[str, bytes, int]]
    place: Dict[str, Tuple[int, int, int]]

    @property
    def total_bytes(self) -> int:
        return sum(len(h) + n for _, h, n in self.files)

    def index(self) -> Optional[dict]:
        if len(self.files) == 1:
            return None
        return {"metadata": {"total_size": sum(n for _, _, n in self.files)},
                "weight_map": {name: self.files[i][0] for name, (i, _, _) in self.place.items()}}


def _header(specs: Sequence[Spec], metadata: Optional[dict]) -> Tuple[bytes, List[int]]:
    h: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets, pos = [], 0
    for s in specs:
        shape = list(s.shape)
        if s.dtype in PACKED:  # the header counts 4-bit elements
            shape[-1] *= 2
        h[s.name] = {"dtype": NAMES[s.dtype], "shape": shape, "data_offsets": [pos, pos + s.nbytes]}
        offsets.append(pos)
        pos += s.nbytes
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw, offsets


def plan_layout(specs: Iterable[Spec], max_shard_bytes: int, metadata: Optional[dict] = None) -> Layout:
    """Split ``specs`` (in order) into shards of at most ``max_shard_bytes`` of tensor data (a
    tensor larger than that gets a shard of its own), named as ``transformers`` names them."""
    groups: List[List[Spec]] = [[]]
    size = 0
    for s in specs:
        if groups[-1] and size + s.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    n = len(groups)
    files, place = [], {}
    for i, group in enumerate(groups):
        fname = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, offsets = _header(group, metadata)
        files.append((fname, header, sum(s.nbytes for s in group)))
        for s, off in zip(group, offsets):
            place[s.name] = (i, len(header) + off, s.nbytes)
    return Layout(files, place)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order (a view when it is contiguous on the CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class Writer:
    """Fills the files of a :class:`Layout` inside ``folder``. ``create()`` (one process)
    writes every header and sizes every file; then any process may ``write()`` any tensor."""

    def __init__(self, folder: str, layout: Layout):
        self.folder, self.layout = folder, layout
        self._fds: Dict[int, int] = {}

    def create(self) -> None:
        for fname, header, nbytes in self.layout.files:
            path = os.path.join(self.folder, fname)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _pwrite_all(fd, memoryview(header), 0)
                os.ftruncate(fd, len(header) + nbytes)
            finally:
                os.close(fd)
        index = self.layout.index()
        if index is not None:
            with open(os.path.join(self.folder, INDEX_NAME), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")

    def write(self, name: str, t: torch.Tensor) -> int:
        i, offset, nbytes = self.layout.place[name]
        data = tensor_bytes(t)
        if data.nbytes != nbytes:
            raise ValueError(f"{name}: {data.nbytes} bytes to write, the layout has room for {nbytes}")
        fd = self._fds.get(i)
        if fd is None:
            fd = self._fds[i] = os.open(os.path.join(self.folder, self.layout.files[i][0]), os.O_WRONLY)
        _pwrite_all(fd, data, offset)
        return nbytes

    def close(self, sync: bool = True) -> None:
        for fd in self._fds.values():
            if sync:
                os.fsync(fd)
            os.close(fd)
        self._fds.clear()


def save_file(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """One safetensors file of ``tensors`` (in this order) at ``path`` (a side file next to a
    merged model, such as EMR's masks): the header :func:`plan_layout` writes, then the data."""
    specs = [Spec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    header, _ = _header(specs, metadata)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, memoryview(header), 0)
        pos = len(header)
        for t in tensors.values():
            data = tensor_bytes(t)
            _pwrite_all(fd, data, pos)
            pos += data.nbytes
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while data.nbytes:
        n = os.pwrite(fd, data[: 1 << 30], offset)  # Linux writes at most ~2 GiB per call
        data, offset = data[n:], offset + n
