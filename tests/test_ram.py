"""ram's reference against mergekit 0.1.5 (see methods_testing for the tolerances)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_models
from methods_testing import (SHAPE_IDS, SHAPES, against_mergekit, fused_equals_reference, fused_tests,
                             random_case, sparse_models, standard_tests)

from fastmerge.methods import ram

globals().update(standard_tests("ram", 3, epsilon=0.03))

EPSILONS = [-1.0, 0.0, 1e-5, 0.03, 10.0]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("epsilon", [1e-5, 0.03])
def test_random(shape, K, epsilon):
    random_case("ram", shape, K, epsilon=epsilon)


@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("epsilon", EPSILONS)
def test_sparse_deltas(K, epsilon):
    """Elements changed by no model, one (kept whole) and several (averaged)."""
    b, ms = sparse_models((37, 53), K, 0.4)
    against_mergekit("ram", b, ms, epsilon=epsilon)


def test_no_models_and_zero_deltas():
    b, ms = make_models((5, 7), 2)
    torch.testing.assert_close(against_mergekit("ram", b, []), b, rtol=0, atol=0)
    against_mergekit("ram", b, [b.clone(), ms[0]])


@pytest.mark.parametrize("shape", [(0,), (0, 5)])
def test_empty(shape):
    z = torch.zeros(shape)
    against_mergekit("ram", z, [z, z])


def test_epsilon_is_a_number():
    b = torch.randn(3)
    with pytest.raises(TypeError, match="epsilon"):
        ram.reference(b, [b], epsilon=None)


# ---- the fused CPU kernel (csrc/ram.cpp): the reference's bytes -------------------------------
globals().update(fused_tests("ram", 3, epsilon=0.03))


@pytest.mark.parametrize("shape", SHAPES + [(0,), (0, 5)], ids=SHAPE_IDS + ["empty", "empty2d"])
@pytest.mark.parametrize("K", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("epsilon", EPSILONS)
def test_fused(shape, K, epsilon):
    b, ms = sparse_models(shape, K, 0.4)
    fused_equals_reference("ram", b, ms, epsilon=epsilon)


def test_fused_zero_and_negative_deltas():
    b, ms = make_models((37, 53), 2)
    fused_equals_reference("ram", b, [b.clone(), ms[0], -ms[1]], epsilon=0.0)
