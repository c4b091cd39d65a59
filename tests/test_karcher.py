"""karcher's reference against mergekit 0.1.5 (see methods_testing for the tolerances).

mergekit's karcher ignores the base flag: every entry, the base included, is averaged with
equal weights; here the base, when given, is the first input."""
from __future__ import annotations

import pytest
import torch
from conftest import make_models, mergekit_merge
from methods_testing import (SHAPE_IDS, SHAPES, against_mergekit, contract_matches_mergekit,
                             random_case, standard_tests)

from fastmerge.methods import karcher

globals().update(standard_tests("karcher", 3))


def test_contract_ignored_base():
    spec = contract_matches_mergekit("karcher")
    assert spec.contract.base.value == "ignored" and spec.contract.min_inputs == 1
    assert karcher.CONTRACT == dict(base="optional", min_models=0, max_models=None)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("base", [True, False], ids=["base", "nobase"])
def test_random(shape, K, base):
    random_case("karcher", shape, K, base=base, scale=0.5)


def test_single_input_is_itself():
    b, (m,) = make_models((5, 7), 1)
    torch.testing.assert_close(karcher.reference(b, []), b, rtol=0, atol=0)
    torch.testing.assert_close(karcher.reference(None, [m]), m, rtol=0, atol=0)
    torch.testing.assert_close(karcher.reference(b, []), mergekit_merge("karcher", b, []))


@pytest.mark.parametrize("max_iter", [0, 1, 3, 10, 50, -1])
@pytest.mark.parametrize("tol", [0.0, 1e-5, 1e-2, 0.5])
def test_parameters(max_iter, tol):
    random_case("karcher", (37, 53), 3, scale=0.5, max_iter=max_iter, tol=tol)


def test_zero_and_small_inputs():
    """Inputs of norm <= tol leave the mean (but still count in the scale)."""
    b, ms = make_models((9, 11), 3)
    against_mergekit("karcher", b, [torch.zeros_like(b)] + ms[1:])
    against_mergekit("karcher", b, [1e-7 * ms[0]] + ms[1:])
    z = torch.zeros(9, 11)
    got = against_mergekit("karcher", z, [z, z])
    assert not got.any()


@pytest.mark.parametrize("factor", [2.0, -1.0, -0.5])
def test_collinear_and_antipodal(factor):
    x = torch.randn(40)
    against_mergekit("karcher", None, [x, factor * x])
    against_mergekit("karcher", x, [factor * x, torch.randn(40)])


@pytest.mark.parametrize("shape", [(0,), (0, 5)])
def test_empty(shape):
    z = torch.zeros(shape)
    against_mergekit("karcher", z, [z, z])


def test_parameter_types():
    b, ms = make_models((3, 4), 2)
    with pytest.raises(TypeError, match="max_iter"):
        karcher.reference(b, ms, max_iter=2.5)
    with pytest.raises(ValueError, match="tol"):
        karcher.reference(b, ms, tol=float("inf"))
