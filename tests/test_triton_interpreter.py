"""The Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest on
machines without CUDA) on small CPU tensors: every method and primitive against the ``cpu``
backend (bit for bit, or within an ulp where a norm ratio may round differently) and the
torch reference; seeded DARE/DELLA masks identical to ``cpu``'s; both selection paths (sample
bracket, radix fallback) with ties split at the threshold; strided inputs read in place; K=16;
Philox counters past 2**32.

The interpreter is slow, so shapes are tiny; the same kernels are tested compiled on a GPU in
``test_gpu.py``.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastmerge
from conftest import assert_match, models_for, philox_mask
from fastmerge import ops, philox
from fastmerge import peft as FP

INFO = fastmerge.backends()["triton"]
pytestmark = pytest.mark.skipif(
    not INFO.get("interpreter"),
    reason="the Triton interpreter runs only without CUDA (TRITON_INTERPRET=1, set by conftest): "
           f"triton backend here: {INFO['reason']}")

# Bit-exact comparisons are against the cpu backend when it is built, else the reference.
REF = "cpu" if fastmerge.backends()["cpu"]["available"] else "torch"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]
RESCALED = ("dare_ties", "dare_linear", "della", "della_linear")  # L1 norm matching by default


def both(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(REF), fn("triton")


def assert_same(out, ref, exact, what=""):
    if exact:
        assert torch.equal(out, ref), what
    else:
        assert_match(out, ref, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("method", fastmerge._registry.names("gta") + fastmerge._registry.names("linear"))
def test_methods_match_cpu(method, dtype):
    base, ms = models_for((37, 53), 3, dtype)
    dens = [0.3, 0.45, 0.2] if method.startswith("della") else [0.3, 0.0, 1.0]
    kw = dict(weights=[1.0, -0.5, 0.7], density=dens, seed=11)
    if method == "linear":
        kw.pop("seed")
    ref, out = both(lambda b: fastmerge.merge(method, base, ms, backend=b, **kw))
    # norm matching: fp64 norms summed in another order may round the fp32 ratio differently
    assert_same(out, ref, method not in RESCALED, f"{method} {dtype}")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties", "task_arithmetic"])
def test_options(method):
    base, ms = models_for((23, 41), 4, torch.float32, seed=3)
    kw = dict(density=[0.4, 0.3, 0.5, 0.45], seed=5, lam=0.7, normalize=True,
              weights=[0.5, 1.0, -0.25, 0.75])
    if method == "task_arithmetic":
        kw.pop("density")
    options = [{}] if method == "task_arithmetic" else [
        dict(rescale="l2"), dict(rescale="linf"), dict(rescale="density"), dict(rescale=False)]
    for extra in options:
        ref, out = both(lambda b: fastmerge.merge(method, base, ms, backend=b, **kw, **extra))
        assert_same(out, ref, extra.get("rescale", False) in (False, "density"), f"{method} {extra}")
    ref, out = both(lambda b: fastmerge.merge(method, base, ms, backend=b, out_dtype=torch.bfloat16, **kw))
    assert_match(out, ref, "out_dtype")


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_seeded_masks_bit_identical_to_cpu(method):
    """Without norm matching the output is exactly the kept deltas' arithmetic: equality
    proves the masks (Philox stream, DELLA ranks) are the cpu backend's, bit for bit."""
    base, ms = models_for((29, 47), 3, torch.bfloat16, seed=7)
    kw = dict(density=[0.5, 0.35, 0.4], epsilon=0.2, seed=2**40 + 123, rescale=False)
    if method.startswith("dare"):
        kw.pop("epsilon")
    ref, out = both(lambda b: fastmerge.merge(method, base, ms, backend=b, **kw))
    assert torch.equal(out, ref)


def test_random_drop_is_the_counter_layout():
    x = torch.randn(67, 31)
    for seed in (0, 1, 2**63 + 5):
        out = ops.random_drop(x, 0.4, seed=seed, rescale=False, backend="triton")
        keep = philox_mask(x.shape, seed, 0, 0.4)
        assert torch.equal(out, torch.where(keep, x, torch.zeros(())))
    ref, out = both(lambda b: ops.random_drop(x, 0.3, seed=9, backend=b))
    assert torch.equal(out, ref)


def test_peft_functions():
    g = torch.Generator().manual_seed(1)
    tasks = [0.05 * torch.randn(19, 43, generator=g) for _ in range(3)]
    w = torch.tensor([1.0, 0.5, -0.7])
    for name in ("ties", "dare_ties", "dare_linear", "magnitude_prune"):
        fn = getattr(FP, name)
        kw = dict(seed=4) if name.startswith("dare") else {}
        ref, out = both(lambda b: fn(tasks, w, 0.3, backend=b, **kw))
        assert torch.equal(out, ref), name
    ref, out = both(lambda b: FP.task_arithmetic(tasks, w, backend=b))
    assert torch.equal(out, ref)
    ref, out = both(lambda b: FP.ties(tasks, w, 0.3, "frequency", backend=b))
    assert torch.equal(out, ref)


def test_primitives():
    base, ms = models_for((31, 37), 3, torch.float32, seed=2)
    x = ms[0] - base
    for k in (0, 1, 17, x.numel() - 1, x.numel()):
        ref, out = both(lambda b: ops.magnitude_threshold(x, k=k, backend=b))
        assert torch.equal(out, ref), k
    for rescale in (None, "l1", "l2"):
        ref, out = both(lambda b: ops.magnitude_prune(x, 0.25, rescale=rescale, backend=b))
        assert_match(out, ref, str(rescale))
    for method in ("sum", "count"):
        ref, out = both(lambda b: ops.elect_sign(ms, [1.0, -0.5, 2.0], method=method, backend=b))
        assert torch.equal(out, ref)
    sign = ops.elect_sign(ms, backend=REF)
    for divisor in ("count", "weight"):
        ref, out = both(lambda b: ops.disjoint_merge(ms, sign, [1.0, 0.5, 0.25], divisor=divisor, backend=b))
        assert torch.equal(out, ref)
    ref, out = both(lambda b: ops.disjoint_merge(ms, sign > 0, divisor="count", backend=b))
    assert torch.equal(out, ref)


def _keep_set(a, T, J):
    """Flat indices of the top set ``key > T or (key == T and i <= J)`` of fp32 ``a``."""
    key = a.reshape(-1).view(torch.int32).long() & 0x7FFFFFFF
    i = torch.arange(key.numel())
    return (key > T) | ((key == T) & (i <= J))


@pytest.mark.parametrize("force_radix", [False, True], ids=["bracket", "radix"])
@pytest.mark.parametrize("case", ["distinct", "bf16_ties", "zeros_split"])
def test_select_exact_top_k(case, force_radix):
    """Exactly k kept, ties at the threshold to the lowest flat index, on both selection paths
    (n > 2**16: the sampled bracket; ``zeros_split`` overflows its candidate buffer)."""
    from fastmerge.backends import _gpu as gpu
    from fastmerge.backends.torch import range_keep
    from fastmerge.backends.triton import kernels

    g = torch.Generator().manual_seed(0)
    n = (1 << 17) + 77
    if case == "distinct":
        x = torch.randn(n, generator=g)
        ks = [1, 1000, n // 5, n - 1]
    elif case == "bf16_ties":
        x = torch.randn(n, generator=g).to(torch.bfloat16)  # ~2**8 distinct magnitudes per octave
        ks = [n // 3, n // 2]
    else:
        x = torch.randn(n, generator=g)
        x[torch.rand(n, generator=g) < 0.7] = 0.0
        ks = [n // 2]  # threshold inside the run of zeros
    _, bst, xs, sts, C, strided = gpu.layout(None, [x])
    tj = kernels().select(None, xs, qm=[0] * len(ks), qk=ks, n=n, C=C, strides=sts, base_strides=bst,
                          strided=strided, force_radix=force_radix)
    a = x.float()
    for (T, J), k in zip(tj.tolist(), ks):
        kept = _keep_set(a, T, J)
        assert int(kept.sum()) == k
        assert torch.equal(kept, range_keep(a.abs(), 0, k).reshape(-1)), (case, k)


def test_strided_inputs_read_in_place():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(53, 37, generator=g)
    ms = [base + 0.05 * torch.randn(53, 37, generator=g) for _ in range(3)]
    views = [ms[0].t().contiguous().t(),                      # transposed storage
             torch.randn(53, 80, generator=g)[:, 5:42],       # row slice (s0 != C)
             ms[2]]
    views[1].copy_(ms[1])
    bview = base.expand(2, 53, 37)[1]                           # a broadcast (stride 0 dim dropped)
    for v, m in zip(views, ms):
        assert torch.equal(v, m)
    assert all(gpu_strides(v) is not None for v in views)
    for method in ("ties", "dare_ties", "della", "breadcrumbs"):
        ref, out = both(lambda b: fastmerge.merge(method, base, ms, density=0.4, seed=1, backend=b))
        got = fastmerge.merge(method, bview, views, density=0.4, seed=1, backend="triton")
        assert_match(got, ref, method)
    # dims that do not collapse to (rows, columns): copied once, same result
    x3 = torch.randn(4, 5, 6, generator=g)
    perm = x3.permute(2, 0, 1)
    assert gpu_strides(perm) is None
    ref, out = both(lambda b: ops.magnitude_prune(perm, 0.3, backend=b))
    assert torch.equal(out, ref)


def gpu_strides(t):
    from fastmerge.backends._gpu import strides_2d

    return strides_2d(t)


def test_sixteen_inputs():
    base, ms = models_for((17, 29), 16, torch.bfloat16, seed=8)
    w = [((-1) ** k) * (0.2 + 0.05 * k) for k in range(16)]
    for method in ("ties", "dare_ties", "task_arithmetic"):
        ref, out = both(lambda b: fastmerge.merge(method, base, ms, weights=w, density=0.3, seed=3,
                                                  rescale=False, backend=b)
                        if method != "task_arithmetic" else
                        fastmerge.merge(method, base, ms, weights=w, backend=b))
        assert torch.equal(out, ref), method


@pytest.mark.parametrize("shape", [(0,), (1,), (), (3, 0, 2), (5,)], ids=str)
def test_edge_shapes(shape):
    base, ms = models_for(shape, 2, torch.float32)
    for method in ("ties", "della", "dare_ties", "linear"):
        kw = dict(density=0.5, seed=0) if method != "linear" else {}
        ref, out = both(lambda b: fastmerge.merge(method, base, ms, backend=b, **kw))
        assert_match(out, ref, f"{method} {shape}")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, on the nan input
def test_nonfinite_detected_in_kernel():
    base, ms = models_for((10, 10), 3, torch.float32)
    ms[2][3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"models\[2\].*non-finite"):
        fastmerge.ties(base, ms, density=0.5, backend="triton")
    base2 = base.clone()
    base2[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"base.*non-finite"):
        fastmerge.task_arithmetic(base2, ms[:2], backend="triton")
    with pytest.raises(ValueError, match="non-finite"):
        ops.magnitude_threshold(ms[2], 0.5, backend="triton")


def test_philox_counters_past_32_bits():
    """64-bit element indices: the counter's high word and the group word selection, checked
    against the readable torch Philox at indices around 2**34 (no 2**34-element tensor needed)."""
    import triton
    import triton.language as tl

    from fastmerge.backends.triton import kernels

    global _common  # the interpreter runs the kernel with this module's globals
    _common = common = kernels()._common

    @triton.jit
    def uniforms(idx, out, k0, k1, N: tl.constexpr, STREAM: tl.constexpr):
        i = tl.load(idx + tl.arange(0, N))
        a, b = _common.seed_key(k0, k1)
        tl.store(out + tl.arange(0, N), _common.uniform_at(i, STREAM, a, b))

    seed = 2**61 + 12345
    idx = torch.tensor([2**34 + j for j in range(-6, 10)] + [2**32 - 2, 2**32 + 3], dtype=torch.int64)
    idx = torch.cat([idx, torch.zeros(32 - idx.numel(), dtype=torch.int64)])
    out = torch.empty(32)
    k0, k1 = common.split_seed(seed)
    uniforms[(1,)](idx, out, k0, k1, N=32, STREAM=3)
    g = idx >> 2
    words = philox.philox4x32(g & 0xFFFFFFFF, g >> 32, torch.full_like(g, 3), torch.zeros_like(g), seed)
    w = torch.stack(words, 1).gather(1, (idx & 3)[:, None])[:, 0]
    expect = (w >> 8).to(torch.float32) * philox.UNIFORM_SCALE
    assert torch.equal(out, expect)
    assert math.isclose(float(out.mean()), 0.5, abs_tol=0.25)


def test_gpu_benchmark_kernel_rows():
    """bench/gpu.py's kernel-level rows (merge pass with thresholds given, selection alone)
    compute what the full merge computes, and its acceptance summary reads the rows."""
    from fastmerge.cli import _bench_module

    bench_gpu = _bench_module("gpu")

    base, ms = models_for((48, 40), 4, torch.bfloat16, seed=6)
    cases = bench_gpu.kernel_cases((48, 40), "cpu", torch.bfloat16, (base, ms, None), 4, ["triton", "cpu"])
    assert [c.op for c, _ in cases] == ["ties_merge_pass", "ties_select"]
    merged = cases[0][0].fn()
    assert torch.equal(merged, fastmerge.ties(base, ms, weights=[0.25] * 4, density=0.2, backend=REF))
    assert cases[0][1] is None and cases[1][1] == 5 * base.numel() * 2
    row = dict(op="ties_merge_pass", api="mergekit", backend="triton", shape=[4096, 14336], dtype="bfloat16",
               k=4, pct_of_copy_bw=85.0, speedup_vs={"peft": None, "mergekit": None})
    lines = []
    res = bench_gpu.acceptance([row], log=lines.append)
    assert res["triton"]["merge_pass_pct_of_copy_bw"] == 85.0 and res["cuda"]["ties_pct_of_copy_bw"] is None
    assert any("unmeasured" in line for line in lines) and any("ok" in line for line in lines)
