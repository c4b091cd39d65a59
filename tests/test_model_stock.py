"""model_stock's reference against mergekit 0.1.5 (see methods_testing for the tolerances)."""
from __future__ import annotations

import pytest
import torch
from methods_testing import SHAPE_IDS, SHAPES, against_mergekit, random_case, standard_tests

from fastmerge.methods import model_stock

globals().update(standard_tests("model_stock", 3))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_random(shape, K, filter_wise):
    random_case("model_stock", shape, K, filter_wise=filter_wise)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_correlated_deltas(filter_wise):
    """A shared direction in every delta: cos well above 0, t between 0 and 1."""
    g = torch.Generator().manual_seed(1)
    base, common = torch.randn(12, 40, generator=g), torch.randn(12, 40, generator=g)
    models = [base + 0.1 * (common + torch.randn(12, 40, generator=g)) for _ in range(3)]
    against_mergekit("model_stock", base, models, filter_wise=filter_wise)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_singular_and_zero(filter_wise):
    """K = 2 antipodal deltas: 1 + cos = 0, the base is kept; zero deltas: cos = 0, t = 0."""
    base = torch.randn(6, 10)
    d = 0.1 * torch.randn(6, 10)
    got = against_mergekit("model_stock", base, [base + d, base - d], filter_wise=filter_wise)
    torch.testing.assert_close(got, base)
    got = against_mergekit("model_stock", base, [base.clone(), base + d], filter_wise=filter_wise)
    torch.testing.assert_close(got, base)
    d2 = d.clone()
    d2[2] = -d[2]  # one antipodal row among collinear ones
    against_mergekit("model_stock", base, [base + d, base + d2, base + 2 * d],
                     filter_wise=filter_wise)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0)])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_empty(shape, filter_wise):
    z = torch.zeros(shape)
    against_mergekit("model_stock", z, [z, z], filter_wise=filter_wise)


def test_filter_wise_is_a_bool():
    base = torch.randn(3)
    with pytest.raises(TypeError, match="filter_wise"):
        model_stock.reference(base, [base, base], filter_wise="yes")
