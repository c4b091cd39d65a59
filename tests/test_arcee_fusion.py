"""arcee_fusion's reference against mergekit 0.1.5 (see methods_testing for the tolerances).

Above 10^6 elements mergekit estimates its quartiles from a random sample (torch.randint);
ours are exact. The test of that compares with mergekit made to sort every element."""
from __future__ import annotations

import pytest
import torch
from conftest import make_models, mergekit_merge
from methods_testing import SHAPE_IDS, SHAPES, against_mergekit, random_case, standard_tests

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
