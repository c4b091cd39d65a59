"""fastmerge.merge versus the real mergekit 0.1.5 (``mergekit.merge_methods.merge_tensors``).

Differences by design (everything else must agree):

1. Random masks (DARE, DELLA with density < 1): mergekit draws them with ``torch.bernoulli`` from
   torch's global generator; fastmerge draws them from its seeded Philox counter layout. The
   tests replace mergekit's ``torch.bernoulli`` with fastmerge's Philox mask (stream k for model
   k), which makes the comparison exact again; only *their* RNG is replaced, never our code.
2. Working precision: mergekit computes in the input dtype (bf16/fp16 deltas, bf16 weights,
   bf16 sums); fastmerge upcasts once, computes in fp32 and rounds the output once. In low
   precision results therefore differ by about an ulp everywhere, and by more at the few
   positions where rounding the deltas to bf16/fp16 changes which elements sit at a top-k cut
   (rounded deltas have many exact ties in magnitude, so the kept set is not unique there).
3. Top-k ties: fastmerge keeps the lowest flat index among equal magnitudes; mergekit's
   ``argsort`` (not stable) keeps an unspecified one. With fp32 random data there are no ties.
4. DELLA on rows of length 1 (1-element tensors, or dim 1 of size 1): mergekit computes
   ``rank_norm = 0/0 = nan`` and ``torch.bernoulli`` raises; fastmerge defines ``rank_norm = 0``.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

import fastmerge
from conftest import (
    BACKENDS,
    DTYPE_IDS,
    DTYPES,
    assert_close_frac,
    bernoulli_from_philox,
    make_models,
    mergekit_merge,
    philox_mask,
)

FP32_ATOL, FP32_RTOL = 1e-6, 1e-5

DETERMINISTIC = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]
RANDOM = ["dare_ties", "dare_linear", "della", "della_linear"]
SHAPES = [(37, 53), (101,), (1,), (3, 5, 7)]
KS = [1, 2, 3, 5, 8]

# weights exactly representable in bf16/fp16 (mergekit rounds weights to the working dtype)
EXACT_WEIGHTS = [1.0, 0.5, -0.25, 0.75, 1.0, -0.5, 0.25, 0.75]


def _params(method, K, weights, density, gamma=None, epsilon=None, **shared):
    """mergekit parameters: only the ones the method declares (mergekit rejects the others)."""
    p = dict(weight=list(weights), density=list(density), **shared)
    if method.startswith("breadcrumbs"):
        p["gamma"] = list(gamma if gamma is not None else [0.01] * K)
    if method.startswith("della"):
        p["epsilon"] = list(epsilon if epsilon is not None else [0.15] * K)
    return p


def _random_weights(K, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    w = (torch.rand(K, generator=g) * 2.4 - 0.9).tolist()  # includes negatives
    # keep sum(w) safely away from 0 so normalize is well conditioned
    if abs(sum(w)) < 0.2:
        w[0] += 1.0
    return w


def _random_densities(K, seed):
    g = torch.Generator().manual_seed(2000 + seed)
    return (0.05 + 0.9 * torch.rand(K, generator=g)).tolist()


def _both(method, base, models, *, weights, density, gamma=None, epsilon=None, lam=1.0,
          normalize=None, rescale=None, int8_mask=None, backend="torch", seed=0):
    K = len(models)
    shared = {}
    if lam != 1.0:
        shared["lambda"] = lam
    if normalize is not None:
        shared["normalize"] = normalize
    if rescale is not None:
        shared["rescale"] = rescale
    if int8_mask is not None:
        shared["int8_mask"] = int8_mask
    theirs = mergekit_merge(method, base, models,
                            **_params(method, K, weights, density, gamma, epsilon, **shared))
    kw = {}
    if gamma is not None:
        kw["gamma"] = gamma
    if epsilon is not None:
        kw["epsilon"] = epsilon
    ours = fastmerge.merge(method, base, models, weights=weights, density=density, lam=lam,
                           normalize=normalize, rescale=rescale, seed=seed, backend=backend, **kw)
    return ours, theirs


def _assert_fp32(ours, theirs, base, msg=""):
    """fp32: within a few ulps. The absolute tolerance scales with the merged delta, which a
    normalize divisor near zero (negative weights) can amplify along with rounding noise."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    scale = max(1.0, float((theirs - base).abs().max())) if base is not None else 1.0
    torch.testing.assert_close(ours, theirs, atol=FP32_ATOL * scale, rtol=FP32_RTOL,
                               msg=lambda m: f"{msg}\n{m}")
    # identical kept sets: the positions the merge changed are the same
    if base is not None:
        assert torch.equal(ours != base, theirs != base), f"{msg}: changed positions differ"


# ---- fp32: deterministic methods ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_fp32_random_params(method, shape, backend):
    """Random per-model weights (with negatives) and per-model densities, fp32, tight."""
    for K in KS:
        seed = zlib.crc32(f"{method}{shape}{K}".encode()) % 1000
        base, models = make_models(shape, K, seed=seed)
        w, d = _random_weights(K, seed), _random_densities(K, seed)
        gamma = [0.01 + 0.02 * k for k in range(K)] if method.startswith("breadcrumbs") else None
        ours, theirs = _both(method, base, models, weights=w, density=d, gamma=gamma, backend=backend)
        _assert_fp32(ours, theirs, base, f"{method} {shape} K={K}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(37, 53), (101,), (1,)], ids=str)
@pytest.mark.parametrize("density", [0.0, 1e-3, 0.3, 0.999, 1.0])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_fp32_density_edges(method, density, shape, backend):
    """density 0 (everything dropped: out == base), tiny (mergekit keeps max(1, k) for
    magnitude; breadcrumbs keeps int(d*n) which may be 0), near 1 and exactly 1."""
    base, models = make_models(shape, 3, seed=7)
    w = [1.0, -0.4, 0.7]
    ours, theirs = _both(method, base, models, weights=w, density=[density] * 3, backend=backend)
    _assert_fp32(ours, theirs, base, f"{method} d={density} {shape}")
    if density == 0.0:
        assert torch.equal(ours, base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_fp32_mixed_density_edges_per_model(method, backend):
    base, models = make_models((37, 53), 4, seed=8)
    w = [0.9, -0.6, 1.3, 0.4]
    d = [0.0, 1e-3, 0.999, 1.0]
    ours, theirs = _both(method, base, models, weights=w, density=d, backend=backend)
    _assert_fp32(ours, theirs, base, method)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(37, 53), (101,)], ids=str)
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_fp32_breadcrumbs_gamma_edges(method, density, shape, backend):
    """Breadcrumbs' outlier removal: when int(gamma*n) + int(density*n) > n mergekit shrinks
    the outlier cut instead of the kept count (n_bot = max(0, n - target - n_top))."""
    for gamma in [0.0, 1e-3, 0.05, 0.5, 0.99, 1.0]:
        base, models = make_models(shape, 2, seed=9)
        ours, theirs = _both(method, base, models, weights=[1.0, 0.6], density=[density] * 2,
                             gamma=[gamma] * 2, backend=backend)
        _assert_fp32(ours, theirs, base, f"{method} d={density} g={gamma}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_breadcrumbs_per_model_gamma(backend):
    base, models = make_models((37, 53), 3, seed=10)
    ours, theirs = _both("breadcrumbs_ties", base, models, weights=[1.0, 0.5, -0.3],
                         density=[0.2, 0.6, 0.95], gamma=[0.0, 0.1, 0.3], backend=backend)
    _assert_fp32(ours, theirs, base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.0, 0.35, 1.0, 2.5, -1.0])
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_fp32_lambda(method, lam, backend):
    base, models = make_models((37, 53), 3, seed=11)
    ours, theirs = _both(method, base, models, weights=[1.0, 0.5, -0.3], density=[0.3, 0.5, 0.7],
                         lam=lam, backend=backend)
    _assert_fp32(ours, theirs, base, f"{method} lam={lam}")
    if lam == 0.0:
        assert torch.equal(ours, base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rescale", [None, True, False])
@pytest.mark.parametrize("normalize", [None, True, False])
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_fp32_normalize_rescale_overrides(method, normalize, rescale, backend):
    """normalize / rescale forced both ways (None = the method's mergekit default). mergekit's
    ``rescale: true`` is L1 norm matching of each sparsified delta."""
    base, models = make_models((37, 53), 3, seed=12)
    ours, theirs = _both(method, base, models, weights=[1.0, 0.5, -0.3], density=[0.3, 0.5, 0.7],
                         normalize=normalize, rescale=rescale, backend=backend)
    _assert_fp32(ours, theirs, base, f"{method} normalize={normalize} rescale={rescale}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "della"])
def test_fp32_int8_mask_is_equivalent(method, backend):
    """mergekit's int8_mask only changes its mask dtype, never the result."""
    base, models = make_models((37, 53), 3, seed=13)
    ours, theirs = _both(method, base, models, weights=[1.0, 0.5, -0.3],
                         density=[0.4, 0.6, 1.0] if method in ("ties", "breadcrumbs_ties") else [1.0] * 3,
                         int8_mask=True, backend=backend)
    _assert_fp32(ours, theirs, base, method)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_fp32_consensus_with_cancelling_weights(method, backend):
    """Weights summing to zero at agreeing positions: mergekit's divisor 0 -> 1."""
    base, models = make_models((37, 53), 2, seed=14)
    models = [models[0], models[0].clone()]
    ours, theirs = _both(method, base, models, weights=[1.0, -1.0], density=[0.5, 0.5],
                         normalize=True, backend=backend)
    _assert_fp32(ours, theirs, base, method)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_kept_count_matches(backend):
    """K=1 TIES with weight 1: exactly max(1, int(d*n)) positions change, as in mergekit."""
    base, models = make_models((37, 53), 1, seed=15)
    n = base.numel()
    for d in (1e-4, 0.01, 0.2, 0.77):
        ours, theirs = _both("ties", base, models, weights=[1.0], density=[d], backend=backend)
        k = max(1, int(d * n))
        assert int((ours != base).sum()) == k == int((theirs != base).sum())
        assert torch.equal(ours, theirs)


# ---- fp32: random methods at density 1 (deterministic) ------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", RANDOM)
def test_fp32_random_methods_density_one(method, shape, backend):
    for K in [1, 3, 8]:
        base, models = make_models(shape, K, seed=16 + K)
        w = _random_weights(K, K)
        ours, theirs = _both(method, base, models, weights=w, density=[1.0] * K, backend=backend)
        _assert_fp32(ours, theirs, base, f"{method} {shape} K={K}")


# ---- linear (no base) ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [None, True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_linear(shape, normalize, backend):
    for K in KS:
        _, models = make_models(shape, K, seed=20 + K)
        w = _random_weights(K, 30 + K)
        params = dict(weight=w)
        if normalize is not None:
            params["normalize"] = normalize
        theirs = mergekit_merge("linear", None, models, **params)
        ours = fastmerge.merge("linear", None, models, weights=w, normalize=normalize, backend=backend)
        torch.testing.assert_close(ours, theirs, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_linear_base_is_ignored(backend):
    base, models = make_models((37, 53), 3, seed=24)
    w = [0.2, 0.5, 0.3]
    theirs = mergekit_merge("linear", None, models, weight=w)
    for b in (None, base, torch.zeros_like(base)):
        ours = fastmerge.linear(b, models, weights=w, backend=backend)
        torch.testing.assert_close(ours, theirs, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_linear_tiny_weight_sum(backend):
    """mergekit's linear normalizes by ``sum(w)`` however small (unlike generalized task
    arithmetic, it has no ``|sum w| < 1e-8 -> 1`` guard): with weights [1e-9, 0] the result is
    models[0]."""
    _, models = make_models((37, 53), 2, seed=25)
    w = [1e-9, 0.0]
    theirs = mergekit_merge("linear", None, models, weight=w)
    ours = fastmerge.merge("linear", None, models, weights=w, backend=backend)
    torch.testing.assert_close(theirs, models[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


# ---- out_dtype -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_out_dtype_is_one_final_cast(out_dtype, backend):
    """fp32 inputs, low-precision output: the fp32 mergekit result cast once."""
    base, models = make_models((37, 53), 3, seed=26)
    w, d = [1.0, 0.5, -0.3], [0.3, 0.5, 0.7]
    theirs = mergekit_merge("ties", base, models, weight=w, density=d).to(out_dtype)
    ours = fastmerge.ties(base, models, weights=w, density=d, out_dtype=out_dtype, backend=backend)
    assert ours.dtype == out_dtype
    assert torch.equal(ours, theirs)


# ---- random methods with mergekit's torch.bernoulli replaced by our Philox mask ----------

def _streams(method, densities):
    """Models for which mergekit calls torch.bernoulli, in call order."""
    if method.startswith("dare"):
        return [k for k, d in enumerate(densities) if d < 1]
    return [k for k, d in enumerate(densities) if 0 < d < 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rescale", [None, False])
@pytest.mark.parametrize("method,shape", [
    (m, s) for m in RANDOM for s in [(37, 53), (101,), (3, 5, 7), (2, 1, 3)]
    # mergekit's DELLA divides by zero on rows of length 1 (by-design difference 4)
    if not (m.startswith("della") and s == (2, 1, 3))
], ids=str)
def test_fp32_random_methods_same_mask(method, shape, rescale, backend, monkeypatch):
    """DARE and DELLA with density < 1, exact against mergekit once mergekit's Bernoulli draws
    come from fastmerge's Philox stream (model k -> stream k). For DARE the mask is
    ``u < fp32(density)``; for DELLA mergekit's own per-element probability tensor (ranks along
    dim 1) is used, so our DELLA probabilities must equal mergekit's for the outputs to agree."""
    for K in [1, 2, 3, 5, 8]:
        seed = 1234567 + 31 * K
        base, models = make_models(shape, K, seed=40 + K)
        w = _random_weights(K, 50 + K)
        d = [0.2 + 0.6 * k / max(1, K - 1) for k in range(K)]
        if K >= 3:
            d[1] = 1.0  # a model that is not sparsified (no bernoulli call in mergekit)
        eps = [0.1 if x < 0.85 else 0.05 for x in d] if method.startswith("della") else None
        ours = fastmerge.merge(method, base, models, weights=w, density=d, epsilon=eps if eps else 0.15,
                               rescale=rescale, seed=seed, backend=backend)
        streams = _streams(method, d)
        params = _params(method, K, w, d, epsilon=eps, **({} if rescale is None else {"rescale": rescale}))
        if method.startswith("dare"):
            theirs = _mergekit_dare_with_philox(method, base, models, params, seed, streams, d, monkeypatch)
        else:
            # mergekit hands its own fp32 probability tensor (1-D deltas become one row)
            with bernoulli_from_philox(monkeypatch, seed, streams, shape if len(shape) > 1 else (1, shape[0])):
                theirs = mergekit_merge(method, base, models, **params)
        _assert_fp32(ours, theirs, base, f"{method} {shape} K={K}")


def _mergekit_dare_with_philox(method, base, models, params, seed, streams, densities, monkeypatch):
    handed = []
    order = list(streams)
    real = torch.bernoulli

    def fake(input, *a, **kw):
        k = order.pop(0)
        # mergekit: torch.bernoulli(torch.full_like(delta, density)) in fp32
        assert input.dtype == torch.float32
        assert torch.all(input == torch.tensor(densities[k], dtype=torch.float32))
        m = philox_mask(tuple(input.shape), seed, k, densities[k])
        handed.append(m)
        return m.to(input.dtype)

    with monkeypatch.context() as mp:
        mp.setattr(torch, "bernoulli", fake)
        theirs = mergekit_merge(method, base, models, **params)
    assert torch.bernoulli is real and not order
    return theirs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.0, 1e-3, 0.5, 0.999])
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_fp32_dare_density_edges_same_mask(method, density, backend, monkeypatch):
    base, models = make_models((37, 53), 3, seed=60)
    w, d, seed = [1.0, -0.5, 0.8], [density] * 3, 99
    ours = fastmerge.merge(method, base, models, weights=w, density=d, seed=seed, backend=backend)
    theirs = _mergekit_dare_with_philox(method, base, models, dict(weight=w, density=d), seed,
                                        [0, 1, 2], d, monkeypatch)
    _assert_fp32(ours, theirs, base, f"{method} d={density}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density,epsilon", [(0.5, 0.49), (0.02, 0.01), (0.98, 0.01), (0.5, 0.0),
                                             (0.3, 0.2), (0.0, 0.15)])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_fp32_della_epsilon_edges_same_mask(method, density, epsilon, backend, monkeypatch):
    base, models = make_models((37, 53), 2, seed=61)
    w, seed = [1.0, 0.7], 4242
    ours = fastmerge.merge(method, base, models, weights=w, density=density, epsilon=epsilon,
                           seed=seed, backend=backend)
    streams = [0, 1] if 0 < density < 1 else []
    with bernoulli_from_philox(monkeypatch, seed, streams, (37, 53)):
        theirs = mergekit_merge(method, base, models, weight=w, density=[density] * 2,
                                epsilon=[epsilon] * 2)
    _assert_fp32(ours, theirs, base, f"{method} d={density} eps={epsilon}")


# ---- random methods: statistics of our own masks -----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_kept_fraction_matches_density(method, density, backend):
    """Without any patching: the fraction of kept elements is ~density (DELLA's probabilities
    average to density too), within 5 standard deviations."""
    n = 5000
    base = torch.zeros(n)
    g = torch.Generator().manual_seed(3)
    model = torch.randn(n, generator=g) * 0.05
    eps = min(density, 1 - density) / 2
    out = fastmerge.merge(method, base, [model], weights=[1.0], density=density, epsilon=eps,
                          rescale=False, seed=7, backend=backend)
    kept = (out != 0).float().mean().item()
    std = math.sqrt(density * (1 - density) / n)
    assert abs(kept - density) < 5 * std, (kept, density)
    # kept entries are untouched (rescale off), dropped ones are exactly zero
    nz = out != 0
    assert torch.equal(out[nz], model[nz])


@pytest.mark.parametrize("backend", BACKENDS)
def test_della_prefers_large_magnitudes(backend):
    """DELLA keeps large-|delta| entries more often than small ones (prob. c1 .. c1+2eps)."""
    n = 4096
    g = torch.Generator().manual_seed(5)
    model = torch.randn(n, generator=g) * 0.05
    out = fastmerge.merge("della_linear", torch.zeros(n), [model], density=0.5, epsilon=0.4,
                          rescale=False, seed=11, backend=backend)
    order = model.abs().argsort()
    low, high = (out[order[: n // 4]] != 0).float().mean(), (out[order[-n // 4:]] != 0).float().mean()
    assert low < 0.3 and high > 0.7, (low, high)


# ---- low precision --------------------------------------------------------------------------

def _tie_free(shape, K, dtype, seed):
    """base = 0 and deltas with pairwise distinct magnitudes that are exact in bf16 and fp16,
    so mergekit's rounded deltas equal ours and every top-k cut is unique."""
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    # mantissas 1 + j/128 (exact in bf16) over exponents 2^-12 .. 2^-2: 1280 distinct values
    mags = torch.tensor([(1 + j / 128) * 2.0 ** -e for e in range(2, 12) for j in range(128)])
    assert n <= mags.numel()
    models = []
    for _ in range(K):
        pick = mags[torch.randperm(mags.numel(), generator=g)[:n]]
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        models.append((pick * sign).reshape(shape).to(dtype))
    return torch.zeros(shape, dtype=dtype), models


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("method", DETERMINISTIC + ["dare_ties", "della"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_low_precision_tie_free(dtype, atol, rtol, method, K, backend):
    """With deltas exactly representable and distinct in magnitude, mergekit's bf16/fp16
    computation keeps the same elements as ours, so every position agrees within about an
    ulp of the output dtype (by-design difference 2 only: fp32 accumulation, one rounding)."""
    shape = (23, 41)
    base, models = _tie_free(shape, K, dtype, seed=K)
    w = EXACT_WEIGHTS[:K]
    dens = [1.0] * K if method in ("dare_ties", "della") else [0.15 + 0.1 * k for k in range(K)]
    ours, theirs = _both(method, base, models, weights=w, density=dens,
                         gamma=[0.02] * K if method.startswith("breadcrumbs") else None,
                         backend=backend)
    assert ours.dtype == dtype
    # deltas here are <= 2^-2, so the absolute tolerance is scaled down accordingly
    assert_close_frac(ours, theirs, atol=atol / 8, rtol=rtol, max_frac=0.0, msg=f"{method} K={K}")


def _cut_band(deltas32, cuts, rel):
    """Positions whose |delta| is within ``rel`` of the magnitude at one of the priority cuts:
    where rounding deltas to a low-precision dtype may legitimately change the kept set."""
    a = deltas32.abs().reshape(-1)
    s = a.sort(descending=True).values
    band = torch.zeros_like(a, dtype=torch.bool)
    for c in cuts:
        if 0 < c < a.numel():
            lo, hi = s[c].item() * (1 - rel), s[c - 1].item() * (1 + rel)
            band |= (a >= lo) & (a <= hi)
    return band.reshape(deltas32.shape)


def _cuts(method, d, n, gamma):
    if d >= 1:
        return []
    if method in ("ties",):
        return [max(1, int(d * n))] if d > 0 else []
    target, n_top = int(d * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return [n - n_bot - target, n - n_bot]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(37, 53), (101,), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("method", DETERMINISTIC)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_low_precision_random_data(dtype, atol, rtol, method, shape, backend):
    """Realistic bf16/fp16 data (base ~ N(0,1), deltas ~0.01..0.1). Rounded deltas have many
    equal magnitudes, so at each top-k cut mergekit's kept set differs from ours by tie-breaking
    (by-design differences 2 and 3). Positions away from every cut must agree within about an
    ulp; the others may differ, and must be few: about 1% of the elements per top-k cut (the size
    of a bf16 tie group at the cut; TIES has one cut per model, breadcrumbs two)."""
    for K in [1, 3, 8]:
        base, models = make_models(shape, K, dtype, seed=70 + K)
        w = EXACT_WEIGHTS[:K]
        dens = [0.2 + 0.7 * k / max(1, K - 1) for k in range(K)] if method != "task_arithmetic" else [1.0] * K
        gamma = 0.02
        ours, theirs = _both(method, base, models, weights=w, density=dens,
                             gamma=[gamma] * K if method.startswith("breadcrumbs") else None,
                             backend=backend)
        assert ours.dtype == dtype and theirs.dtype == dtype
        n = base.numel()
        rel = 4 * torch.finfo(dtype).eps
        band = torch.zeros(shape, dtype=torch.bool)
        n_cuts = 0
        if method != "task_arithmetic":
            for m, dk in zip(models, dens):
                cuts = _cuts("ties" if method == "ties" else "bc", dk, n, gamma)
                n_cuts += len(cuts)
                band |= _cut_band(m.float() - base.float(), cuts, rel)
        away = ~band
        assert_close_frac(ours[away], theirs[away], atol=atol, rtol=rtol, max_frac=0.0,
                          msg=f"{method} {shape} K={K} (away from cuts)")
        assert_close_frac(ours, theirs, atol=atol, rtol=rtol,
                          max_frac=0.015 * n_cuts + 1.0 / n, msg=f"{method} {shape} K={K}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_low_precision_linear(dtype, atol, rtol, K, backend):
    """mergekit's linear upcasts to fp32 itself: agreement within rounding."""
    _, models = make_models((37, 53), K, dtype, seed=80)
    w = EXACT_WEIGHTS[:K] if sum(EXACT_WEIGHTS[:K]) else [1.0] * K
    theirs = mergekit_merge("linear", None, models, weight=w)
    ours = fastmerge.merge("linear", None, models, weights=w, backend=backend)
    assert ours.dtype == dtype
    assert_close_frac(ours, theirs, atol=atol, rtol=rtol, max_frac=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_low_precision_dare_same_mask(dtype, atol, rtol, method, backend, monkeypatch):
    """bf16/fp16 DARE with mergekit's Bernoulli replaced by our mask. mergekit hands
    ``full_like(delta, density)`` in bf16 (density rounded to bf16) or fp32 (fp16 inputs on CPU);
    our keep probability is fp32(density) by design, and the mask we hand back uses it."""
    base, models = _tie_free((23, 41), 3, dtype, seed=90)
    w, d, seed = [1.0, 0.5, -0.25], [0.5, 0.75, 0.25], 5
    ours = fastmerge.merge(method, base, models, weights=w, density=d, seed=seed, backend=backend)
    order = [0, 1, 2]

    def fake(input, *a, **kw):
        k = order.pop(0)
        return philox_mask(tuple(input.shape), seed, k, d[k]).to(input.dtype)

    with monkeypatch.context() as mp:
        mp.setattr(torch, "bernoulli", fake)
        theirs = mergekit_merge(method, base, models, weight=w, density=d)
    assert not order
    assert_close_frac(ours, theirs, atol=atol / 8, rtol=rtol, max_frac=0.0)
