"""Every fused backend against the ``torch`` reference: same kept set, at most 1 ulp apart.

Shapes cover odd sizes, 1-D, a single element, empty, 3-D and non-contiguous views; all
supported dtypes; K from 1 to 8; every parameter at its edges. The selection tests cover both
paths of the C++ top-k (sample bracket for >= 2**20 elements, histogram radix select as the
fallback) and the tie cutoff by lowest flat index.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastmerge
from conftest import BACKENDS, assert_match, models_for

FUSED = [b for b in BACKENDS if b != "torch"]
pytestmark = pytest.mark.skipif(not FUSED, reason="no fused backend built on this machine")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(37, 53), (101,), (1,), (0,), (3, 5, 7), (64, 64)]


def both(fn, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn("torch"), fn(backend)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", fastmerge._registry.names("gta") + fastmerge._registry.names("linear"))
def test_merge_methods(backend, dtype, shape, method):
    K = 3
    base, ms = models_for(shape, K, dtype)
    dens = [0.3, 0.45, 0.2] if method.startswith("della") else [0.3, 0.0, 1.0]
    kw = dict(weights=[1.0, -0.5, 0.7], density=dens, seed=11)
    if method == "linear":
        kw.pop("seed")
    ref, out = both(lambda b: fastmerge.merge(method, base, ms, backend=b, **kw), backend)
    assert_match(out, ref, f"{method} {dtype} {shape}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("K", [1, 2, 5, 8])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della", "dare_linear"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(rescale=True, normalize=True, lam=0.6),
        dict(rescale="l2"),
        dict(rescale="linf", normalize=False),
        dict(rescale="density"),
        dict(rescale=False, lam=1.7),
    ],
    ids=["defaults", "l1-norm-lam", "l2", "linf", "density", "plain-lam"],
)
def test_merge_options(backend, K, method, opts):
    base, ms = models_for((29, 31), K, torch.float32, seed=K)
    weights = [(-1) ** k * (0.3 + 0.2 * k) for k in range(K)]
    dens = [0.2 + 0.5 * k / max(1, K - 1) for k in range(K)]
    if method == "della":
        dens = [min(d, 0.8) for d in dens]
    kw = dict(weights=weights, density=dens, seed=5, gamma=0.05, epsilon=0.1, **opts)
    ref, out = both(lambda b: fastmerge.merge(method, base, ms, backend=b, **kw), backend)
    assert_match(out, ref, f"{method} K={K} {opts}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("density", [0.0, 1e-3, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_ties", "task_arithmetic"])
def test_density_edges(backend, density, method):
    base, ms = models_for((41, 43), 3, torch.float32)
    ref, out = both(lambda b: fastmerge.merge(method, base, ms, density=density, seed=3, backend=b), backend)
    assert_match(out, ref, f"{method} density={density}")
    delta_ref, delta_out = ref - base, out - base
    assert int((delta_ref != 0).sum()) == int((delta_out != 0).sum())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.5, 1.0])
def test_breadcrumbs_gamma_edges(backend, gamma):
    base, ms = models_for((50, 20), 3, torch.float32)
    ref, out = both(lambda b: fastmerge.breadcrumbs(base, ms, density=0.3, gamma=gamma, backend=b), backend)
    assert_match(out, ref, f"gamma={gamma}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("density,epsilon", [(0.5, 0.0), (0.5, 0.49), (0.02, 0.01), (0.9, 0.05)])
@pytest.mark.parametrize("shape", [(17, 33), (257,), (4, 6, 5), (1, 1)], ids=str)
def test_della_edges(backend, density, epsilon, shape):
    base, ms = models_for(shape, 2, torch.float32)
    ref, out = both(lambda b: fastmerge.della(base, ms, density=density, epsilon=epsilon, seed=9, backend=b), backend)
    assert_match(out, ref, f"della {density} {epsilon} {shape}")


@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_inputs(backend):
    base, ms = models_for((40, 30), 3, torch.float32)
    base_t, ms_t = base.t(), [m.t() for m in ms]  # transposed views
    assert not base_t.is_contiguous()
    ref, out = both(lambda b: fastmerge.ties(base_t, ms_t, density=0.3, backend=b), backend)
    assert_match(out, ref, "transposed")
    # against the merge of contiguous copies (same logical tensors)
    expect = fastmerge.ties(base_t.contiguous(), [m.contiguous() for m in ms_t], density=0.3, backend=backend)
    assert torch.equal(out, expect)
    sl_b, sl_m = base[:, ::2], [m[:, ::2] for m in ms]
    ref, out = both(lambda b: fastmerge.dare_ties(sl_b, sl_m, density=0.5, seed=1, backend=b), backend)
    assert_match(out, ref, "strided slice")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_out_dtype(backend, out_dtype):
    base, ms = models_for((33, 35), 3, torch.bfloat16)
    ref, out = both(lambda b: fastmerge.ties(base, ms, density=0.4, out_dtype=out_dtype, backend=b), backend)
    assert out.dtype == out_dtype
    assert_match(out, ref, str(out_dtype))


# ---- selection: exactly k kept, ties broken by lowest flat index ------------------------

def topk_keep_mask(x, k):
    """Independent oracle: the k largest |x|, ties by lowest index (stable sort of magnitudes)."""
    a = x.float().abs().reshape(-1)
    order = torch.sort(a, descending=True, stable=True).indices
    keep = torch.zeros(a.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


@pytest.mark.parametrize("backend", FUSED + ["torch"])
@pytest.mark.parametrize(
    "n,levels",
    # paths in csrc/kernels.cpp select_ranges: n <= 2^16 nth_element, up to 2^20 two-pass
    # radix select, beyond that the sampled bracket (with the radix select as its fallback)
    [(1000, 7), (5003, 3), (1, 1), (2048, 1), (1 << 16, 9), ((1 << 16) + 1, 4), ((1 << 17) + 7, 5),
     (300007, 100000), (1 << 20, 5), ((1 << 20) + 3, 100000)],
    ids=["small-ties", "heavy-ties", "one", "all-equal", "2^16-ties", "2^16+1-ties", "2^17-ties",
         "radix-distinct", "2^20-ties", "2^20-distinct"],
)
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.2, 0.5, 0.999, 1.0])
def test_topk_exact_with_ties(backend, n, levels, frac):
    g = torch.Generator().manual_seed(n + levels)
    x = (torch.randint(-levels, levels + 1, (n,), generator=g).float() / levels)
    k = int(frac * n)
    pruned = fastmerge.ops.magnitude_prune(x, k=k, backend=backend)
    expect = topk_keep_mask(x, k) & (x != 0)
    assert torch.equal(pruned != 0, expect)
    assert torch.equal(pruned[expect], x[expect])
    if k:
        thr = fastmerge.ops.magnitude_threshold(x, k=k, backend=backend)
        assert float(thr) == float(x.abs().sort(descending=True).values[k - 1])


@pytest.mark.parametrize("backend", FUSED)
def test_topk_bracket_fallback(backend):
    """Large values hidden where the selection sample does not look: the sample bracket misses
    and the histogram radix select must still give the exact answer."""
    n = 1 << 21
    x = torch.full((n,), 1e-3)
    # the sample layout of select_bracket in csrc/kernels.cpp: clamp(n >> 10, 1024, 8192) runs
    # of 16 keys, evenly spaced
    runs, run = min(8192, max(1024, n >> 10)), 16
    stride = n // runs
    pos = torch.arange(n)
    hidden = (pos % stride) >= run
    g = torch.Generator().manual_seed(0)
    x[hidden] = 1.0 + torch.rand(int(hidden.sum()), generator=g)
    for k in [1000, n // 2, n - 5]:
        ref = fastmerge.ops.magnitude_prune(x, k=k, backend="torch")
        out = fastmerge.ops.magnitude_prune(x, k=k, backend=backend)
        assert torch.equal(out, ref), k


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(1024, 1100), (300, 301), (41, 43)], ids=["bracket", "radix", "small"])
def test_merge_selection_paths(backend, dtype, shape):
    base, ms = models_for(shape, 3, dtype)
    for method in ["ties", "breadcrumbs_ties"]:
        ref, out = both(lambda b: fastmerge.merge(method, base, ms, density=[0.2, 0.05, 0.7], gamma=0.02, backend=b), backend)
        assert_match(out, ref, method)


# ---- primitives and PEFT functions ------------------------------------------------------

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", ["sum", "count"])
def test_elect_and_disjoint(backend, dtype, method):
    ts = [torch.randn(57, 3).to(dtype) for _ in range(4)]
    ts[1][0, 0] = 0.0
    w = [1.0, -2.0, 0.5, 0.0]
    ref, out = both(lambda b: fastmerge.ops.elect_sign(ts, w, method=method, backend=b), backend)
    assert torch.equal(ref, out)
    for div in ["count", "weight"]:
        ref, out = both(lambda b: fastmerge.ops.disjoint_merge(ts, ref, w, divisor=div, backend=b), backend)
        assert_match(out, ref, div)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("rescale", [True, False, "l1", "l2", "linf"])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_random_drop(backend, rescale, density):
    x = torch.randn(1001)
    ref, out = both(lambda b: fastmerge.ops.random_drop(x, density, seed=2, rescale=rescale, backend=b), backend)
    assert_match(out, ref, f"{rescale} {density}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("fn", ["ties", "dare_ties", "dare_linear", "magnitude_prune", "task_arithmetic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("K", [1, 4, 8])
def test_peft_functions(backend, fn, dtype, K):
    ts = [0.1 * torch.randn(23, 19).to(dtype) for _ in range(K)]
    w = torch.linspace(-1, 1.5, K)
    args = (ts, w) if fn == "task_arithmetic" else (ts, w, 0.35)
    kw = {"seed": 4} if fn.startswith("dare") else {}
    ref, out = both(lambda b: getattr(fastmerge.peft, fn)(*args, backend=b, **kw), backend)
    assert_match(out, ref, fn)


@pytest.mark.parametrize("backend", FUSED)
def test_nonfinite_detected_in_kernel(backend):
    base, ms = models_for((10, 10), 3, torch.float32)
    ms[2][3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"models\[2\].*non-finite"):
        fastmerge.ties(base, ms, density=0.5, backend=backend)
    base_mid, ms_mid = models_for((300, 301), 3, torch.float32)  # the radix-select path
    ms_mid[1][299, 300] = float("-inf")
    with pytest.raises(ValueError, match=r"models\[1\].*non-finite"):
        fastmerge.ties(base_mid, ms_mid, density=0.5, backend=backend)
    base2 = base.clone()
    base2[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        fastmerge.task_arithmetic(base2, ms[:2], backend=backend)


def test_auto_prefers_fused_on_cpu():
    from fastmerge import dispatch

    expected = "cpu" if "cpu" in BACKENDS else "torch"
    assert dispatch.resolve("auto", torch.device("cpu")) == expected
    assert dispatch.resolve(None, torch.device("cpu")) in ("cpu", "torch")

