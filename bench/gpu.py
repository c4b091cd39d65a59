"""GPU benchmark of the ``triton`` and ``cuda`` backends against PEFT and mergekit on the same GPU:
``python -m bench.gpu`` from a checkout, ``fastmerge bench-gpu`` (or ``python -m
fastmerge.bench.gpu``) when installed.

Plan (issue 3): ``ties, dare_ties, task_arithmetic, della``; K in {2, 4, 8}; shapes 4096x4096,
4096x14336 and 128256x4096 (Llama-3-8B projections and embedding); bf16 and fp32; every GPU
backend available; PEFT's and mergekit's own functions on the same tensors; the copy bandwidth
of this GPU measured at the start of the same run. Rows are :mod:`bench.suite`'s (``op,
backend, device, shape, dtype, k, median_ms, bytes, gbps, pct_of_copy_bw, speedup_vs {peft,
mergekit}, commit, versions, date``), plus two kernel-level rows per GPU backend that isolate
the acceptance figures of the issue:

* ``ties_merge_pass``: the fused merge pass alone, thresholds given (K+1 tensors read, 1 written);
* ``ties_select``: the exact top-k selection alone (bytes: one read of the K+1 inputs, its floor).

Timing on CUDA: CUDA events around batches of back-to-back calls (about 20 ms per batch), the
median over batches; every call still includes whatever host syncs the op itself needs (the
fused merges read their non-finite flags). At the end, the issue's acceptance checks are
printed for bf16 4096x14336, K=4: merge pass >= 80% of copy bandwidth, full TIES (selection
included) >= 33%, >= 50x PEFT's ``ties``.

``--device cpu`` runs the same plan logic on the CPU backends (``--quick``: tiny shapes) to
check the script without a GPU; ``--json PATH`` saves the rows (``bench/results/`` by
convention: ``gpu_<name>.json``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

try:
    from . import suite
except ImportError:  # run as a script: python bench/gpu.py
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import suite

METHODS = ("ties", "dare_ties", "task_arithmetic", "della")
SHAPES = ((4096, 4096), (4096, 14336), (128256, 4096))
DTYPES = (torch.bfloat16, torch.float32)
KS = (2, 4, 8)
GPU_BACKENDS = ("triton", "cuda")
QUICK_SHAPES = ((4096, 4096),)
DRY_SHAPES = ((256, 320),)
TIMING = {"warmup": 2, "min_reps": 5, "min_time": 0.3, "max_time": 3.0}
ACCEPT = dict(shape=[4096, 14336], dtype="bfloat16", k=4, merge_pass_pct=80.0, ties_pct=33.0,
              peft_speedup=50.0)


def cuda_time(fn, warmup: int = 1, min_reps: int = 3, min_time: float = 0.2, *,
              max_time: Optional[float] = None, max_reps: int = 10_000, sync=None) -> list:
    """Seconds per call of ``fn()`` from CUDA events, one entry per batch of back-to-back
    calls (batch sized to ~20 ms from a timed first call); same signature as
    :func:`bench.suite.time_fn`."""
    for _ in range(warmup):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def batch(calls: int) -> float:
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3

    one = batch(1)
    calls = max(1, min(200, int(0.02 / max(one, 1e-7))))
    times, spent, done = [], 0.0, 0
    while True:
        t = batch(calls)
        times.append(t / calls)
        spent += t
        done += calls
        if done >= max_reps or (max_time is not None and spent >= max_time):
            break
        if len(times) >= min_reps and spent >= min_time:
            break
    return times


def _kernel_sets(backends):
    out = {}
    for b in backends:
        if b == "triton":
            from fastmerge.backends.triton import kernels

            out[b] = kernels()
        elif b == "cuda":
            from fastmerge.backends import cuda

            if cuda.extension() is not None:
                out[b] = cuda._Kernels
    return out


def kernel_cases(shape, device, dtype, inputs, k, backends):
    """The ``ties_merge_pass`` and ``ties_select`` rows of every GPU backend in ``backends``
    (on CPU tensors only under Triton's interpreter: how the tests check these rows)."""
    backends = [b for b in backends if b in GPU_BACKENDS]
    if not backends:
        return []
    from fastmerge import _semantics as sem
    from fastmerge import abi
    from fastmerge.backends import _gpu as G

    base, models, _ = inputs
    models = models[:k]
    n = base.numel()
    masks = [sem.magnitude_mask(suite.DEFAULT_DENSITY, n)] * k
    lay = G.layout(base, models)
    b, bst, xs, sts, C, strided = lay
    esize = base.element_size()
    out = []
    for name, ks in _kernel_sets(backends).items():
        with G._device(base.device):
            thr = G.thresholds(ks, b, bst, xs, sts, C, strided, masks, n, exact=True)[0]
        dst = torch.empty_like(base)
        scale = torch.ones(k, dtype=torch.float32, device=base.device)

        def merge_pass(ks=ks, thr=thr, dst=dst, scale=scale):
            return ks.fused_merge(b, xs, dst, kinds=[abi.MASK_RANGE] * k, thr=thr, scale=scale,
                                  weights=[1.0 / k] * k, probs=[1.0] * k, keeps=[None] * k, seed=0, n=n,
                                  C=C, strides=sts, base_strides=bst, strided=strided,
                                  scale_mode=abi.SCALE_NONE, consensus=abi.CONSENSUS_SUM, elect_weighted=True,
                                  divisor=abi.DIVISOR_WEIGHT, const_div=1.0, normalize=True, lam=1.0)

        def select(ks=ks):  # what a merge runs: the deferred (no host read) selection
            return G.thresholds(ks, b, bst, xs, sts, C, strided, masks, n)[0]

        out.append((suite.Case("ties_merge_pass", "mergekit", name, lambda f=merge_pass, d=dst: (f(), d)[1],
                               False), None))
        out.append((suite.Case("ties_select", "mergekit", name, select, False), (k + 1) * n * esize))
    return out


def acceptance(rows: list, log=print) -> dict:
    """The issue's GPU acceptance figures from ``rows`` (None where a row is missing)."""
    def pick(op, api, backend=None):
        hits = [r for r in rows if r["op"] == op and r["api"] == api and r["shape"] == ACCEPT["shape"]
                and r["dtype"] == ACCEPT["dtype"] and r["k"] == ACCEPT["k"]
                and (backend is None or r["backend"] == backend)]
        return hits

    result = {}
    for backend in GPU_BACKENDS:
        mp = pick("ties_merge_pass", "mergekit", backend)
        full = pick("ties", "mergekit", backend)
        pf = pick("ties", "peft", backend)
        result[backend] = {
            "merge_pass_pct_of_copy_bw": mp[0]["pct_of_copy_bw"] if mp else None,
            "ties_pct_of_copy_bw": full[0]["pct_of_copy_bw"] if full else None,
            "speedup_vs_peft_ties": pf[0]["speedup_vs"]["peft"] if pf else None,
        }
    goals = {"merge_pass_pct_of_copy_bw": ACCEPT["merge_pass_pct"], "ties_pct_of_copy_bw": ACCEPT["ties_pct"],
             "speedup_vs_peft_ties": ACCEPT["peft_speedup"]}
    log(f"acceptance (bf16 {ACCEPT['shape'][0]}x{ACCEPT['shape'][1]}, K={ACCEPT['k']}):")
    for backend, figures in result.items():
        for key, value in figures.items():
            verdict = "unmeasured" if value is None else ("ok" if value >= goals[key] else "BELOW TARGET")
            shown = "-" if value is None else f"{value:.1f}"
            log(f"  {backend:<6} {key:<26} {shown:>8}  (target >= {goals[key]:g})  {verdict}")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastmerge bench-gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default) times the GPU backends; cpu checks the script on the CPU backends")
    p.add_argument("--quick", action="store_true",
                   help="4096x4096 only on a GPU; tiny shapes with --device cpu")
    p.add_argument("--shapes", type=suite._shapes, metavar="AxB,...")
    p.add_argument("--dtypes", type=suite._dtypes, metavar="D,...")
    p.add_argument("--k", type=suite._ks, metavar="K,...")
    p.add_argument("--methods", type=suite._methods, metavar="M,...")
    p.add_argument("--backends", type=suite._backends, metavar="B,...")
    p.add_argument("--no-refs", action="store_true", help="skip PEFT and mergekit (no speedups)")
    p.add_argument("--density", type=suite._density, default=suite.DEFAULT_DENSITY)
    p.add_argument("--json", metavar="PATH", help="save {meta, rows} (a directory gets a dated name)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device visible to torch; use --device cpu for a dry run of the "
              "script on the CPU backends", file=sys.stderr)
        return 2
    on_gpu = args.device == "cuda"
    shapes = args.shapes or list(QUICK_SHAPES if args.quick and on_gpu else DRY_SHAPES if not on_gpu
                                 else SHAPES)
    rows = suite.run(
        shapes=shapes, dtypes=args.dtypes or (DTYPES if on_gpu or not args.quick else DTYPES[:1]),
        ks=args.k or (KS if on_gpu or not args.quick else KS[:1]), methods=args.methods or list(METHODS),
        backends=args.backends or (list(GPU_BACKENDS) if on_gpu else ["cpu"]), refs=not args.no_refs,
        json_path=args.json, density=args.density, timer=cuda_time if on_gpu else None,
        timing=TIMING if on_gpu else suite.TIMING["quick"], extra_cases=kernel_cases,
        label=f"gpu{'-quick' if args.quick else ''}" if on_gpu else "gpu-dry-run-cpu")
    if on_gpu:
        acceptance(rows)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
