"""mergekit's other methods on the fused cpu kernels, against mergekit in the same run (issue 17's
acceptance: >= 5x mergekit's ``merge_tensors``, >= 35% of the copy bandwidth).

    PYTHONPATH=. python -m bench.methods [--shape 4096 4096] [--methods slerp karcher]

Each row: fastmerge ``merge(method, backend="cpu")`` and mergekit 0.1.5's ``merge_tensors`` on
the same fp32 inputs (base + K models, K as the method takes, up to 3), median seconds (timing
policy and copy bandwidth from :mod:`bench.suite`: ``dst.copy_(src)``, read + write), GB/s of
the bytes the merge must move (each input read once, the output written once), its % of the
copy bandwidth, and the speedup over mergekit. (The fused plans read each input twice: a Gram
pass and a combination pass.)
"""
from __future__ import annotations

import argparse
import statistics

import torch

import fastmerge
from bench.suite import copy_bandwidth, cpu_name, time_fn

# method -> (non-base models K, parameters under fastmerge's names)
CASES = {
    "slerp": (1, dict(t=0.3)),
    "nuslerp": (2, dict(weights=[0.4, 0.6])),
    "multislerp": (3, dict(weights=[0.3, 0.5, 0.2])),
    "karcher": (3, dict()),
    "model_stock": (3, dict()),
    "sce": (3, dict(select_topk=0.5)),
    "arcee_fusion": (1, dict()),
}


def _mergekit(name, base, models, params):
    from mergekit.merge_methods import merge_tensors

    mk = {("weight" if k == "weights" else k): v for k, v in params.items()}
    with torch.no_grad():
        return merge_tensors([base, *models], name, parameters=mk, base_index=0)


def run(shape=(4096, 4096), methods=tuple(CASES), log=print) -> list:
    copy = copy_bandwidth()
    log(f"{cpu_name()}, {torch.get_num_threads()} torch threads; copy bandwidth {copy:.2f} GB/s "
        f"(dst.copy_(src), 256 MiB fp32, read + write); shape {shape[0]}x{shape[1]} fp32")
    g = torch.Generator().manual_seed(0)
    rows = []
    log(f"{'method':<12} {'K':>2} {'fastmerge ms':>13} {'mergekit ms':>12} {'GB/s':>7} "
        f"{'% copy BW':>9} {'x mergekit':>10}")
    for name in methods:
        K, params = CASES[name]
        base = torch.randn(shape, generator=g)
        models = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(K)]
        ours = time_fn(lambda: fastmerge.merge(name, base, models, backend="cpu", **params),
                       warmup=1, min_reps=5, min_time=0.5)
        theirs = time_fn(lambda: _mergekit(name, base, models, params), warmup=1, min_reps=3,
                         min_time=0.5, max_time=5.0)
        t, tm = statistics.median(ours), statistics.median(theirs)
        nbytes = (K + 2) * base.numel() * 4
        gbps = nbytes / t / 1e9
        row = dict(method=name, k=K, ms=1e3 * t, mergekit_ms=1e3 * tm, gbps=gbps,
                   pct_of_copy_bw=100 * gbps / copy, speedup=tm / t)
        rows.append(row)
        log(f"{name:<12} {K:>2} {row['ms']:>13.1f} {row['mergekit_ms']:>12.1f} {gbps:>7.2f} "
            f"{row['pct_of_copy_bw']:>9.1f} {row['speedup']:>10.1f}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=2, default=[4096, 4096])
    p.add_argument("--methods", nargs="+", default=list(CASES), choices=list(CASES))
    a = p.parse_args(argv)
    run(tuple(a.shape), a.methods)


if __name__ == "__main__":
    main()
