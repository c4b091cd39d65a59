"""Benchmark of the elementwise merges of mergekit's other methods (nearswap, ram, ramplus_tl,
passthrough) on the ``cpu`` backend, against mergekit 0.1.5's own ``merge_tensors`` in the same
run, with the share of the copy bandwidth measured in that run (bench/suite.py's
``copy_bandwidth``: ``dst.copy_(src)``, read + write).

``bytes`` counts what a method must move once: its inputs read and the output written (ramplus_tl
reads its inputs twice, a counting pass and the merge, but is credited one read, as the
acceptance of issue 17 states it: >= 35% of copy bandwidth reading each input at most twice).

    python -m bench.methods_elementwise [--size 4096] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics

import torch

import fastmerge
from bench import suite

# method, K (non-base models, as the method takes, up to 3), base?, parameters
CASES = (
    ("nearswap", 1, True, dict(t=0.01)),
    ("ram", 3, True, dict(epsilon=0.01)),
    ("ramplus_tl", 3, True, dict(epsilon=0.01)),
    ("passthrough", 1, False, dict(scale=0.5)),
)


def _mergekit(name, base, models, params):
    from mergekit.merge_methods import merge_tensors

    if base is None:
        return merge_tensors(list(models), name, parameters=params)
    return merge_tensors([base, *models], name, parameters=params, base_index=0)


def _median_s(fn, reps):
    return statistics.median(suite.time_fn(fn, warmup=1, min_reps=reps, min_time=0.0, max_reps=reps))


def run(size: int, reps: int) -> list:
    copy = suite.copy_bandwidth()
    print(f"{suite.device_name('cpu')}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"copy bandwidth {copy:.2f} GB/s (dst.copy_(src), 256 MiB fp32)", flush=True)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(size, size, generator=g)
    pool = [base + 0.02 * torch.randn(size, size, generator=g) * (torch.rand(size, size, generator=g) < 0.5)
            for _ in range(3)]
    rows = []
    for name, K, has_base, params in CASES:
        b, ms = (base if has_base else None), pool[:K]
        ours_s = _median_s(lambda: fastmerge.merge(name, b, ms, backend="cpu", **params), reps)
        with torch.no_grad():
            mk_s = _median_s(lambda: _mergekit(name, b, ms, params), max(1, reps // 2))
        nbytes = (K + int(has_base) + 1) * base.numel() * 4
        gbps = nbytes / ours_s / 1e9
        rows.append(dict(method=name, K=K, ms=1e3 * ours_s, mergekit_ms=1e3 * mk_s, speedup=mk_s / ours_s,
                         gbps=gbps, pct_copy=100 * gbps / copy))
    print(f"{'method':<12} {'K':>2} {'fastmerge ms':>13} {'mergekit ms':>12} {'x mergekit':>11} "
          f"{'GB/s':>7} {'% copy BW':>10}")
    for r in rows:
        print(f"{r['method']:<12} {r['K']:>2} {r['ms']:>13.1f} {r['mergekit_ms']:>12.1f} "
              f"{r['speedup']:>11.1f} {r['gbps']:>7.2f} {r['pct_copy']:>10.1f}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="tensors are size x size fp32")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    run(args.size, args.reps)


if __name__ == "__main__":
    main()
