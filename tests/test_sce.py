"""sce's reference against mergekit 0.1.5 (see methods_testing for the tolerances)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_models
from methods_testing import (LOW, LOW_IDS, SHAPE_IDS, SHAPES, against_mergekit, low_precision,
                             random_case, sparse_models, standard_tests)

import fastmerge
from fastmerge.methods import sce

globals().update(standard_tests("sce", 3))

TOPK = [-0.5, 0.0, 0.001, 0.3, 0.5, 0.999, 1.0, 1.5]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_random(shape, K, select_topk):
    random_case("sce", shape, K, select_topk=select_topk)


@pytest.mark.parametrize("select_topk", TOPK)
@pytest.mark.parametrize("int8_mask", [False, True])
def test_select_topk(select_topk, int8_mask):
    random_case("sce", (37, 53), 3, select_topk=select_topk, int8_mask=int8_mask)


@pytest.mark.parametrize("select_topk", [0.3, 1.0])
def test_sparse_deltas(select_topk):
    """Elements no model or one model changes: variance 0 is never selected."""
    b, ms = sparse_models((37, 53), 3, 0.2)
    against_mergekit("sce", b, ms, select_topk=select_topk)


@pytest.mark.parametrize("dtype,atol,rtol", LOW, ids=LOW_IDS)
def test_low_precision_select(dtype, atol, rtol):
    """bf16/fp16 deltas repeat, so variances tie at the top-k cut, where mergekit's topk order
    is unspecified and ours keeps the lowest index: a few elements (<= 0.5%) may differ."""
    low_precision("sce", 3, dtype, atol, rtol, select_topk=0.4, max_frac=0.005)


def test_small_deltas_get_equal_weights():
    """sum_k mean(d_k^2) < 1e-6: mergekit's guard gives every model weight 1/K."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(37, 53, generator=g)
    ms = [b + 1e-4 * (k + 1) * torch.randn(37, 53, generator=g) for k in range(3)]
    assert sum(float((m - b).square().mean()) for m in ms) < 1e-6
    against_mergekit("sce", b, ms, atol=1e-9)
    against_mergekit("sce", b, ms, select_topk=0.5, atol=1e-9)


def test_no_models_one_model_identical_models():
    b, ms = make_models((5, 7), 2)
    torch.testing.assert_close(against_mergekit("sce", b, []), b, rtol=0, atol=0)
    got = against_mergekit("sce", b, ms[:1], select_topk=0.5)  # variance 0: nothing kept
    torch.testing.assert_close(got, b, rtol=0, atol=0)
    against_mergekit("sce", b, [ms[0], ms[0].clone()], select_topk=0.5)
    against_mergekit("sce", b, [b.clone(), b.clone()])


def test_opposing_signs():
    b = torch.randn(6, 8)
    d = 0.1 * torch.randn(6, 8)
    against_mergekit("sce", b, [b + d, b - d, b + 0.5 * d])
    against_mergekit("sce", b, [b + d, b - d])


@pytest.mark.filterwarnings("ignore:var")  # mergekit's torch.var of no elements
@pytest.mark.parametrize("shape", [(0,), (0, 5)])
@pytest.mark.parametrize("select_topk", [0.5, 1.0])
def test_empty(shape, select_topk):
    z = torch.zeros(shape)
    against_mergekit("sce", z, [z, z], select_topk=select_topk)


def test_variance_ties_go_to_the_lowest_index():
    """By design (mergekit's topk leaves tie order unspecified): equal variances at the cut
    keep the lowest flat indices."""
    d0 = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 0.0])
    keep = sce.select_mask([d0, -d0], 0.4)  # 5 nonzero variances: k = 2 of [1, 4, 1, 4, 1]
    assert keep.tolist() == [False, True, False, True, False, False]
    keep = sce.select_mask([d0, -d0], 0.8)  # k = 4: both 4s, then the first two 1s
    assert keep.tolist() == [True, True, True, True, False, False]


def test_parameter_types():
    b, ms = make_models((3, 4), 2)
    with pytest.raises(TypeError, match="select_topk"):
        sce.reference(b, ms, select_topk=None)
    with pytest.raises(TypeError, match="int8_mask"):
        sce.reference(b, ms, int8_mask=1)


# ---- the fused cpu kernels (csrc/sce.cpp) against the reference ---------------------------------
# The weights come from whole-tensor sums (fp64 here, torch's fp32 order there): outputs agree
# within a few ulps, never bit for bit. A wrongly selected element would be off by its delta,
# so the selection is checked element by element with tight tolerances.
STRICT = {"rtol": 1e-5, "atol": 1e-6}


def big_models(shape, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    return b.to(dtype), [(b + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(K)]


def fused(b, ms, **params):
    return fastmerge.merge("sce", b, ms, backend="cpu", **params)


def strict_match(b, ms, **params):
    want = sce.reference(b, ms, **params)
    got = fused(b, ms, out_dtype=torch.float32, **params)
    torch.testing.assert_close(got, want, **STRICT)
    return got


@pytest.mark.parametrize("select_topk", TOPK + [1e-7, 0.05])
@pytest.mark.parametrize("K", [1, 2, 5])
def test_fused_select_topk_edges(select_topk, K):
    b, ms = make_models((37, 53), K)
    strict_match(b, ms, select_topk=select_topk)


@pytest.mark.parametrize("shape,select_topk", [((1000, 700), 0.001), ((1000, 700), 0.5),
                                               ((3, 200003), 0.1), ((3, 200003), 0.97)])
def test_fused_select_sampled(shape, select_topk):
    """Above 2^19 elements a sample brackets the threshold; the selection stays exact."""
    b, ms = big_models(shape, 3)
    strict_match(b, ms, select_topk=select_topk)


@pytest.mark.parametrize("select_topk", [0.05, 0.3, 0.5])
def test_fused_variance_ties(select_topk):
    """Deltas of a few values: variances tie in masses at the cut; the lowest indices are kept
    (the reference's stable sort), also where the sample's bracket collapses onto one value."""
    g = torch.Generator().manual_seed(1)
    for n in (5000, 1 << 20):
        b = torch.randn(n, generator=g)
        ms = [b + 0.25 * torch.randint(-2, 3, (n,), generator=g).float() for _ in range(3)]
        strict_match(b, ms, select_topk=select_topk)
    d0 = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 0.0])
    z = torch.zeros(6)
    strict_match(z, [d0, -d0], select_topk=0.4)
    strict_match(z, [d0, -d0], select_topk=0.8)


def test_fused_select_when_the_sample_misses():
    """The sampled chunks (4096 runs of 64 elements, csrc/sce.cpp) made unrepresentative: the
    bracket misses and two histogram passes find the exact threshold instead."""
    n = 1 << 19
    b, ms = big_models((n,), 3)
    step = (n - 64) // 4095
    idx = ((torch.arange(4096) * step)[:, None] + torch.arange(64)).reshape(-1)
    for m in ms:
        m[idx] = b[idx] + 3 * torch.randn(idx.numel())
    for select_topk in (0.2, 0.6):
        strict_match(b, ms, select_topk=select_topk)
    for m in ms:
        m[idx] = b[idx]
    strict_match(b, ms, select_topk=0.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("select_topk", [0.4, 1.0])
def test_fused_low_precision(dtype, select_topk):
    """bf16/fp16 inputs: the kernels compute on the fp32 upcast, as the reference does."""
    b, ms = make_models((129, 67), 3, dtype)
    want = sce.reference(b, ms, select_topk=select_topk)
    torch.testing.assert_close(fused(b, ms, select_topk=select_topk, out_dtype=torch.float32), want, **STRICT)
    got = fused(b, ms, select_topk=select_topk)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=0, atol=0)


def test_fused_non_contiguous_and_empty():
    b, ms = make_models((53, 37), 3)
    views = [m.t() for m in ms]
    for select_topk in (0.3, 1.0):
        torch.testing.assert_close(fused(b.t(), views, select_topk=select_topk),
                                   sce.reference(b.t(), views, select_topk=select_topk), **STRICT)
    z = torch.zeros(0, 5)
    assert fused(z, [z, z], select_topk=0.5).shape == (0, 5)
    assert torch.equal(fused(b, [], select_topk=0.5), b)


@pytest.mark.parametrize("select_topk", [0.0, 0.3, 1.0])
def test_fused_nonfinite_names_the_input(select_topk):
    from fastmerge._validate import NonFiniteError

    b, ms = big_models((601, 1103), 3)
    for k in range(3):
        bad = [m.clone() for m in ms]
        bad[k].view(-1)[12345] = float("nan") if k != 1 else float("-inf")
        with pytest.raises(NonFiniteError, match=rf"models\[{k}\]"):
            fused(b, bad, select_topk=select_topk)
    bad = b.clone()
    bad.view(-1)[-1] = float("inf")
    ms[2].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="base"):  # the base first
        fused(bad, ms, select_topk=select_topk)


@pytest.mark.parametrize("select_topk", [0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_thread_count(select_topk, dtype):
    b, ms = big_models((601, 1103), 3, dtype, seed=3)  # 663k elements: the sampled selection
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(fused(b, ms, select_topk=select_topk))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       outs[1].view(torch.int16 if dtype != torch.float32 else torch.int32))
