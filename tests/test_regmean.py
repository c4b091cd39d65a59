"""fastmerge.regmean against FusionBench 0.2.33's RegMean (``merging_with_regmean_weights``), the
paper's least-squares definition, and its error paths.

The reference is a TRANSCRIPTION of FusionBench's functions (MIT, Copyright (c) 2024 Anke Tang)
in ``bench/upstream_fusionbench.py``: ``import fusion_bench`` needs omegaconf, lightning and
hydra, which are not installed (the guarded test below runs it where they are).

Tolerance, fp32: both implementations are backward-stable solves of the same fp32 system
(LU vs FusionBench's explicit inverse), so they differ by ~cond(sum G') * eps32 relative to the
result; we accept ``8 * cond * eps32 * max|W|`` (the largest ratio seen over this file's cases is
1.6) and check that ours is no farther than FusionBench's from the fp64 solution (within 2x plus
rounding).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from fastmerge import NonFiniteError
from fastmerge.bench import upstream_fusionbench as U
from fastmerge.regmean import SingularGramError, regmean, regmean_state_dicts

EPS32 = torch.finfo(torch.float32).eps


def _data(out, n, k, seed, rows=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rows = rows or 2 * n + 8
    weights = [torch.randn(out, n, generator=g) for _ in range(k)]
    xs = [torch.randn(rows, n, generator=g) * (0.5 + torch.rand(n, generator=g)) for _ in range(k)]
    grams = [x.T @ x / rows for x in xs]
    return [w.to(dtype) for w in weights], [gm.to(dtype) for gm in grams], xs


def _fb(weights, grams, alpha, transpose=True):
    merged = U.merging_with_regmean_weights({"layer.weight": list(weights)},
                                            [{"layer": gm} for gm in grams], alpha, transpose)
    return merged["layer.weight"]


def _cond(grams, alpha):
    return float(torch.linalg.cond(sum(U.reduce_non_diagonal_elements(gm.double(), alpha) for gm in grams)))


def _check_close(ours, weights, grams, alpha, transpose=True):
    ref = _fb(weights, grams, alpha, transpose)
    truth = _fb([w.double() for w in weights], [gm.double() for gm in grams], alpha, transpose)
    scale = float(truth.abs().max())
    assert ours.shape == ref.shape and ours.dtype == weights[0].dtype and ours.is_contiguous()
    tol = 8 * _cond(grams, alpha) * EPS32 * scale
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)
    err_ours = float((ours.double() - truth).abs().max())
    err_fb = float((ref.double() - truth).abs().max())
    assert err_ours <= 2 * err_fb + 4 * EPS32 * scale


SHAPES = [(37, 53), (53, 37), (1, 17), (17, 1), (64, 64)]


@pytest.mark.parametrize("shape,k,alpha", list(itertools.product(SHAPES, [1, 2, 3, 8], [0.0, 0.5, 0.9, 1.0])))
def test_matches_fusionbench_fp32(shape, k, alpha):
    weights, grams, _ = _data(*shape, k, seed=shape[0] * 1000 + shape[1] * 10 + k)
    _check_close(regmean(weights, grams, alpha=alpha), weights, grams, alpha)


@pytest.mark.parametrize("alpha", [-0.5, 1.3])
def test_alpha_outside_unit_interval_is_accepted_as_in_fusionbench(alpha):
    weights, grams, _ = _data(37, 53, 3, seed=5, rows=400)
    _check_close(regmean(weights, grams, alpha=alpha), weights, grams, alpha)


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (1, 9)])
def test_weight_transpose_false(shape):
    weights, grams, _ = _data(*shape, 3, seed=7)
    flipped = [w.T.contiguous() for w in weights]  # [in, out], GPT-2 Conv1D layout
    ours = regmean(flipped, grams, alpha=0.7, weight_transpose=False)
    _check_close(ours, flipped, grams, 0.7, transpose=False)
    torch.testing.assert_close(ours.T, regmean(weights, grams, alpha=0.7), rtol=0, atol=1e-5)


def test_alpha_one_is_the_least_squares_merge():
    """The paper's definition: W minimizes sum_k ||X_k W^T - X_k W_k^T||^2 (independent of FusionBench)."""
    weights, grams, xs = _data(29, 41, 4, seed=11)
    x = torch.cat(xs).double()
    y = torch.cat([xk.double() @ w.double().T for xk, w in zip(xs, weights)])
    lstsq = torch.linalg.lstsq(x, y).solution.T
    # grams are X^T X / rows with the same rows for every model: the common factor cancels
    torch.testing.assert_close(regmean(weights, grams, alpha=1.0).double(), lstsq, rtol=0, atol=2e-5)


def test_alpha_zero_is_a_diagonal_weighted_average():
    weights, grams, _ = _data(13, 21, 5, seed=12)
    d = torch.stack([gm.diagonal().double() for gm in grams])  # [K, in]
    expect = sum(w.double() * dk for w, dk in zip(weights, d)) / d.sum(0)
    torch.testing.assert_close(regmean(weights, grams, alpha=0.0).double(), expect, rtol=0, atol=1e-6)


def test_one_model_returns_its_weight():
    weights, grams, _ = _data(31, 19, 1, seed=13)
    torch.testing.assert_close(regmean(weights, grams, alpha=0.5), weights[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_fusionbench_after_rounding(dtype):
    """Half inputs compute in fp32; FusionBench cannot take them (its ``reduce_non_diagonal_elements``
    promotes the Gram to fp32 and the matmul then mixes dtypes), so its reference runs on the same
    values upcast, and its fp32 result is rounded to ``dtype``: the two then differ by at most one
    ``dtype`` ulp plus the fp32 tolerance."""
    weights, grams, _ = _data(37, 53, 3, seed=14, dtype=dtype)
    ours = regmean(weights, grams, alpha=0.8)
    assert ours.dtype == dtype
    up_w, up_g = [w.float() for w in weights], [gm.float() for gm in grams]
    ref = _fb(up_w, up_g, 0.8).to(dtype)
    tol32 = 8 * _cond(up_g, 0.8) * EPS32 * float(ref.float().abs().max())
    torch.testing.assert_close(ours.float(), ref.float(), rtol=torch.finfo(dtype).eps, atol=tol32)


def test_non_contiguous_inputs():
    weights, grams, _ = _data(37, 53, 3, seed=15)
    nc_w = [torch.stack([w, w], -1)[..., 0] for w in weights]  # column stride 2, same values
    assert all(not w.is_contiguous() and torch.equal(w, ref) for w, ref in zip(nc_w, weights))
    nc_w[0] = torch.empty(53, 37).T.copy_(weights[0])  # transposed strides
    nc_g = [torch.empty_like(gm).T.copy_(gm) for gm in grams]
    assert not nc_g[0].is_contiguous()
    ours = regmean(nc_w, nc_g, alpha=0.6)
    _check_close(ours, weights, grams, 0.6)


def test_inputs_are_not_modified():
    weights, grams, _ = _data(17, 23, 3, seed=16)
    copies = [t.clone() for t in weights + grams]
    regmean(weights, grams, alpha=0.3)
    assert all(torch.equal(a, b) for a, b in zip(weights + grams, copies))


def test_fp64_compute_is_accurate_where_fp32_is_not():
    """An ill-conditioned (but nonsingular) sum: ``compute_dtype=torch.float64`` gives the fp64
    answer to within the output's rounding, fp32 (like FusionBench) loses ~cond * eps32."""
    g = torch.Generator().manual_seed(17)
    n = 96
    q = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    xs = [(torch.randn(2 * n, n, generator=g) * torch.logspace(0, -2.5, n)) @ q.T for _ in range(2)]
    grams = [x.T @ x for x in xs]
    weights = [torch.randn(40, n, generator=g) for _ in range(2)]
    truth = _fb([w.double() for w in weights], [gm.double() for gm in grams], 1.0)
    err = {cd: float((regmean(weights, grams, compute_dtype=cd).double() - truth).abs().max() / truth.abs().max())
           for cd in (torch.float32, torch.float64)}
    assert err[torch.float64] < 2 * EPS32
    assert err[torch.float32] > 20 * err[torch.float64]


def test_fp64_inputs_compute_in_fp64():
    weights, grams, _ = _data(19, 27, 3, seed=18, dtype=torch.float64)
    ours = regmean(weights, grams, alpha=0.5)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, _fb(weights, grams, 0.5), rtol=0, atol=1e-11)


# ----------------------------------------------------------------------------- state dicts


def _state_dicts(k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"l1.weight": (37, 53), "l1.bias": (37,), "l2.weight": (53, 37), "l2.bias": (53,),
              "ln.weight": (16,), "emb.weight": (10, 8), "head.weight": (1, 37)}
    sds = [{key: torch.randn(s, generator=g).to(dtype) for key, s in shapes.items()} for _ in range(k)]
    grams = []
    for _ in range(k):
        grams.append({})
        for module, n in (("l1", 53), ("l2", 37), ("head", 37)):
            x = torch.randn(3 * n, n, generator=g)
            grams[-1][module] = (x.T @ x / x.shape[0]).to(dtype)
    return sds, grams


@pytest.mark.parametrize("k,alpha", [(1, 0.9), (2, 0.0), (3, 0.9), (4, 1.0), (8, 0.5)])
def test_state_dicts_match_fusionbench(k, alpha):
    sds, grams = _state_dicts(k, seed=20 + k)
    ours = regmean_state_dicts(sds, grams, alpha=alpha)
    ref = U.merging_with_regmean_weights({key: [sd[key] for sd in sds] for key in sds[0]}, grams, alpha)
    assert list(ours) == list(sds[0])
    for key in ref:
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in grams[0]:  # RegMean-merged
            _check_close(ours[key], [sd[key] for sd in sds], [gm[module] for gm in grams], alpha)
        else:  # averaged: fp32 sum / K against torch.stack(...).mean(0)
            torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=4 * EPS32 * k)


def test_state_dicts_half_and_integer_tensors():
    sds, grams = _state_dicts(3, seed=30, dtype=torch.bfloat16)
    for sd in sds:
        sd["position_ids"] = torch.arange(7)
    ours = regmean_state_dicts(sds, grams, alpha=0.9)
    assert ours["l1.weight"].dtype == torch.bfloat16 and torch.equal(ours["position_ids"], torch.arange(7))
    mean = (sds[0]["ln.weight"].float() + sds[1]["ln.weight"].float() + sds[2]["ln.weight"].float()) / 3
    assert torch.equal(ours["ln.weight"], mean.to(torch.bfloat16))


def test_installed_fusion_bench_if_importable():
    """FusionBench itself, where it imports (here it does not: ``import fusion_bench`` needs
    omegaconf, lightning, hydra ...)."""
    fb = pytest.importorskip("fusion_bench.method.regmean.regmean", exc_type=ImportError)
    sds, grams = _state_dicts(3, seed=40)
    ref = fb.merging_with_regmean_weights({key: [sd[key] for sd in sds] for key in sds[0]}, grams, 0.9)
    ours = regmean_state_dicts(sds, grams, alpha=0.9)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- errors


def test_singular_sum_raises_and_alpha_below_one_fixes_it():
    weights, grams, _ = _data(37, 53, 3, seed=50, rows=10)  # rank 30 < 53
    with pytest.raises(SingularGramError, match=r"grams\[k\] \(alpha = 1\) is singular.*alpha < 1"):
        regmean(weights, grams, alpha=1.0)
    assert torch.isfinite(regmean(weights, grams, alpha=0.99)).all()
    assert torch.isfinite(regmean(weights, grams, alpha=1.0, rcond=0)).all()  # solve anyway
    with pytest.raises(SingularGramError, match=r"rcond"):
        regmean(weights, grams, alpha=1.0, compute_dtype=torch.float64)


def test_dead_feature_raises():
    weights, grams, _ = _data(7, 11, 2, seed=51)
    for gm in grams:
        gm[4, :] = 0
        gm[:, 4] = 0
    with pytest.raises(SingularGramError, match=r"feature\(s\) \[4\]"):
        regmean(weights, grams, alpha=0.5)
    assert issubclass(SingularGramError, ValueError)


def _w(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _g(n, dtype=torch.float32):
    x = torch.randn(2 * n + 4, n)
    return (x.T @ x).to(dtype)


def _nan(t, value=float("nan")):
    t = t.clone()
    t.view(-1)[0] = value
    return t


ERRORS = [
    ("empty", lambda: regmean([], []), ValueError, r"weights is empty"),
    ("single tensor", lambda: regmean(_w(3, 4), [_g(4)]), TypeError, r"weights must be a list"),
    ("not a tensor", lambda: regmean([_w(3, 4), "x"], [_g(4), _g(4)]), TypeError, r"weights\[1\] must be a torch.Tensor"),
    ("empty grams", lambda: regmean([_w(3, 4)], []), ValueError, r"grams is empty"),
    ("count", lambda: regmean([_w(3, 4), _w(3, 4)], [_g(4)]), ValueError, r"grams has 1 entries for 2 weights"),
    ("1-D weight", lambda: regmean([_w(4)], [_g(4)]), ValueError, r"weights\[0\] must be a 2-D"),
    ("empty weight", lambda: regmean([_w(0, 4)], [_g(4)]), ValueError, r"weights\[0\] is empty"),
    ("weight shapes", lambda: regmean([_w(3, 4), _w(4, 4)], [_g(4), _g(4)]), ValueError,
     r"weights\[1\] has shape \(4, 4\) but weights\[0\] has \(3, 4\)"),
    ("weight dtype", lambda: regmean([torch.ones(3, 4, dtype=torch.int64)], [_g(4)]), TypeError,
     r"weights\[0\] has dtype torch.int64"),
    ("weight dtypes", lambda: regmean([_w(3, 4), _w(3, 4, dtype=torch.float16)], [_g(4), _g(4)]), TypeError,
     r"weights\[1\] has dtype torch.float16 but weights\[0\]"),
    ("non-square gram", lambda: regmean([_w(3, 4), _w(3, 4)], [_g(4), _g(4)[:, :3]]), ValueError,
     r"grams\[1\] must be a square"),
    ("gram size", lambda: regmean([_w(3, 4)], [_g(3)]), ValueError, r"grams\[0\] has shape \(3, 3\).*\[4, 4\]"),
    ("gram size transposed", lambda: regmean([_w(3, 4)], [_g(4)], weight_transpose=False), ValueError,
     r"grams\[0\] has shape \(4, 4\).*weight_transpose=False.*\[3, 3\]"),
    ("gram dtype", lambda: regmean([_w(3, 4)], [torch.eye(4, dtype=torch.int32)]), TypeError,
     r"grams\[0\] has dtype torch.int32"),
    ("gram dtypes", lambda: regmean([_w(3, 4), _w(3, 4)], [_g(4), _g(4, torch.bfloat16)]), TypeError,
     r"grams\[1\] has dtype torch.bfloat16 but grams\[0\]"),
    ("gram device", lambda: regmean([_w(3, 4)], [torch.empty(4, 4, device="meta")]), ValueError,
     r"grams\[0\] is on meta"),
    ("weight device", lambda: regmean([_w(3, 4), torch.empty(3, 4, device="meta")], [_g(4), _g(4)]), ValueError,
     r"weights\[1\] is on meta"),
    ("nan weight", lambda: regmean([_w(3, 4), _nan(_w(3, 4))], [_g(4), _g(4)]), NonFiniteError,
     r"weights\[1\] contains non-finite"),
    ("inf gram", lambda: regmean([_w(3, 4)], [_nan(_g(4), float("inf"))]), NonFiniteError,
     r"grams\[0\] contains non-finite"),
    ("alpha nan", lambda: regmean([_w(3, 4)], [_g(4)], alpha=float("nan")), ValueError, r"alpha must be finite"),
    ("alpha str", lambda: regmean([_w(3, 4)], [_g(4)], alpha="0.5"), TypeError, r"alpha must be a number"),
    ("alpha bool", lambda: regmean([_w(3, 4)], [_g(4)], alpha=True), TypeError, r"alpha must be a number"),
    ("weight_transpose", lambda: regmean([_w(3, 4)], [_g(4)], weight_transpose=1), TypeError,
     r"weight_transpose must be a bool"),
    ("compute_dtype", lambda: regmean([_w(3, 4)], [_g(4)], compute_dtype=torch.float16), TypeError,
     r"compute_dtype must be"),
    ("rcond", lambda: regmean([_w(3, 4)], [_g(4)], rcond=-1.0), ValueError, r"rcond must be >= 0"),
]


@pytest.mark.parametrize("fn,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def _sd_errors():
    sds, grams = _state_dicts(2, seed=60)
    bad_keys = [sds[0], {k: v for k, v in sds[1].items() if k != "ln.weight"}]
    bad_gram_keys = [grams[0], {"l1": grams[1]["l1"], "l2": grams[1]["l2"]}]
    extra_gram = [dict(gm, nope=torch.eye(3)) for gm in grams]
    bad_shape = [sds[0], dict(sds[1], **{"ln.weight": torch.zeros(17)})]
    bad_gram = [grams[0], dict(grams[1], l1=torch.eye(52))]
    ints = [dict(sd, ids=torch.arange(3) + i) for i, sd in enumerate(sds)]
    nan = [sds[0], dict(sds[1], **{"l1.bias": _nan(sds[1]["l1.bias"])})]
    not_tensor = [sds[0], dict(sds[1], **{"l1.bias": [1.0]})]
    return [
        ("empty", ([], []), ValueError, r"state_dicts is empty"),
        ("single dict", (sds[0], grams), TypeError, r"state_dicts must be a list of dicts"),
        ("not a dict", ([sds[0], 3], grams), TypeError, r"state_dicts\[1\] must be a dict"),
        ("count", (sds, grams[:1]), ValueError, r"grams_per_model has 1 entries for 2 state_dicts"),
        ("keys", (bad_keys, grams), ValueError, r"state_dicts\[1\] has other keys.*ln.weight"),
        ("gram keys", (sds, bad_gram_keys), ValueError, r"grams_per_model\[1\] has other keys.*head"),
        ("gram without weight", (sds, extra_gram), ValueError, r"Gram for 'nope'.*'nope.weight'"),
        ("shape", (bad_shape, grams), ValueError, r"state_dicts\[1\]\['ln.weight'\] has shape"),
        ("gram shape", (sds, bad_gram), ValueError, r"grams_per_model\[1\]\['l1'\] has shape \(52, 52\)"),
        ("integers differ", (ints, grams), ValueError, r"state_dicts\[1\]\['ids'\] differs.*integer"),
        ("nan", (nan, grams), NonFiniteError, r"state_dicts\[1\]\['l1.bias'\] contains non-finite"),
        ("not a tensor", (not_tensor, grams), TypeError, r"state_dicts\[1\]\['l1.bias'\] must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("args,exc,match", [e[1:] for e in _sd_errors()], ids=[e[0] for e in _sd_errors()])
def test_state_dict_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        regmean_state_dicts(*args, alpha=0.9)


def test_state_dict_singular_names_the_module():
    sds, grams = _state_dicts(2, seed=61)
    for gm in grams:
        x = torch.randn(5, 53)
        gm["l1"] = x.T @ x
    with pytest.raises(SingularGramError, match=r"grams_per_model\[k\]\['l1'\]"):
        regmean_state_dicts(sds, grams, alpha=1.0)
