"""Benchmark of fastmerge.quant: the quantizers, the fused merge->quantize, delta compression.

    python -m bench.quant                       # 4096x4096, ~1 min on 2 cores; --quick: 1024x1024
    python -m bench.quant --json bench/results/cpu_quant_4096.json
    python -m bench.quant --device cuda --json bench/results/gpu_quant.json   # on a GPU
    fastmerge bench-quant [options]             # same thing, installed

On a GPU (``--device cuda``; default shapes 4096x4096 and 4096x14336) the rows compare the
Triton kernels (``triton``) with the torch reference on the same GPU, timed with CUDA events
over batches of back-to-back calls, against the GPU's copy bandwidth measured the same way.
Each ``fastmerge`` call reads its kernels' non-finite flags (one host sync per call), so the
``triton kernel`` rows time the quantizer launches alone, the figure to hold against the copy
bandwidth (issue 5: >= 80%).

Rows (same fields as ``fastmerge bench``; see bench/README.md):

* ``quantize_int4`` / ``quantize_fp8`` of one ``size²`` weight (bf16 by default), the C++ kernels
  (``cpu``) against the torch reference (``torch``, the formats' definition), with GB/s and % of
  the copy bandwidth measured in the same run. ``bytes`` = the weight read once + every output
  tensor written once.
* ``merge+<format>``: ``fastmerge.merge(method, base, models, quantize=cfg)`` (``fused``: the
  merged tensor is never written) against ``quantize(fastmerge.merge(...))`` (``merge then
  quantize``, both fastmerge's own kernels), K models, calls alternated so both see the same
  machine. ``bytes`` = K + 1 inputs read + the quantized outputs written.
* ``delta_<method>``: ``compress_delta(base, finetuned, method)`` with ``ratio`` (dense delta
  in the model dtype / compressed bytes) and ``sqnr_db`` of the reconstructed delta. The
  fine-tune is ``base + N(0, 0.002)`` on ``base ~ N(0, 0.02)``: a dense Gaussian delta, the hard
  case for sign / top-k codes (real fine-tuning deltas are heavier-tailed).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Optional, Sequence

import torch

import fastmerge
from fastmerge import quant as Q

from .suite import Bench

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

QUANTIZERS = [
    ("quantize_int4", "gptq g128", Q.Int4Config(128)),
    ("quantize_int4", "gptq g128 sym", Q.Int4Config(128, True)),
    ("quantize_int4", "gptq g32", Q.Int4Config(32)),
    ("quantize_int4", "torchao g128", Q.Int4Config(128, layout="torchao")),
    ("quantize_fp8", "e4m3fn tensor", Q.FP8Config("tensor")),
    ("quantize_fp8", "e4m3fn row", Q.FP8Config("row")),
    ("quantize_fp8", "e4m3fn block128", Q.FP8Config("block")),
    ("quantize_fp8", "e5m2 row", Q.FP8Config("row", "e5m2")),
]

FUSED = [
    ("task_arithmetic", {}, "int4 gptq g128", Q.Int4Config(128)),
    ("task_arithmetic", {}, "int4 torchao g128", Q.Int4Config(128, layout="torchao")),
    ("task_arithmetic", {}, "fp8 row", Q.FP8Config("row")),
    ("ties", {"density": 0.2}, "int4 gptq g128", Q.Int4Config(128)),
]


def out_bytes(res) -> int:
    tensors = list(res) if isinstance(res, tuple) else list(res.tensors().values())
    return sum(t.numel() * t.element_size() for t in tensors)


def alternated(fa, fb, reps: int, min_time: float) -> tuple:
    """Seconds per call of two functions timed in alternation (after one warm-up each), so that
    drifts of a shared machine hit both alike."""
    fa(), fb()
    ta, tb, spent = [], [], 0.0
    while len(ta) < reps or spent < min_time:
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
            spent += ts[-1]
        if spent > 30 * min_time:
            break
    return ta, tb


def kernel_launch(w: torch.Tensor, cfg):
    """The Triton quantizer's launches for ``w`` without the flag check (no host sync): a
    function returning the format's tensors (a dict for INT4, ``(q, scale)`` for FP8)."""
    from fastmerge.backends import _gpu as gpu
    from fastmerge.backends.triton import kernels

    return lambda: gpu.quantize_launch(kernels(), w, cfg)[0]


def bench_quantizers(b: Bench, w: torch.Tensor, fast: Optional[str] = None) -> None:
    dname = DTYPE_NAMES[w.dtype]
    fast = fast or ("cpu" if w.device.type == "cpu" else "triton")
    for op, label, cfg in QUANTIZERS:
        res = Q.quantize(w, cfg, backend=fast)
        nbytes = w.numel() * w.element_size() + out_bytes(res)
        t_ref = b.time(lambda: Q.quantize(w, cfg, backend="torch"), slow=False)
        b.row(op, f"torch ({label})", tuple(w.shape), 1, t_ref, nbytes, dtype=dname)
        t = b.time(lambda: Q.quantize(w, cfg, backend=fast), slow=False)
        b.row(op, f"{fast} ({label})", tuple(w.shape), 1, t, nbytes, dtype=dname,
              speedup={"torch": statistics.median(t_ref) / statistics.median(t)})
        if fast == "triton":
            t = b.time(kernel_launch(w, cfg), slow=False)
            b.row(op, f"triton kernel ({label})", tuple(w.shape), 1, t, nbytes, dtype=dname,
                  speedup={"torch": statistics.median(t_ref) / statistics.median(t)})


def bench_fused(b: Bench, base, models, reps: int) -> None:
    dname, shape, K = DTYPE_NAMES[base.dtype], tuple(base.shape), len(models)
    for method, kw, label, cfg in FUSED:
        res = fastmerge.merge(method, base, models, quantize=cfg, **kw)
        nbytes = (K + 1) * base.numel() * base.element_size() + out_bytes(res)

        def fused():
            fastmerge.merge(method, base, models, quantize=cfg, **kw)

        def unfused():
            Q.quantize(fastmerge.merge(method, base, models, **kw), cfg)

        if base.device.type == "cpu":
            t_fused, t_unfused = alternated(fused, unfused, reps, 1.0)
        else:  # a GPU is not shared: CUDA events over batches, one function after the other
            t_fused, t_unfused = b.time(fused, slow=False), b.time(unfused, slow=False)
        b.row(f"{method}+{label}", "merge then quantize", shape, K, t_unfused, nbytes, dtype=dname)
        b.row(f"{method}+{label}", "fused", shape, K, t_fused, nbytes, dtype=dname,
              speedup={"merge then quantize": statistics.median(t_unfused) / statistics.median(t_fused)})


def bench_deltas(b: Bench, base, finetuned) -> None:
    dname, shape = DTYPE_NAMES[base.dtype], tuple(base.shape)
    delta = finetuned.float() - base.float()
    for method, kw in (("bitdelta", {}), ("ternary", {"density": 0.1}), ("int4", {"group_size": 128}),
                       ("fp8", {"granularity": "row"})):
        c = Q.compress_delta(base, finetuned, method, **kw)
        nbytes = 2 * base.numel() * base.element_size() + c.nbytes
        t = b.time(lambda: Q.compress_delta(base, finetuned, method, **kw), slow=False)
        b.row(f"delta_{method}", "cpu" if base.device.type == "cpu" else "auto", shape, 1, t, nbytes,
              dtype=dname, ratio=c.ratio, sqnr_db=Q.sqnr(delta, Q.decompress_delta(c, torch.float32)), compressed_bytes=c.nbytes,
              **{k: v for k, v in kw.items()})


GPU_SHAPES = ((4096, 4096), (4096, 14336))


def run(size: int = 4096, k: int = 3, dtype=torch.bfloat16, quick: bool = False,
        json_path: Optional[str] = None, seed: int = 0, log=print, device: str = "cpu",
        shapes=None) -> list:
    if shapes is None:
        shapes = GPU_SHAPES if device != "cpu" and size == 4096 and not quick else ((size, size),)
    if quick:
        shapes = [(min(r, 1024), min(c, 1024)) for r, c in shapes]
    t0 = time.perf_counter()
    timer = None
    if device != "cpu":  # CUDA events: no host sync inside the figures
        from .gpu import cuda_time as timer
    b = Bench(device, quick, api="quant", log=log, timer=timer)
    load = b.env["loadavg_at_start"]
    log(f"fastmerge quant bench on {b.dname}, {torch.get_num_threads()} torch threads, "
        f"copy {b.copy:.1f} GB/s, load average {load}")
    if device == "cpu" and load is not None and load > 0.5:
        log(f"load average {load:.2f} at start: other work is running, timings will be noisy")
    for shape in shapes:
        g = torch.Generator(device=device).manual_seed(seed)
        base32 = torch.randn(shape, generator=g, device=device) * 0.02
        models = [(base32 + torch.randn(shape, generator=g, device=device) * 0.002).to(dtype)
                  for _ in range(k)]
        base = base32.to(dtype)
        del base32
        # fused first: the torch reference quantizers churn GBs of temporaries, and the page
        # faults of merge-then-quantize's intermediate then depend on what the allocator kept
        bench_fused(b, base, models, reps=5 if quick else 21)
        bench_quantizers(b, models[0])
        bench_deltas(b, base, models[0])
        del base, models
    return b.finish(t0, "python -m bench.quant", {
        "shapes": [list(s) for s in shapes], "k": k, "dtype": DTYPE_NAMES[dtype], "seed": seed,
        "data": "base ~ N(0, 0.02), models = base + N(0, 0.002)"}, json_path)


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m bench.quant") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096, help="weight side (default 4096)")
    p.add_argument("--k", type=int, default=3, help="models merged (default 3)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--quick", action="store_true", help="1024x1024: a ~15 s smoke run")
    p.add_argument("--json", metavar="PATH", help="save {meta, rows}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the Triton kernels on the GPU (default shapes 4096x4096, 4096x14336)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: no CUDA device visible to torch", file=sys.stderr)
        return 2
    run(a.size, a.k, getattr(torch, a.dtype), a.quick, a.json, a.seed, device=a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
