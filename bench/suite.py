"""The engine behind ``fastmerge bench``: time every merge against PEFT and mergekit, in one run.

Every row answers three questions about one op at one shape, dtype and K:

* how long it takes (``median_ms``, median of several timed calls after warm-up);
* how close it is to the memory-bandwidth ceiling: ``gbps = bytes / median`` where ``bytes`` is
  what the op *must* move (mergekit-style merge: K models + base read, one output written;
  PEFT-style: K task tensors read, one output written) and ``pct_of_copy_bw`` compares that with
  ``dst.copy_(src)`` measured on this machine in the same run;
* how much faster it is than the library it replaces (``speedup_vs``: the reference library's
  median divided by this row's median, both measured in this run):
  ``fastmerge.merge(X)`` vs ``mergekit.merge_methods.merge_tensors(..., X)`` and
  ``fastmerge.peft.X`` vs ``peft.utils.merge_utils.X``.

Use :func:`run` from Python or :func:`main` (argparse) from the command line
(``fastmerge bench --quick``, ``python bench/run.py --quick``). See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

import fastmerge

from . import methods as other_methods

# Order of the table: the methods people use most first.
MERGE_METHODS = tuple(m for m in (
    "ties", "dare_ties", "task_arithmetic", "della", "dare_linear", "breadcrumbs_ties",
    "della_linear", "breadcrumbs", "linear",
) if m in fastmerge.METHODS)
PEFT_METHODS = ("ties", "dare_ties", "task_arithmetic")
# mergekit's other methods (bench/methods.py): each with its own K (up to 3) and parameters
OTHER_METHODS = other_methods.METHODS
ALL_OPS = tuple(dict.fromkeys(MERGE_METHODS + PEFT_METHODS + OTHER_METHODS))
# mergekit references run by default (the reference libraries are slow); any other method
# mergekit knows gets its reference too when it is named explicitly in ``methods``.
MERGEKIT_DEFAULT_REFS = ("ties", "dare_ties", "della", "task_arithmetic") + OTHER_METHODS
MERGEKIT_METHODS = MERGE_METHODS  # mergekit 0.1.5 registers all of these names
NO_DENSITY = ("task_arithmetic", "linear")  # methods that do not sparsify
BACKENDS = ("cpu", "triton", "cuda", "torch")  # fastmerge backends, fast ones first
SLOW_BACKENDS = ("torch",)  # the readable reference: the spec, not a contender
BACKEND_DEVICE = {"torch": "cpu", "cpu": "cpu", "triton": "cuda", "cuda": "cuda"}
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

# Llama-7B/8B-like projections: square attention and MLP up/gate. The MLP down projection
# (14336x4096: same numel, but DELLA ranks along rows) is left to --shapes: the references need
# ~1 min per shape and dtype for TIES+DELLA alone on 2 cores, and the full plan must stay
# around 10 minutes.
FULL_SHAPES = ((4096, 4096), (4096, 14336))
FULL_DTYPES = (torch.float32, torch.bfloat16)
QUICK_DTYPES = (torch.float32,)
DEFAULT_K = 3
DEFAULT_DENSITY = 0.2

# Timing policy. ``max_time`` bounds the timed part of one case: a call slower than that is
# timed once after a single warm-up call (PEFT's TIES on 4096x14336 takes ~15 s per call).
TIMING = {
    "quick": dict(warmup=1, min_reps=3, min_time=0.2, max_time=0.5),
    "full": dict(warmup=2, min_reps=5, min_time=0.5, max_time=2.0),
}


@dataclass(frozen=True)
class Tier:
    """One shape of the plan. ``refs``: run PEFT/mergekit; ``slow``: run the ``torch``
    reference backend by default; ``fast_only``: never run refs or slow backends here."""

    shape: tuple
    refs: bool = True
    slow: bool = False
    fast_only: bool = False


@dataclass
class Case:
    op: str
    api: str  # "mergekit" | "peft": whose semantics (and which reference it is paired with)
    backend: str  # fastmerge backend, or "peft" / "mergekit" for the reference libraries
    fn: Callable
    slow: bool  # reference library or torch backend

    @property
    def is_ref(self) -> bool:
        return self.backend in ("peft", "mergekit")


# ----------------------------------------------------------------------------- measurement


def _sync_for(device) -> Optional[Callable]:
    device = torch.device(device)
    if device.type == "cuda":
        return functools.partial(torch.cuda.synchronize, device)
    return None


def time_fn(fn: Callable, warmup: int = 1, min_reps: int = 3, min_time: float = 0.2, *,
            max_time: Optional[float] = None, max_reps: int = 10_000,
            sync: Optional[Callable] = None) -> list:
    """Seconds per call of ``fn()``, measured with ``time.perf_counter``; report the median.

    Runs ``warmup`` untimed calls (stopping early once one takes longer than ``max_time``), then
    timed calls until there are at least ``min_reps`` of them and ``min_time`` seconds have
    been spent, or until ``max_time`` seconds have been spent (at least one call is always
    timed), or ``max_reps`` calls. ``sync`` (e.g. ``torch.cuda.synchronize``) is called
    before starting and stopping each clock.
    """
    def once() -> float:
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        return time.perf_counter() - t0

    for _ in range(warmup):
        if max_time is not None and once() > max_time:
            break
    times = []
    spent = 0.0
    while True:
        t = once()
        times.append(t)
        spent += t
        if len(times) >= max_reps:
            break
        if max_time is not None and spent >= max_time:
            break
        if len(times) >= min_reps and spent >= min_time:
            break
    return times


def copy_bandwidth(nbytes: int = 256 * 2**20, device="cpu", reps: int = 10, timer=None) -> float:
    """Measured copy bandwidth in GB/s (1 GB = 1e9 bytes): ``dst.copy_(src)`` on fp32 tensors
    of ``nbytes`` each, counting read + write (``2 * nbytes``), median of ``reps`` copies
    (``timer``: :func:`time_fn` or one with its signature, e.g. ``bench.gpu.cuda_time``)."""
    n = max(1, int(nbytes) // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)  # ones/zeros: pages are touched
    dst = torch.zeros_like(src)
    times = (timer or time_fn)(functools.partial(dst.copy_, src), warmup=2, min_reps=reps,
                               min_time=0.0, max_reps=reps, sync=_sync_for(device))
    del src, dst
    return 2 * n * 4 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------- environment


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({cpu_cores()} cores)"


def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _version(dist: str, module: Optional[str] = None) -> Optional[str]:
    try:
        from importlib import metadata

        return metadata.version(dist)
    except Exception:
        pass
    try:
        return getattr(importlib.import_module(module or dist), "__version__", None)
    except Exception:
        return None


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastmerge": getattr(fastmerge, "__version__", None),
        "peft": _version("peft"),
        "mergekit": _version("mergekit"),
    }


def git_commit() -> tuple:
    """``(commit, dirty)`` of the checkout fastmerge (or this file) lives in; ``(None, None)``
    outside a git checkout (an installed wheel)."""
    for path in (os.path.dirname(os.path.abspath(fastmerge.__file__)),
                 os.path.dirname(os.path.abspath(__file__))):
        try:
            commit = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10, check=True).stdout.strip()
            status = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()
            return commit or None, bool(status)
        except Exception:
            continue
    return None, None


def environment() -> dict:
    """Where and when a benchmark runs: the fields every results file's ``meta`` carries
    (machine, threads, load average at the start, commit, library versions, UTC date)."""
    commit, dirty = git_commit()
    return {"cpu": cpu_name(), "cores": cpu_cores(), "platform": platform.platform(),
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "loadavg_at_start": _loadavg(), "commit": commit, "dirty": dirty,
            "versions": versions(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


class Bench:
    """Rows with the fields of ``fastmerge bench`` plus any extra figures (errors, ratios), for
    the benchmarks of one API (``bench.lowrank``, ``bench.quant``)."""

    def __init__(self, device: str, quick: bool, api: str, log=print, timer=None):
        """``timer``: :func:`time_fn` (default) or one with its signature, e.g. CUDA events
        (``bench.gpu.cuda_time``); it times both the copy bandwidth and every row."""
        self.dev = device
        self.dname = device_name(device)
        self.sync = _sync_for(device)
        self.timer = timer or time_fn
        self.log = log
        self.quick = quick
        self.api = api
        self.env = environment()
        self.copy = copy_bandwidth(device=device, timer=self.timer)
        self.rows = []

    def time(self, fn, slow: bool) -> list:
        """Seconds per call: a slow call (seconds each) once, warm; otherwise a median of >= 3."""
        if slow:
            return self.timer(fn, warmup=0, min_reps=1, min_time=0.0, max_time=0.0, sync=self.sync)
        return self.timer(fn, warmup=1, min_reps=3, min_time=0.5, max_time=20.0, sync=self.sync)

    def finish(self, t0: float, command: str, config: dict, json_path=None) -> list:
        """Log the row count and wall time since ``t0``, save ``{meta, rows}`` to ``json_path``
        (meta: environment, copy bandwidth, ``config`` plus the command line), return the rows."""
        wall = time.perf_counter() - t0
        self.log(f"{len(self.rows)} rows in {wall:.0f} s")
        meta = {"mode": "quick" if self.quick else "full", "device": self.dname, **self.env,
                "copy_gbps": self.copy,
                "config": {**config, "command": " ".join([command] + sys.argv[1:])},
                "wall_s": round(wall, 1)}
        if json_path:
            self.log(f"saved {save_json(self.rows, meta, json_path)}")
        return self.rows

    def row(self, op, backend, shape, k, times, nbytes, speedup=None, dtype="float32", **extra) -> dict:
        med = statistics.median(times)
        gbps = nbytes / med / 1e9
        r = {"op": op, "api": self.api, "backend": backend, "device": self.dname,
             "torch_device": self.dev, "shape": list(shape), "dtype": dtype, "k": k,
             "median_ms": med * 1e3, "min_ms": min(times) * 1e3, "reps": len(times),
             "bytes": nbytes, "gbps": gbps, "pct_of_copy_bw": 100.0 * gbps / self.copy,
             "speedup_vs": speedup or {}, "commit": self.env["commit"], "versions": self.env["versions"],
             "date": self.env["date"], "threads": self.env["threads"]}
        r.update(extra)
        self.rows.append(r)
        figs = " ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}"
                        for k_, v in extra.items())
        sp = " ".join(f"x{v:.2f} vs {n}" for n, v in (speedup or {}).items())
        self.log(f"{op:<12} {backend:<22} {'x'.join(map(str, shape)):<10} k={k:<4} "
                 f"{med * 1e3:>10.1f} ms  {figs}  {sp}")
        return r



def _references() -> dict:
    """The reference libraries that can be imported: ``{"peft": module, "mergekit": fn}``."""
    refs = {}
    try:
        from peft.utils import merge_utils

        refs["peft"] = merge_utils
    except Exception as exc:  # not installed, or broken by a version mismatch
        refs["peft"] = exc
    try:
        from mergekit.merge_methods import merge_tensors

        refs["mergekit"] = merge_tensors
    except Exception as exc:
        refs["mergekit"] = exc
    return refs


# ----------------------------------------------------------------------------- cases


def _inputs(shape, dtype, k: int, device, seed: int, tasks: bool):
    """Weight-like base ``N(0, 0.02)`` and K fine-tunes ``base + N(0, 0.002)``, made in fp32
    then cast; ``tasks`` adds PEFT's inputs ``t_k = m_k - base`` (outside any timing)."""
    g = torch.Generator().manual_seed(seed)
    base32 = torch.randn(shape, generator=g) * 0.02
    models = [(base32 + torch.randn(shape, generator=g) * 0.002).to(dtype).to(device) for _ in range(k)]
    base = base32.to(dtype).to(device)
    del base32
    task_tensors = [m - base for m in models] if tasks else None
    return base, models, task_tensors


def _merge_case(method, base, models, weights, density, seed, backend):
    kwargs = dict(weights=weights, seed=seed, backend=backend)
    if method not in NO_DENSITY:
        kwargs["density"] = density
    if method == "linear":  # linear ignores the base: sum w_k m_k / sum w_k
        return functools.partial(fastmerge.merge, method, None, models, **kwargs)
    return functools.partial(fastmerge.merge, method, base, models, **kwargs)


def _mergekit_case(merge_tensors, method, base, models, weights, density):
    params = {"weight": list(weights)}
    if method not in NO_DENSITY:
        params["density"] = [density] * len(models)
    if method == "linear":
        return functools.partial(merge_tensors, list(models), method, parameters=params)
    return functools.partial(merge_tensors, [base, *models], method, parameters=params, base_index=0)


def _peft_case(impl, method, tasks, weights_t, density, seed=None, backend=None):
    extra = {} if backend is None else {"backend": backend}
    if method == "task_arithmetic":
        return functools.partial(impl.task_arithmetic, tasks, weights_t, **extra)
    if method == "dare_ties" and backend is not None:
        extra["seed"] = seed
    return functools.partial(getattr(impl, method), tasks, weights_t, density, **extra)


def bytes_moved(op: str, api: str, numel: int, k: int, in_dtype, out_dtype) -> int:
    """Bytes the op cannot avoid moving: every input read once, the output written once.
    mergekit-style: K models + the base (``linear`` does not read the base); PEFT-style:
    K task tensors; mergekit's other methods: their own K models, plus the base when they take
    one (bench/methods.py). The output counts with its own dtype (PEFT promotes to the weights'
    dtype)."""
    isz = torch.empty((), dtype=in_dtype).element_size()
    osz = torch.empty((), dtype=out_dtype).element_size()
    if op in OTHER_METHODS:
        n_in = other_methods.bytes_in(op)
    else:
        n_in = k + 1 if api == "mergekit" and op != "linear" else k
    return n_in * numel * isz + numel * osz


# ----------------------------------------------------------------------------- table


_COLS = (("op", 16, "<"), ("api", 8, "<"), ("backend", 8, "<"), ("shape", 11, "<"),
         ("dtype", 8, "<"), ("K", 2, ">"), ("median ms", 10, ">"), ("GB/s", 8, ">"),
         ("% copy BW", 9, ">"), ("x peft", 7, ">"), ("x mergekit", 10, ">"))


def _fmt_line(values) -> str:
    return "  ".join(f"{str(v):{align}{w}}" for v, (_, w, align) in zip(values, _COLS)).rstrip()


def table_header() -> str:
    head = _fmt_line([c[0] for c in _COLS])
    return head + "\n" + "-" * len(head)


def _num(x, fmt) -> str:
    return "-" if x is None else format(x, fmt)


def format_row(row: dict) -> str:
    ms = row["median_ms"]
    sp = row["speedup_vs"]
    return _fmt_line([
        row["op"], row["api"], row["backend"], "x".join(map(str, row["shape"])), row["dtype"],
        row["k"], _num(ms, ".3f" if ms < 10 else ".1f" if ms < 1000 else ".0f"),
        _num(row["gbps"], ".2f"), _num(row["pct_of_copy_bw"], ".1f"),
        _num(sp["peft"], ".1f"), _num(sp["mergekit"], ".1f"),
    ])


# ----------------------------------------------------------------------------- run


def _plan(quick: bool, shapes) -> list:
    if shapes:
        return [Tier(tuple(s), refs=True, slow=quick) for s in shapes]
    if quick:
        # 1024^2: with the slow references (and the torch backend if nothing faster is built);
        # 2048^2: the fused backends alone, a size where their threads have work to share.
        return [Tier((1024, 1024), refs=True, slow=True), Tier((2048, 2048), fast_only=True)]
    return [Tier(s) for s in FULL_SHAPES]


def _select_backends(backends, available: dict, log) -> tuple:
    """``(names, explicit)``: fastmerge backends to run, fast ones first."""
    def no_device(b):
        # triton is usable on CPU tensors under TRITON_INTERPRET=1 (the tests' mode): no GPU, no row
        return BACKEND_DEVICE.get(b) == "cuda" and not torch.cuda.is_available()

    if backends is None:
        return [b for b in BACKENDS if available.get(b, {}).get("available") and not no_device(b)], False
    names = []
    for b in backends:
        info = available.get(b)
        if info is None:
            raise ValueError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
        if not info["available"] or no_device(b):
            log(f"backend {b} skipped: {info['reason'] if not info['available'] else 'no CUDA device'}")
            continue
        if b not in names:
            names.append(b)
    return names, True


def tier_backends(tier: Tier, backends: list, explicit: bool) -> list:
    """The fastmerge backends timed at ``tier``. The torch backend (the readable spec, not a
    contender) runs when named explicitly, or in a ``slow`` tier when no fused backend exists
    (so that fastmerge still has rows); never in a ``fast_only`` tier."""
    has_fast = any(b not in SLOW_BACKENDS for b in backends)
    return [b for b in backends if b not in SLOW_BACKENDS or (
        not tier.fast_only and (explicit or (tier.slow and not has_fast)))]


def _cases(tier: Tier, dev: str, backends: list, explicit_backends: bool, methods: list,
           explicit_methods: bool, refs: dict, inputs, k: int, density: float, seed: int,
           others: bool = True) -> list:
    """The cases of one shape/dtype/K; mergekit's other methods (their own K) when ``others``."""
    base, all_models, tasks = inputs
    models = all_models
    models = models[:k]
    tasks = tasks[:k] if tasks is not None else None
    weights = [1.0 / k] * k
    weights_t = torch.tensor(weights, dtype=torch.float32, device=base.device)
    run_refs = tier.refs and not tier.fast_only
    bks = [b for b in tier_backends(tier, backends, explicit_backends) if BACKEND_DEVICE[b] == dev]
    mk = refs.get("mergekit") if run_refs and not isinstance(refs.get("mergekit"), Exception) else None
    pf = refs.get("peft") if run_refs and not isinstance(refs.get("peft"), Exception) else None
    mk_methods = MERGEKIT_METHODS if explicit_methods else MERGEKIT_DEFAULT_REFS
    out = []
    for op in methods:  # mergekit-style API, reference first so speedups print with the row
        if op not in MERGE_METHODS:
            continue
        if mk is not None and op in mk_methods:
            out.append(Case(op, "mergekit", "mergekit", _mergekit_case(mk, op, base, models, weights, density), True))
        for b in bks:
            out.append(Case(op, "mergekit", b, _merge_case(op, base, models, weights, density, seed, b),
                            b in SLOW_BACKENDS))
    for op in methods if others else ():  # mergekit's other methods, each with its own K
        if op not in OTHER_METHODS:
            continue
        if mk is not None:
            out.append(Case(op, "mergekit", "mergekit", other_methods.mergekit_case(mk, op, base, all_models), True))
        for b in bks:
            out.append(Case(op, "mergekit", b, other_methods.fastmerge_case(op, base, all_models, b),
                            b in SLOW_BACKENDS))
    for op in methods:  # PEFT-style API
        if op not in PEFT_METHODS:
            continue
        if pf is not None:
            out.append(Case(op, "peft", "peft", _peft_case(pf, op, tasks, weights_t, density), True))
        for b in bks:
            out.append(Case(op, "peft", b, _peft_case(fastmerge.peft, op, tasks, weights_t, density, seed, b),
                            b in SLOW_BACKENDS))
    return out


def case_keys(backends=None, refs: bool = True, methods=None) -> list:
    """``(op, api, backend)`` of every case :func:`make_cases` builds, without building inputs
    (for pytest parametrization)."""
    return [(c.op, c.api, c.backend) for c in make_cases(shape=(0,), backends=backends, refs=refs,
                                                         methods=methods, _placeholders=True)[0]]


def make_cases(shape=(1024, 1024), dtype=torch.float32, k: int = DEFAULT_K,
               density: float = DEFAULT_DENSITY, seed: int = 0, backends=None, refs: bool = True,
               methods=None, _placeholders: bool = False) -> tuple:
    """``(cases, numel)`` for one shape/dtype/K on CPU: every fastmerge backend available (the
    torch reference included unless ``backends`` says otherwise) plus the PEFT and mergekit
    references, as in :func:`run`. ``case.fn()`` runs one merge."""
    available = fastmerge.backends()
    if backends is None:
        backends = [b for b in BACKENDS if available.get(b, {}).get("available")]
    else:
        backends = [b for b in backends if available.get(b, {}).get("available")]
    backends = [b for b in backends if BACKEND_DEVICE[b] == "cpu"]
    tier = Tier(tuple(shape), refs=refs, slow=True)
    ops = list(methods) if methods is not None else list(ALL_OPS)
    ref_libs = _references() if refs else {}
    if _placeholders:
        e = torch.empty(0)
        inputs, numel = (e, [e] * _models_needed(ops, k), [e] * k), 0
    else:
        inputs = _inputs(tuple(shape), dtype, _models_needed(ops, k), "cpu", seed, tasks=True)
        numel = inputs[0].numel()
    return _cases(tier, "cpu", backends, True, ops, methods is not None, ref_libs, inputs, k,
                  density, seed), numel


def _models_needed(methods, kmax: int) -> int:
    """Models to generate: the largest K asked for, and every other method's own K."""
    return max([kmax] + [other_methods.k_of(m) for m in methods if m in OTHER_METHODS])


def run(quick: bool = False, shapes=None, dtypes=None, ks=None, methods=None, backends=None,
        refs: bool = True, json_path: Optional[str] = None, plot_dir: Optional[str] = None,
        density: float = DEFAULT_DENSITY, seed: int = 0, verbose: bool = True, timer=None,
        timing: Optional[dict] = None, extra_cases: Optional[Callable] = None,
        label: Optional[str] = None) -> list:
    """Run the benchmark, print the table, optionally save JSON and PNG plots; return the rows.

    Args:
        quick: ~30 s plan (1024x1024 fp32 with the references, plus 2048x2048 for the fused
            backends alone) instead of the full one (Llama-like shapes, fp32 and bf16).
        shapes: list of shapes (tuples) replacing the plan's; every shape gets references.
        dtypes: list of torch dtypes (or names). ks: list of K (number of models).
        methods: op names (mergekit's method names; ``ties, dare_ties, task_arithmetic`` also
            run through ``fastmerge.peft``). Default: all.
        backends: fastmerge backends to run. Default: every available fused one; the slow
            ``torch`` reference backend only when named here, or in the quick plan's small
            shape when no fused backend is built.
        refs: run PEFT and mergekit themselves (needed for ``speedup_vs``).
        json_path: write ``{"meta": ..., "rows": ...}`` here (a directory gets a dated name).
        plot_dir: write ``gbps.png`` and ``speedup.png`` here (needs matplotlib).
        density: fraction kept by the sparsifying methods. seed: data and DARE/DELLA seed.
        timer: replaces :func:`time_fn` (same signature), e.g. CUDA-event timing on a GPU.
        timing: replaces the plan's ``TIMING`` entry. label: the results' ``mode``.
        extra_cases: ``f(shape, device, dtype, inputs, k, backends) -> [(Case, nbytes), ...]``,
            more rows per shape/dtype/K (``nbytes`` None: :func:`bytes_moved`).
    """
    t_start = time.perf_counter()
    log = (lambda s="": print(s, flush=True)) if verbose else (lambda s="": None)
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    mode = label or ("quick" if quick else "full")
    timing = timing or TIMING["quick" if quick else "full"]
    dtypes = [DTYPES[d] if isinstance(d, str) else d for d in (dtypes or (QUICK_DTYPES if quick else FULL_DTYPES))]
    ks = list(ks or [DEFAULT_K])
    explicit_methods = methods is not None
    methods = list(methods) if methods is not None else list(ALL_OPS)
    for m in methods:
        if m not in ALL_OPS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(ALL_OPS)}")
    available = fastmerge.backends()
    bks, explicit_backends = _select_backends(backends, available, log)
    ref_libs = _references() if refs else {}
    plan = _plan(quick, shapes)

    env = environment()
    commit, dirty, vers, date, threads = (env[k] for k in ("commit", "dirty", "versions", "date", "threads"))
    devices = sorted({BACKEND_DEVICE[b] for b in bks}) or ["cpu"]

    log(f"fastmerge bench ({mode}{' — pass --quick for a ~1 min run' if mode == 'full' else ''})")
    log(f"fastmerge {vers['fastmerge']} from {os.path.dirname(os.path.abspath(fastmerge.__file__))}; "
        f"commit {commit[:12] + ('+dirty' if dirty else '') if commit else 'n/a'}")
    log("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    for name in BACKENDS:
        info = available.get(name, {})
        log(f"backend {name:<6} {'yes' if info.get('available') else 'no ':<3}  {info.get('reason', '')}")
    for lib, mod in ref_libs.items():
        if isinstance(mod, Exception):
            log(f"reference {lib} not importable, its rows are skipped: {type(mod).__name__}: {mod}")
    if not refs:
        log("references: off (--no-refs): no speedups")
    if not bks:
        log("no fastmerge backend selected/available: only reference rows will be measured")
    timed = {b for t in plan for b in tier_backends(t, bks, explicit_backends)}
    if bks:
        for b in bks:
            if b not in timed:
                log(f"backend {b} is skipped by this plan (it is the spec, not a contender); "
                    f"name it in --backends to time it")

    load = env["loadavg_at_start"]
    if load is not None and load > 0.5:
        log(f"load average {load:.2f} at start: other work is running, timings will be noisy")
    copy_gbps = {}
    for dev in devices:
        copy_gbps[dev] = copy_bandwidth(device=dev, timer=timer)
        log(f"copy bandwidth [{dev}] {device_name(dev)}: {copy_gbps[dev]:.2f} GB/s "
            f"(dst.copy_(src), 256 MiB fp32, read+write, {threads} torch threads)")
    log()
    log(table_header())

    rows, errors = [], []
    for tier in plan:
        for dev in devices:
            for dtype in dtypes:
                kmax = _models_needed(methods, max(ks))
                # Build the case list on placeholders first: skip the (big) inputs if empty.
                probe = _cases(tier, dev, bks, explicit_backends, methods, explicit_methods,
                               ref_libs, (torch.empty(0), [torch.empty(0)] * kmax, [torch.empty(0)] * kmax),
                               kmax, density, seed)
                if not probe:
                    continue
                need_tasks = any(c.api == "peft" for c in probe)
                try:
                    inputs = _inputs(tier.shape, dtype, kmax, dev, seed, need_tasks)
                except RuntimeError as exc:  # out of memory
                    errors.append({"shape": list(tier.shape), "dtype": str(dtype), "error": repr(exc)})
                    log(f"! {tier.shape} {dtype}: could not allocate inputs: {exc}")
                    continue
                numel = inputs[0].numel()
                dname = device_name(dev)
                sync = _sync_for(dev)
                for k in ks:
                    ref_ms = {}
                    cases = [(c, None) for c in _cases(tier, dev, bks, explicit_backends, methods,
                                                       explicit_methods, ref_libs, inputs, k, density, seed,
                                                       others=k == ks[0])]
                    if extra_cases is not None:
                        tb = [b for b in tier_backends(tier, bks, explicit_backends) if BACKEND_DEVICE[b] == dev]
                        cases += extra_cases(tier.shape, dev, dtype, inputs, k, tb)
                    for case, nbytes in cases:
                        try:
                            row = _measure(case, dev, dname, tier.shape, dtype, k, density, numel,
                                           timing, sync, copy_gbps[dev], ref_ms, timer, nbytes)
                        except Exception as exc:
                            errors.append({"op": case.op, "api": case.api, "backend": case.backend,
                                           "shape": list(tier.shape), "dtype": _dtype_name(dtype),
                                           "k": k, "error": f"{type(exc).__name__}: {exc}"})
                            log(f"! {case.op} {case.api} {case.backend}: {type(exc).__name__}: {exc}")
                            continue
                        row.update(commit=commit, versions=vers, date=date, threads=threads)
                        rows.append(row)
                        log(format_row(row))
                del inputs
                gc.collect()
                if dev == "cuda":
                    torch.cuda.empty_cache()
    wall = time.perf_counter() - t_start
    log()
    log(f"{len(rows)} rows in {wall:.1f} s")
    if errors:
        log(f"{len(errors)} case(s) failed (listed above)")

    meta = {
        "mode": mode,
        "device": device_name(devices[0]),
        "devices": {d: device_name(d) for d in devices},
        **env,
        "copy_gbps": copy_gbps.get("cpu", next(iter(copy_gbps.values()))),
        "copy_gbps_by_device": copy_gbps,
        "backends": available,
        "fastmerge_path": os.path.dirname(os.path.abspath(fastmerge.__file__)),
        "config": {"shapes": [list(t.shape) for t in plan], "dtypes": [_dtype_name(d) for d in dtypes],
                   "ks": ks, "methods": methods, "backends": [b for b in bks if b in timed], "refs": refs, "density": density,
                   "seed": seed, "timing": timing},
        "errors": errors,
        "wall_s": round(wall, 2),
    }
    if json_path:
        path = save_json(rows, meta, json_path)
        log(f"saved {path}")
    if plot_dir:
        for p in plot(rows, meta, plot_dir, log=log):
            log(f"saved {p}")
    return rows


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _measure(case: Case, dev, dname, shape, dtype, k, density, numel, timing, sync, copy, ref_ms,
             timer=None, nbytes=None) -> dict:
    # First call: warm-up, and the output's dtype (PEFT promotes bf16 tasks to fp32 weights).
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    out = case.fn()
    if sync is not None:
        sync()
    first = time.perf_counter() - t0
    out_dtype = out.dtype
    del out
    other = case.op in OTHER_METHODS
    if other:
        k = other_methods.k_of(case.op)
    warmup = 0 if first > timing["max_time"] else max(0, timing["warmup"] - 1)
    times = (timer or time_fn)(case.fn, warmup, timing["min_reps"], timing["min_time"],
                               max_time=timing["max_time"], sync=sync)
    med = statistics.median(times)
    if nbytes is None:
        nbytes = bytes_moved(case.op, case.api, numel, k, dtype, out_dtype)
    gbps = nbytes / med / 1e9
    speedup = {"peft": None, "mergekit": None}
    if case.is_ref:
        ref_ms[(case.api, case.op)] = med
    elif (case.api, case.op) in ref_ms:
        speedup[case.api] = ref_ms[(case.api, case.op)] / med
    return {
        "op": case.op, "api": case.api, "backend": case.backend, "device": dname,
        "torch_device": dev, "shape": list(shape), "dtype": _dtype_name(dtype),
        "out_dtype": _dtype_name(out_dtype), "k": k,
        "density": None if case.op in NO_DENSITY or other else density,
        "median_ms": med * 1e3, "min_ms": min(times) * 1e3, "reps": len(times),
        "bytes": nbytes, "gbps": gbps, "pct_of_copy_bw": 100.0 * gbps / copy,
        "speedup_vs": speedup,
        **({"path": other_methods.path(case.op, case.backend)} if other and not case.is_ref else {}),
    }


# ----------------------------------------------------------------------------- outputs


def save_json(rows: list, meta: dict, path: str) -> str:
    """Write ``{"meta": meta, "rows": rows}``; a directory (existing, or ending in '/') gets
    ``bench_<mode>_<UTC date>.json`` inside it."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        stamp = meta["date"].replace(":", "").replace("-", "").replace("+0000", "Z")
        path = os.path.join(path, f"bench_{meta['mode']}_{stamp}.json")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
        f.write("\n")
    return path


def _groups(rows: list) -> dict:
    groups = {}
    for r in rows:
        key = (r["torch_device"], tuple(r["shape"]), r["dtype"], r["k"])
        groups.setdefault(key, []).append(r)
    return groups


def _label(r) -> str:
    return r["op"] if r["api"] == "mergekit" else f"peft.{r['op']}"


def plot(rows: list, meta: dict, plot_dir: str, log=print) -> list:
    """``gbps.png`` (effective GB/s per op and backend, copy bandwidth as a line) and
    ``speedup.png`` (fastmerge over its paired reference), one panel per shape/dtype/K."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    if not rows:
        log("plots skipped: no rows")
        return []
    os.makedirs(plot_dir, exist_ok=True)
    groups = _groups(rows)
    order = {b: i for i, b in enumerate(BACKENDS + ("peft", "mergekit"))}
    colors = {"cpu": "tab:blue", "triton": "tab:purple", "cuda": "tab:green", "torch": "tab:gray",
              "peft": "tab:orange", "mergekit": "tab:red"}
    paths = []

    def save(fig, name):
        fig.tight_layout()
        path = os.path.join(plot_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    def panels(n, width):
        fig, axes = plt.subplots(n, 1, figsize=(width, 3.6 * n), squeeze=False)
        return fig, [a[0] for a in axes]

    def title(key):
        dev, shape, dtype, k = key
        return (f"{meta['devices'].get(dev, dev)} | {'x'.join(map(str, shape))} {dtype} K={k} | "
                f"copy {meta['copy_gbps_by_device'][dev]:.1f} GB/s")

    def grouped_bars(ax, g, value, legend, annotate=None):
        """One bar group per op label, one bar per backend; returns (labels, backends)."""
        labels = list(dict.fromkeys(_label(r) for r in g))
        series = sorted({r["backend"] for r in g}, key=lambda b: order.get(b, 99))
        bw = 0.8 / len(series)
        for j, b in enumerate(series):
            xs, ys = [], []
            for i, lab in enumerate(labels):
                hit = [r for r in g if _label(r) == lab and r["backend"] == b]
                if hit:
                    xs.append(i - 0.4 + bw * (j + 0.5))
                    ys.append(value(hit[0]))
            bars = ax.bar(xs, ys, bw, label=legend.format(b), color=colors.get(b))
            if annotate:
                for rect, y in zip(bars, ys):
                    ax.annotate(annotate.format(y), (rect.get_x() + rect.get_width() / 2, y),
                                ha="center", va="bottom", fontsize=7)
        return labels, series

    # Effective bandwidth
    width = max(8.0, 0.9 * max(len({_label(r) for r in g}) for g in groups.values()) + 2)
    fig, axes = panels(len(groups), width)
    for ax, (key, g) in zip(axes, groups.items()):
        labels, series = grouped_bars(ax, g, lambda r: r["gbps"], "{}")
        copy = meta["copy_gbps_by_device"][key[0]]
        ax.axhline(copy, color="black", ls="--", lw=1, label=f"copy {copy:.1f} GB/s")
        ax.set_yscale("log")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.set_ylabel("effective GB/s")
        ax.set_title(title(key), fontsize=9)
        ax.legend(fontsize=7, ncol=len(series) + 1)
        ax.grid(axis="y", which="both", alpha=0.3)
    save(fig, "gbps.png")

    # Speedup over the paired reference
    sgroups = {k: [r for r in g if r["speedup_vs"].get(r["api"])] for k, g in groups.items()}
    sgroups = {k: g for k, g in sgroups.items() if g}
    if not sgroups:
        log("speedup plot skipped: no fastmerge row has a reference measured in this run")
        return paths
    fig, axes = panels(len(sgroups), width)
    for ax, (key, g) in zip(axes, sgroups.items()):
        labels, _ = grouped_bars(ax, g, lambda r: r["speedup_vs"][r["api"]], "fastmerge[{}]",
                                 annotate="{:.1f}x")
        ax.axhline(1.0, color="black", lw=1)
        ax.set_yscale("log")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([f"{lab}\nvs {'peft' if lab.startswith('peft.') else 'mergekit'}"
                            for lab in labels], fontsize=8)
        ax.set_ylabel("speedup (x, log)")
        ax.set_title(title(key), fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", which="both", alpha=0.3)
    save(fig, "speedup.png")
    return paths


# ----------------------------------------------------------------------------- CLI


def _csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def _shapes(text: str) -> list:
    out = []
    for item in _csv(text):
        try:
            shape = tuple(int(d) for d in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: use e.g. 4096x4096") from None
        if not shape or any(d <= 0 for d in shape):
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: dimensions must be positive")
        out.append(shape)
    return out


def _dtypes(text: str) -> list:
    out = []
    for item in _csv(text):
        if item.lower() not in DTYPES:
            raise argparse.ArgumentTypeError(f"unknown dtype {item!r}; use float32, bfloat16, float16")
        out.append(DTYPES[item.lower()])
    return out


def _ks(text: str) -> list:
    try:
        ks = [int(x) for x in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad K list {text!r}: use e.g. 3 or 2,3,8") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError("K must be >= 1")
    return ks


def _choices(allowed, what: str):
    """argparse type: a comma-separated list whose entries must all be in ``allowed``."""
    def parse(text: str) -> list:
        items = _csv(text)
        for x in items:
            if x not in allowed:
                raise argparse.ArgumentTypeError(f"unknown {what} {x!r}; choose from {', '.join(allowed)}")
        return items
    return parse


_methods = _choices(ALL_OPS, "method")
_backends = _choices(BACKENDS, "backend")


def _density(text: str) -> float:
    try:
        d = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad density {text!r}") from None
    if not 0.0 < d <= 1.0:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {d}")
    return d


def build_parser(prog: str = "fastmerge bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Time fastmerge's merges against PEFT and mergekit on this machine: median "
                    "time, effective GB/s, % of measured copy bandwidth, speedup (same run).",
        epilog="Default (full) plan: 4096x4096 and 4096x14336; float32 and bfloat16; K=3; "
               "density 0.2; every available fused backend; PEFT and mergekit references "
               "(~10 min on 2 cores, mostly the references). --quick: ~20-30 s. "
               "See bench/README.md.",
    )
    p.add_argument("--quick", action="store_true",
                   help="small plan: 1024x1024 fp32 with the references, 2048x2048 fp32 for the "
                        "fused backends alone; under a minute on 2 cores")
    p.add_argument("--json", metavar="PATH", help="save {meta, rows} as JSON (a directory gets a dated file)")
    p.add_argument("--plot", metavar="DIR", help="save gbps.png and speedup.png (needs matplotlib)")
    p.add_argument("--shapes", type=_shapes, metavar="AxB,...", help="e.g. 4096x4096,4096x14336")
    p.add_argument("--dtypes", type=_dtypes, metavar="D,...", help="float32,bfloat16,float16")
    p.add_argument("--k", type=_ks, metavar="K,...", help="number of models merged (default 3)")
    p.add_argument("--methods", type=_methods, metavar="M,...",
                   help=f"subset of: {', '.join(ALL_OPS)} (default all)")
    p.add_argument("--backends", type=_backends, metavar="B,...",
                   help="fastmerge backends: cpu,triton,cuda,torch (default: every available "
                        "fused one; the slow torch reference only when named, or in --quick "
                        "when no fused backend is built)")
    p.add_argument("--no-refs", action="store_true", help="skip PEFT and mergekit (no speedups)")
    p.add_argument("--density", type=_density, default=DEFAULT_DENSITY,
                   help=f"density of the sparsifying methods (default {DEFAULT_DENSITY})")
    p.add_argument("--seed", type=int, default=0, help="seed for the data and DARE/DELLA (default 0)")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = "fastmerge bench") -> int:
    args = build_parser(prog).parse_args(argv)
    run(quick=args.quick, shapes=args.shapes, dtypes=args.dtypes, ks=args.k, methods=args.methods,
        backends=args.backends, refs=not args.no_refs, json_path=args.json, plot_dir=args.plot,
        density=args.density, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
