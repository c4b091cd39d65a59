"""The research methods of issue 24 against their upstream code (FusionBench 0.2.33, the
tall_masks repository, the PCB authors' pcb-merging.py, transcribed in
``fastmerge.bench.upstream_research``), on the same data in one run, with the copy bandwidth
measured in that run as the ceiling.

    python -m fastmerge.bench.research [--shape 4096x4096] [--k 4] [--reps 5] [--methods ...]
                                       [--json bench/results/cpu_research_4096x4096_k4.json]

Each row times fastmerge (its default backend on CPU tensors: the fused C++ kernels where the
method has them) and the upstream function, alternating call by call, median of ``--reps``
after one warm-up call each. Bytes that must move: every input read once and every output
written once (fp32 tensors; packed masks at one bit an element): consensus_ta / consensus_ties /
pcb read base + K models and write one tensor; tall_masks writes K bit masks; emr writes the
unified vector and K bit masks; fisher reads K models and K Fishers and writes one tensor.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import fastmerge
from fastmerge import research

from . import upstream_research as up
from .suite import copy_bandwidth, environment, save_json

METHODS = ("consensus_ta", "consensus_ties", "tall_masks", "emr", "fisher", "pcb")
MERGES = ("consensus_ta", "consensus_ties", "pcb")  # the fastmerge.merge methods among them


def _flat(base, models):
    return base.reshape(-1), torch.vstack([m.reshape(-1) for m in models])


def cases(base, models, fishers):
    """``{method: (fastmerge call, upstream call, bytes)}`` on the given data."""
    n, K = base.numel(), len(models)
    f32 = 4
    merge_bytes = (K + 2) * n * f32
    bits = K * ((n + 7) // 8)

    def up_consensus_ties():
        ptm, ft = _flat(base, models)
        merged = up.ties_tall(ft - ptm, reset_thresh=20, merge_func="sum")
        mask = up.consensus_fb(up.tall_masks_fb(ft, ptm, merged, 0.6), 2)
        return ptm + merged * mask

    def up_tall():
        ptm, ft = _flat(base, models)
        return up.tall_masks_fb(ft, ptm, (ft - ptm).sum(0), 0.6)

    def up_pcb():
        ptm, ft = _flat(base, models)
        return ptm + up.pcb_authors(ft - ptm, pcb_ratio=0.1)

    return {
        "consensus_ta": (lambda: fastmerge.merge("consensus_ta", base, models),
                         lambda: up.consensus_ta_upstream(base, models), merge_bytes),
        "consensus_ties": (lambda: fastmerge.merge("consensus_ties", base, models), up_consensus_ties, merge_bytes),
        "tall_masks": (lambda: research.tall_masks(base, models), up_tall, (K + 1) * n * f32 + bits),
        "emr": (lambda: research.emr(base, models),
                lambda: up.emr_fb([{"x": m - base} for m in models]), (K + 2) * n * f32 + bits),
        "fisher": (lambda: research.fisher(models, fishers),
                   lambda: up.fisher_fb({"x": models}, [{"x": f} for f in fishers]), (2 * K + 1) * n * f32),
        "pcb": (lambda: fastmerge.merge("pcb", base, models), up_pcb, merge_bytes),
    }


def measure(shape, k, reps, methods, log=print):
    copy = copy_bandwidth()
    log(f"copy bandwidth {copy:.2f} GB/s")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    models = [base + 0.01 * torch.randn(shape, generator=g) for _ in range(k)]
    fishers = [torch.rand(shape, generator=g) ** 2 for _ in range(k)]
    table = cases(base, models, fishers)
    rows = []
    for method in methods:
        ours, theirs, nbytes = table[method]
        times = {"fastmerge": [], "upstream": []}
        for _ in range(reps + 1):  # the first round warms both up and is dropped
            for name, fn in (("fastmerge", ours), ("upstream", theirs)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        row = {"op": method, "shape": list(shape), "dtype": "float32", "K": k, "bytes": nbytes,
               # fastmerge.merge's methods resolve by name; tall_masks / emr / fisher as
               # fastmerge.research resolves them
               "backend": fastmerge.dispatch.resolve(None, base.device, method if method in MERGES
                                                     else "research." + method)}
        for name, ts in times.items():
            med = statistics.median(ts[1:])
            row[f"{name}_ms"] = 1e3 * med
        row["pct_of_copy_bw"] = 100.0 * nbytes / (row["fastmerge_ms"] / 1e3) / 1e9 / copy
        row["speedup"] = row["upstream_ms"] / row["fastmerge_ms"]
        rows.append(row)
        log(f"{method:15s} fastmerge {row['fastmerge_ms']:8.1f} ms ({row['pct_of_copy_bw']:5.1f}% copy, "
            f"{row['backend']})  upstream {row['upstream_ms']:9.1f} ms  {row['speedup']:6.1f}x")
    return copy, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x4096", help="ROWSxCOLS (default 4096x4096)")
    ap.add_argument("--k", type=int, default=4, help="models (default 4)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per variant (default 5)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--json", help="save the rows and the environment here")
    args = ap.parse_args(argv)
    try:
        shape = tuple(int(s) for s in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape ROWSxCOLS expected, got {args.shape!r}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if args.k < 1 or args.reps < 1:
        ap.error("--k and --reps must be at least 1")
    copy, rows = measure(shape, args.k, args.reps, methods)
    if args.json:
        meta = environment()
        meta.update(mode="research", copy_gbps=copy,
                    command=" ".join(["python", "-m", "fastmerge.bench.research", *(argv or sys.argv[1:])]))
        print(f"saved {save_json(rows, meta, args.json)}")


if __name__ == "__main__":
    main()
