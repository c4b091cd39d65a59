"""arcee_fusion's reference against mergekit 0.1.5 (see methods_testing for the tolerances).

Above 10^6 elements mergekit estimates its quartiles from a random sample (torch.randint);
ours are exact. The test of that compares with mergekit made to sort every element."""
from __future__ import annotations

import pytest
import torch
from conftest import make_models, mergekit_merge
from methods_testing import SHAPE_IDS, SHAPES, against_mergekit, random_case, standard_tests

import fastmerge
from fastmerge.methods import arcee_fusion

globals().update(standard_tests("arcee_fusion", 1))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_random(shape, scale):
    random_case("arcee_fusion", shape, 1, scale=scale)


def test_rows_without_change_and_identical_models():
    """A row equal to the base's has KL 0, importance 0; identical tensors: all importance 0,
    threshold 0, every element kept (the model, which is the base)."""
    b, (m,) = make_models((16, 24), 1)
    m[3] = b[3]
    m[7, :5] = b[7, :5]
    against_mergekit("arcee_fusion", b, [m])
    torch.testing.assert_close(against_mergekit("arcee_fusion", b, [b.clone()]), b, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_small_counts(n):
    """The order statistics floor(q (n - 1)) on few elements."""
    random_case("arcee_fusion", (n,), 1, scale=1.0)
    random_case("arcee_fusion", (n, 3), 1, scale=1.0)


def test_exact_quartiles_above_the_sample_size(monkeypatch):
    """By design: over 10^6 elements we take exact quartiles, which is what mergekit computes
    when its sample covers the whole tensor."""
    import mergekit.merge_methods.arcee_fusion as mk

    g = torch.Generator().manual_seed(0)
    b = torch.randn(1100, 1000, generator=g)
    m = b + 0.2 * torch.randn(1100, 1000, generator=g)
    got = arcee_fusion.reference(b, [m])
    monkeypatch.setattr(mk, "_QUANTILE_SAMPLE_SIZE", b.numel())
    expected = mergekit_merge("arcee_fusion", b, [m])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_empty_is_the_base():
    """By design: mergekit raises IndexError on 0-size tensors; we return the (empty) base."""
    z = torch.zeros(0, 5)
    with pytest.raises(IndexError):
        mergekit_merge("arcee_fusion", z, [z])
    assert arcee_fusion.reference(z, [z]).shape == (0, 5)


# ---- the fused cpu kernels (csrc/arcee_fusion.cpp) against the reference -------------------------
# exp, log and the row sums are computed differently from torch's, so s differs by fp32
# round-off (the KL sum cancels: about 1e-4 relative, as much as the fp32 reference's own error):
# only elements whose s lies that close to the threshold may be decided the
# other way. Elsewhere the output is the reference's, bit for bit.
def fused(b, ms, **params):
    return fastmerge.merge("arcee_fusion", b, ms, backend="cpu", **params)


def decided_alike(b, m, rel=1e-3):
    """Every element where fused and reference differ has s within ``rel`` of the threshold."""
    got, want = fused(b, [m], out_dtype=torch.float32), arcee_fusion.reference(b, [m])
    diff = got != want
    s = arcee_fusion.importance(m.float(), b.float())
    q1, median, q3 = (arcee_fusion.order_statistic(s, q) for q in (0.25, 0.5, 0.75))
    thr = median + 1.5 * (q3 - q1)
    near = (s - thr).abs() <= rel * thr.abs() + 1e-30
    assert not (diff & ~near).any(), f"{int((diff & ~near).sum())} elements decided otherwise far from the threshold"
    assert diff.float().mean() <= 1e-3
    return got


def big_pair(shape, scale=0.05, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    return b.to(dtype), (b + scale * torch.randn(shape, generator=g)).to(dtype)


@pytest.mark.parametrize("shape", [(1000, 700), (200003,), (7, 3, 129), (64, 1)],
                         ids=["1000x700", "1d", "3d", "64x1"])
@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_fused_matches_the_reference(shape, scale):
    decided_alike(*big_pair(shape, scale))


def test_fused_importance_ties():
    """Rows equal to the base (KL 0: s = 0 in masses, the quartiles among the ties) and equal
    tensors (every s 0, threshold 0, all kept)."""
    b, m = big_pair((300, 257))
    m[:200] = b[:200]
    decided_alike(b, m)
    b2 = b.clone()
    assert torch.equal(fused(b, [b2]), b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_low_precision(dtype):
    b, m = big_pair((129, 67), dtype=dtype)
    decided_alike(b, m)
    assert fused(b, [m]).dtype == dtype


def test_fused_non_contiguous_and_empty():
    b, m = big_pair((67, 129))
    got = fused(b.t(), [m.t()])
    want = fused(b.t().contiguous(), [m.t().contiguous()])
    assert torch.equal(got, want)
    z = torch.zeros(0, 5)
    assert fused(z, [z]).shape == (0, 5)


def test_fused_nonfinite_names_the_input():
    from fastmerge._validate import NonFiniteError

    b, m = big_pair((601, 1103))
    bad = m.clone()
    bad.view(-1)[54321] = float("nan")
    with pytest.raises(NonFiniteError, match=r"models\[0\]"):
        fused(b, [bad])
    badb = b.clone()
    badb.view(-1)[-1] = float("-inf")
    with pytest.raises(NonFiniteError, match="base"):  # the base first
        fused(badb, [bad])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_thread_count(dtype):
    b, m = big_pair((601, 1103), dtype=dtype, seed=3)
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(fused(b, [m]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
