"""ramplus_tl's reference against mergekit 0.1.5 (see methods_testing for the tolerances)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_models, mergekit_merge
from methods_testing import (SHAPE_IDS, SHAPES, against_mergekit, fused_equals_reference, fused_tests,
                             merged_cpu, random_case, sparse_models, standard_tests)

from fastmerge.methods import ramplus_tl

globals().update(standard_tests("ramplus_tl", 3, epsilon=0.03))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_random(shape, K):
    random_case("ramplus_tl", shape, K, epsilon=0.03)


@pytest.mark.parametrize("r", [0.0, 0.1, 2.0, -1.0])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 5.0, -0.3])
def test_r_alpha(r, alpha):
    b, ms = sparse_models((37, 53), 3, 0.4)
    against_mergekit("ramplus_tl", b, ms, r=r, alpha=alpha)


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("epsilon", [-1.0, 0.0, 1e-5, 0.03, 10.0])
def test_epsilon(K, epsilon):
    b, ms = sparse_models((37, 53), K, 0.4)
    against_mergekit("ramplus_tl", b, ms, epsilon=epsilon, r=0.5, alpha=1.0)


def test_no_models_and_zero_deltas():
    b, ms = make_models((5, 7), 2)
    torch.testing.assert_close(against_mergekit("ramplus_tl", b, []), b, rtol=0, atol=0)
    against_mergekit("ramplus_tl", b, [b.clone(), ms[0]])


def test_zero_delta_with_epsilon_zero():
    """By design: a model that changes nothing, with epsilon = 0, gets rho = 0 (mergekit:
    0/0 = nan, which reaches the elements another model alone changes)."""
    b, (m,) = sparse_models((6, 8), 1, 0.5)
    expected = mergekit_merge("ramplus_tl", b, [b.clone(), m], epsilon=0.0)
    assert expected.isnan().any()
    got = ramplus_tl.reference(b, [b.clone(), m], epsilon=0.0)
    # m alone changes what it changes: shared = 0, so lambda = 1 for it too, which is ram
    torch.testing.assert_close(got, against_mergekit("ram", b, [m], epsilon=0.0))


@pytest.mark.parametrize("shape", [(0,), (0, 5)])
def test_empty(shape):
    z = torch.zeros(shape)
    against_mergekit("ramplus_tl", z, [z, z])


def test_parameters_are_numbers():
    b = torch.randn(3)
    for name in ("r", "alpha", "epsilon"):
        with pytest.raises(TypeError, match=name):
            ramplus_tl.reference(b, [b], **{name: "x"})


# ---- the fused CPU kernels (csrc/ram.cpp: a counting pass, then the merge) -------------------
globals().update(fused_tests("ramplus_tl", 3, epsilon=0.03, r=0.5, alpha=1.0))


@pytest.mark.parametrize("shape", SHAPES + [(0,), (0, 5)], ids=SHAPE_IDS + ["empty", "empty2d"])
@pytest.mark.parametrize("K", [0, 1, 2, 3, 4])
def test_fused(shape, K):
    b, ms = sparse_models(shape, K, 0.4)
    fused_equals_reference("ramplus_tl", b, ms, epsilon=0.03)


@pytest.mark.parametrize("r", [0.0, 0.1, 2.0, -1.0])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 5.0, -0.3])
@pytest.mark.parametrize("epsilon", [-1.0, 0.0, 1e-5, 0.03, 10.0])
def test_fused_parameters(r, alpha, epsilon):
    b, ms = sparse_models((37, 53), 3, 0.4)
    fused_equals_reference("ramplus_tl", b, ms, r=r, alpha=alpha, epsilon=epsilon)


def test_fused_zero_delta_with_epsilon_zero():
    b, (m,) = sparse_models((6, 8), 1, 0.5)
    fused_equals_reference("ramplus_tl", b, [b.clone(), m], epsilon=0.0)


def test_fused_counts_decide_lambda():
    """A model whose changes are mostly shared gets a large lambda on its unique ones: a wrong
    count (or a count per thread block) changes the bytes."""
    b, ms = sparse_models((301, 1201), 3, 0.6, seed=5)
    got = fused_equals_reference("ramplus_tl", b, ms, r=1.0, alpha=10.0, epsilon=1e-5)
    plain = merged_cpu("ram", b, ms, epsilon=1e-5)
    assert not torch.equal(got, plain)
