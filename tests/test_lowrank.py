"""fastmerge.lowrank against exact references.

* ``svd_lowrank``: error within 1.02x of the Eckart-Young optimum ``(Σ_{i>r} σ_i²)^½`` on
  matrices with known decaying spectra (``U diag(σ) Vᵀ``, random orthogonal ``U, V``); on flat
  spectra within the documented bound ``√(2 + r/(p−1))``.
* ``polar``: Newton-Schulz against the SVD polar factor, SVD fallback on rank deficiency.
* TSV-Merge / Iso-C / Iso-CTS: the ``exact=True`` path against a step-by-step transcription of
  FusionBench's functions (below), and the fast default against ``exact=True`` (relative
  Frobenius error <= 1e-2).
* LoRA re-rank against PEFT 0.21.2's own ``add_weighted_adapter`` (B @ A products).
Matrices are at most 256 on a side: the whole file runs in a few seconds on 2 cores.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastmerge
from fastmerge import lowrank as L

# ----------------------------------------------------------------------------- data


def _orth(m, r, g):
    return torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q


def known(m, n, sigma, seed=0, dtype=torch.float32):
    """``U diag(sigma) Vᵀ`` with Haar-random orthonormal U (m × r), V (n × r); r = len(sigma)."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigma)
    return ((_orth(m, r, g) * sigma) @ _orth(n, r, g).T).to(dtype)


def _i(r):
    return torch.arange(1, r + 1, dtype=torch.float64)


SPECTRA = {  # decaying spectra, σ_1 = 1
    "1/i": lambda r: 1 / _i(r),
    "1/sqrt(i)": lambda r: _i(r) ** -0.5,
    "i^-2": lambda r: _i(r) ** -2,
    "exp": lambda r: torch.exp(-_i(r) / (r / 8)),
}


def optimal(sigma, rank):
    return float(sigma[rank:].pow(2).sum().sqrt())


def tasks(shape, T, spectrum="1/i", seed=0, dtype=torch.float32):
    """T task vectors with the same decaying spectrum shape (scaled per task) and independent
    random singular vectors."""
    r = min(shape)
    return [known(*shape, SPECTRA[spectrum](r) * (1 + 0.3 * t), seed=seed * 100 + t, dtype=dtype)
            for t in range(T)]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- svd_lowrank


@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("shape", [(256, 192), (160, 256)])
@pytest.mark.parametrize("rank", [1, 8, 32, 64])
def test_svd_lowrank_near_eckart_young_on_decaying_spectra(spectrum, shape, rank):
    sigma = SPECTRA[spectrum](min(shape))
    x = known(*shape, sigma, seed=rank)
    u, s, vh = L.svd_lowrank(x, rank, seed=1)
    assert u.shape == (shape[0], rank) and s.shape == (rank,) and vh.shape == (rank, shape[1])
    ratio = float((x - (u * s) @ vh).norm()) / optimal(sigma, rank)
    assert ratio <= 1.02, f"error {ratio:.4f}x optimal"
    # orthonormal factors, descending values close to the true ones
    eye = torch.eye(rank)
    assert torch.allclose(u.T @ u, eye, atol=1e-5) and torch.allclose(vh @ vh.T, eye, atol=1e-5)
    assert bool((s[1:] <= s[:-1]).all())
    # Ritz values interlace (never above the true ones); the leading half is within 1%
    assert bool((s.double() <= sigma[:rank] * (1 + 1e-5) + 1e-7).all())
    half = max(1, rank // 2)
    assert torch.allclose(s[:half].double(), sigma[:half], rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("kind", ["equal", "gaussian", "equal+step"])
def test_svd_lowrank_flat_spectrum_bound(kind):
    """Flat spectra have no gap to find, but then any good subspace is nearly optimal: the
    error stays within the documented ``√(2 + r/(p−1))`` (Halko et al. Thm 10.5 plus the
    orthogonal split of the error), and in practice within a few percent."""
    m, n, rank = 200, 150, 20
    g = torch.Generator().manual_seed(3)
    if kind == "gaussian":  # Marchenko-Pastur spectrum
        x = torch.randn(m, n, generator=g)
        sigma = torch.linalg.svdvals(x.double())
    else:
        sigma = torch.ones(n, dtype=torch.float64)
        if kind == "equal+step":
            sigma[2 * rank:] = 0.5
        x = known(m, n, sigma, seed=4)
    u, s, vh = L.svd_lowrank(x, rank, seed=0)
    ratio = float((x - (u * s) @ vh).norm()) / optimal(sigma, rank)
    p = max(10, rank // 10)
    assert ratio <= math.sqrt(2 + rank / (p - 1))
    assert ratio <= 1.05, f"flat spectrum ({kind}): {ratio:.4f}x optimal"


def test_svd_lowrank_exact_matches_lapack_and_seed_rules():
    x = known(96, 80, SPECTRA["1/i"](80), seed=5)
    u, s, vh = L.svd_lowrank(x, 10, exact=True)
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    assert torch.equal(s, S[:10]) and torch.equal(u, U[:, :10]) and torch.equal(vh, Vh[:10])
    a = L.svd_lowrank(x, 10, seed=7)
    b = L.svd_lowrank(x, 10, seed=7)
    c = L.svd_lowrank(x, 10, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(11)
    d = L.svd_lowrank(x, 10)
    torch.manual_seed(11)
    e = L.svd_lowrank(x, 10)
    assert all(torch.equal(p, q) for p, q in zip(d, e))


def test_svd_lowrank_batched_and_sketch_size():
    sigma = SPECTRA["1/i"](48)
    xs = torch.stack([known(64, 48, sigma, seed=s) for s in range(6)]).reshape(2, 3, 64, 48)
    u, s, vh = L.svd_lowrank(xs, 8, seed=0)
    assert u.shape == (2, 3, 64, 8) and s.shape == (2, 3, 8) and vh.shape == (2, 3, 8, 48)
    err = torch.linalg.matrix_norm(xs - (u * s.unsqueeze(-2)) @ vh)
    assert float(err.max()) <= 1.02 * optimal(sigma, 8)
    # rank + oversample >= min(m, n): the exact SVD is used (a sketch that large saves nothing)
    x = xs[0, 0]
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    assert torch.equal(L.svd_lowrank(x, 40)[1], S[:40])
    assert torch.equal(L.svd_lowrank(x, 48)[1], S)


def test_svd_lowrank_edge_ranks_and_dtypes():
    x = known(40, 30, SPECTRA["exp"](30), seed=2)
    u, s, vh = L.svd_lowrank(x, 0)
    assert u.shape == (40, 0) and s.shape == (0,) and vh.shape == (0, 30)
    assert L.svd_lowrank(torch.zeros(5, 0), 0)[0].shape == (5, 0)
    for dt in (torch.float16, torch.bfloat16):
        u, s, vh = L.svd_lowrank(x.to(dt), 5, exact=True)
        assert u.dtype == torch.float32
        ref = torch.linalg.svdvals(x.to(dt).float())[:5]
        assert torch.allclose(s, ref, rtol=1e-5)
    u, s, vh = L.svd_lowrank(x.double(), 5, seed=0)
    assert u.dtype == torch.float64
    dense = L.project(x.to(torch.bfloat16), 5, seed=0)
    assert dense.dtype == torch.bfloat16 and dense.shape == x.shape
    b, a = L.project(x, 5, factors=True, seed=0)
    assert b.shape == (40, 5) and a.shape == (5, 30)
    assert torch.allclose(b @ a, L.project(x, 5, seed=0), atol=1e-6)
    assert float((x - b @ a).norm()) <= 1.02 * optimal(SPECTRA["exp"](30), 5)


@pytest.mark.parametrize("call, exc, words", [
    (lambda x: L.svd_lowrank(x, 31), ValueError, ["rank", "[0, 30]"]),
    (lambda x: L.svd_lowrank(x, -1), ValueError, ["rank"]),
    (lambda x: L.svd_lowrank(x, 2.0), TypeError, ["rank", "int"]),
    (lambda x: L.svd_lowrank(x, True), TypeError, ["rank"]),
    (lambda x: L.svd_lowrank(x, 3, oversample=-1), ValueError, ["oversample"]),
    (lambda x: L.svd_lowrank(x, 3, n_iter=1.5), TypeError, ["n_iter"]),
    (lambda x: L.svd_lowrank(x, 3, exact=1), TypeError, ["exact"]),
    (lambda x: L.svd_lowrank(x[0], 1), ValueError, ["x", "2 dimensions"]),
    (lambda x: L.svd_lowrank(x.int(), 1), TypeError, ["x", "int32"]),
    (lambda x: L.svd_lowrank(x.tolist(), 1), TypeError, ["x", "Tensor"]),
    (lambda x: L.svd_lowrank(x, 3, seed="a"), TypeError, ["seed"]),
    (lambda x: L.svd_lowrank(torch.where(x > 0.1, float("nan"), x), 3), ValueError, ["non-finite"]),
    (lambda x: L.svd_lowrank(torch.where(x > 0.1, float("inf"), x), 3, exact=True), ValueError, ["non-finite"]),
    (lambda x: L.project(x, 3, factors="yes"), TypeError, ["factors"]),
    (lambda x: L.polar(x, method="qr"), ValueError, ["method"]),
    (lambda x: L.polar(x, tol=0), ValueError, ["tol"]),
    (lambda x: L.polar(x, n_iter=-2), ValueError, ["n_iter"]),
    (lambda x: L.polar(torch.where(x > 0.1, float("nan"), x)), ValueError, ["non-finite"]),
])
def test_argument_errors(call, exc, words):
    x = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    with pytest.raises(exc) as info:
        call(x)
    for w in words:
        assert w in str(info.value), str(info.value)


# ----------------------------------------------------------------------------- polar


def _polar_ref(x):
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(64, 64), (96, 40), (40, 96)])
@pytest.mark.parametrize("cond", [1e1, 1e3, 1e5])
def test_polar_newton_schulz_matches_svd(shape, cond):
    r = min(shape)
    sigma = torch.logspace(0, -math.log10(cond), r, dtype=torch.float64) * 7.0
    x = known(*shape, sigma, seed=int(cond))
    w, info = L.polar(x, return_info=True)
    assert info["method"] == "newton_schulz" and info["converged"], info
    assert w.shape == x.shape and w.dtype == torch.float32
    # fp32 rounding limits the directions of singular values ~1e-5 of the largest
    assert rel(w, _polar_ref(x)) <= (1e-4 if cond <= 1e3 else 1e-3), (rel(w, _polar_ref(x)), info)
    small = w.T @ w if shape[0] >= shape[1] else w @ w.T
    assert torch.allclose(small, torch.eye(r), atol=1e-4)
    # the scaled steps cover [1e-3, 1] in ~10 steps (plain Newton-Schulz: ~20); below 1e-3
    # the stragglers grow 1.5x per step
    assert info["iterations"] <= 14 + max(0.0, math.log(cond / 1e3) / math.log(1.5)), info


def test_polar_rank_deficient_falls_back_to_svd_and_batches():
    x = known(50, 40, torch.cat([torch.ones(30, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)]))
    w, info = L.polar(x, return_info=True)
    assert info["method"] == "svd"
    assert torch.equal(w, L.polar(x, method="svd"))
    assert info["iterations"] < 30, "stagnation should stop the iteration early"
    xs = torch.stack([known(30, 20, torch.logspace(0, -2, 20, dtype=torch.float64), seed=s) for s in range(4)])
    ws = L.polar(xs * 1e6)  # scale does not matter
    for k in range(4):
        assert rel(ws[k], _polar_ref(xs[k])) <= 1e-4
    w0 = L.polar(torch.zeros(6, 4))  # all singular values zero: any orthonormal W is a polar factor
    assert torch.allclose(w0.T @ w0, torch.eye(4), atol=1e-6)
    assert L.polar(torch.zeros(3, 0)).shape == (3, 0)


def test_polar_of_huge_and_half_inputs():
    x = known(48, 32, torch.logspace(0, -2, 32, dtype=torch.float64))
    assert rel(L.polar(x * 1e30), _polar_ref(x)) <= 1e-4  # the Gram matrix would overflow fp32
    assert rel(L.polar(x.to(torch.bfloat16)), _polar_ref(x.to(torch.bfloat16).float())) <= 1e-4


# ----------------------------------------------------------------------------- FusionBench transcription
#
# Step-by-step transcription of FusionBench's functions (fusion_bench 0.2.33:
# method/task_singular_vector/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction and
# method/isotropic_merging/iso_utils.py::iso_c / iso_cts) for one parameter, written out here
# independently of fastmerge.lowrank so that the exact path is checked against the procedure,
# zero-padded buffers, float rank arithmetic and running means included.


def fb_tsv(tvs):
    T = len(tvs)
    key_2d = tvs[0].dim() == 2
    new = None
    for i, vec in enumerate(tvs):
        if key_2d:
            u, s, vh = torch.linalg.svd(vec, full_matrices=False)
            if i == 0:
                sum_u, sum_s, sum_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
            k = int(s.shape[0] * (1 / T))
            sum_u[:, i * k:(i + 1) * k] = u[:, :k]
            sum_s[i * k:(i + 1) * k] = s[:k]
            sum_vh[i * k:(i + 1) * k, :] = vh[:k, :]
        else:
            new = vec.clone() if i == 0 else new + (vec - new) / (i + 1)
    if not key_2d:
        return new
    u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, vh_v = torch.linalg.svd(sum_vh, full_matrices=False)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_v, vh_v))


def fb_iso_c(tvs):
    T = len(tvs)
    new = sum(tvs) / T
    if tvs[0].dim() == 2:
        new = new * T
        u, s, v = torch.linalg.svd(new, full_matrices=False)
        new = torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), v))
    return new


def fb_iso_cts(tvs, frac=0.8):
    T = len(tvs)
    shape = tvs[0].shape
    if len(shape) != 2:
        new = None
        for i, vec in enumerate(tvs):
            new = vec.clone() if i == 0 else new + (vec - new) / (i + 1)
        return new
    combined = sum(tvs)
    c = int(min(shape) * frac)
    ts_total = round((min(shape) - c) / T) * T
    c = min(shape) - ts_total
    u, s, v = torch.linalg.svd(combined, full_matrices=False)
    cu, cs, cv = u[:, :c], s[:c], v[:c, :]
    nd = int((min(shape) - c) / T)
    for i, w in enumerate(tvs):
        w_ts = w - cu @ cu.T @ w
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        if i == 0:
            su, ss, sv = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
        su[:, i * nd:(i + 1) * nd] = u_ts[:, :nd]
        ss[i * nd:(i + 1) * nd] = s_ts[:nd]
        sv[i * nd:(i + 1) * nd, :] = v_ts[:nd, :]
    su[:, T * nd:T * nd + c] = cu
    ss[T * nd:T * nd + c] = cs
    sv[T * nd:T * nd + c, :] = cv
    a, _, b = torch.linalg.svd(su, full_matrices=False)
    su = a @ b
    a, _, b = torch.linalg.svd(sv, full_matrices=False)
    sv = a @ b
    ss = torch.ones_like(ss) * ss.mean()
    return torch.linalg.multi_dot((su, torch.diag(ss), sv))


FB = {"tsv": fb_tsv, "iso_c": fb_iso_c, "iso_cts": fb_iso_cts}


@pytest.mark.parametrize("method", L.METHODS)
@pytest.mark.parametrize("shape, T", [((96, 72), 3), ((60, 90), 4), ((48, 48), 5), ((4, 30), 8),
                                      ((90,), 3), ((3, 4, 5), 2)])
def test_exact_path_matches_fusionbench_procedure(method, shape, T):
    if len(shape) == 2:
        tvs = tasks(shape, T, "1/i", seed=T)
    else:
        g = torch.Generator().manual_seed(1)
        tvs = [torch.randn(shape, generator=g) for _ in range(T)]
    ours = L.merged_delta(method, tvs, exact=True)
    ref = FB[method](tvs)
    assert ours.shape == ref.shape
    assert rel(ours, ref) <= 1e-5 or float((ours - ref).abs().max()) <= 1e-6, rel(ours, ref)


def test_fusionbench_rank_arithmetic():
    assert L.tsv_k((768, 1024), 3) == 256
    assert L.tsv_k((4096, 4096), 8) == 512 and L.tsv_k((4, 30), 8) == 0
    assert L.iso_cts_split((4096, 4096), 8, 0.8) == (3280, 102)
    assert L.iso_cts_split((768, 3072), 8, 0.8) == (616, 19)
    c, p = L.iso_cts_split((50, 70), 3, 0.8)
    assert c + 3 * p == 50
    with pytest.raises(ValueError, match="common_space_fraction"):
        L.iso_cts_split((5, 9), 8, 0.1)


# ----------------------------------------------------------------------------- fast vs exact

# (method, shape, T, spectrum): the fast default against exact=True. Recorded figures (relative
# Frobenius error, this file's data): TSV 3e-3 (1/i) .. 4e-6 (exp); Iso-C ~3e-7; Iso-CTS
# ~1e-5 (m <= n: exact Rayleigh-Ritz) .. 4e-5 (tall: sketched).
FAST_CASES = [(m, shape, T, sp) for m in L.METHODS
              for shape, T in [((192, 160), 4), ((256, 256), 8), ((96, 128), 3)]
              for sp in ("1/i", "i^-2", "exp")]


@pytest.mark.parametrize("method, shape, T, spectrum", FAST_CASES)
def test_fast_path_matches_exact(method, shape, T, spectrum):
    tvs = tasks(shape, T, spectrum, seed=1)
    exact = L.merged_delta(method, tvs, exact=True)
    fast = L.merged_delta(method, tvs, seed=0)
    err = rel(fast, exact)
    assert err <= 1e-2, f"{method} {shape} T={T} {spectrum}: {err:.2e}"


def test_fast_tsv_rank_deficient_tasks_use_lapack():
    """Task vectors of rank < k: the top k holds null vectors that only LAPACK's choice
    reproduces, and the polar step mixes them into everything; the fast path detects it."""
    T = 4  # 80x64 tasks: k = 16
    g = torch.Generator().manual_seed(0)
    tvs = [torch.randn(80, 6, generator=g) @ torch.randn(6, 64, generator=g) for _ in range(T)]
    assert rel(L.merged_delta("tsv", tvs, seed=0), L.merged_delta("tsv", tvs, exact=True)) <= 1e-5


# ----------------------------------------------------------------------------- merge API


def _base_models(shape, T, spectrum="1/i", dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=g)
    tvs = tasks(shape, T, spectrum, seed=3) if len(shape) == 2 else \
        [torch.randn(shape, generator=g) * 0.1 for _ in range(T)]
    return base.to(dtype), [(base + t).to(dtype) for t in tvs], tvs


@pytest.mark.parametrize("method", L.METHODS)
def test_merge_api(method):
    base, models, tvs = _base_models((64, 48), 3)
    tau = FB[method]([(m - base) for m in models])
    out = fastmerge.merge(method, base, models, alpha=0.7, exact=True)
    assert rel(out - base, 0.7 * tau) <= 1e-5
    assert torch.equal(fastmerge.merge(method, base, models, lam=0.7, exact=True), out)
    alias = getattr(fastmerge, method)
    fast = alias(base, models, alpha=0.7, seed=0)
    assert rel(fast - base, 0.7 * tau) <= 1e-2
    assert torch.equal(fast, alias(base, models, alpha=0.7, seed=0))
    # weights scale the task vectors before the SVDs (FusionBench's list-valued TSV alpha)
    w = [0.5, 1.0, 2.0]
    weighted = fastmerge.merge(method, base, models, weights=w, exact=True)
    assert rel(weighted - base, FB[method]([wi * (m - base) for wi, m in zip(w, models)])) <= 1e-5
    # 1-D tensors (biases, norms) are averaged
    b1, m1, _ = _base_models((33,), 3)
    assert torch.allclose(fastmerge.merge(method, b1, m1, alpha=2.0), b1 + 2.0 * sum(m - b1 for m in m1) / 3,
                          atol=1e-6)
    # bf16 in, bf16 out (fp32 inside); out_dtype
    bb, mb = base.to(torch.bfloat16), [m.to(torch.bfloat16) for m in models]
    ob = fastmerge.merge(method, bb, mb, exact=True)
    assert ob.dtype == torch.bfloat16
    ref = bb.float() + FB[method]([m.float() - bb.float() for m in mb])
    assert torch.allclose(ob.float(), ref, atol=2e-2, rtol=1e-2)
    assert fastmerge.merge(method, bb, mb, out_dtype=torch.float32, exact=True).dtype == torch.float32


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(method="ties", alpha=0.5), ValueError, ["alpha", "lam"]),
    (dict(method="tsv", alpha=0.5, lam=0.3), ValueError, ["alpha", "lam"]),
    (dict(method="tsv", alpha="x"), TypeError, ["alpha"]),
    (dict(method="iso_c", exact="yes"), TypeError, ["exact"]),
    (dict(method="iso_cts", common_space_fraction=1.5), ValueError, ["common_space_fraction"]),
    (dict(method="tsv", backend="gpu"), ValueError, ["backend"]),
    (dict(method="tsv", weights=[1.0]), ValueError, ["weights"]),
    (dict(method="tsvm"), ValueError, ["tsvm", "iso_c"]),
])
def test_merge_errors(kwargs, exc, words):
    base, models, _ = _base_models((20, 16), 3)
    method = kwargs.pop("method")
    with pytest.raises(exc) as info:
        fastmerge.merge(method, base, models, **kwargs)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_merge_rejects_mismatched_models_and_nonfinite():
    base, models, _ = _base_models((20, 16), 3)
    with pytest.raises(ValueError, match=r"models\[1\].*shape"):
        fastmerge.tsv(base, [models[0], models[1].T.contiguous()])
    with pytest.raises(TypeError, match=r"models\[2\].*float16"):
        fastmerge.iso_c(base, [models[0], models[1], models[2].half()])
    bad = models[1].clone()
    bad[3, 4] = float("nan")
    for method in L.METHODS:
        with pytest.raises(ValueError, match="non-finite"):
            fastmerge.merge(method, base, [models[0], bad], seed=0)


# ----------------------------------------------------------------------------- LoRA re-rank vs PEFT


def _peft_model(r=4, seed=0, in_f=40, out_f=32, **cfg):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    net = torch.nn.Sequential()
    net.add_module("lin", torch.nn.Linear(in_f, out_f))
    config = dict(r=r, lora_alpha=2 * r, target_modules=["lin"], init_lora_weights=False)
    config.update(cfg)
    model = peft.get_peft_model(net, peft.LoraConfig(**config), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(**{**config, "r": r + 2, "lora_alpha": r}))
    return model, model.base_model.model.lin


# PEFT's clamp quantile is taken over signed entries, so it depends on the (arbitrary) sign of
# each singular pair: only LAPACK's own signs (exact=True) reproduce it, and clamp is checked
# with exact=True only.
RERANK_CASES = [(c, r, cl, ex) for c, r, cl in [("svd", 6, None), ("svd", 3, None), ("svd", 6, 0.9),
                                                 ("ties_svd", 5, None), ("svd", 20, None)]
                for ex in (False, True) if ex or cl is None]


@pytest.mark.parametrize("combination, rank, clamp, exact", RERANK_CASES)
def test_lora_rerank_matches_peft_add_weighted_adapter(combination, rank, clamp, exact):
    model, layer = _peft_model()
    weights = [0.8, -0.5]
    deltas = [layer.get_delta_weight(n).detach() for n in ("a", "b")]
    kw = {} if combination == "svd" else dict(density=0.5)
    with torch.no_grad():
        model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=combination,
                                   svd_rank=rank, svd_clamp=clamp, **kw)
    peft_delta = layer.get_delta_weight("m").detach()
    assert layer.scaling["m"] == 1.0
    wt = torch.tensor(weights)
    merged = (fastmerge.peft.task_arithmetic(deltas, wt) if combination == "svd"
              else fastmerge.peft.ties(deltas, wt, density=0.5))
    b, a = L.lora_rerank(merged, rank, clamp=clamp, exact=exact, seed=0)
    assert b.shape == (32, rank) and a.shape == (rank, 40)
    assert b.dtype == a.dtype == merged.dtype
    if exact or combination == "svd":
        # "svd" merges two adapters: the delta has rank <= 4 + 6, inside the sketch, so the
        # randomized factors are exact too
        assert rel(b @ a, peft_delta) <= 1e-5, rel(b @ a, peft_delta)
    else:  # TIES output is full rank: near-optimal truncation, not PEFT's exact one
        ours, theirs = float((merged - b @ a).norm()), float((merged - peft_delta).norm())
        assert theirs <= ours <= 1.02 * theirs, (ours, theirs)


def test_lora_rerank_clamp_quantile_and_shapes():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(30, 8, generator=g) @ torch.randn(8, 50, generator=g)
    b, a = L.lora_rerank(delta, 4, exact=True)
    hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), 0.8)
    bc, ac = L.lora_rerank(delta, 4, exact=True, clamp=0.8)
    assert torch.allclose(bc, b.clamp(-hi, hi)) and torch.allclose(ac, a.clamp(-hi, hi))
    big = torch.randn(2 ** 24 + 3, generator=g)  # beyond torch.quantile's size limit
    assert float(L._quantile(big, 0.25)) == pytest.approx(float(big.sort().values[int(0.25 * (big.numel() - 1))]), abs=1e-6)
    # conv delta: flattened like PEFT; rank beyond min(m, n) pads with zeros
    conv = torch.randn(6, 3, 3, 3, generator=g)
    b, a = L.lora_rerank(conv, 30, exact=True)
    assert b.shape == (6, 30) and a.shape == (30, 27)
    assert torch.allclose(b @ a, conv.flatten(1), atol=1e-5)
    assert L.lora_rerank(delta.half(), 3)[0].dtype == torch.float16
    with pytest.raises(ValueError, match="clamp"):
        L.lora_rerank(delta, 3, clamp=1.5)
    with pytest.raises(ValueError, match="rank"):
        L.lora_rerank(delta, 0)
    with pytest.raises(ValueError, match="delta"):
        L.lora_rerank(delta[0], 2)
