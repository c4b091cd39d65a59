"""fastmerge.regmean and fastmerge.opcm against the transcribed FusionBench 0.2.33 code
(``bench/upstream_fusionbench.py``) on the same data, in one run.

    python -m fastmerge.bench.regmean_opcm [--size 1024] [--k 4] [--reps 5] [--device cpu|cuda]
                                           [--json bench/results/cpu_regmean_opcm_1024_k4.json]

Rows (the fields of ``fastmerge bench``, see bench/README.md), fp32:

* ``regmean``: one ``size x size`` linear layer, K models and K Grams, ``alpha = 0.9``:
  ``fastmerge.regmean`` (fp32, and ``compute_dtype=float64``) against FusionBench's
  ``merging_with_regmean_weights`` (``torch.inverse`` + matmul).
* ``opcm``: a state dict of a ``size²`` weight, a ``2size x size`` and a ``size x 2size`` weight
  (an MLP's two layers: where the economy SVD saves FusionBench's full ``U`` / ``V``) and their
  biases, K models merged in sequence, ``alpha = 0.5``: ``fastmerge.opcm.merge`` against the
  transcribed ``OPCMForCLIP`` loop.

The two sides alternate call by call (a warm-up round is dropped) so that a shared machine's
drifts hit both alike; each row reports the median. ``rel_err`` is ``max|ours - ref| /
max|ref|`` (regmean; ``rel_err_vs_fp64``: the same against FusionBench's math in fp64) or the
same on the merged task vectors (opcm). These ops are compute
bound: ``bytes`` (inputs read once, the output written once) and ``gbps`` are for completeness.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Optional, Sequence

import torch

from fastmerge import opcm
from fastmerge.regmean import regmean

from . import upstream_fusionbench as U
from .suite import Bench

FP32 = 4


def _alternate(fns: dict, reps: int, sync) -> dict:
    times = {name: [] for name in fns}
    for i in range(reps + 1):  # round 0 warms up and is dropped
        for name, fn in fns.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            if i:
                times[name].append(time.perf_counter() - t0)
    return times


def _regmean_case(b: Bench, size: int, k: int, reps: int, g: torch.Generator) -> None:
    dev = b.dev
    weights = [torch.randn(size, size, generator=g).to(dev) for _ in range(k)]
    grams = []
    for _ in range(k):
        x = torch.randn(2 * size, size, generator=g).to(dev)
        grams.append(x.T @ x / x.shape[0])
    alpha = 0.9

    def ref():
        return U.merging_with_regmean_weights({"layer.weight": weights}, [{"layer": gm} for gm in grams],
                                              alpha)["layer.weight"]

    fns = {"ref": ref, "ours": lambda: regmean(weights, grams, alpha=alpha),
           "ours64": lambda: regmean(weights, grams, alpha=alpha, compute_dtype=torch.float64)}
    times = _alternate(fns, reps, b.sync)
    r = ref()
    truth = U.merging_with_regmean_weights({"layer.weight": [w.double() for w in weights]},
                                           [{"layer": gm.double()} for gm in grams], alpha)["layer.weight"]
    scale = float(r.abs().max())
    nbytes = (2 * k + 1) * size * size * FP32
    b.row("regmean", "fusionbench (transcribed)", (size, size), k, times["ref"], nbytes,
          rel_err_vs_fp64=float((r.double() - truth).abs().max()) / scale)
    for name, label in (("ours", "fastmerge"), ("ours64", "fastmerge (fp64 compute)")):
        out = fns[name]()
        speedup = {"fusionbench": statistics.median(times["ref"]) / statistics.median(times[name])}
        b.row("regmean", label, (size, size), k, times[name], nbytes, speedup=speedup,
              rel_err=float((out - r).abs().max()) / scale,
              rel_err_vs_fp64=float((out.double() - truth).abs().max()) / scale)


def _opcm_case(b: Bench, size: int, k: int, reps: int, g: torch.Generator) -> None:
    shapes = {"attn.weight": (size, size), "attn.bias": (size,), "fc1.weight": (2 * size, size),
              "fc1.bias": (2 * size,), "fc2.weight": (size, 2 * size), "fc2.bias": (size,)}
    base = {key: torch.randn(s, generator=g).to(b.dev) for key, s in shapes.items()}
    models = [{key: v + 0.01 * torch.randn(v.shape, generator=g).to(b.dev) for key, v in base.items()}
              for _ in range(k)]
    alpha = 0.5
    accel = str(b.dev)
    fns = {"ref": lambda: U.opcm_state_dicts(base, models, alpha, accelerator=accel)[0],
           "ours": lambda: opcm.merge(base, models, alpha=alpha)}
    times = _alternate(fns, reps, b.sync)
    ref, ours = fns["ref"](), fns["ours"]()
    err = max(float((ours[key] - ref[key]).abs().max() / (ref[key] - base[key]).abs().max()) for key in ref)
    numel = sum(v.numel() for v in base.values())
    nbytes = (k + 2) * numel * FP32
    label = f"{len(shapes)} tensors, {numel / 1e6:.1f}M"
    b.row("opcm", "fusionbench (transcribed)", (numel,), k, times["ref"], nbytes, state_dict=label)
    speedup = {"fusionbench": statistics.median(times["ref"]) / statistics.median(times["ours"])}
    b.row("opcm", "fastmerge", (numel,), k, times["ours"], nbytes, speedup=speedup, state_dict=label, rel_err=err)


def run(size: int = 1024, k: int = 4, reps: int = 5, device: Optional[str] = None, json_path=None,
        seed: int = 0, log=print) -> list:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    b = Bench(device, quick=False, api="research", log=log)
    log(f"{b.dname}: copy bandwidth {b.copy:.1f} GB/s; {reps} alternating reps per row, median")
    g = torch.Generator().manual_seed(seed)
    _regmean_case(b, size, k, reps, g)
    _opcm_case(b, size, k, reps, g)
    log("")
    log(f"{'op':<8} {'implementation':<26} {'median ms':>10} {'speedup':>8} {'rel_err':>9} {'vs fp64':>9}")
    for r in b.rows:
        sp = r["speedup_vs"].get("fusionbench")
        sp = f"{sp:.2f}x" if sp else "-"
        err, err64 = (f"{r[f]:.1e}" if f in r else "-" for f in ("rel_err", "rel_err_vs_fp64"))
        log(f"{r['op']:<8} {r['backend']:<26} {r['median_ms']:>10.1f} {sp:>8} {err:>9} {err64:>9}")
    return b.finish(t0, "python -m fastmerge.bench.regmean_opcm",
                    {"size": size, "k": k, "reps": reps, "seed": seed, "regmean_alpha": 0.9, "opcm_alpha": 0.5},
                    json_path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmerge.bench.regmean_opcm", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="layer side (default 1024)")
    p.add_argument("--k", type=int, default=4, help="models merged (default 4)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per implementation (default 5)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--json", metavar="PATH", help="save {meta, rows}")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.size < 2 or a.k < 2 or a.reps < 1:
        p.error("--size and --k must be >= 2, --reps >= 1")
    run(a.size, a.k, a.reps, a.device, a.json, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
