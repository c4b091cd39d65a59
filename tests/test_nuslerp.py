"""nuslerp's reference against mergekit 0.1.5 (see methods_testing for the tolerances)."""
from __future__ import annotations

import pytest
import torch
from methods_testing import SHAPE_IDS, SHAPES, against_mergekit, random_case, standard_tests

import fastmerge
from fastmerge.methods import nuslerp

globals().update(standard_tests("nuslerp", 2, weights=[0.3, 0.7]))

LAYOUTS = [dict(), dict(nuslerp_flatten=False), dict(nuslerp_flatten=False, nuslerp_row_wise=True),
           dict(nuslerp_row_wise=True)]
LAYOUT_IDS = ["flat", "rows", "columns", "flat-rowwise-ignored"]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("base", [True, False], ids=["base", "nobase"])
def test_random(shape, layout, base):
    random_case("nuslerp", shape, 2, base=base, weights=[0.3, 0.7], **layout)


@pytest.mark.parametrize("weights", [[1.0, 0.0], [0.0, 1.0], [0.5, -0.5], [2.0, -1.0], 1.0,
                                     [1e-7, 1e-7], [-0.2, -0.6]])
def test_weights(weights):
    """``t = w1 / (w0 + w1)``; ``|w0 + w1| < 1e-6`` gives ``t = 0.5``."""
    random_case("nuslerp", (37, 53), 2, weights=weights)
    random_case("nuslerp", (37, 53), 2, weights=weights, nuslerp_flatten=False)


@pytest.mark.parametrize("factor", [2.0, -1.5, 1.0])
@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=LAYOUT_IDS[:3])
def test_collinear_and_antipodal_deltas(factor, layout):
    """Antipodal deltas (factor < 0) are ill-posed in fp32: the reference's (and mergekit's)
    fp32 cosine lands on -1 or a rounding step above it, so it interpolates linearly or divides
    by a sin(theta) of rounding size. The fused plan's exact cosine rounds to -1: linear."""
    base = torch.randn(8, 6)
    d = 0.1 * torch.randn(8, 6)
    models = [base + d, base + factor * d]
    against_mergekit("nuslerp", base, models, weights=[0.4, 0.6], fused=factor > 0, **layout)
    got = fastmerge.merge("nuslerp", base, models, weights=[0.4, 0.6], backend="cpu", **layout)
    v0, v1 = models[0] - base, models[1] - base
    torch.testing.assert_close(got, base + (0.4 * v0 + 0.6 * v1), atol=1e-6, rtol=1e-5)


def test_mixed_rows():
    """Per-row layout: collinear, antipodal, zero and generic rows in one tensor."""
    base = torch.randn(4, 16)
    d0, d1 = 0.1 * torch.randn(4, 16), 0.1 * torch.randn(4, 16)
    d1[0], d1[1], d1[2], d0[3] = 3 * d0[0], -d0[1], 0.0, 0.0
    against_mergekit("nuslerp", base, [base + d0, base + d1], weights=[0.4, 0.6],
                     nuslerp_flatten=False)


def test_zero_deltas():
    base = torch.randn(5, 7)
    m = base + 0.1 * torch.randn(5, 7)
    against_mergekit("nuslerp", base, [base.clone(), m], weights=[0.5, 0.5])
    against_mergekit("nuslerp", base, [base.clone(), base.clone()], weights=[0.5, 0.5])


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0)])
@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=LAYOUT_IDS[:3])
def test_empty(shape, layout):
    z = torch.zeros(shape)
    against_mergekit("nuslerp", z, [z, z], weights=[0.5, 0.5], **layout)


def test_weights_required_and_counted():
    b, m = torch.randn(3), torch.randn(3)
    with pytest.raises(TypeError, match="weights"):
        nuslerp.reference(b, [m, m])
    with pytest.raises(ValueError, match="weights"):
        nuslerp.reference(b, [m, m], weights=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="nuslerp_flatten"):
        nuslerp.reference(b, [m, m], weights=1.0, nuslerp_flatten=1)
