"""multislerp's reference against mergekit 0.1.5 (see methods_testing for the tolerances)."""
from __future__ import annotations

import pytest
import torch
from methods_testing import SHAPE_IDS, SHAPES, against_mergekit, random_case, standard_tests

import fastmerge
from fastmerge.methods import multislerp

globals().update(standard_tests("multislerp", 3, weights=[0.3, 0.5, 0.2]))

WEIGHTS = {1: [0.7], 2: [0.3, 0.7], 3: [0.3, 0.5, 0.2], 4: [1.0, 2.0, 0.5, 0.25]}


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("base", [True, False], ids=["base", "nobase"])
def test_random(shape, K, base):
    random_case("multislerp", shape, K, base=base, weights=WEIGHTS[K])


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("base", [True, False], ids=["base", "nobase"])
def test_spread_directions(K, base):
    """Independent models, far apart on the sphere: a large tangent step."""
    g = torch.Generator().manual_seed(K)
    ms = [torch.randn(37, 53, generator=g) * (k + 1) for k in range(K)]
    b = torch.randn(37, 53, generator=g) if base else None
    against_mergekit("multislerp", b, ms, weights=WEIGHTS[K])


@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("eps", [0.0, 1e-8, 1e-3])
@pytest.mark.parametrize("weights", [1.0, [0.5, -0.2, 0.9], [2.0, 2.0, 2.0]])
def test_parameters(normalize_weights, eps, weights):
    random_case("multislerp", (37, 53), 3, weights=weights, normalize_weights=normalize_weights,
                eps=eps)


@pytest.mark.parametrize("factor", [2.0, -1.0])
def test_collinear_and_antipodal(factor):
    """Two antipodal deltas with equal weights cancel: mergekit's linear fallback where the
    cancellation is exact. Here the deltas carry the rounding of ``m - base``, so ``|mu|`` is of
    rounding size (above eps) and the direction ``mu / |mu|`` is rounding noise, in the
    reference as in mergekit (the same fp32 ops): the fused plan is only held to the norm."""
    base = torch.randn(6, 9)
    d = 0.1 * torch.randn(6, 9)
    models = [base + d, base + factor * d]
    against_mergekit("multislerp", base, models, weights=[0.5, 0.5], fused=factor > 0)
    got = fastmerge.merge("multislerp", base, models, weights=[0.5, 0.5], backend="cpu")
    norm = sum(0.5 * float((m - base).norm()) for m in models)
    assert got.isfinite().all()
    assert abs(float((got - base).norm()) - norm) < 0.05 * norm  # fp32 cancellation of ~1e6 c_k v_k
    against_mergekit("multislerp", base, models, weights=[0.2, 0.8])


def test_antipodal_norm_over_many_draws():
    """Nearly antipodal deltas: ``a^T G a`` cancels to rounding noise, so the fused plan takes
    ``|mu|`` from ``mu`` itself; the result keeps the weighted norm on every draw (before,
    about a third of the draws were off by 5-30%)."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        base = torch.randn(6, 9, generator=gen)
        d = 0.1 * torch.randn(6, 9, generator=gen)
        models = [base + d, base - d]
        got = fastmerge.merge("multislerp", base, models, weights=[0.5, 0.5], backend="cpu")
        norm = sum(0.5 * float((m - base).norm()) for m in models)
        assert got.isfinite().all() and abs(float((got - base).norm()) - norm) < 0.05 * norm


def test_zero_mean_with_three_raises_like_mergekit():
    from conftest import mergekit_merge

    base = torch.zeros(6, 9)  # exact deltas: their units cancel exactly
    d = 0.1 * torch.randn(6, 9)
    models = [d, -d, base.clone()]
    with pytest.raises(ValueError, match="weighted"):
        mergekit_merge("multislerp", base, models, weight=[0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="models"):
        multislerp.reference(base, models, weights=[0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="models"):
        fastmerge.merge("multislerp", base, models, weights=[0.5, 0.5, 0.0], backend="cpu")


def test_zero_deltas():
    base = torch.randn(5, 7)
    models = [base.clone(), base + 0.1 * torch.randn(5, 7), base + 0.1 * torch.randn(5, 7)]
    against_mergekit("multislerp", base, models, weights=[0.2, 0.3, 0.5])
    against_mergekit("multislerp", base, [base.clone(), base.clone()], weights=[0.5, 0.5])


@pytest.mark.parametrize("shape", [(0,), (0, 5)])
def test_empty_two_models(shape):
    z = torch.zeros(shape)
    against_mergekit("multislerp", z, [z, z], weights=[0.5, 0.5])


def test_weights_checked():
    """By design: weights summing to zero cannot be normalized (mergekit returns nan)."""
    b, ms = torch.randn(4), [torch.randn(4) for _ in range(3)]
    with pytest.raises(TypeError, match="weights"):
        multislerp.reference(b, ms)
    with pytest.raises(ValueError, match="weights"):
        multislerp.reference(b, ms, weights=[1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="weights"):
        multislerp.reference(b, ms, weights=[1.0, 1.0])
    multislerp.reference(b, ms, weights=[1.0, -1.0, 0.0], normalize_weights=False)
