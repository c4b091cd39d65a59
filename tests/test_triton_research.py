"""The Triton kernels of the research methods (``triton_kernels/consensus.py``, ``emr.py``,
``fisher.py``, ``pcb.py``, driven by ``backends/triton_methods.py``) in Triton's interpreter on
small CPU tensors (on a machine with CUDA, the compiled kernels on the GPU): against the torch
references, bit for bit where the kernels do the reference's fp32 operations in its order
(consensus_ta/ties and TALL masks, EMR's unified vector and masks, Fisher's merge), within
float64 round-off for EMR's and Fisher's sums, within fp32 round-off for PCB (exp and tanh are
csrc/fmath.h's polynomials: the cpu backend's bytes). Odd sizes, 1-D, 0-d, empty, 3-D and
non-contiguous inputs, K = 1, 3, 8, fp32/bf16 (and fp16 outputs), inf/nan naming the input, the
host-read budget. The kernels are compiled for sm_80/sm_90 by ``triton_compile_check.py``.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import make_models, models_for, reads_of

import fastmerge
from fastmerge import backends, research
from fastmerge._validate import NonFiniteError

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

INFO = fastmerge.backends()["triton"]
DEV = torch.device("cpu" if INFO.get("interpreter") else "cuda")
pytestmark = pytest.mark.skipif(
    not INFO["available"],
    reason="needs the triton backend (a GPU, or the interpreter: TRITON_INTERPRET=1, set by conftest "
           f"without CUDA): {INFO['reason']}")

SHAPES = [(37, 53), (129,), (), (0,), (5, 0), (3, 4, 5), (2, 1029)]
SHAPE_IDS = ["37x53", "1d-odd", "0d", "empty", "5x0", "3d", "2x1029"]
KS = [1, 3, 8]
DTYPES = [torch.float32, torch.bfloat16]
DT_IDS = ["fp32", "bf16"]
RESEARCH = ("consensus_ta", "consensus_ties", "pcb", "emr")


def dev(x):
    """Tensors (or lists, dicts of them) on ``DEV``."""
    if isinstance(x, torch.Tensor):
        return x.to(DEV)
    if isinstance(x, (list, tuple)):
        return [dev(t) for t in x]
    if isinstance(x, dict):
        return {k: dev(v) for k, v in x.items()}
    return x


def bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(-1)


def same_bytes(got, want, what=""):
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(bits(got), bits(want)), f"{what}: {(got.float() - want.float()).abs().max()}"


def merge(method, base, models, backend, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend == "triton":
            return fastmerge.merge(method, dev(base), dev(models), backend="triton", **kw).cpu()
        return fastmerge.merge(method, base, models, backend=backend, **kw)


def test_methods_declare_the_gpu_backends():
    from fastmerge import _registry

    for name in RESEARCH:
        assert {"cpu", "triton", "cuda"} <= set(_registry.get(name).kernels), name
    T = backends.method_ops("triton")
    for op in ("tall_masks", "emr", "fisher"):
        assert research._kernels("triton", torch.zeros(1, device=DEV), op) is T
    for fn in ("consensus", "tall_masks", "emr", "sum_squares", "fisher", "pcb"):
        assert callable(getattr(T, fn)) and callable(getattr(backends.method_ops("cpu"), fn)), fn


# ---- consensus_ta, consensus_ties (triton_kernels/consensus.py) -------------------------------

CONSENSUS = [("consensus_ta", {}), ("consensus_ta", dict(k=1, tall_lambda="per-model", lam=0.8)),
             ("consensus_ta", dict(k=0, lam=0.5)), ("consensus_ta", dict(k=9)),
             ("consensus_ties", {}), ("consensus_ties", dict(density="per-model", normalize=True)),
             ("consensus_ties", dict(density=1.0, k=1, tall_lambda=0.0)),
             ("consensus_ties", dict(density=0.5, lam=1.3, tall_lambda="per-model", k=2))]


def _params(params, K):
    p = dict(params)
    if p.get("tall_lambda") == "per-model":
        p["tall_lambda"] = [0.3 + 0.3 * (k % 3) for k in range(K)]
    if p.get("density") == "per-model":
        p["density"] = [(0.1, 1.0, 0.0)[k % 3] for k in range(K)]
    return p


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("method,params", CONSENSUS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CONSENSUS)])
def test_consensus_bit_identical_to_reference(method, params, shape, K):
    base, models = make_models(shape, K, seed=3 + K)
    p = _params(params, K)
    same_bytes(merge(method, base, models, "triton", **p), merge(method, base, models, "torch", **p), str(p))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("method", ["consensus_ta", "consensus_ties"])
def test_consensus_low_precision_out_dtype_non_contiguous(method, dtype):
    base, models = models_for((41, 29), 3, dtype, seed=4)
    for out_dtype in (None, torch.float32, torch.bfloat16, torch.float16):
        same_bytes(merge(method, base, models, "triton", out_dtype=out_dtype),
                   merge(method, base, models, "torch", out_dtype=out_dtype), str(out_dtype))
    bt, mt = base.t(), [m.t() for m in models]
    assert not bt.is_contiguous()
    same_bytes(merge(method, bt, mt, "triton"), merge(method, bt, mt, "torch"), "transposed")


def test_consensus_ties_cut_ties_and_sampled_bracket():
    """Equal magnitudes at the top-k cut (split by the lowest index), an input past the
    select's all-candidates size (the sampled bracket), and a run of ties the bracket misses
    (the pass redone with the exact select)."""
    base, models = models_for((57, 61), 3, torch.float32, seed=5)
    q = [((m - base) * 50).round() / 50 + base for m in models]
    for density in (0.3, [0.05, 0.5, 0.9]):
        same_bytes(merge("consensus_ties", base, q, "triton", density=density),
                   merge("consensus_ties", base, q, "torch", density=density), str(density))
    n = (1 << 16) + 4096
    g = torch.Generator().manual_seed(6)
    base = torch.zeros(n)
    ms = [0.1 * torch.randn(n, generator=g) for _ in range(2)]
    same_bytes(merge("consensus_ties", base, ms, "triton", density=0.3),
               merge("consensus_ties", base, ms, "torch", density=0.3), "sampled")
    ms[0][: n * 3 // 4] = 0.05  # the top 30% of model 0 sits inside a run of ties
    got, reads = reads_of(lambda: merge("consensus_ties", base, ms, "triton", density=0.3))
    same_bytes(got, merge("consensus_ties", base, ms, "torch", density=0.3), "missed bracket")
    assert reads >= 2  # the missed-bracket flag was read, then the exact select ran


# ---- TALL masks (research.tall_masks) ------------------------------------------------------

@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("shape", [(29, 31), (13,), (), (0,), (3, 4, 5), (8,)], ids=["29x31", "13", "0d", "empty", "3d", "8"])
def test_tall_masks_equal_reference_and_packbits(shape, K):
    base, models = make_models(shape, K, seed=7 + K)
    for lam_t in (0.6, [0.1 + 0.5 * k for k in range(K)]):
        got = research.tall_masks(dev(base), dev(models), tall_lambda=lam_t, backend="triton")
        want = research.tall_masks(base, models, tall_lambda=lam_t, backend="torch")
        assert got.packed.dtype == torch.uint8 and got.packed.shape == (K, (base.numel() + 7) // 8)
        assert got.packed.device.type == DEV.type
        assert torch.equal(got.packed.cpu(), want.packed), lam_t
        deltas = [m.float() - base.float() for m in models]
        total = sum(deltas) if deltas else None
        for t in range(K):
            m = (deltas[t].abs() > (lam_t if isinstance(lam_t, float) else lam_t[t]) * (total - deltas[t]).abs())
            assert np.array_equal(got.packed[t].cpu().numpy(), np.packbits(m.reshape(-1).numpy())), t


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_tall_masks_given_mtl(dtype):
    base, models = make_models((100, 3), 3, seed=8)
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    mtl = fastmerge.merge("ties", base.float(), [m.float() for m in models], density=0.2) - base.float()
    for mtl_dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = research.tall_masks(dev(base), dev(models), mtl=dev(mtl.to(mtl_dtype)), backend="triton")
        b = research.tall_masks(base, models, mtl=mtl.to(mtl_dtype), backend="torch")
        assert torch.equal(a.packed.cpu(), b.packed), mtl_dtype
    views = research.tall_masks(dev(base.t()), dev([m.t() for m in models]), mtl=dev(mtl.t()), backend="triton")
    assert torch.equal(views.packed.cpu(),
                       research.tall_masks(base.t(), [m.t() for m in models], mtl=mtl.t(), backend="torch").packed)


# ---- EMR (triton_kernels/emr.py) -------------------------------------------------------------

def _sums_close(got, want, n, what):
    """float64 sums of the same exact terms in another order: ``n * 2**-53`` relative."""
    for g, w in zip(got, want):
        assert abs(g - w) <= max(n, 1) * 2.0 ** -53 * abs(w) + 1e-300, (what, g, w)


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_emr_equals_reference(shape, K):
    base, models = make_models(shape, K, seed=9 + K)
    uni, packed, abs_sum, kept_sum = research.emr_parts(dev(base), dev(models), backend="triton")
    r_uni, r_packed, r_abs, r_kept = research.emr_parts(base, models, backend="torch")
    same_bytes(uni, r_uni, "unified")
    assert torch.equal(packed.cpu(), r_packed)
    _sums_close(abs_sum, r_abs, base.numel(), "sum |tau|")
    _sums_close(kept_sum, r_kept, base.numel(), "sum |tau_uni m|")
    a = research.emr(dev(base), dev(models), backend="triton")
    b = research.emr(base, models, backend="torch")
    torch.testing.assert_close(a.rescalers, b.rescalers, atol=0, rtol=1e-6)
    same_bytes(merge("emr", base, models, "triton"), merge("emr", base, models, "torch"), "emr merge")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_emr_low_precision_non_contiguous_state_dicts(dtype):
    base, models = models_for((43, 37), 4, dtype, seed=10)
    bt, mt = base.t(), [m.t() for m in models]
    a = research.emr(dev(bt), dev(mt), backend="triton")
    b = research.emr(bt, mt, backend="torch")
    same_bytes(a.unified, b.unified, "unified")
    assert torch.equal(a.masks.cpu(), b.masks)
    torch.testing.assert_close(a.rescalers, b.rescalers, atol=0, rtol=1e-6)
    for out_dtype in (None, torch.float32):
        same_bytes(merge("emr", bt, mt, "triton", out_dtype=out_dtype), merge("emr", bt, mt, "torch", out_dtype=out_dtype))
    sd_base = {"w": base, "b": base[0].clone(), "s": base[1, :1].clone()}
    sd_models = [{"w": m, "b": m[0].clone(), "s": m[1, :1].clone()} for m in models]
    a = research.emr(dev(sd_base), dev(sd_models), backend="triton")
    b = research.emr(sd_base, sd_models, backend="torch")
    torch.testing.assert_close(a.rescalers, b.rescalers, atol=0, rtol=1e-6)
    for name in sd_base:
        same_bytes(a.unified[name], b.unified[name], name)
        assert torch.equal(a.masks[name].cpu(), b.masks[name]), name
    rebuilt, want = a.task(2), b.task(2)
    for name in sd_base:
        torch.testing.assert_close(rebuilt[name].cpu(), want[name], atol=1e-6, rtol=1e-6)


# ---- Fisher (triton_kernels/fisher.py) -------------------------------------------------------

def _fisher_inputs(shape, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    _, models = models_for(shape, K, dtype, seed=seed)
    fishers = [(torch.rand(shape, generator=g) ** 3 * (k + 1)).to(dtype) for k in range(K)]
    return models, fishers


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_fisher_equals_reference(shape, K):
    models, fishers = _fisher_inputs(shape, K, seed=11 + K)
    names = [f"models[{t}]" for t in range(K)] + [f"fishers[{t}]" for t in range(K)]
    T = backends.method_ops("triton")
    n = models[0].numel()
    want_sq = [float(f.double().square().sum()) for f in fishers]
    _sums_close(T.sum_squares(dev(fishers), names), want_sq, n, "sum F^2")
    for params in (dict(normalize_fisher_weight=False), dict(weights=[0.5 + k for k in range(K)],
                                                              normalize_fisher_weight=False),
                   dict(minimal_fisher_weight=1e-2, normalize_fisher_weight=False)):
        got = fastmerge.fisher(dev(models), dev(fishers), backend="triton", **params)
        same_bytes(got, fastmerge.fisher(models, fishers, backend="torch", **params), str(params))
    # normalized: the coefficients come from the float64 norms (round-off apart), then the same pass
    for params in (dict(), dict(minimal_fisher_weight=0.0)) if n else (dict(),):  # eps 0, no entries: 1 / 0
        got = fastmerge.fisher(dev(models), dev(fishers), backend="triton", **params).cpu()
        torch.testing.assert_close(got, fastmerge.fisher(models, fishers, backend="torch", **params),
                                   atol=1e-7, rtol=1e-6, msg=str(params))
    # the merge pass itself, given the same coefficients: the reference formula's bytes
    c = [0.1 + 0.8 * t / K for t in range(K)]
    got = T.fisher(dev(models), dev(fishers), c, 1e-6, out_dtype=torch.float32, names=names)
    coef = torch.tensor(c, dtype=torch.float32)
    num = sum(coef[t] * (fishers[t].float() + 1e-6) * models[t].float() for t in range(K))
    den = sum(coef[t] * (fishers[t].float() + 1e-6) for t in range(K))
    same_bytes(got, (num / den) if n else torch.empty(shape), "merge pass")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_fisher_low_precision_non_contiguous_state_dicts(dtype):
    models, fishers = _fisher_inputs((31, 47), 3, dtype, seed=12)
    mt, ft = [m.t() for m in models], [f.t() for f in fishers]
    for out_dtype in (None, torch.float32, torch.float16):
        same_bytes(fastmerge.fisher(dev(mt), dev(ft), backend="triton", out_dtype=out_dtype,
                                    normalize_fisher_weight=False),
                   fastmerge.fisher(mt, ft, backend="torch", out_dtype=out_dtype, normalize_fisher_weight=False))
    f32 = [m.float() for m in models]  # Fishers in another dtype than the models
    same_bytes(fastmerge.fisher(dev(f32), dev(fishers), backend="triton", normalize_fisher_weight=False),
               fastmerge.fisher(f32, fishers, backend="torch", normalize_fisher_weight=False))
    sd_m = [{"w": m, "b": m[0].clone()} for m in models]
    sd_f = [{"w": f, "b": f[0].clone()} for f in fishers]
    got = fastmerge.fisher(dev(sd_m), dev(sd_f), weights=[0.2, 0.3, 0.5], backend="triton")
    want = fastmerge.fisher(sd_m, sd_f, weights=[0.2, 0.3, 0.5], backend="torch")
    for name in want:
        torch.testing.assert_close(got[name].cpu().float(), want[name].float(), atol=1e-7, rtol=1e-6, msg=name)


# ---- PCB (triton_kernels/pcb.py) -------------------------------------------------------------

PCB = [dict(), dict(ratio=1.0), dict(ratio=0.05, weights="per-model", lam=1.2),
       dict(min_ratio=0.0, max_ratio=0.0), dict(min_ratio=0.1, max_ratio=0.2, ratio=0.3)]


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("shape", SHAPES + [(160, 70)], ids=SHAPE_IDS + ["160x70"])
def test_pcb_matches_reference(shape, K):
    """Within fp32 round-off of the reference (its exp/tanh are torch's), and the cpu backend's
    bytes (the same polynomials and operations) where it is built."""
    base, models = models_for(shape, K, torch.float32, seed=13 + K)
    cpu = fastmerge.backends()["cpu"]["available"]
    for params in PCB:
        p = dict(params, weights=[1.0 + 0.1 * k for k in range(K)]) if params.get("weights") else params
        got = merge("pcb", base, models, "triton", **p)
        ref = merge("pcb", base, models, "torch", **p)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5, msg=str(p))
        if cpu:
            same_bytes(got, merge("pcb", base, models, "cpu", **p), f"cpu {p}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_pcb_low_precision_non_contiguous(dtype):
    base, models = models_for((60, 50), 4, dtype, seed=14)
    bt, mt = base.t(), [m.t() for m in models]
    for out_dtype in (None, torch.float32):
        got = merge("pcb", bt, mt, "triton", out_dtype=out_dtype)
        ref = merge("pcb", bt, mt, "torch", out_dtype=out_dtype)
        assert got.dtype == ref.dtype
        tol = dict(atol=2e-6, rtol=1e-5) if got.dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(got.float(), ref.float(), **tol)


def test_pcb_zero_over_zero_edges_stay_finite():
    """Equal clamped magnitudes (hi == lo) and a score max equal to its cut (M == q): 0 terms."""
    base = torch.zeros(64, 33)
    models = [base + 0.01, base - 0.01 * torch.ones_like(base), base + 0.02]
    got = merge("pcb", base, models, "triton")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, merge("pcb", base, models, "torch"), atol=1e-6, rtol=1e-5)
    one = merge("pcb", torch.zeros(()), [torch.tensor(0.5)], "triton")
    assert torch.isfinite(one) and one.shape == ()


def test_pcb_exp_tanh_are_fmath_polynomials():
    """The kernels' exp and tanh within 2 ulps of torch's over their ranges (exp(0) = 1, tanh(0) = 0,
    tanh = 1 beyond 9): the scores' accuracy claim."""
    from fastmerge.backends.triton import kernels

    global _pcb  # a jit function resolves the names it calls in its module's globals
    _pcb = kernels().pcb

    @triton.jit
    def _probe(x, e, t, n, BLK: tl.constexpr):
        i = tl.program_id(0) * BLK + tl.arange(0, BLK)
        v = tl.load(x + i, mask=i < n, other=0.0)
        tl.store(e + i, _pcb.exp_f(v), mask=i < n)
        tl.store(t + i, _pcb.tanh_f(v), mask=i < n)

    x = torch.cat([torch.linspace(-20, 20, 4001), torch.tensor([0.0, 0.6249, 0.625, 9.0, 9.5, 1e-6, -1e-6]),
                   torch.logspace(-8, 1, 500)]).to(DEV)
    e, t = torch.empty_like(x), torch.empty_like(x)
    _probe[(triton.cdiv(x.numel(), 256),)](x, e, t, x.numel(), BLK=256, enable_fp_fusion=False)
    e, t, x = e.cpu(), t.cpu(), x.cpu()
    ulp = lambda v: torch.finfo(torch.float32).eps * v.abs().clamp(min=torch.finfo(torch.float32).tiny)  # noqa: E731
    assert ((e - torch.exp(x)).abs() <= 2 * ulp(torch.exp(x))).all()
    assert ((t - torch.tanh(x)).abs() <= 2 * ulp(torch.tanh(x)) + 1e-45).all()
    assert e[x == 0].eq(1).all() and t[x == 0].eq(0).all() and t[x > 9].eq(1).all()


# ---- errors, overflow, host reads ------------------------------------------------------------

def _calls(T):
    names = [f"models[{t}]" for t in range(3)] + [f"fishers[{t}]" for t in range(3)]
    return {
        "consensus_ta": lambda b, ms: T.consensus(b, ms, k=2, tall_lambda=[0.6] * 3, lam=1.0, out_dtype=torch.float32),
        "consensus_ties": lambda b, ms: T.consensus(b, ms, k=2, tall_lambda=[0.6] * 3, lam=1.0,
                                                    out_dtype=torch.float32, top_k=[100, 400, 1000]),
        "tall_masks": lambda b, ms: T.tall_masks(b, ms, [0.6] * 3),
        "emr": lambda b, ms: T.emr(b, ms),
        "pcb": lambda b, ms: T.pcb(b, ms, ranks=(0, 1000, 900), weights=[1.0] * 3, lam=1.0, out_dtype=torch.float32),
        "fisher": lambda b, ms: T.fisher(ms, [(x - b).abs() for x in ms], [0.3] * 3, 1e-6,
                                         out_dtype=torch.float32, names=names),
    }


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_names_the_input():
    """Each pass flags inf/nan per input; the base is named first, then the models in order
    (cpu_methods' order); a given mtl and the Fishers (inf/nan, negative) by name."""
    T = backends.method_ops("triton")
    b, ms = make_models((37, 41), 3, seed=15)
    b, ms = dev(b), dev(ms)
    for name, fn in _calls(T).items():
        fn(b, ms)  # finite: no error
        for k, bad_value in ((2, float("nan")), (0, float("-inf")), (1, float("inf"))):
            bad = [m.clone() for m in ms]
            bad[k].view(-1)[7 * k + 3] = bad_value
            with pytest.raises(NonFiniteError, match=rf"models\[{k}\]"):
                fn(b, bad)
        if name == "fisher":
            continue
        bb = b.clone()
        bb.view(-1)[-1] = float("nan")
        bad = [m.clone() for m in ms]
        bad[1].view(-1)[0] = float("inf")
        with pytest.raises(NonFiniteError, match="base"):
            fn(bb, bad)
    mtl = sum(m - b for m in ms)
    mtl.view(-1)[5] = float("inf")
    with pytest.raises(NonFiniteError, match="mtl"):
        T.tall_masks(b, ms, [0.6] * 3, mtl=mtl)
    with pytest.raises(NonFiniteError, match="mtl"):
        research.tall_masks(b, ms, mtl=mtl, backend="triton")
    names = [f"models[{t}]" for t in range(3)] + [f"fishers[{t}]" for t in range(3)]
    fs = [(m - b).abs() for m in ms]
    for k in range(3):
        bad = [f.clone() for f in fs]
        bad[k].view(-1)[k] = float("nan")
        for fn in (lambda f: T.sum_squares(f, names), lambda f: T.fisher(ms, f, [0.3] * 3, 1e-6,
                                                                         out_dtype=torch.float32, names=names)):
            with pytest.raises(NonFiniteError, match=rf"fishers\[{k}\]"):
                fn(bad)
        bad[k].view(-1)[k] = -0.5
        for fn in (lambda f: T.sum_squares(f, names), lambda f: fastmerge.fisher(ms, f, backend="triton")):
            with pytest.raises(ValueError, match=rf"fishers\[{k}\] has negative entries"):
                fn(bad)
    assert T.sum_squares([-f * 0 for f in fs], names) == [0.0] * 3  # -0 is not negative
    with pytest.raises(NonFiniteError, match=r"models\[1\]"):
        research.emr(b, [ms[0], ms[1] * float("inf"), ms[2]], backend="triton")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_result_overflow_flagged_in_kernel():
    """Finite inputs whose result is inf as stored (fp32, or only after the rounding to bf16 /
    fp16) raise the overflow error from the kernels' own result flag."""
    T = backends.method_ops("triton")
    x = dev(torch.full((7, 9), 3.0e38))
    cases = [
        lambda: T.consensus(-x, [x, x], k=0, tall_lambda=[0.6] * 2, lam=1.0, out_dtype=torch.float32),
        lambda: T.consensus(x * 0, [x * 0 + 7.0e4], k=0, tall_lambda=[0.6], lam=1.0, out_dtype=torch.float16),
        lambda: T.consensus(x * 0, [x, x], k=0, tall_lambda=[0.6] * 2, lam=1.0, out_dtype=torch.bfloat16,
                            top_k=[63, 63]),
        lambda: T.fisher([x, x], [x * 0, x * 0], [1e38, 1e38], 1.0, out_dtype=torch.float32,
                         names=["m0", "m1", "f0", "f1"]),
        lambda: T.fisher([x * 0 + 7.0e4], [x * 0 + 1.0], [1.0], 0.0, out_dtype=torch.float16, names=["m", "f"]),
    ]
    for i, fn in enumerate(cases):
        with pytest.raises(NonFiniteError, match="overflow") as exc:
            fn()
        assert exc.value.overflow, i


def test_one_host_read_per_result():
    T = backends.method_ops("triton")
    b, ms = make_models((3000,), 3, seed=16)
    b, ms = dev(b), dev(ms)
    for name, fn in _calls(T).items():
        _, reads = reads_of(lambda: fn(b, ms))
        assert reads <= 1, f"{name}: {reads} host reads (budget 1)"
    fs = [(m - b).abs() for m in ms]
    _, reads = reads_of(lambda: T.sum_squares(fs, ["a"] * 6))
    assert reads <= 1
    # fastmerge.fisher with the norms: the sum of squares, then the merge
    _, reads = reads_of(lambda: fastmerge.fisher(ms, fs, backend="triton"))
    assert reads <= 2


def test_consensus_ties_thresholds_on_triton():
    """``threshold`` (the whole-model trim of ``fastmerge merge``'s topk_scope: model): the
    cuts go straight to the pass, no select; the reference's bytes."""
    base, ms = make_models((37, 53), 3, seed=21)
    for thr in ([0.01, 0.02, 0.0], 0.03):
        assert torch.equal(merge("consensus_ties", base, ms, "triton", threshold=thr),
                           merge("consensus_ties", base, ms, "torch", threshold=thr))
