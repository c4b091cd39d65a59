"""``fastmerge merge CONFIG OUT``: merge whole checkpoints tensor by tensor, streaming.

One pass over the inputs. Per tensor: a reader thread ``pread``s the next tensor's K+1 inputs
into reused buffers (the kernel was asked to fetch the ones after it already) while this one
merges on the fused kernel, and a writer thread ``pwrite``s each result at its place in the
output shard while the next one merges. On a GPU the buffers are pinned and the copies to the
device run on a side stream.

Several processes (``torchrun --nproc-per-node=N -m fastmerge merge CONFIG OUT``, on one machine
or several sharing OUT's filesystem) split the tensors by size; every process computes the same
output layout, so each writes its tensors straight into the shared shard files and rank 0
writes the index, config and tokenizer: the bytes are those of a one-process run.

The output is atomic: everything is written to a hidden folder next to OUT, and that folder
becomes OUT only when every tensor is on disk (one ``renameat2(RENAME_EXCHANGE)`` where the
filesystem has it). An interrupted (SIGINT, SIGTERM, SIGHUP) or failed run leaves OUT as it was
and removes its folder; a SIGKILLed one leaves it, and the next run names it. OUT is never an
input, never holds one, never lies inside one, and is never the working directory or the
config's folder. See "Safety guarantees" in the README.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import heapq
import json
import math
import os
import queue
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _semantics as sem
from . import adapters, api, card, dispatch, hub, lowrank, research
from .regmean import regmean as _regmean
from .methods import pcb as _pcb
from .methods.pcb import ranks as _pcb_ranks
from . import layers
from . import mergeconfig as mc
from . import vocab as vocab_
from .backends._host import key_float
from .safetensors_io import PACKED, Checkpoint, FormatError, Spec, Writer, confined, plan_layout, save_file

COPY_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "vocab.txt", "chat_template.jinja", "chat_template.json")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class MergeError(RuntimeError):
    """A merge that cannot run or finish; the message is meant for the user as is."""


class Interrupted(MergeError):
    """SIGINT, SIGTERM or SIGHUP stopped the run; ``code`` is the shell's ``128 + signal``."""

    def __init__(self, signum: int, committed: bool):
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} after OUT was complete: OUT holds the new merge"
                         if committed else f"interrupted by {name}: OUT was left as it was and "
                         "the temporary folder removed")
        self.code = 128 + signum


@dataclass
class Options:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    backend: Optional[str] = None
    max_shard_bytes: int = 5 * 10**9
    seed: int = 0
    topk_scope: Optional[str] = None  # overrides the config's
    overwrite: bool = False
    copy_tokenizer: bool = True
    progress: bool = True
    read_ahead: int = 2
    drop_extra_tensors: bool = False  # mergekit's way: tensors the base lacks are left out
    trust_index: bool = False  # mergekit's way: an index decides, whatever else the shards hold
    trust_remote_code: bool = False  # mergekit's --trust-remote-code: for loading tokenizers
    write_model_card: bool = True  # README.md, as mergekit-yaml writes it
    allow_crimes: bool = False  # mergekit's --allow-crimes: merge models of other architectures
    shard_params: Optional[int] = None  # mergekit's --out-shard-size: parameters per shard


@dataclass
class Job:
    name: str
    shape: tuple
    dtype: torch.dtype  # working dtype the inputs are read as
    out_dtype: torch.dtype
    kind: str  # merge | copy
    kwargs: Dict[str, Any] = field(default_factory=dict)
    in_bytes: int = 0
    # the inputs: (checkpoint index in the merger's pool, tensor name there), the base first
    # when has_base; a copy job reads srcs[0]
    srcs: List[Tuple[int, str]] = field(default_factory=list)
    has_base: bool = False
    # a vocabulary tensor whose rows are aligned to the output tokenizer (fastmerge.vocab)
    # before the merge; vocab_base: the config's base model folder (its rows are preferred)
    vocab: bool = False
    vocab_base: Optional[str] = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_seed(seed: int, name: str) -> int:
    """The Philox seed of one tensor: a hash of the run's seed and the tensor's name, so that
    the result never depends on the order or the process a tensor is merged in."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest(), "little")


# ------------------------------------------------------------------------- processes

class Group:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 without one)."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.dist = None
        self.coll_device = torch.device("cpu")
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.dist = dist
            if device.type == "cuda":
                self.coll_device = device

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist is None:
            return t
        x = t.to(self.coll_device)
        self.dist.all_reduce(x)
        return x.to(t.device)

    def all_ok(self, ok: bool) -> bool:
        """True when every process reports ok (a barrier too)."""
        if self.dist is None:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        return int(self.sum_(flag)) == 0

    def close(self) -> None:
        if self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()


def assign(jobs: List[Job], world: int) -> List[int]:
    """Rank of each job: largest first onto the least-loaded rank (ties: lowest rank)."""
    owner = [0] * len(jobs)
    heap = [(0, r) for r in range(world)]
    for i in sorted(range(len(jobs)), key=lambda i: (-jobs[i].in_bytes, i)):
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + jobs[i].in_bytes + 1, r))
    return owner


# ------------------------------------------------------------------------------ plan

def local_refs(cfg: mc.MergeConfig) -> mc.MergeConfig:
    """``cfg`` with every model reference it reads as a local folder: hub ids (``org/name``,
    ``@revision``) resolved through the hub cache, downloading only the files a merge needs
    (:mod:`fastmerge.hub`). An unused ``base_model`` (``linear``) is not fetched."""
    found: dict = {}

    def local(ref: str, role: str) -> str:
        if ref not in found:
            parts = adapters.split(ref)
            found[ref] = (hub.local_path(ref, role) if parts is None else
                          f"{hub.local_path(parts[0], role + ' (model)')}+{hub.local_path(parts[1], role + ' (lora)')}")
        return found[ref]

    wants_base = cfg.uses_base or (cfg.slices and cfg.base) or cfg.tokenizer_source is not None
    base = local(cfg.base, "base_model") if wants_base and cfg.base is not None else cfg.base
    models = [dataclasses.replace(m, path=local(m.path, f"models[{i}]")) for i, m in enumerate(cfg.models)]
    slices = [dataclasses.replace(
        sl, base=None if sl.base is None else local(sl.base, f"slices[{i}].base_model"),
        sources=[dataclasses.replace(m, path=local(m.path, f"slices[{i}].sources[{j}]"))
                 for j, m in enumerate(sl.sources)]) for i, sl in enumerate(cfg.slices)]
    tok = cfg.tokenizer_source
    if tok not in (None, "base", "union"):
        tok = local(tok, "tokenizer_source")
    tokens = {t: e if e.model is None else dataclasses.replace(e, model=local(e.model, f"tokenizer.tokens[{t!r}]"))
              for t, e in cfg.tokens.items()}
    return dataclasses.replace(cfg, base=base, models=models, slices=slices, tokenizer_source=tok,
                               tokens=tokens)


def _aliases(out: torch.Tensor, inputs: List[torch.Tensor]) -> bool:
    """Whether ``out`` shares memory with one of ``inputs``."""
    ptr = out.untyped_storage().data_ptr()
    return any(x.untyped_storage().data_ptr() == ptr for x in inputs)


def _model_folder(path: str) -> str:
    """The model's folder of a reference (of ``model+lora``: the model's)."""
    parts = adapters.split(path)
    return path if parts is None else parts[0]


def model_key(path: str) -> str:
    """The model folder of a reference, absolute: one key per model for its vocabulary."""
    return os.path.abspath(_model_folder(path))


def _open(path: str, role: str, trust_index: bool = False) -> Checkpoint:
    """The checkpoint at ``path``; a ``model+lora`` path: the model read through the adapter."""
    parts = adapters.split(path)
    try:
        if parts is None:
            ck = Checkpoint(path, trust_index=trust_index)
        else:
            ck = adapters.LoraCheckpoint(Checkpoint(parts[0], trust_index=trust_index), parts[1])
        ck.folder_key = model_key(path)  # the model whose tokenizer its vocabulary rows follow
        return ck
    except FileNotFoundError as exc:
        raise MergeError(f"{role} not found: {exc.filename or exc.args[0] if exc.args else path}") from None
    except (FormatError, adapters.AdapterError) as exc:
        raise MergeError(f"{role}: {exc}") from None


def _some(names: List[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def plan(cfg: mc.MergeConfig, base: Optional[Checkpoint], inputs: List[Checkpoint],
         labels: List[str], seed: int, drop_extra: bool = False, warn=None,
         vocab_rows: Optional[int] = None) -> List[Job]:
    """One job per tensor of the reference model (the base; for ``linear``, the first model).
    A tensor the reference has and another model lacks is an error; one another model has and
    the reference lacks is an error too, unless ``drop_extra`` (mergekit's behaviour: it
    writes the weights of the base model's architecture and nothing else)."""
    ref = base if base is not None else inputs[0]
    names = ref.names()
    known = set(names)
    everyone = ([base] if base is not None else []) + inputs
    who = (["base_model"] if base is not None else []) + labels
    dropped: set = set()
    for ck, label in zip(everyone, who):
        missing = [n for n in names if n not in ck.entries]
        if missing:
            raise MergeError(f"{label} ({ck.folder}) lacks tensor(s) {_some(missing)}")
        extra = [n for n in ck.names() if n not in known]
        if extra and not drop_extra:
            raise MergeError(f"{label} ({ck.folder}) has tensor(s) {_some(extra)} that {who[0]} "
                             "lacks; pass --drop-extra-tensors to leave them out of OUT, as "
                             "mergekit does")
        dropped.update(extra)
    if dropped and warn is not None:
        warn(f"left out {len(dropped)} tensor(s) that {who[0]} lacks (--drop-extra-tensors): "
             f"{_some(sorted(dropped))}")
    positions = mc.layer_positions(names)
    srcs = list(range(len(everyone)))
    return [_job(cfg, name, [(who[k], everyone[k], k, name) for k in srcs], base is not None,
                 positions[name], seed, vocab_rows=vocab_rows) for name in names]


def _job(cfg: mc.MergeConfig, name: str, inputs: list, has_base: bool, t: float, seed: int,
         sl: Optional[mc.Slice] = None, vocab_rows: Optional[int] = None) -> Job:
    """The job writing tensor ``name`` from ``inputs`` (label, checkpoint, pool index, tensor
    name), the base first when ``has_base``, its parameters at gradient position ``t`` (of
    slice ``sl``): shapes and dtypes checked, the working dtype chosen. ``vocab_rows``: the
    output vocabulary's size when the config builds one; a vocabulary tensor (embeddings,
    output head) then has that many rows, its inputs any number."""
    entries = [(label, ck.entries[n]) for label, ck, _, n in inputs]
    srcs = [(i, n) for _, _, i, n in inputs]
    e0 = entries[0][1]
    vocab = (vocab_rows is not None and layers.is_vocab(name) and len(e0.shape) >= 1
             and e0.dtype.is_floating_point)
    for label, e in entries:
        if (e.shape[1:] if vocab else e.shape) != (e0.shape[1:] if vocab else e0.shape):
            raise MergeError(f"shape mismatch for tensor {name}: {entries[0][0]} has {list(e0.shape)}, "
                             f"{label} has {list(e.shape)}")
    dtypes = {e.dtype for _, e in entries}
    in_bytes = sum(e.nbytes for _, e in entries)
    if dtypes & PACKED:
        raise MergeError(f"tensor {name} holds packed 4-bit values (F4): fastmerge cannot merge it")
    if not all(d.is_floating_point for d in dtypes):
        if len(dtypes) != 1:
            raise MergeError(f"dtype mismatch for tensor {name}: {sorted(map(str, dtypes))}")
        return Job(name, e0.shape, e0.dtype, e0.dtype, "copy", in_bytes=in_bytes, srcs=srcs[:1])
    if cfg.dtype is not None:
        dtype = cfg.dtype
    elif len(dtypes) == 1:
        dtype = dtypes.pop()
    else:
        raise MergeError(f"dtype mismatch for tensor {name}: the models hold "
                         f"{', '.join(sorted(str(d).replace('torch.', '') for d in dtypes))}; "
                         "set `dtype:` in the config to merge them in one dtype")
    if dtype not in _DTYPE_NAMES:
        raise MergeError(f"tensor {name} is {dtype}; fastmerge merges float32, float16 and "
                         "bfloat16: set `dtype: float32` (or bfloat16) in the config")
    try:
        shared, per_model = mc.resolve(cfg, name, t, sl)
    except mc.ConfigError as exc:
        raise MergeError(str(exc)) from None
    kwargs = mc.merge_kwargs(cfg, shared, per_model)
    # seeded: DARE/DELLA's masks and the SVD methods' sketches
    if (cfg.method in lowrank.METHODS
            or sem.MERGEKIT_METHODS.get(cfg.method, (None, None))[1] in ("random", "della")):
        kwargs["seed"] = tensor_seed(seed, name)
    shape = (vocab_rows, *e0.shape[1:]) if vocab else e0.shape
    base = (sl.base if sl is not None else None) or cfg.base
    return Job(name, tuple(shape), dtype, cfg.out_dtype or dtype, "merge", kwargs, in_bytes,
               srcs=srcs, has_base=has_base, vocab=vocab,
               vocab_base=None if not vocab or base is None else model_key(base))


def plan_slices(cfg: mc.MergeConfig, pool: List[Checkpoint], index: Dict[str, int],
                seed: int, vocab_rows: Optional[int] = None) -> Tuple[List[Job], int]:
    """The jobs of a ``slices`` config and its output layer count. ``pool``: the opened
    checkpoints, ``index``: folder -> position in ``pool``. Layer ``i`` of a slice (``i`` from
    0 to its length ``L``) merges layer ``start + i`` of each source into output layer
    ``o + i``, ``o`` the layers of the slices before it, at gradient position ``i / (L - 1)``
    (1 when ``L == 1``); the tensors before the layer stack come from the first slice's
    sources and those after it from the last slice's, at position 0, as mergekit plans them
    (fastmerge/layers.py derives which are which from the names)."""
    stacks = {}
    for folder, i in index.items():
        try:
            stacks[folder] = layers.Stack(pool[i].names(), folder)
        except ValueError as exc:
            raise MergeError(str(exc)) from None
    jobs, out_layer = [], 0

    def unit(sl, pairs, out_name, t):
        base = cfg.base_source(sl)
        srcs = ([base] if base is not None else []) + cfg.inputs_of(sl)
        inputs = []
        for ref in srcs:
            n = pairs(ref)
            ck = pool[index[ref.path]]
            if n not in ck.entries:
                raise MergeError(f"{ref.path} lacks tensor {n} (slices[{cfg.slices.index(sl)}])")
            inputs.append((ref.path, ck, index[ref.path], n))
        jobs.append(_job(cfg, out_name, inputs, base is not None, t, seed, sl, vocab_rows))

    first, last = cfg.slices[0], cfg.slices[-1]
    lead = stacks[first.sources[0].path]
    for name in lead.pre:
        unit(first, lambda ref, n=name: n, name, 0.0)
    for sl in cfg.slices:
        L = sl.length
        for i in range(L):
            t = i / (L - 1) if L > 1 else 1.0
            for ref in sl.sources:
                stack = stacks[ref.path]
                if ref.layer_range[0] + i >= stack.count:
                    raise MergeError(f"slices[{cfg.slices.index(sl)}]: {ref.path} has {stack.count} "
                                     f"layers, layer_range {list(ref.layer_range)} asks for more")
            for rest in stacks[sl.sources[0].path].layers.get(sl.sources[0].layer_range[0] + i, []):
                unit(sl, lambda ref, r=rest: stacks[ref.path].name(ref.layer_range[0] + i, r),
                     lead.name(out_layer, rest), t)
            out_layer += 1
    for name in stacks[last.sources[0].path].post:
        unit(last, lambda ref, n=name: n, name, 0.0)
    return jobs, out_layer


# --------------------------------------------------------------- whole-model thresholds

_CHUNK = 1 << 24


def _abs_bits(model: torch.Tensor, base: torch.Tensor, dtype: torch.dtype):
    """|model - base| in fp32 (as the kernels form it) as int32 bit patterns, in chunks."""
    m, b = model.reshape(-1), base.reshape(-1)
    for s in range(0, m.numel(), _CHUNK):
        d = m[s:s + _CHUNK].to(dtype).float() - b[s:s + _CHUNK].to(dtype).float()
        yield d.abs_().view(torch.int32)


def model_thresholds(jobs: List[Job], mine: List[int], base: Checkpoint, inputs: List[Checkpoint],
                     densities: List[float], group: Group) -> List[float]:
    """FusionBench's TIES trimming over the whole model, exactly: per model, with ``N`` the
    number of elements of all merged tensors and ``k = int(N * density)``, the threshold is the
    ``(N - k)``-th smallest ``|delta|`` (``kthvalue``) and every element ``>=`` it is kept.
    Found by :func:`_radix_ranks` on the fp32 bit patterns, the histograms summed over all
    processes."""
    K = len(inputs)
    merged = [i for i, j in enumerate(jobs) if j.kind == "merge"]
    N = sum(jobs[i].numel for i in merged)
    rank = [N - int(N * d) for d in densities]  # 1-based ascending rank of the threshold
    active = [k for k in range(K) if densities[k] < 1.0 and N > 0]
    thr = [0.0] * K
    if not active:
        return thr
    todo = [jobs[i] for i in mine if jobs[i].kind == "merge"]

    def passes():
        """(k, |delta| bit patterns of a chunk) over this process's tensors, mapped pages
        dropped after each tensor."""
        for job in todo:
            b = base.tensor(job.name)
            for k in active:
                for bits in _abs_bits(inputs[k].tensor(job.name), b, job.dtype):
                    yield k, bits
                inputs[k].release(job.name)
            base.release(job.name)

    # the (N - k)-th smallest is the one at 0-based rank N - k - 1 (none asked of the others)
    keys = _radix_ranks(passes, K, [[rank[k] - 1] if k in active else [] for k in range(K)], group)
    for k in active:
        thr[k] = key_float(keys[k][0])
    return thr


def _radix_ranks(stream, K: int, ranks: List[List[int]], group: Group) -> List[List[int]]:
    """The 32-bit keys at 0-based ascending ranks ``ranks[k]`` of model ``k``'s keys, over
    everything ``stream()`` yields (``(k, int64 tensor of keys in [0, 2^32))``, called twice):
    the 16 high bits by one histogram pass, the 16 low bits inside each chosen bucket by a
    second; the histograms summed over all processes."""
    hi = torch.zeros(K, 1 << 16, dtype=torch.int64)
    for k, keys in stream():
        hi[k] += torch.bincount(keys >> 16, minlength=1 << 16)
    cum = group.sum_(hi).cumsum(1)
    want = {}  # (k, bucket) -> [(rank inside the bucket, index into ranks[k])]
    for k in range(K):
        for i, r in enumerate(ranks[k]):
            b = int(torch.searchsorted(cum[k], torch.tensor(r), right=True))
            want.setdefault((k, b), []).append((r - (int(cum[k, b - 1]) if b else 0), i))
    lo = {kb: torch.zeros(1 << 16, dtype=torch.int64) for kb in want}
    buckets = {k: [b for kk, b in want if kk == k] for k in range(K)}
    for k, keys in stream():
        top = keys >> 16
        for b in buckets[k]:
            sel = keys[top == b]
            if sel.numel():
                lo[k, b] += torch.bincount(sel & 0xFFFF, minlength=1 << 16)
    out = [[0] * len(ranks[k]) for k in range(K)]
    for (k, b), items in want.items():
        c = group.sum_(lo[k, b]).cumsum(0)
        for r, i in items:
            out[k][i] = (b << 16) | int(torch.searchsorted(c, torch.tensor(r), right=True))
    return out


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """Unsigned order keys of fp32 values (-0 as +0) as int64: key order = float order."""
    u = (x + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(u >= 0x80000000, (~u) & 0xFFFFFFFF, u | 0x80000000)


def _from_order_key(key: int) -> float:
    return key_float(key & 0x7FFFFFFF if key & 0x80000000 else (~key) & 0xFFFFFFFF)


def pcb_model_stats(jobs: List[Job], mine: List[int], base: Checkpoint, inputs: List[Checkpoint],
                    kw: dict, group: Group) -> tuple:
    """PCB's per-task statistics over the whole model, as the authors' ``pcb-merging.py``
    computes them on the flattened model: ``(lo, hi, q, M)``, the clamp bounds (order
    statistics of ``|tau_t|`` over all ``N`` merged elements), the score cut and the score max
    (of ``b_t`` over all elements; :mod:`fastmerge.methods.pcb`). Four passes over the inputs
    (two radix passes each); the merge pass follows."""
    K = len(inputs)
    todo = [jobs[i] for i in mine if jobs[i].kind == "merge"]
    N = sum(j.numel for j in jobs if j.kind == "merge")
    r_lo, r_hi, r_q = _pcb_ranks(N, kw.get("ratio", 0.1), kw.get("min_ratio", 1e-4), kw.get("max_ratio", 1e-4))

    def deltas():
        for job in todo:
            b = base.tensor(job.name).reshape(-1)
            ms = [x.tensor(job.name).reshape(-1) for x in inputs]
            for s in range(0, b.numel(), _CHUNK):
                bb = b[s:s + _CHUNK].to(job.dtype).float()
                yield [m[s:s + _CHUNK].to(job.dtype).float() - bb for m in ms]
            for x in inputs:
                x.release(job.name)
            base.release(job.name)

    def abs_keys():
        for ds in deltas():
            for k, d in enumerate(ds):
                yield k, d.abs().view(torch.int32).to(torch.int64)

    bounds = _radix_ranks(abs_keys, K, [[r_lo, r_hi]] * K, group)
    lo = [key_float(b[0]) for b in bounds]
    hi = [key_float(b[1]) for b in bounds]

    def score_keys():
        for ds in deltas():
            total = sum(ds)
            for k, d in enumerate(ds):
                yield k, _order_keys(_pcb.score(d, total, torch.tensor(lo[k]), torch.tensor(hi[k]), K)[1])

    cuts = _radix_ranks(score_keys, K, [[r_q, N - 1]] * K, group)
    return lo, hi, [_from_order_key(c[0]) for c in cuts], [_from_order_key(c[1]) for c in cuts]


# ----------------------------------------------------------------- the output folder
#
# What fastmerge may delete: the temporary folder it created in this run, and, with
# --overwrite, the OUT it replaces (after the new one took its place). Nothing else: a
# leftover of another run is named, never removed; an empty OUT is removed with rmdir only.

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347, "riscv64": 276}
_renameat2_fn: list = []


def _libc_renameat2(libc):
    """glibc's ``renameat2`` (2.28+) as ``fn(src: bytes, dst: bytes, flags) -> 0 or -1``."""
    import ctypes

    c = libc.renameat2
    c.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    c.restype = ctypes.c_int
    return lambda src, dst, flags: c(_AT_FDCWD, src, _AT_FDCWD, dst, flags)


def _syscall_renameat2(libc, machine: str):
    """The raw ``renameat2`` system call (an older libc on a kernel that has it)."""
    import ctypes

    nr, c = _RENAMEAT2_SYSCALL[machine], libc.syscall
    c.restype = ctypes.c_long
    return lambda src, dst, flags: c(ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(src),
                                     ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(dst), ctypes.c_uint(flags))


def _load_renameat2():
    """libc's ``renameat2``, else the raw syscall, else None (not Linux)."""
    if not _renameat2_fn:
        fn = None
        if sys.platform.startswith("linux"):
            import ctypes
            import platform

            try:
                libc = ctypes.CDLL(None, use_errno=True)
            except OSError:
                libc = None
            if libc is not None and hasattr(libc, "renameat2"):
                fn = _libc_renameat2(libc)
            elif libc is not None and platform.machine() in _RENAMEAT2_SYSCALL:
                fn = _syscall_renameat2(libc, platform.machine())
        _renameat2_fn.append(fn)
    return _renameat2_fn[0]


def renameat2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: True when done, False where this kernel, libc or
    filesystem does not have it (the caller then takes the documented fallback); any other
    failure raises OSError."""
    fn = _load_renameat2()
    if fn is None:
        return False
    import ctypes

    if fn(os.fsencode(src), os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # EPERM: a seccomp filter; EINVAL: the filesystem lacks the flag
    raise OSError(err, os.strerror(err), src, None, dst)


def out_entry(out: str) -> str:
    """The directory entry OUT names: its parent resolved, its last component kept (a symlink
    OUT is itself replaced, never followed)."""
    a = os.path.abspath(out)
    return os.path.join(os.path.realpath(os.path.dirname(a)), os.path.basename(a))


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_out(out: str, inputs: List[tuple], keep: List[tuple]) -> str:
    """Refuse an OUT that is, holds or lies inside an input folder (``inputs``: (label, path)),
    or that is or holds a folder to keep (``keep``: the working directory, the config's
    folder), every path resolved. Returns :func:`out_entry`."""
    entry = out_entry(out)
    folders = [(label, path, os.path.realpath(path), True) for label, path in inputs]
    folders += [(label, path, os.path.realpath(path), False) for label, path in keep]
    for label, path, folder, _ in folders:
        if entry == folder:
            raise MergeError(f"OUT {out} is {label} ({path}); choose a new folder for the merge")
    for label, path, folder, _ in folders:
        if _within(folder, entry):
            raise MergeError(f"OUT {out} holds {label} ({path}); choose a folder that holds no "
                             "input, config or working directory")
    for label, path, folder, is_input in folders:
        if is_input and _within(entry, folder):
            raise MergeError(f"OUT {out} lies inside {label} ({path}); choose a folder outside "
                             "the input models")
    probe = os.path.dirname(entry)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise MergeError(f"OUT {out}: {probe} is not a folder")
    return entry


def leftovers(entry: str) -> List[str]:
    """Folders an interrupted run left next to OUT (``.NAME.fastmerge-*``)."""
    parent, prefix = os.path.dirname(entry), f".{os.path.basename(entry)}.fastmerge-"
    try:
        return sorted(os.path.join(parent, f) for f in os.listdir(parent) if f.startswith(prefix))
    except OSError:
        return []


def describe_leftovers(entry: str, found: List[str]) -> str:
    old = [f for f in found if re.search(r"\.fastmerge-old-[0-9a-f]+$", f)]
    if old and not os.path.lexists(entry):
        new = [f for f in found if f.endswith(old[0][-16:]) and "-tmp-" in f]
        return (f"OUT {entry} was missing: an earlier --overwrite was killed between its two "
                f"renames. The previous OUT is {old[0]}" + (f" and that run's finished merge "
                f"{new[0]}" if new else "") + " (not deleted; this run writes a new OUT)")
    return (f"{', '.join(found[:3])}{f' and {len(found) - 3} more' if len(found) > 3 else ''} "
            "left by an interrupted fastmerge run (or in use by one still running); not deleted: "
            "remove it once no run needs it")


def _discard(path: str, whole: bool) -> Optional[str]:
    """Delete the previous OUT, now at ``path``: a file or symlink is unlinked (a link's target
    is untouched); a folder is removed whole when ``whole`` (--overwrite), else only if empty.
    Returns a warning when it stays."""
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        elif whole:
            shutil.rmtree(path)
        else:
            os.rmdir(path)
    except OSError as exc:
        return f"the previous OUT, now at {path}, was not removed: {exc.strerror}"
    return None


class _Signal(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Signals:
    """While active (main thread only), SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, as
    Python's default SIGINT does, except inside :meth:`deferred` (the commit, the clean-up),
    where the signal waits until the block ends."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self):
        self.depth = 0
        self.pending: Optional[int] = None
        self._saved: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                num = getattr(signal, name, None)
                # an ignored signal stays ignored (nohup's SIGHUP, a background job's SIGINT)
                if num is not None and signal.getsignal(num) is not signal.SIG_IGN:
                    self._saved[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for num, handler in self._saved.items():
            signal.signal(num, handler)
        self._saved.clear()

    def _handle(self, signum, frame) -> None:
        if self.depth:
            self.pending = signum
            return
        raise _Signal(signum)

    @contextlib.contextmanager
    def deferred(self, reraise: bool = True):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if reraise and not self.depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise _Signal(signum)


# ------------------------------------------------------------------------------- run

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise MergeError(f"--device {name}: use auto, cpu or cuda[:N]")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError(f"--device {name}: this torch has no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MergeError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.t0 = time.perf_counter()
        self.bytes = 0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is a dependency; a broken install still merges
                return
            self.bar = tqdm(total=total, unit="tensor", desc="merging", dynamic_ncols=True,
                            file=sys.stderr, smoothing=0.1)

    def step(self, nbytes: int) -> None:
        self.bytes += nbytes
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.bytes / dt / 1e9:.2f} GB/s", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _stage(t: torch.Tensor, dtype: torch.dtype, device: torch.device, stream) -> torch.Tensor:
    """One input (read into a reused, on GPUs pinned, host buffer) on the merge device in the
    working dtype; on a GPU copied on ``stream`` without blocking the host."""
    if device.type == "cuda":
        with torch.cuda.stream(stream):
            x = t.to(device, non_blocking=True)
            x.record_stream(torch.cuda.current_stream(device))
        t = x
    return t if t.dtype == dtype else t.to(dtype)


# the methods whose models each name a statistics folder: method -> its parameter
_STATS = {"fisher": "fisher", "regmean": "grams"}


def _read_all(folder: str) -> Dict[str, torch.Tensor]:
    ck = Checkpoint(folder)
    return {n: ck.tensor(n).clone() for n in ck.names()}


def load_emr(folder: str, base) -> research.EMR:
    """The :class:`~fastmerge.research.EMR` of a ``fastmerge merge`` run with ``merge_method:
    emr``: the unified model in ``folder``, the masks and rescalers of ``folder/emr/
    emr.safetensors`` and ``base`` (the base model's folder, or its state dict). ``tau_uni`` is
    read back as ``unified - base`` in fp32 (exact but for the output dtype's rounding of the
    unified model); ``.task(t)`` rebuilds model ``t`` (the config's order: the file's
    ``models`` metadata) as a state dict of the merged tensors."""
    side = os.path.join(folder, research.EMR_DIR)
    if not os.path.isfile(os.path.join(side, research.EMR_FILE)):
        raise ValueError(f"{os.path.join(side, research.EMR_FILE)} does not exist: {folder} is not "
                         "the output of a merge_method: emr run")
    try:
        extra, merged = _read_all(side), _read_all(folder)
        base = _read_all(base) if isinstance(base, str) else dict(base)
    except (FormatError, FileNotFoundError) as exc:
        raise ValueError(f"load_emr: {exc}") from None
    masks = {n[len("masks."):]: t for n, t in extra.items() if n.startswith("masks.")}
    missing = sorted(n for n in masks if n not in base or n not in merged)
    if missing or "rescalers" not in extra:
        raise ValueError(f"load_emr: {folder} and the base do not match {research.EMR_FILE} "
                         f"(tensors {missing[:3]} missing, or no rescalers)")
    unified = {n: merged[n].float() - base[n].float() for n in masks}
    return research.EMR({n: base[n] for n in masks}, unified, masks, extra["rescalers"].float())


class Merger:
    def __init__(self, config: str, out: str, options: Options):
        self.options = options
        self.config_path = config
        self.tmp: Optional[str] = None
        self.tmp_created = False  # this run made self.tmp (the only folder it may remove whole)
        self.committed = False
        self.made_parents: List[str] = []
        self.signals = Signals()
        try:
            self.written = mc.load(config)  # as written: the model card names its hub ids
            self.cfg = local_refs(self.written)
        except (mc.ConfigError, hub.HubError) as exc:
            raise MergeError(str(exc)) from None
        if options.topk_scope is not None:
            self.cfg.topk_scope = options.topk_scope
        if self.cfg.quantize is not None:
            raise MergeError("quantize: is not supported by `fastmerge merge` yet (it would need quantized "
                             "checkpoint output: qweight/qzeros/scales and a quantization_config); merge, "
                             "then quantize tensors with fastmerge.quant")
        self.out = check_out(out, self._inputs(), [
            ("the working directory", os.getcwd()),
            ("the config's folder", os.path.dirname(os.path.abspath(config)))])
        self.device = _device(options.device)
        self._check_backend()
        self.group = Group(self.device)
        # emr: per merged tensor, its packed masks, size and the two per-task sums of its rescalers
        self.emr_parts: Dict[str, tuple] = {}
        self.stats: Dict[str, Checkpoint] = {}  # fisher / regmean: statistics folders, opened once
        self.pcb_stats: Optional[tuple] = None  # pcb with topk_scope: model: (lo, hi, q, M)
        self.fisher_coef: Optional[List[float]] = None
        if self.cfg.method in _STATS and (self.cfg.slices or self.cfg.base is not None):
            raise MergeError(f"merge_method {self.cfg.method} takes a models list and no base_model "
                             "(its statistics are per model, as FusionBench merges)")
        if self.cfg.method == "emr" and self.cfg.slices:
            raise MergeError("merge_method emr takes a models list, not slices (one set of masks and "
                             "rescalers per model)")
        if self.cfg.method == "emr" and self.group.world > 1:
            raise MergeError("merge_method emr runs in one process (its masks and whole-model rescalers "
                             "are gathered in one file): run it without torchrun")

    def _inputs(self) -> List[tuple]:
        """(label, path) of the config and every folder it names: OUT must stay clear of them."""
        cfg = self.cfg
        found = [("the config", self.config_path)]
        for label, path in cfg.paths():  # a model+lora reference: both folders
            parts = adapters.split(path)
            found += [(label, path)] if parts is None else [(label, parts[0]), (label, parts[1])]
        if cfg.tokenizer_source not in (None, "base", "union"):
            found.append(("tokenizer_source", cfg.tokenizer_source))
        if cfg.method in _STATS:  # OUT stays clear of the statistics folders too
            key = _STATS[cfg.method]
            for i, m in enumerate(cfg.models):
                if isinstance(m.parameters.get(key), str):
                    found.append((f"models[{i}].parameters.{key}", m.parameters[key]))
        return found

    def _check_backend(self) -> None:
        """Refuse a backend that cannot run here before anything is read or written."""
        name = self.options.backend
        where = f"--backend {name}" if name is not None else \
            f"FASTMERGE_BACKEND={os.environ.get('FASTMERGE_BACKEND', '')}"
        try:
            dispatch.resolve(name, self.device)
        except (ValueError, RuntimeError) as exc:
            raise MergeError(f"{where}: {exc}") from None

    def _warn(self, message: str) -> None:
        if self.group.rank == 0:
            print(f"fastmerge merge: warning: {message}", file=sys.stderr)

    # ---- setup (every process, identically)
    def _open_all(self) -> None:
        """``pool``: every checkpoint the merge reads, each opened once. A ``models`` config:
        the base (when the method reads one), then the inputs; a ``slices`` config: each folder
        its slices name, in order of first mention."""
        cfg, trust = self.cfg, self.options.trust_index
        self.base, self.inputs, self.pool, self.out_layers = None, [], [], None
        self.vocabulary = self._vocabulary()
        rows = None if self.vocabulary is None else self.vocabulary.size
        if cfg.slices:
            index: Dict[str, int] = {}
            opened: Dict[str, int] = {}
            for i, sl in enumerate(cfg.slices):
                for j, src in enumerate(sl.sources):
                    folder = os.path.abspath(src.path)
                    if folder not in opened:
                        opened[folder] = len(self.pool)
                        self.pool.append(_open(src.path, f"slices[{i}].sources[{j}]", trust))
                    index[src.path] = opened[folder]
            self.jobs, self.out_layers = plan_slices(cfg, self.pool, index, self.options.seed, rows)
            self._skip_trivial_vocab()
            return
        self.base = _open(cfg.base, "base_model", trust) if cfg.uses_base else None
        refs = cfg.inputs
        self.labels = [f"models[{cfg.models.index(r)}]" for r in refs]
        self.inputs = [_open(r.path, label, trust) for r, label in zip(refs, self.labels)]
        self.pool = ([self.base] if self.base is not None else []) + self.inputs
        if not self.inputs:
            raise MergeError("nothing to merge: `models` lists only the base model")
        self.jobs = plan(cfg, self.base, self.inputs, self.labels, self.options.seed,
                         self.options.drop_extra_tensors, self._warn, rows)
        self._skip_trivial_vocab()

    def _vocabulary(self) -> Optional[vocab_.Vocabulary]:
        """The output vocabulary when the config names a tokenizer source (fastmerge.vocab);
        built alike on every process."""
        cfg = self.cfg
        if cfg.tokenizer_source is None:
            return None
        if cfg.topk_scope == "model":
            raise MergeError("topk_scope: model and a tokenizer source cannot be combined (the "
                             "embedding rows are aligned per tensor)")
        folders = [model_key(p) for _, p in cfg.paths()]
        base = model_key(cfg.base) if cfg.base is not None else folders[0]
        src = cfg.tokenizer_source
        src = src if src in ("base", "union") else model_key(src)
        tokens = {t: e if e.model is None else dataclasses.replace(e, model=model_key(e.model))
                  for t, e in cfg.tokens.items()}
        try:
            return vocab_.build(base, folders, src, tokens, cfg.pad_to_multiple_of,
                                self.options.trust_remote_code, self._warn)
        except vocab_.VocabError as exc:
            raise MergeError(str(exc)) from None

    def _skip_trivial_vocab(self) -> None:
        """A vocabulary tensor every model of which already has the output's rows, in order,
        is merged as it is read."""
        v = self.vocabulary
        for j in self.jobs:
            if j.vocab and all(v.trivial(self.pool[c].folder_key, self.pool[c].entries[n].shape[0])
                               for c, n in j.srcs):
                j.vocab = False

    def _setup(self) -> None:
        cfg = self.cfg
        self._open_all()
        if not self.jobs:
            raise MergeError("nothing to merge: the models hold no tensors")
        self.thresholds = None
        if cfg.topk_scope == "model":
            self._check_model_topk()
        self._check_architectures()
        specs = [Spec(j.name, j.out_dtype, j.shape) for j in self.jobs]
        limit = self.options.max_shard_bytes
        if self.options.shard_params is not None:  # parameters per shard, at the widest output dtype
            limit = self.options.shard_params * max((j.out_dtype.itemsize for j in self.jobs), default=1)
        self.layout = plan_layout(specs, limit)
        if cfg.method == "fisher":
            self._fisher_coefficients()
        owner = assign(self.jobs, self.group.world)
        self.mine = [i for i, r in enumerate(owner) if r == self.group.rank]
        if os.path.lexists(self.out) and not self.options.overwrite and not _empty_folder(self.out):
            kind = ("a symlink" if os.path.islink(self.out) else
                    "not empty" if os.path.isdir(self.out) else "a file")
            raise MergeError(f"OUT {self.out} exists and is {kind}; pass --overwrite to replace "
                             "it (it is replaced only once the new merge is complete)")

    def _check_architectures(self) -> None:
        """mergekit refuses to merge models whose ``config.json`` names other architectures
        unless ``--allow-crimes``; so does this."""
        if self.options.allow_crimes:
            return
        seen = {}
        for ck in self.pool:
            try:
                with open(os.path.join(ck.folder, "config.json"), encoding="utf-8") as fh:
                    arch = json.load(fh).get("architectures")
            except (OSError, ValueError, AttributeError):
                continue  # no (readable) config: nothing to compare
            if arch:
                seen.setdefault(tuple(arch), ck.folder)
        if len(seen) > 1:
            (a, fa), (b, fb) = list(seen.items())[:2]
            raise MergeError(f"the models are of different architectures: {fa} is {'/'.join(a)}, "
                             f"{fb} is {'/'.join(b)}; pass --allow-crimes to merge them anyway "
                             "(as mergekit-yaml requires)")

    def _check_model_topk(self) -> None:
        if self.cfg.slices:
            raise MergeError("topk_scope: model (FusionBench's whole-model TIES trimming) takes a "
                             "`models` config, not `slices`")
        if self.cfg.method == "pcb":  # the authors' code takes its statistics over the flattened model
            keys = ("ratio", "min_ratio", "max_ratio", "weights", "lam")
            first = next((j for j in self.jobs if j.kind == "merge"), None)
            for j in self.jobs:
                if j.kind == "merge" and any(j.kwargs.get(k) != first.kwargs.get(k) for k in keys):
                    raise MergeError(f"topk_scope: model needs one ratio, min_ratio, max_ratio, weight and "
                                     f"lambda for the whole model, but tensor {j.name} resolves to others "
                                     "(no gradients or filters on them)")
            return
        if self.cfg.method not in ("ties", "consensus_ties"):
            raise MergeError(f"topk_scope: model (whole-model top-k) applies to merge_method ties (FusionBench's "
                             f"TIES trimming), consensus_ties (the tall_masks code's) and pcb (the authors' "
                             f"PCB), not {self.cfg.method}")
        dens = None
        for j in self.jobs:
            if j.kind != "merge":
                continue
            d = j.kwargs["density"]
            if dens is None:
                dens = d
            elif d != dens:
                raise MergeError(f"topk_scope: model needs one density per model for the whole "
                                 f"model, but tensor {j.name} resolves to {d} where others have "
                                 f"{dens} (no gradients or filters on density)")
        self.densities = dens or [1.0] * len(self.inputs)

    def _prepare_output(self) -> None:
        """Rank 0: the temporary folder with every shard's header, after a disk-space check.
        Missing parent folders are created (and removed again if the run fails)."""
        parent = os.path.dirname(self.out)
        missing = []
        p = parent
        while not os.path.lexists(p):
            missing.append(p)
            p = os.path.dirname(p)
        for d in reversed(missing):
            try:
                with self.signals.deferred():
                    os.mkdir(d)
                    self.made_parents.append(d)
            except OSError as exc:
                raise MergeError(f"cannot create OUT's folder {d}: {exc.strerror}") from None
        found = leftovers(self.out)
        if found:
            self._warn(describe_leftovers(self.out, found))
        need = self.layout.total_bytes
        free = shutil.disk_usage(parent).free
        if free < need + (64 << 20):
            raise MergeError(f"not enough disk space in {parent}: the merged model needs "
                             f"{_human(need)}, {_human(free)} free")
        try:
            with self.signals.deferred():
                os.mkdir(self.tmp)  # never an existing folder: that one is not ours
                self.tmp_created = True
        except FileExistsError:
            raise MergeError(f"the temporary folder {self.tmp} already exists (not touched); "
                             "run again") from None
        except OSError as exc:
            raise MergeError(f"cannot write in {parent}: {exc.strerror}") from None
        try:
            Writer(self.tmp, self.layout).create()
        except OSError as exc:
            raise MergeError(f"writing {self.tmp}: {exc.strerror}") from None

    # ---- the streaming pass
    def _merge_all(self) -> None:
        jobs, mine, pool = self.jobs, self.mine, self.pool
        writer = Writer(self.tmp, self.layout)
        q: "queue.Queue" = queue.Queue(maxsize=2)
        failure: List[BaseException] = []

        def write_loop():
            while True:
                item = q.get()
                if item is None:
                    return
                name, t, event = item
                if failure:
                    continue
                try:
                    if event is not None:
                        event.synchronize()
                    writer.write(name, t)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    failure.append(exc)

        wt = threading.Thread(target=write_loop, name="fastmerge-writer", daemon=True)
        wt.start()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        loader = ThreadPoolExecutor(1, thread_name_prefix="fastmerge-reader")

        # two sets of K+1 read buffers: the reader fills one while the merge reads the other
        cap = max((pool[c].entries[n].nbytes for i in mine for c, n in jobs[i].srcs), default=0)
        width = max((len(jobs[i].srcs) for i in mine), default=0)
        sets: List[List[torch.Tensor]] = [[], []]

        def load(pos):
            job = jobs[mine[pos]]
            bufs = sets[pos % 2]
            if not bufs:
                bufs.extend(torch.empty(cap, dtype=torch.uint8, pin_memory=cuda) for _ in range(width))
            if cuda:
                stream.synchronize()  # the copies out of this set, two tensors ago, are done
            if job.kind == "copy":
                c, n = job.srcs[0]
                return None, [pool[c].read(n, bufs[0]).clone()]
            xs = [_stage(pool[c].read(n, buf), job.dtype, self.device, stream)
                  for (c, n), buf in zip(job.srcs, bufs)]
            if job.vocab:
                xs = self._align(job, xs)
            return (xs[0], xs[1:]) if job.has_base else (None, xs)

        def prefetch(pos):
            for i in mine[pos:pos + self.options.read_ahead]:
                for c, n in jobs[i].srcs:
                    pool[c].prefetch(n)

        bar = _Progress(len(mine), self.options.progress and self.group.rank == 0)
        done = False
        try:
            prefetch(0)
            nxt = loader.submit(load, 0) if mine else None
            for pos, i in enumerate(mine):
                job = jobs[i]
                b, xs = nxt.result()
                prefetch(pos + 2)
                if pos + 1 < len(mine):
                    nxt = loader.submit(load, pos + 1)
                if cuda:
                    torch.cuda.current_stream(self.device).wait_stream(stream)
                out = xs[0] if job.kind == "copy" else self._merge_one(job, b, xs)
                if job.kind != "copy" and _aliases(out, ([b] if b is not None else []) + xs):
                    # a merge that returns an input (passthrough, one model) hands back a view
                    # of a read buffer the reader refills two tensors later: the writer gets a copy
                    out = out.clone()
                event = None
                if cuda:
                    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                    host.copy_(out, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    out = host
                while not failure:
                    try:
                        q.put((job.name, out, event), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if failure:
                    break
                del b, xs, out
                bar.step(job.in_bytes)
            done = True
        finally:
            q.put(None)
            wt.join()
            loader.shutdown(wait=True)
            writer.close(sync=done and not failure)  # no fsync for a folder about to go
            bar.close()
        if failure:
            self._raise_write_failure(failure[0])

    def _align(self, job, xs):
        """A vocabulary tensor's inputs, their rows laid out in the output vocabulary."""
        try:
            return vocab_.align(self.vocabulary, [self.pool[c].folder_key for c, _ in job.srcs], xs,
                                job.vocab_base)
        except vocab_.VocabError as exc:
            raise MergeError(f"tensor {job.name}: {exc}") from None

    def _merge_one(self, job, base, xs):
        """One tensor's merge; a user error becomes a MergeError naming the tensor."""
        if self.cfg.method == "emr":
            return self._emr_one(job, base, xs)
        if self.cfg.method == "fisher":
            return self._fisher_one(job, xs)
        if self.cfg.method == "regmean":
            return self._regmean_one(job, xs)
        if self.pcb_stats is not None:
            kw = job.kwargs
            try:
                return research.pcb_with_stats(base, xs, self.pcb_stats, weights=kw.get("weights"),
                                               lam=kw.get("lam", 1.0), out_dtype=job.out_dtype,
                                               backend=self.options.backend)
            except (ValueError, TypeError) as exc:
                raise MergeError(f"tensor {job.name}: {exc}") from None
        kw = dict(job.kwargs)
        if self.thresholds is not None:
            kw.pop("density", None)
            kw["threshold"] = self.thresholds
        try:
            return api.merge(self.cfg.method, base, xs, out_dtype=job.out_dtype,
                             backend=self.options.backend, **kw)
        except (ValueError, TypeError) as exc:
            raise MergeError(f"tensor {job.name}: {exc}") from None

    def _stats_tensor(self, job, k: int, name: str, required: bool = True):
        """Tensor ``name`` of model ``k``'s statistics folder (the job's ``fisher`` / ``grams``
        parameter), or None when absent and not ``required``."""
        key = _STATS[self.cfg.method]
        folder = job.kwargs.get(key)[k]
        ck = self.stats.get(folder)
        if ck is None:
            try:
                ck = self.stats[folder] = Checkpoint(folder, self.options.trust_index)
            except (FormatError, FileNotFoundError, NotADirectoryError) as exc:
                raise MergeError(f"{self.labels[k]}: {key} {folder}: "
                                 f"{exc if isinstance(exc, FormatError) else 'no such folder'}") from None
        if name not in ck.entries:
            if not required:
                return None
            raise MergeError(f"{self.labels[k]}: {key} {folder} lacks tensor {name}")
        return ck.tensor(name)

    def _fisher_coefficients(self) -> None:
        """fisher's per-model coefficients ``c_t`` once, over the whole model: the weights
        (default 1/K) times, with ``normalize_fisher_weight``, the normalized inverse Fisher
        norms, FusionBench's ``get_models_fisher_norm`` (every merged tensor)."""
        jobs = [j for j in self.jobs if j.kind == "merge"]
        if not jobs:
            return
        kw = jobs[0].kwargs
        K = len(self.inputs)
        w = kw.get("weights")
        c = [1.0 / K] * K if w is None else [float(x) for x in w]
        eps = float(kw.get("minimal_fisher_weight", 1e-6))
        if kw.get("normalize_fisher_weight", True):
            sq = [0.0] * K
            for job in jobs:
                fs = [self._stats_tensor(job, k, job.name) for k in range(K)]
                for k, f in enumerate(fs):
                    if tuple(f.shape) != tuple(job.shape):
                        raise MergeError(f"{self.labels[k]}: fisher tensor {job.name} has shape "
                                         f"{list(f.shape)}, the model {list(job.shape)}")
                try:
                    part = research.fisher_sum_squares(fs, backend=self.options.backend, name=job.name)
                except (ValueError, TypeError) as exc:
                    raise MergeError(f"tensor {job.name}: {exc}") from None
                sq = [a + b for a, b in zip(sq, part)]
            c = research.fisher_coefficients(c, sq, eps)
        self.fisher_coef = c

    def _fisher_one(self, job, xs):
        """One tensor of fisher: :func:`fastmerge.fisher` with the whole model's coefficients."""
        fs = [self._stats_tensor(job, k, job.name).to(xs[0].device) for k in range(len(xs))]
        eps = float(job.kwargs.get("minimal_fisher_weight", 1e-6))
        try:
            return research.fisher(xs, fs, weights=self.fisher_coef, normalize_fisher_weight=False,
                                   minimal_fisher_weight=eps, out_dtype=job.out_dtype,
                                   backend=self.options.backend)
        except (ValueError, TypeError) as exc:
            raise MergeError(f"tensor {job.name}: {exc}") from None

    def _regmean_one(self, job, xs):
        """One tensor of regmean: a ``<module>.weight`` whose module has a Gram in every model's
        folder by :func:`fastmerge.regmean`, anything else the models' mean (FusionBench's
        ``merging_with_regmean_weights``)."""
        module = job.name[:-len(".weight")] if job.name.endswith(".weight") else None
        grams = None
        if module is not None and xs[0].dim() == 2:
            first = self._stats_tensor(job, 0, module, required=False)
            if first is not None:
                grams = [first] + [self._stats_tensor(job, k, module) for k in range(1, len(xs))]
        try:
            if grams is None:
                out = sum(x.float() for x in xs) / len(xs)
                return out.to(job.out_dtype)
            grams = [g.to(xs[0].device) for g in grams]
            return _regmean(xs, grams, alpha=float(job.kwargs.get("alpha", 1.0))).to(job.out_dtype)
        except (ValueError, TypeError) as exc:
            raise MergeError(f"tensor {job.name}: {exc}") from None

    def _emr_one(self, job, base, xs):
        """EMR's unified tensor ``base + tau_uni``; its masks and rescaler sums kept for
        ``emr.safetensors`` (:meth:`_write_emr`)."""
        try:
            uni, packed, abs_sum, kept_sum = research.emr_parts(base, xs, backend=self.options.backend,
                                                                name=job.name)
        except (ValueError, TypeError) as exc:
            raise MergeError(f"tensor {job.name}: {exc}") from None
        self.emr_parts[job.name] = (packed, uni.numel(), abs_sum, kept_sum)
        return (base.float() + uni.to(base.device)).to(job.out_dtype)

    def _write_emr(self) -> None:
        """``emr/emr.safetensors`` in OUT: ``masks.<tensor>`` (uint8 ``[K, ceil(n / 8)]``, numpy
        packbits order) per merged tensor and ``rescalers`` (fp32 ``[K]``, the whole model's,
        FusionBench's sums of per-tensor means), the models in config order in the metadata.
        :func:`load_emr` (``fastmerge.load_emr(OUT, BASE)``) rebuilds every task from it."""
        names = sorted(self.emr_parts)
        tensors = {f"masks.{n}": self.emr_parts[n][0] for n in names}
        tensors["rescalers"] = research.emr_rescalers(self.emr_parts[n][1:] for n in names)
        models = [m.path for m in self.written.inputs_of()]
        os.mkdir(os.path.join(self.tmp, research.EMR_DIR))
        save_file(os.path.join(self.tmp, research.EMR_DIR, research.EMR_FILE), tensors,
                  {"format": "pt", "fastmerge": "emr", "models": json.dumps(models)})

    def _raise_write_failure(self, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise MergeError(f"no space left on device while writing {self.tmp}") from None
        if isinstance(exc, OSError):
            raise MergeError(f"writing {self.tmp}: {exc}") from None
        raise exc

    def _copy(self, folder: str, name: str) -> None:
        """``folder/name`` into the temporary folder, if it exists; never a file outside
        ``folder`` (a symlink pointing out of it is an error)."""
        try:
            path = confined(folder, name, folder)
        except FormatError as exc:
            raise MergeError(str(exc)) from None
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(self.tmp, name))

    def _finish(self) -> None:
        """Rank 0: config, tokenizer and the merge config next to the weights; then the commit."""
        cfg = self.cfg
        if cfg.slices:  # mergekit: the base model's config, else a source's
            src = cfg.base or cfg.slices[0].sources[0].path
        else:
            src = cfg.base if self.base is not None else cfg.models[0].path
        src = _model_folder(src)
        for f in COPY_FILES:
            self._copy(src, f)
        conf = os.path.join(self.tmp, "config.json")
        if os.path.isfile(conf):
            try:
                with open(conf, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (ValueError, UnicodeDecodeError):
                raise MergeError(f"{os.path.join(src, 'config.json')} is not valid JSON") from None
            dts = {j.out_dtype for j in self.jobs if j.kind == "merge"}
            if len(dts) == 1 and isinstance(data, dict):
                name = _DTYPE_NAMES[dts.pop()]
                for key in ("torch_dtype", "dtype"):
                    if key in data:
                        data[key] = name
            key = layers.num_layers_key(data) if isinstance(data, dict) else None
            if self.out_layers is not None and key is not None:
                data[key] = self.out_layers  # a frankenmerge's layer count
            if self.vocabulary is not None and isinstance(data, dict):
                holder = data.get("text_config") if "vocab_size" not in data else data
                if isinstance(holder, dict):
                    holder["vocab_size"] = self.vocabulary.size
            with open(conf, "w") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.write("\n")
        if self.vocabulary is not None:  # mergekit saves the tokenizer it built, whatever --copy-tokenizer says
            tok = self.vocabulary.tokenizer
            template = self._chat_template()
            if template is not None:
                tok.chat_template = template
            tok.save_pretrained(self.tmp)
        elif self.options.copy_tokenizer:
            tok = src if cfg.tokenizer_source in (None, "base") else cfg.tokenizer_source
            if not os.path.isdir(tok):
                raise MergeError(f"tokenizer_source {tok!r} is not a local folder")
            template = self._chat_template()
            for f in TOKENIZER_FILES:
                if template is None or f not in ("chat_template.jinja", "chat_template.json"):
                    self._copy(tok, f)
            if template is not None:
                self._set_chat_template(template)
        elif cfg.chat_template is not None:
            self._warn("chat_template is set but the tokenizer is not copied (--no-copy-tokenizer): "
                       "it is not saved")
        if cfg.method == "emr":
            self._write_emr()
        text = cfg.source if cfg.source.endswith("\n") else cfg.source + "\n"
        for saved in ("mergekit_config.yml", "fastmerge_config.yml"):  # mergekit's name, and ours
            with open(os.path.join(self.tmp, saved), "w") as fh:
                fh.write(text)
        if self.options.write_model_card:
            with open(os.path.join(self.tmp, "README.md"), "w", encoding="utf-8") as fh:
                fh.write(card.model_card(self.written, self.written.name))
        with self.signals.deferred():
            self._commit()

    def _chat_template(self) -> Optional[str]:
        """The configured chat template; ``auto``: the one most of the models the config names
        have (their ``chat_template.jinja`` or tokenizer_config.json's), first named on a tie;
        None when none has one."""
        wanted = self.cfg.chat_template
        if wanted != "auto":
            return wanted
        found = []
        for folder in dict.fromkeys(_model_folder(p) for _, p in self.cfg.paths()):
            text = None
            try:
                with open(confined(folder, "chat_template.jinja", folder), encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, FormatError):
                try:
                    with open(confined(folder, "tokenizer_config.json", folder), encoding="utf-8") as fh:
                        text = json.load(fh).get("chat_template")
                except (OSError, FormatError, ValueError, AttributeError):
                    pass
            if isinstance(text, list):  # named templates: the default one
                text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
            if isinstance(text, str) and text.strip():
                found.append(text.strip())
        return max(found, key=found.count) if found else None

    def _set_chat_template(self, template: str) -> None:
        """The template into the copied tokenizer_config.json (created if there is none)."""
        path = os.path.join(self.tmp, "tokenizer_config.json")
        data = {}
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (ValueError, UnicodeDecodeError):
                raise MergeError("the copied tokenizer_config.json is not valid JSON") from None
        data["chat_template"] = template
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False)
            fh.write("\n")

    def _commit(self) -> None:
        """The finished temporary folder becomes OUT, in one atomic step where the filesystem
        has ``renameat2``:

        * no OUT: ``renameat2(tmp, OUT, RENAME_NOREPLACE)`` (fallback: ``rename``);
        * an OUT to replace: ``renameat2(tmp, OUT, RENAME_EXCHANGE)`` swaps the two, then the
          previous OUT, now at the temporary name, is deleted;
        * without ``renameat2``: ``rename(OUT, .NAME.fastmerge-old-ID)``, then ``rename(tmp,
          OUT)``, then the old one is deleted. A kill between the two renames leaves no OUT but
          both complete folders, which the next run names.
        Signals wait until this is done (:meth:`Signals.deferred`)."""
        out, tmp = self.out, self.tmp
        if not os.path.lexists(out):
            try:
                done = renameat2(tmp, out, RENAME_NOREPLACE)
            except FileExistsError:
                done = False
            if not done:
                if os.path.lexists(out):
                    raise MergeError(f"OUT {out} appeared while merging; it was not touched")
                os.rename(tmp, out)
            self.committed, self.tmp_created = True, False
            return
        whole = self.options.overwrite
        if not whole and not _empty_folder(out):
            raise MergeError(f"OUT {out} appeared while merging; it was not touched")
        if renameat2(tmp, out, RENAME_EXCHANGE):
            old = tmp
        else:
            old = tmp.replace(".fastmerge-tmp-", ".fastmerge-old-")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old, out)  # put the previous OUT back
                raise
        self.committed, self.tmp_created = True, False
        problem = _discard(old, whole)
        if problem:
            self._warn(problem)

    def _step(self, fn, only_rank0: bool = False):
        """Run ``fn`` (on every process, or rank 0 only); then every process learns whether all
        succeeded, so that one failing process never leaves the others waiting."""
        err = None
        if not only_rank0 or self.group.rank == 0:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below after the vote
                err = exc
        if not self.group.all_ok(err is None):
            if err is not None:
                raise err
            raise MergeError(f"another process failed (see rank 0's message); rank {self.group.rank} stops")

    def _steps(self) -> None:
        self._step(self._setup)
        # one name for the temporary folder on every process, drawn by rank 0
        token = torch.tensor([secrets.randbits(62) if self.group.rank == 0 else 0], dtype=torch.int64)
        token = int(self.group.sum_(token))
        self.tmp = os.path.join(os.path.dirname(self.out),
                                f".{os.path.basename(self.out)}.fastmerge-tmp-{token:016x}")
        self._step(self._prepare_output, only_rank0=True)
        if self.cfg.topk_scope == "model":
            def thresholds():
                if self.cfg.method == "pcb":
                    first = next(j for j in self.jobs if j.kind == "merge")
                    self.pcb_stats = pcb_model_stats(self.jobs, self.mine, self.base, self.inputs,
                                                     first.kwargs, self.group)
                    return
                self.thresholds = model_thresholds(self.jobs, self.mine, self.base, self.inputs,
                                                   self.densities, self.group)
            self._step(thresholds)
        self._step(self._merge_all)
        self._step(self._finish, only_rank0=True)

    def _cleanup(self) -> None:
        """After success or failure: a run that did not commit removes its own temporary
        folder and the parent folders it created (only while empty), nothing else."""
        if self.group.rank == 0 and not self.committed:
            if self.tmp_created:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp_created = os.path.lexists(self.tmp)
            for d in reversed(self.made_parents):
                try:
                    os.rmdir(d)
                except OSError:
                    break
        for c in getattr(self, "pool", []):
            c.close()
        self.group.close()

    def run(self) -> dict:
        t0 = time.perf_counter()
        error: Optional[BaseException] = None
        with self.signals:
            try:
                self._steps()
            except BaseException as exc:  # noqa: BLE001 - re-raised after the clean-up
                error = exc
            with self.signals.deferred(reraise=False):
                self._cleanup()
            pending = self.signals.pending
        if isinstance(error, KeyboardInterrupt) or (error is None and pending is not None):
            raise Interrupted(getattr(error, "signum", None) or pending or signal.SIGINT,
                              self.committed) from None
        if isinstance(error, OSError):
            raise MergeError(f"{error.strerror or error}: {error.filename}") from error
        if error is not None:
            raise error
        nbytes = sum(self.jobs[i].in_bytes for i in self.mine)
        return {"tensors": len(self.jobs), "tensors_here": len(self.mine), "seconds": time.perf_counter() - t0,
                "bytes_read_here": nbytes, "bytes_written": self.layout.total_bytes, "rank": self.group.rank,
                "world": self.group.world, "out": self.out}


def _empty_folder(path: str) -> bool:
    """A real folder (not a symlink to one) with nothing in it."""
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def merge_checkpoints(config: str, out: str, **options) -> dict:
    """Python entry of ``fastmerge merge``: merge the checkpoints ``config`` (mergekit YAML)
    names into the folder ``out``. Options as :class:`Options`. Returns a summary dict."""
    return Merger(config, out, Options(**options)).run()
