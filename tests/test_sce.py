"""sce's reference against mergekit 0.1.5 (see methods_testing for the tolerances)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_models
from methods_testing import (LOW, LOW_IDS, SHAPE_IDS, SHAPES, against_mergekit, low_precision,
                             random_case, sparse_models, standard_tests)

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
