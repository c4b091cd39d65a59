"""fastmerge.opcm against FusionBench 0.2.33's OPCM (``OPCMForCLIP.run``), its documented
deviations, and its error paths.

The reference is a TRANSCRIPTION of FusionBench's run loop, ``merge_linear_weights``,
``merge_other_parameters`` and ``get_task_vector_norm`` (MIT, Copyright (c) 2024 Anke Tang) in
``bench/upstream_fusionbench.py``, driven over lists of state dicts: ``import fusion_bench``
needs omegaconf, lightning and hydra, which are not installed.

Tolerances. In fp64 the two agree to ~1e-12 over 8 steps: that is the semantic check. In fp32 the
result is sensitive to rounding by nature: removing the diagonal pairs ``u_i v_iᵀ`` depends on
individual singular vectors, which move by ``eps / gap`` for close singular values, and each
step's SVD is of the previous step's result, so differences compound. FusionBench's own fp32 run
is up to 2e-4 (relative to the merged task vector's largest entry) from its fp64 run on these
cases at K = 8; we accept 3e-5 for K <= 3 and 2e-3 beyond, and 3e-6 for one step from identical
state.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from fastmerge import NonFiniteError, opcm
from fastmerge.bench import upstream_fusionbench as U

SHAPES = {"a.weight": (37, 53), "a.bias": (37,), "b.weight": (53, 37), "c.weight": (1, 20),
          "d.weight": (20, 1), "e.weight": (24, 24), "ln.weight": (16,)}


def _models(k, seed, dtype=torch.float32, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    base = {key: torch.randn(s, generator=g, dtype=torch.float64) for key, s in shapes.items()}
    models = [{key: v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64) for key, v in base.items()}
              for _ in range(k)]
    return {key: v.to(dtype) for key, v in base.items()}, [{key: v.to(dtype) for key, v in m.items()} for m in models]


def _fb_alpha(alpha):
    """FusionBench's alpha giving our split rank: at alpha = 1 our r is always 0 (see
    test_alpha_one_is_diagonal_only), which FusionBench gives for every alpha > 1."""
    return 2.0 if alpha == 1.0 else alpha


def _rel_err(out, ref, base):
    return max(float((out[k].double() - ref[k].double()).abs().max() /
                     (ref[k].double() - base[k].double()).abs().max()) for k in ref)


def _ours(base, models, alpha, **kw):
    m = opcm.Merger(base, alpha=alpha, **kw)
    for sd in models:
        assert m.add(sd) is m
    return m


@pytest.mark.parametrize("k,alpha", list(itertools.product([1, 2, 3, 5, 8], [0.0, 0.25, 0.5, 0.9, 1.0])))
def test_matches_fusionbench_fp64(k, alpha):
    base, models = _models(k, seed=100 * k + int(100 * alpha), dtype=torch.float64)
    ref, lam = U.opcm_state_dicts(base, models, _fb_alpha(alpha))
    m = _ours(base, models, alpha)
    out = m.merged
    assert m.count == k and list(out) == list(base)
    assert all(out[key].dtype == torch.float64 for key in out)
    assert _rel_err(out, ref, base) < 1e-9
    assert m.lambda_t == pytest.approx(lam[-1], rel=1e-12)
    norms = [float(U.get_task_vector_norm(sd, base)) for sd in models]
    assert m.norms == pytest.approx(norms, rel=1e-12)


@pytest.mark.parametrize("k,alpha", list(itertools.product([2, 3, 5, 8], [0.0, 0.5, 0.9, 1.0])))
def test_matches_fusionbench_fp32(k, alpha):
    base, models = _models(k, seed=100 * k + int(100 * alpha))
    ref, lam = U.opcm_state_dicts(base, models, _fb_alpha(alpha))
    m = _ours(base, models, alpha)
    assert all(t.dtype == torch.float32 for t in m.merged.values())
    assert _rel_err(m.merged, ref, base) < (3e-5 if k <= 3 else 2e-3)
    assert m.lambda_t == pytest.approx(lam[-1], rel=1e-5)


def test_every_step_matches_fusionbench():
    base, models = _models(6, seed=7, dtype=torch.float64)
    m = opcm.Merger(base, alpha=0.5)
    for t, sd in enumerate(models, 1):
        m.add(sd)
        ref, lam = U.opcm_state_dicts(base, models[:t], 0.5)
        assert _rel_err(m.merged, ref, base) < 1e-10
        assert m.lambda_t == pytest.approx(lam[-1], rel=1e-12)


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (1, 9), (9, 1), (16, 16)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.6, 0.95])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 3e-6)])
def test_economy_projection_equals_fusionbench_full_svd(shape, alpha, dtype, tol):
    """The economy-SVD form (module docstring) against FusionBench's ``merge_linear_weights`` with
    its full SVD, one step from the same state (``λ = 1``, zero base: the result is
    ``prev + τ'``)."""
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    prev = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    tau = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    fb = U.OPCMStateDicts(alpha)
    fb.previous_lambda_t, fb.lambda_t = 1, 1
    ref = fb.merge_linear_weights(prev, torch.zeros_like(prev), tau, "w", alpha) - prev
    ours = opcm.project(prev, tau.clone(), alpha)
    assert float((ours - ref).abs().max() / tau.abs().max()) < tol


def test_single_tensor_base():
    base, models = _models(4, seed=8, shapes={"weight": (23, 31)}, dtype=torch.float64)
    ref, lam = U.opcm_state_dicts(base, models, 0.5)
    m = _ours(base["weight"], [sd["weight"] for sd in models], 0.5)
    assert isinstance(m.merged, torch.Tensor)
    torch.testing.assert_close(m.merged, ref["weight"], rtol=0, atol=1e-10)
    # a lone 1-D tensor is not linear: plain addition and rescale (FusionBench's "other" parameters)
    base, models = _models(4, seed=9, shapes={"bias": (29,)}, dtype=torch.float64)
    ref, _ = U.opcm_state_dicts(base, models, 0.5)
    out = opcm.merge(base["bias"], [sd["bias"] for sd in models], alpha=0.5)
    torch.testing.assert_close(out, ref["bias"], rtol=0, atol=1e-12)


def test_linear_predicate_excludes_embeddings():
    shapes = dict(SHAPES, **{"embed.weight": (40, 12)})
    base, models = _models(4, seed=10, shapes=shapes, dtype=torch.float64)

    def linear(name, t):
        return opcm.default_linear(name, t) and "embed" not in name

    ref, _ = U.opcm_state_dicts(base, models, 0.5, is_linear=linear)
    assert _rel_err(opcm.merge(base, models, alpha=0.5, linear=linear), ref, base) < 1e-10
    # by default the embedding is projected like a Linear weight: a different result
    default = opcm.merge(base, models, alpha=0.5)
    assert not torch.allclose(default["embed.weight"], ref["embed.weight"], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_fusionbench_after_rounding(dtype):
    """Half models compute in fp32; FusionBench's fp32 run on the same values upcast, rounded to
    ``dtype``, is within one ``dtype`` ulp plus the fp32 tolerance."""
    base, models = _models(3, seed=11, dtype=dtype)
    out = opcm.merge(base, models, alpha=0.5)
    up = lambda sd: {k: v.float() for k, v in sd.items()}  # noqa: E731
    ref, _ = U.opcm_state_dicts(up(base), [up(sd) for sd in models], 0.5)
    for key in ref:
        assert out[key].dtype == dtype
        r = ref[key].to(dtype).float()
        tv = float((ref[key] - base[key].float()).abs().max())
        torch.testing.assert_close(out[key].float(), r, rtol=torch.finfo(dtype).eps, atol=3e-5 * tv)


def test_non_contiguous_inputs():
    base, models = _models(3, seed=12)
    ref, _ = U.opcm_state_dicts(base, models, 0.5)

    def strided(sd):
        out = {}
        for k, v in sd.items():
            nc = torch.stack([v, v], -1)[..., 0]  # last-dim stride 2, same values
            if v.dim() == 2:
                nc = torch.empty(v.shape[::-1]).T.copy_(v)  # transposed strides
            assert not nc.is_contiguous() or v.numel() <= 1 or min(v.shape) == 1
            out[k] = nc
        return out

    out = opcm.merge(strided(base), [strided(sd) for sd in models], alpha=0.5)
    assert _rel_err(out, ref, base) < 3e-5


def test_first_add_is_the_model_and_before_is_the_base():
    base, models = _models(2, seed=13)
    m = opcm.Merger(base)
    assert m.count == 0 and all(torch.equal(m.merged[k], base[k]) for k in base)
    m.add(models[0])
    assert m.count == 1 and m.lambda_t == 1.0
    assert all(torch.equal(m.merged[k], models[0][k]) for k in base)
    assert m.merged["a.weight"] is not models[0]["a.weight"]  # new tensors


def test_inputs_are_not_modified():
    base, models = _models(3, seed=14)
    copies = [{k: v.clone() for k, v in sd.items()} for sd in [base] + models]
    opcm.merge(base, models, alpha=0.5)
    for sd, c in zip([base] + models, copies):
        assert all(torch.equal(sd[k], c[k]) for k in sd)


def test_alpha_one_is_diagonal_only():
    """FusionBench's ``cumsum(S) / S.sum() > 1`` is True at the last index in ~13% of fp32
    matrices (the cumsum rounds above the sum), giving r = k - 1 at alpha = 1; ours divides by
    ``cumsum(S)[-1]``, so alpha = 1 always gives r = 0 (only the diagonal pairs removed)."""
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        prev = torch.randn(24, 24, generator=g)
        s = U.svd(prev)[1]  # the SVD FusionBench calls
        if (s.cumsum(0) / s.sum())[-1] > 1:
            break
    else:
        pytest.skip("no fp32 matrix with the rounding quirk found")
    tau = torch.randn(24, 24, generator=g)
    fb = U.OPCMStateDicts(1.0)
    fb.previous_lambda_t, fb.lambda_t = 1, 1
    zero = torch.zeros_like(prev)
    quirk = fb.merge_linear_weights(prev, zero, tau, "w", 1.0) - prev
    r0 = fb.merge_linear_weights(prev, zero, tau, "w", 2.0) - prev
    ours = opcm.project(prev, tau.clone(), 1.0)
    assert float((ours - r0).abs().max()) < 1e-5
    assert float((quirk - r0).abs().max()) > 0.1  # FusionBench's alpha = 1 really is different here


def test_alpha_zero_and_one_give_split_rank_zero():
    g = torch.Generator().manual_seed(15)
    prev, tau = torch.randn(20, 30, generator=g, dtype=torch.float64), torch.randn(20, 30, generator=g, dtype=torch.float64)
    a0, a1 = opcm.project(prev, tau.clone(), 0.0), opcm.project(prev, tau.clone(), 1.0)
    torch.testing.assert_close(a0, a1, rtol=0, atol=1e-12)
    u, _, vh = torch.linalg.svd(prev, full_matrices=False)
    diag = torch.einsum("mk,mn,kn->k", u, tau, vh)  # u_iᵀ τ v_i
    torch.testing.assert_close(a0, tau - (u * diag) @ vh, rtol=0, atol=1e-12)


def test_zero_previous_task_vector_means_no_projection():
    """The first model equals the base in 'a.weight': no subspace to protect, so step 2 adds τ_2
    unprojected there (FusionBench would remove τ_2's diagonal in the zero matrix's SVD basis)."""
    base, models = _models(2, seed=16)
    models[0]["a.weight"] = base["a.weight"].clone()
    m = _ours(base, models, 0.5)
    tau = models[1]["a.weight"] - base["a.weight"]
    got = m.merged["a.weight"] - base["a.weight"]
    assert all(torch.isfinite(v).all() for v in m.merged.values())
    torch.testing.assert_close(got, tau / m.lambda_t, rtol=1e-5, atol=1e-6)


def test_zero_norms_do_not_give_nan():
    base, _ = _models(1, seed=17)
    same = [{k: v.clone() for k, v in base.items()} for _ in range(3)]
    m = _ours(base, same, 0.5)
    assert m.lambda_t == 1.0 and m.norms == (0.0, 0.0, 0.0)
    assert all(torch.equal(m.merged[k], base[k]) for k in base)
    _, models = _models(2, seed=17)
    m = _ours(base, [same[0], models[1]], 0.5)  # first task vector zero, the second not
    assert all(torch.isfinite(v).all() for v in m.merged.values())


def test_installed_fusion_bench_if_importable():
    """FusionBench itself, where it imports (here it does not: ``import fusion_bench`` needs
    omegaconf, lightning, hydra ...): its ``merge_linear_weights`` on one step."""
    fbmod = pytest.importorskip("fusion_bench.method.opcm.opcm", exc_type=ImportError)
    g = torch.Generator().manual_seed(18)
    prev, tau = torch.randn(20, 30, generator=g), torch.randn(20, 30, generator=g)
    algo = fbmod.OPCMForCLIP.__new__(fbmod.OPCMForCLIP)
    algo.previous_lambda_t, algo.lambda_t = 1, 1
    ref = algo.merge_linear_weights(prev, torch.zeros_like(prev), tau, "w", 0.5) - prev
    torch.testing.assert_close(opcm.project(prev, tau.clone(), 0.5), ref, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- errors


def _sd():
    return {"a.weight": torch.randn(4, 5), "a.bias": torch.randn(4)}


def _with(**kw):
    sd = _sd()
    sd.update({k.replace("__", "."): v for k, v in kw.items()})
    return sd


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


INIT_ERRORS = [
    ("base type", lambda: opcm.Merger([1.0]), TypeError, r"base must be a torch.Tensor or a state dict"),
    ("empty base", lambda: opcm.Merger({}), ValueError, r"base is an empty state dict"),
    ("base value", lambda: opcm.Merger({"a": 1.0}), TypeError, r"base\['a'\] must be a torch.Tensor"),
    ("base dtype", lambda: opcm.Merger({"a": torch.ones(3, dtype=torch.int64)}), TypeError,
     r"base\['a'\] has dtype torch.int64"),
    ("base nan", lambda: opcm.Merger(_with(a__bias=_nan(torch.ones(4)))), NonFiniteError,
     r"base\['a.bias'\] contains non-finite"),
    ("tensor base nan", lambda: opcm.Merger(_nan(torch.ones(3, 3))), NonFiniteError, r"^base contains"),
    ("alpha low", lambda: opcm.Merger(_sd(), alpha=-0.1), ValueError, r"alpha must be in \[0, 1\]"),
    ("alpha high", lambda: opcm.Merger(_sd(), alpha=1.5), ValueError, r"alpha must be in \[0, 1\]"),
    ("alpha nan", lambda: opcm.Merger(_sd(), alpha=float("nan")), ValueError, r"alpha must be finite"),
    ("alpha str", lambda: opcm.Merger(_sd(), alpha="0.5"), TypeError, r"alpha must be a number"),
    ("linear type", lambda: opcm.Merger(_sd(), linear=True), TypeError, r"linear must be a callable"),
    ("linear 1-D", lambda: opcm.Merger(_sd(), linear=lambda n, t: True), ValueError,
     r"linear selected base\['a.bias'\] of shape \(4,\)"),
    ("merge empty", lambda: opcm.merge(_sd(), []), ValueError, r"models is empty"),
    ("merge single", lambda: opcm.merge(_sd(), _sd()), TypeError, r"models must be a list"),
]


@pytest.mark.parametrize("fn,exc,match", [e[1:] for e in INIT_ERRORS], ids=[e[0] for e in INIT_ERRORS])
def test_init_errors(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


ADD_ERRORS = [
    ("tensor for dict", lambda: torch.randn(4, 5), TypeError, r"model must be a state dict"),
    ("keys", lambda: {"a.weight": torch.randn(4, 5)}, ValueError, r"model has other keys than base: missing \['a.bias'\]"),
    ("value", lambda: _with(a__bias=[1.0]), TypeError, r"model\['a.bias'\] must be a torch.Tensor"),
    ("shape", lambda: _with(a__weight=torch.randn(5, 4)), ValueError, r"model\['a.weight'\] has shape \(5, 4\)"),
    ("dtype", lambda: _with(a__weight=torch.randn(4, 5, dtype=torch.float64)), TypeError,
     r"model\['a.weight'\] has dtype torch.float64"),
    ("device", lambda: _with(a__weight=torch.empty(4, 5, device="meta")), ValueError, r"model\['a.weight'\] is on meta"),
    ("nan", lambda: _with(a__weight=_nan(torch.randn(4, 5))), NonFiniteError, r"model\['a.weight'\] contains non-finite"),
]


@pytest.mark.parametrize("make,exc,match", [e[1:] for e in ADD_ERRORS], ids=[e[0] for e in ADD_ERRORS])
def test_add_errors_leave_the_merge_unchanged(make, exc, match):
    m = opcm.Merger(_sd())
    first = _sd()
    m.add(first)
    with pytest.raises(exc, match=match):
        m.add(make())
    assert m.count == 1 and all(torch.equal(m.merged[k], first[k]) for k in first)


def test_tensor_base_add_errors():
    m = opcm.Merger(torch.randn(4, 5))
    with pytest.raises(TypeError, match=r"model must be a torch.Tensor like base"):
        m.add(_sd())
    with pytest.raises(ValueError, match=r"^model has shape \(4,\)"):
        m.add(torch.randn(4))
