"""Benchmark of fastmerge.lowrank against the full-SVD paths it replaces, in one run.

    python -m bench.lowrank                      # full plan, ~8 min on 2 cores; --quick: ~1 min
    python -m bench.lowrank --json bench/results/cpu_lowrank_4096.json
    fastmerge bench-lowrank [options]            # same thing, installed

Rows (same fields as ``fastmerge bench``; see bench/README.md), all fp32 on one device:

* ``svd_lowrank`` at ranks 64/256/512 of a ``size²`` matrix with a known decaying spectrum
  (``σ_i = 1/i``, random orthogonal singular vectors), against ``torch.linalg.svd`` (LAPACK /
  cuSOLVER; the same call FusionBench and PEFT make) and ``torch.svd_lowrank`` with the same
  sketch width and power steps. ``error_ratio`` = ``‖x − U S Vh‖_F`` / the Eckart-Young optimum
  ``(Σ_{i>r} σ_i²)^½``.
* ``polar`` of the Iso-C sum: Newton-Schulz against the SVD polar factor (why the merges use
  LAPACK's polar factor on CPU).
* ``tsv`` and ``iso_c`` of T task vectors on a ``size²`` layer and ``iso_cts`` on a
  ``(size/2)²`` one: ``fastmerge.merge(...)`` fast default against ``exact=True`` (FusionBench's
  math, every SVD a full ``torch.linalg.svd``). ``rel_err_vs_exact`` = ``‖τ_fast − τ_exact‖_F /
  ‖τ_exact‖_F`` on the merged task vectors.
* ``lora_rerank``: PEFT's ``add_weighted_adapter`` SVD step on two rank-8 adapters' merged delta
  (``torch.linalg.svd(full_matrices=True)`` as PEFT calls it) against ours.

``bytes`` counts every input read once and every output written once; these ops are compute
bound, so ``gbps`` is low by nature and is given for completeness.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Optional, Sequence

import torch

import fastmerge
from fastmerge import lowrank as L

from . import suite
from .suite import Bench

FP32 = 4


def _orthogonal(n: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, device=device)).Q


def _spectrum(n: int, device) -> torch.Tensor:
    return 1.0 / torch.arange(1, n + 1, dtype=torch.float64, device=device)


def bench_svd(b: Bench, size: int, ranks: Sequence[int], seed: int) -> None:
    g = torch.Generator(device=b.dev).manual_seed(seed)
    sigma = _spectrum(size, b.dev)
    x = (_orthogonal(size, g, b.dev) * sigma.float()) @ _orthogonal(size, g, b.dev).T
    shape = (size, size)

    def opt(r):
        return float(sigma[r:].pow(2).sum().sqrt())

    def err(u, s, vh):
        return float(torch.linalg.matrix_norm(x - (u * s) @ vh))

    full = {}

    def lapack():
        full["f"] = torch.linalg.svd(x, full_matrices=False)

    t_full = b.time(lapack, slow=True)
    U, S, Vh = full.pop("f")
    for r in ranks:
        b.row("svd", "torch.linalg.svd", shape, r, t_full, size * size * FP32 + (2 * size + 1) * size * FP32,
              error_ratio=err(U[:, :r], S[:r], Vh[:r]) / opt(r))
    del U, S, Vh
    for r in ranks:
        out = {}
        p = max(10, r // 10)  # svd_lowrank's default, given to torch.svd_lowrank too

        def ours():
            out["f"] = L.svd_lowrank(x, r, seed=seed)

        def theirs():
            u, s, v = torch.svd_lowrank(x, q=r + p, niter=L.DEFAULT_N_ITER)
            out["t"] = (u[:, :r], s[:r], v[:, :r].mT)

        nbytes = size * size * FP32 + (2 * size + 1) * r * FP32
        t_torch = b.time(theirs, slow=False)
        b.row("svd_lowrank", "torch.svd_lowrank", shape, r, t_torch, nbytes,
              error_ratio=err(*out["t"]) / opt(r), oversample=p, n_iter=L.DEFAULT_N_ITER)
        t_ours = b.time(ours, slow=False)
        b.row("svd_lowrank", "fastmerge", shape, r, t_ours, nbytes,
              speedup={"torch.linalg.svd": statistics.median(t_full) / statistics.median(t_ours),
                       "torch.svd_lowrank": statistics.median(t_torch) / statistics.median(t_ours)},
              error_ratio=err(*out["f"]) / opt(r), oversample=p, n_iter=L.DEFAULT_N_ITER)
    x = None  # free it (a rebinding: the closures above hold the name)
    gc.collect()


def _tasks(size, T, seed, device, shape=None):
    """Base N(0, 0.02) and T models base + τ_t, τ_t = U_t diag(σ·(1 + 0.3t)) V_tᵀ, σ_i = 1/i·0.01:
    decaying spectra with independent singular vectors per task."""
    shape = shape or (size, size)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    base = 0.02 * torch.randn(shape, generator=g, device=device)
    r = min(shape)
    sigma = (0.01 * _spectrum(r, device)).float()
    models = []
    for t in range(T):
        u = torch.linalg.qr(torch.randn(shape[0], r, generator=g, device=device)).Q
        v = torch.linalg.qr(torch.randn(shape[1], r, generator=g, device=device)).Q
        models.append(base + (u * (sigma * (1 + 0.3 * t))) @ v.T)
        del u, v
    return base, models


def bench_merge(b: Bench, method: str, base, models, seed: int) -> dict:
    T = len(models)
    shape = tuple(base.shape)
    nbytes = (T + 2) * base.numel() * FP32
    out = {}

    def exact():
        out["e"] = fastmerge.merge(method, base, models, exact=True)

    def fast():
        out["f"] = fastmerge.merge(method, base, models, seed=seed)

    t_exact = b.time(exact, slow=True)
    b.row(method, "exact (FusionBench math)", shape, T, t_exact, nbytes)
    t_fast = b.time(fast, slow=True)
    te, tf = out["e"] - base, out["f"] - base
    rel = float(torch.linalg.matrix_norm(tf - te) / torch.linalg.matrix_norm(te))
    b.row(method, "fastmerge", shape, T, t_fast, nbytes,
          speedup={"exact": statistics.median(t_exact) / statistics.median(t_fast)},
          rel_err_vs_exact=rel)
    return out


def bench_polar(b: Bench, a: torch.Tensor) -> None:
    """Newton-Schulz vs SVD polar factor of the Iso-C sum (the matrix the merge orthogonalises)."""
    shape = tuple(a.shape)
    nbytes = 2 * a.numel() * FP32
    out = {}

    def svd():
        out["s"] = L.polar(a, method="svd")

    def ns():
        out["n"] = L.polar(a, method="newton_schulz", return_info=True)

    t_svd = b.time(svd, slow=True)
    b.row("polar", "svd (LAPACK)", shape, 1, t_svd, nbytes)
    t_ns = b.time(ns, slow=True)
    w, info = out["n"]
    rel = float(torch.linalg.matrix_norm(w - out["s"]) / torch.linalg.matrix_norm(out["s"]))
    b.row("polar", "newton_schulz", shape, 1, t_ns, nbytes,
          speedup={"svd": statistics.median(t_svd) / statistics.median(t_ns)},
          rel_err_vs_exact=rel, iterations=info["iterations"], fell_back=info["method"] == "svd")


def bench_lora(b: Bench, size: int, seed: int) -> None:
    """PEFT's add_weighted_adapter SVD step (its exact calls) vs lora_rerank, merged delta of two
    rank-8 adapters (rank <= 16), new rank 16."""
    g = torch.Generator(device=b.dev).manual_seed(seed + 7)
    delta = sum(w * (torch.randn(size, 8, generator=g, device=b.dev) @ torch.randn(8, size, generator=g, device=b.dev))
                for w in (0.7, 0.4)) / 8
    r = 16
    out = {}

    def peft_path():  # peft 0.21.2 _svd_generalized_task_arithmetic_weighted_adapter
        U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
        out["p"] = (U[:, :r] @ torch.diag(S[:r]), Vh[:r, :])

    def ours():
        out["o"] = L.lora_rerank(delta, r, seed=seed)

    nbytes = delta.numel() * FP32 + 2 * size * r * FP32
    t_peft = b.time(peft_path, slow=True)
    b.row("lora_rerank", "peft svd path", (size, size), r, t_peft, nbytes)
    t_ours = b.time(ours, slow=False)
    (pb, pa), (ob, oa) = out["p"], out["o"]
    ref = pb @ pa
    rel = float(torch.linalg.matrix_norm(ob @ oa - ref) / torch.linalg.matrix_norm(ref))
    b.row("lora_rerank", "fastmerge", (size, size), r, t_ours, nbytes,
          speedup={"peft svd path": statistics.median(t_peft) / statistics.median(t_ours)},
          rel_err_vs_exact=rel)


def run(size: int = 4096, ranks=(64, 256, 512), tasks: int = 8, quick: bool = False,
        device: Optional[str] = None, json_path: Optional[str] = None, seed: int = 0,
        log=print) -> list:
    if quick:
        size, ranks, tasks = min(size, 1024), [r for r in ranks if r < 1024 // 4] or [32], min(tasks, 4)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    b = Bench(dev, quick, api="lowrank", log=log)
    load = b.env["loadavg_at_start"]
    log(f"fastmerge lowrank bench on {b.dname}, {torch.get_num_threads()} torch threads, "
        f"copy {b.copy:.1f} GB/s, load average {load}")
    if load is not None and load > 0.5:
        log(f"load average {load:.2f} at start: other work is running, timings will be noisy")
    bench_svd(b, size, ranks, seed)
    base, models = _tasks(size, tasks, seed, dev)
    out = bench_merge(b, "tsv", base, models, seed)
    del out
    out = bench_merge(b, "iso_c", base, models, seed)
    bench_polar(b, sum(m - base for m in models))
    del out, base, models
    gc.collect()
    half = size // 2
    base, models = _tasks(half, tasks, seed + 5, dev)
    bench_merge(b, "iso_cts", base, models, seed)
    del base, models
    bench_lora(b, size, seed)
    return b.finish(t0, "python -m bench.lowrank", {
        "size": size, "ranks": list(ranks), "tasks": tasks, "seed": seed,
        "spectrum": "sigma_i = 1/i, random orthogonal singular vectors"}, json_path)


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m bench.lowrank") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096, help="matrix side (default 4096)")
    p.add_argument("--ranks", type=suite._ks, default=[64, 256, 512], help="svd_lowrank ranks")
    p.add_argument("--tasks", type=int, default=8, help="task vectors merged (default 8)")
    p.add_argument("--quick", action="store_true", help="1024², T=4: a ~1 min smoke run")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--json", metavar="PATH", help="save {meta, rows}")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    run(a.size, a.ranks, a.tasks, a.quick, a.device, a.json, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
