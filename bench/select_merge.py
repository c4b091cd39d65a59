"""The TIES family's one-pass merge (csrc/select_merge.cpp) against the two passes it replaces
(the exact top-k select, then the fused merge), in one run, with the copy bandwidth measured
in that run as the ceiling.

    python -m fastmerge.bench.select_merge [--shape 4096x4096] [--k 3] [--density 0.2] [--reps 12]
                                           [--json bench/results/cpu_select_merge_4096x4096_k3.json]

Both variants run through ``fastmerge.merge(..., backend="cpu")`` on the same data, alternating
call by call so that drifts of a shared machine hit both alike; the two passes are forced by
raising the one-pass size threshold. Bytes moved as in ``fastmerge bench``: K models + base
read once, the output written once.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import fastmerge
import fastmerge.backends.cpu as cpu_backend

from .suite import bytes_moved, copy_bandwidth, environment, save_json

METHODS = ("ties", "breadcrumbs_ties", "breadcrumbs")


def _case(method, base, models, density):
    return lambda: fastmerge.merge(method, base, models, density=density, backend="cpu")


def measure(shape, k, density, dtypes, reps, log=print):
    copy = copy_bandwidth()
    log(f"copy bandwidth {copy:.2f} GB/s")
    rows = []
    one_pass_min = cpu_backend._ONE_PASS_MIN
    for dtype in dtypes:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(shape, generator=g).to(dtype)
        models = [(base.float() + 0.01 * torch.randn(shape, generator=g)).to(dtype) for _ in range(k)]
        for method in METHODS:
            fn = _case(method, base, models, density)
            times = {"one_pass": [], "two_pass": []}
            for _ in range(reps + 1):  # the first round warms both up and is dropped
                for variant, threshold in (("one_pass", one_pass_min), ("two_pass", 1 << 62)):
                    cpu_backend._ONE_PASS_MIN = threshold
                    t0 = time.perf_counter()
                    fn()
                    times[variant].append(time.perf_counter() - t0)
            cpu_backend._ONE_PASS_MIN = one_pass_min
            nbytes = bytes_moved(method, "mergekit", base.numel(), k, dtype, dtype)
            row = {"op": method, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "K": k,
                   "density": density, "bytes": nbytes}
            for variant, ts in times.items():
                med = statistics.median(ts[1:])
                row[f"{variant}_ms"] = 1e3 * med
                row[f"{variant}_pct_of_copy_bw"] = 100.0 * nbytes / med / 1e9 / copy
            row["speedup"] = row["two_pass_ms"] / row["one_pass_ms"]
            rows.append(row)
            log(f"{method:17s} {row['dtype']:9s} one pass {row['one_pass_ms']:7.1f} ms "
                f"({row['one_pass_pct_of_copy_bw']:4.1f}% copy)  two passes {row['two_pass_ms']:7.1f} ms "
                f"({row['two_pass_pct_of_copy_bw']:4.1f}%)  {row['speedup']:.2f}x")
    return copy, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x4096", help="ROWSxCOLS (default 4096x4096)")
    ap.add_argument("--k", type=int, default=3, help="models merged into the base (default 3)")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=12, help="timed calls per variant (default 12)")
    ap.add_argument("--json", help="save the rows and the environment here")
    args = ap.parse_args(argv)
    try:
        shape = tuple(int(s) for s in args.shape.lower().split("x"))
        dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
    except (ValueError, AttributeError):
        ap.error(f"--shape ROWSxCOLS and --dtypes float32,bfloat16,... expected; got {args.shape!r}, {args.dtypes!r}")
    if not fastmerge.backends()["cpu"]["available"]:
        ap.error("the cpu backend is not built: " + fastmerge.backends()["cpu"]["reason"])
    copy, rows = measure(shape, args.k, args.density, dtypes, args.reps)
    if args.json:
        meta = environment()
        meta.update(mode="select_merge", copy_gbps=copy,
                    command=" ".join(["python", "-m", "fastmerge.bench.select_merge", *(argv or sys.argv[1:])]))
        print(f"saved {save_json(rows, meta, args.json)}")


if __name__ == "__main__":
    main()
