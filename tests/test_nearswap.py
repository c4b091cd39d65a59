"""nearswap's reference against mergekit 0.1.5 (see methods_testing for the tolerances)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_models
from methods_testing import (SHAPE_IDS, SHAPES, against_mergekit, fused_equals_reference, fused_tests,
                             random_case, standard_tests)

from fastmerge.methods import nearswap

globals().update(standard_tests("nearswap", 1, t=0.05))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.05, 1.0, -1.0, 100.0])
def test_random(shape, t):
    random_case("nearswap", shape, 1, t=t)


def test_equal_and_near_elements():
    """|a - b| below the 1e-6 floor: weight t / 1e-6 (clamped to 1)."""
    a = torch.randn(50)
    b = a.clone()
    b[10:20] += 1e-7
    b[20:30] += 0.2
    for t in (0.0, 1e-8, 1e-7, 0.05):
        against_mergekit("nearswap", a, [b], t=t)


@pytest.mark.parametrize("t", [1e-7, 1e-6, 3e-6, 1e-4])
def test_floor_of_the_distance(t):
    """Distances around the 1e-6 floor, on values near 0 where the floor is visible."""
    a = torch.zeros(200)
    b = torch.logspace(-8, -4, 200) * torch.where(torch.arange(200) % 2 == 0, 1.0, -1.0)
    against_mergekit("nearswap", a, [b], t=t, atol=1e-12)
    against_mergekit("nearswap", b, [a], t=t, atol=1e-12)


@pytest.mark.parametrize("shape", [(0,), (0, 5)])
def test_empty(shape):
    z = torch.zeros(shape)
    against_mergekit("nearswap", z, [z], t=0.1)


def test_t_required():
    a = torch.randn(3)
    with pytest.raises(TypeError, match="t"):
        nearswap.reference(a, [a])


# ---- the fused CPU kernel (csrc/nearswap.cpp): the reference's bytes --------------------------
globals().update(fused_tests("nearswap", 1, t=0.03))


@pytest.mark.parametrize("shape", SHAPES + [(0,), (0, 5)], ids=SHAPE_IDS + ["empty", "empty2d"])
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.05, 1.0, -1.0, 100.0, 1e38])
def test_fused(shape, t):
    b, ms = make_models(shape, 1)
    fused_equals_reference("nearswap", b, ms, t=t)


@pytest.mark.parametrize("t", [0.0, 1e-7, 1e-6, 3e-6, 1e-4])
def test_fused_floor_of_the_distance(t):
    a = torch.zeros(200)
    b = torch.logspace(-8, -4, 200) * torch.where(torch.arange(200) % 2 == 0, 1.0, -1.0)
    fused_equals_reference("nearswap", a, [b], t=t)
    fused_equals_reference("nearswap", b, [a], t=t)
    fused_equals_reference("nearswap", a, [a.clone()], t=t)  # |a - b| = 0 everywhere
