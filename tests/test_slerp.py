"""slerp's reference against mergekit 0.1.5 (see methods_testing for the tolerances)."""
from __future__ import annotations

import math

import pytest
import torch
from methods_testing import SHAPE_IDS, SHAPES, against_mergekit, random_case, standard_tests

globals().update(standard_tests("slerp", 1, t=0.3))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, -0.5, 1.5])
def test_random(shape, t):
    random_case("slerp", shape, 1, t=t, scale=1.0)


def _at_angle(cos, n=301, seed=0):
    """Two vectors of norms 1.5 and 0.7 whose cosine is ``cos``."""
    g = torch.Generator().manual_seed(seed)
    a, r = torch.randn(n, generator=g), torch.randn(n, generator=g)
    a = a / a.norm()
    r = r - (r @ a) * a
    r = r / r.norm()
    return 1.5 * a, 0.7 * (cos * a + math.sqrt(1 - cos * cos) * r)


@pytest.mark.parametrize("cos", [1.0, -1.0, 0.99999, -0.99999, 0.999, -0.999, 0.0, 0.5])
@pytest.mark.parametrize("t", [0.0, 0.25, 1.0])
def test_angles(cos, t):
    """Collinear, antipodal and near-threshold pairs (|cos| > 0.9995 interpolates linearly)."""
    a, b = _at_angle(cos)
    got = against_mergekit("slerp", a, [b], t=t)
    if abs(cos) > 0.9995:
        torch.testing.assert_close(got, (1 - t) * a + t * b)


def test_collinear_scaled_copies():
    base = torch.randn(37, 53)
    for factor in (2.0, -3.0, 1.0):
        against_mergekit("slerp", base, [factor * base], t=0.4)


@pytest.mark.parametrize("which", ["base", "model", "both"])
def test_zero_vectors(which):
    """A zero vector keeps norm 1: cosine 0, so the spherical branch at theta = pi/2."""
    a, b = torch.randn(9, 4), torch.randn(9, 4)
    if which in ("base", "both"):
        a = torch.zeros_like(a)
    if which in ("model", "both"):
        b = torch.zeros_like(b)
    got = against_mergekit("slerp", a, [b], t=0.3)
    torch.testing.assert_close(got, math.cos(0.3 * math.pi / 2) * a + math.sin(0.3 * math.pi / 2) * b)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0)])
def test_empty(shape):
    against_mergekit("slerp", torch.zeros(shape), [torch.zeros(shape)], t=0.3)


def test_t_is_required_and_a_number():
    from fastmerge.methods import slerp

    b, m = torch.randn(3), torch.randn(3)
    with pytest.raises(TypeError, match="t"):
        slerp.reference(b, [m])
    with pytest.raises(TypeError, match="t"):
        slerp.reference(b, [m], t="0.5")
    with pytest.raises(ValueError, match="t"):
        slerp.reference(b, [m], t=float("nan"))
