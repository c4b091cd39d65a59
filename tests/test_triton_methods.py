"""The Triton kernels of mergekit's other methods (``triton_kernels/gram.py``, ``lincomb.py``,
``nearswap.py``, ``ram.py``, ``passthrough.py``, driven by ``backends/triton_methods.py``) in
Triton's interpreter on small CPU tensors: against the ``cpu`` backend's C++ kernels (bit for
bit for the elementwise passes; the Gram within its documented float64 bound) and against the
torch references, on the three layouts, odd shapes, 1-D, 0-d, empty and non-contiguous inputs,
fp32/bf16/fp16, and inf/nan naming the right input. The same kernels are compiled for sm_80 and
sm_90 in ``triton_compile_check.py``. On a machine with CUDA the same tests run the compiled
kernels on the GPU (inputs built on the CPU, moved to the device for the triton calls).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_match
from methods_testing import fused_matches, sparse_models

import fastmerge
from fastmerge import backends
from fastmerge._validate import NonFiniteError

INFO = fastmerge.backends()["triton"]
DEV = torch.device("cpu" if INFO.get("interpreter") else "cuda")
pytestmark = pytest.mark.skipif(
    not INFO["available"] or not fastmerge.backends()["cpu"]["available"],
    reason="needs the triton backend (a GPU, or the interpreter: TRITON_INTERPRET=1, set by conftest "
           f"without CUDA) and the cpu backend: triton here: {INFO['reason']}")


def _to_dev(x):
    if isinstance(x, torch.Tensor) and x.dtype != torch.float64:  # float64: host coefficients
        return x.to(DEV)
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        return [_to_dev(t) for t in x]
    return x


class _OnDevice:
    """``triton_methods`` with tensor arguments moved to ``DEV`` and results back to the CPU."""

    def __getattr__(self, name):
        fn = getattr(backends.method_ops("triton"), name)

        def call(*args, **kw):
            out = fn(*[_to_dev(a) for a in args], **{k: _to_dev(v) for k, v in kw.items()})
            assert out.device.type == ("cpu" if name == "gram" else DEV.type)
            return out.cpu()
        return call

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]
ALONG = ["all", "last", "first"]
SHAPES = [(13, 37), (3, 700), (129,), (), (0,), (5, 0), (4, 3, 5)]
SHAPE_IDS = ["13x37", "3x700", "1d", "0d", "empty", "5x0", "3d"]


def ops():
    return _OnDevice(), backends.method_ops("cpu")


def inputs(shape, K, dtype=torch.float32, seed=0, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    if not contiguous:  # transposed views of the wanted shape
        shape = tuple(reversed(shape))
    base = torch.randn(shape, generator=g)
    ms = [base + 0.05 * (k + 1) * torch.randn(shape, generator=g) for k in range(K)]
    if not contiguous:
        base, ms = base.t(), [m.t() for m in ms]
    return base.to(dtype), [m.to(dtype) for m in ms]


def bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def gram_bound(xs, base, along):
    """The float64 Gram of the fp32 deltas (exact products, summed by torch) and the bound of a float64 sum of ``n`` exact
    products in any order: ``n * 2**-53 * sum |d_a d_b|`` (we allow that, not a tighter one)."""
    from fastmerge.backends.cpu_methods import layout

    d = [(x.float() - (0 if base is None else base.float())).double() for x in xs]  # fp32 deltas
    outer, length, inner = layout(d[0].shape, along)
    D = torch.stack([t.reshape(outer, length, inner) for t in d], -1).permute(0, 2, 1, 3)
    D = D.reshape(outer * inner, length, len(xs))
    exact = D.transpose(1, 2) @ D
    bound = length * 2.0 ** -53 * (D.abs().transpose(1, 2) @ D.abs())
    return exact, bound


@pytest.mark.parametrize("along", ALONG)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gram_matches_cpu_and_reference(shape, along):
    T, C = ops()
    for dtype, has_base in ((torch.float32, True), (torch.bfloat16, False), (torch.float16, True)):
        base, xs = inputs(shape, 3, dtype, seed=1)
        base = base if has_base else None
        got = T.gram(xs, ["a", "b", "c"], base=base, along=along)
        want = C.gram(xs, ["a", "b", "c"], base=base, along=along)
        exact, bound = gram_bound(xs, base, along)
        assert got.dtype == torch.float64 and got.shape == want.shape and got.device.type == "cpu"
        assert torch.equal(got, got.transpose(1, 2))
        assert ((got - exact).abs() <= bound).all(), (dtype, (got - exact).abs().max())
        assert ((got - want).abs() <= 2 * bound).all(), (dtype, (got - want).abs().max())


def test_gram_non_contiguous_and_many_pairs():
    """Transposed views equal their copies; K = 6 (21 pairs) runs in two pair launches."""
    T, C = ops()
    base, xs = inputs((9, 13), 6, seed=2, contiguous=False)
    assert not xs[0].is_contiguous()
    names = [f"x{k}" for k in range(6)]
    for along in ALONG:
        got = T.gram(xs, names, base=base, along=along)
        again = T.gram([x.contiguous() for x in xs], names, base=base.contiguous(), along=along)
        assert torch.equal(got, again)
        exact, bound = gram_bound(xs, base, along)
        assert ((got - exact).abs() <= bound).all()
        assert ((got - C.gram(xs, names, base=base, along=along)).abs() <= 2 * bound).all()


@pytest.mark.parametrize("along", ALONG)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_lincomb_bytes_equal_cpu(shape, along):
    T, C = ops()
    g = torch.Generator().manual_seed(3)
    from fastmerge.backends.cpu_methods import layout

    outer, _, inner = layout(shape, along)
    nvec = outer * inner
    for dtype, out_dtype, base_kind in ((torch.float32, torch.float32, "delta"),
                                        (torch.bfloat16, torch.bfloat16, "plain"),
                                        (torch.float16, torch.float32, "none"),
                                        (torch.bfloat16, torch.float16, "delta")):
        base, xs = inputs(shape, 3, dtype, seed=4)
        coef = torch.randn(nvec, 3, generator=g, dtype=torch.float64)
        bc = torch.randn(nvec, generator=g, dtype=torch.float64)
        kw = dict(out_dtype=out_dtype, along=along)
        if base_kind != "none":
            kw.update(base=base, base_coef=bc, delta=base_kind == "delta")
        got = T.lincomb(xs, ["a", "b", "c"], coef, **kw)
        want = C.lincomb(xs, ["a", "b", "c"], coef, **kw)
        assert got.dtype == out_dtype and got.shape == torch.Size(shape)
        assert torch.equal(bits(got), bits(want)), (dtype, out_dtype, base_kind)
        # and the readable formula in fp32 (c rounded to fp32 first, as both kernels do)
        if got.numel() and base_kind == "none":
            ref = sum(c.float() * x.float() for c, x in zip(_per_element(coef, shape, along), xs))
            torch.testing.assert_close(got, ref.to(out_dtype), atol=1e-5, rtol=1e-5)


def _per_element(coef, shape, along):
    """Coefficient k broadcast to each element of its vector (for the readable formula)."""
    from fastmerge.backends.cpu_methods import layout

    outer, length, inner = layout(shape, along)
    return [coef[:, k].float().reshape(outer, 1, inner).expand(outer, length, inner).reshape(shape)
            for k in range(coef.shape[1])]


def test_lincomb_scalars_and_non_contiguous():
    T, C = ops()
    base, xs = inputs((29, 31), 2, torch.bfloat16, seed=5, contiguous=False)
    for kw in (dict(), dict(base=base, base_coef=0.0), dict(base=base, base_coef=1.0, delta=True)):
        got = T.lincomb(xs, ["a", "b"], [0.3, -1.7], out_dtype=torch.bfloat16, **kw)
        want = C.lincomb(xs, ["a", "b"], [0.3, -1.7], out_dtype=torch.bfloat16, **kw)
        assert torch.equal(bits(got), bits(want)), kw


ELEMENTWISE = {
    "nearswap": lambda o, b, ms, od: o.nearswap(b, ms[0], t=0.02, out_dtype=od),
    "ram": lambda o, b, ms, od: o.ram(b, ms, epsilon=1e-3, out_dtype=od),
    "ramplus": lambda o, b, ms, od: o.ram(b, ms, epsilon=1e-3, out_dtype=od,
                                          amplify=lambda s, u: [1 + 0.1 * min(x / max(y, 1e-5), 0.2)
                                                                for x, y in zip(s, u)]),
    "scaled_copy": lambda o, b, ms, od: o.scaled_copy(ms[0], scale=0.37, out_dtype=od),
    "copy": lambda o, b, ms, od: o.scaled_copy(ms[0], scale=1.0, out_dtype=od),
    "ram_no_models": lambda o, b, ms, od: o.ram(b, [], epsilon=1e-3, out_dtype=od),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("kernel", list(ELEMENTWISE))
def test_elementwise_bytes_equal_cpu(kernel, dtype):
    T, C = ops()
    fn = ELEMENTWISE[kernel]
    for shape, seed in (((19, 53), 0), ((1031,), 1), ((), 2), ((0,), 3), ((2, 0, 3), 4)):
        b, ms = sparse_models(shape, 3, 0.5, seed=seed)
        b, ms = b.to(dtype), [m.to(dtype) for m in ms]
        for od in dict.fromkeys((dtype, torch.float32, torch.bfloat16)):
            got, want = fn(T, b, ms, od), fn(C, b, ms, od)
            assert got.dtype == od and got.shape == torch.Size(shape)
            assert torch.equal(bits(got), bits(want)), (shape, od)
    b, ms = sparse_models((41, 19), 3, 0.5, seed=5)
    views = [m.t() for m in ms]
    assert torch.equal(bits(fn(T, b.t(), views, dtype)), bits(fn(C, b.t(), views, dtype)))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nonfinite_names_the_input():
    """Each kernel flags inf/nan per input in its pass; the base is named first, then the
    models in order (cpu_methods' order)."""
    T, _ = ops()
    b, ms = sparse_models((19, 23), 3, 0.5, seed=6)
    calls = {
        "gram": lambda b, ms: T.gram(ms, ["models[0]", "models[1]", "models[2]"], base=b, along="first"),
        "lincomb": lambda b, ms: T.lincomb(ms, ["models[0]", "models[1]", "models[2]"], [1.0, 2.0, 3.0],
                                           base=b, base_coef=1.0, delta=True, out_dtype=torch.float32),
        "ram": lambda b, ms: T.ram(b, ms, epsilon=1e-3, out_dtype=torch.float32),
        "ramplus": lambda b, ms: T.ram(b, ms, epsilon=1e-3, out_dtype=torch.float32,
                                       amplify=lambda s, u: [1.0] * len(s)),
    }
    for name, fn in calls.items():
        for k, bad_value in ((2, float("nan")), (0, float("-inf")), (1, float("inf"))):
            bad = [m.clone() for m in ms]
            bad[k].view(-1)[7 * k + 3] = bad_value
            with pytest.raises(NonFiniteError, match=rf"models\[{k}\]"):
                fn(b, bad)
        bb = b.clone()
        bb.view(-1)[-1] = float("nan")
        bad = [m.clone() for m in ms]
        bad[1].view(-1)[0] = float("inf")
        with pytest.raises(NonFiniteError, match="base"):
            fn(bb, bad)
    x = ms[0].to(torch.bfloat16).clone()
    x[3, 4] = float("inf")
    with pytest.raises(NonFiniteError, match="models"):
        T.scaled_copy(x, scale=1.0, out_dtype=torch.bfloat16, name="models")
    with pytest.raises(NonFiniteError, match=r"models\[0\]"):
        T.nearswap(b, x.float(), t=0.1, out_dtype=torch.float32)


METHODS = [
    ("slerp", 1, True, dict(t=0.3)),
    ("nuslerp", 2, True, dict(weights=[0.3, 0.7])),
    ("nuslerp", 2, True, dict(weights=[0.6, 0.4], nuslerp_flatten=False)),
    ("nuslerp", 2, False, dict(weights=[0.6, 0.4], nuslerp_flatten=False, nuslerp_row_wise=True)),
    ("multislerp", 3, True, dict(weights=[0.3, 0.5, 0.2])),
    ("karcher", 3, False, dict()),
    ("model_stock", 3, True, dict()),
    ("model_stock", 3, True, dict(filter_wise=True)),
    ("nearswap", 1, True, dict(t=0.05)),
    ("ram", 3, True, dict(epsilon=0.03)),
    ("ramplus_tl", 3, True, dict(epsilon=0.03)),
    ("passthrough", 1, False, dict(scale=0.5)),
]
EXACT = ("nearswap", "ram", "ramplus_tl", "passthrough")  # no Gram pass: the cpu bytes


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name,K,with_base,params", METHODS,
                         ids=[f"{m[0]}-{i}" for i, m in enumerate(METHODS)])
def test_methods_on_triton(name, K, with_base, params, dtype):
    """fastmerge.merge(..., backend="triton") against backend="cpu" (bytes, or 1 ulp where a
    Gram feeds the coefficients) and against the torch reference (methods_testing's tolerance)."""
    from fastmerge import _registry

    assert {"cpu", "triton", "cuda"} <= set(_registry.get(name).kernels)
    for shape in ((37, 53), (129,)) if dtype == torch.float32 else ((19, 23),):
        b, ms = sparse_models(shape, K, 0.5, seed=7) if name.startswith("ram") else inputs(shape, K, seed=7)
        b = b.to(dtype) if with_base else None
        ms = [m.to(dtype) for m in ms]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fastmerge.merge(name, _to_dev(b), _to_dev(ms), backend="triton", **params).cpu()
            want = fastmerge.merge(name, b, ms, backend="cpu", **params)
            if DEV.type == "cpu":
                fused_matches(name, b, ms, backend="triton", **params)
        if name in EXACT:
            assert torch.equal(bits(got), bits(want)), shape
        else:
            assert_match(got, want, f"{name} {shape}")


def test_cuda_delegates_to_triton():
    assert backends.method_ops("cuda") is backends.method_ops("triton")
    assert fastmerge.backends()["cuda"]["delegates"] == {"methods": "triton"}
    with pytest.raises(ValueError, match="torch"):
        backends.method_ops("torch")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow warnings in the interpreter
def test_result_overflow_flagged_in_kernel():
    """Finite inputs whose result is inf/nan as stored (in fp32, or only after the rounding to
    fp16/bf16) raise the overflow error from the kernel's own result flag."""
    T, _ = ops()
    assert backends.method_ops("triton").RESULT_CHECKED
    x = torch.full((7, 9), 3.0e38)
    cases = [
        lambda: T.scaled_copy(x, scale=2.0, out_dtype=torch.float32),
        lambda: T.scaled_copy(torch.full((5,), 3.397e38), scale=1.0, out_dtype=torch.bfloat16),  # rounds up to inf
        lambda: T.scaled_copy(torch.full((300,), 7.0e4), scale=1.0, out_dtype=torch.float16),
        lambda: T.lincomb([x, x], ["a", "b"], [1.0, 1.0], out_dtype=torch.float32),
        lambda: T.lincomb([x[:, :1], x[:, :1]], ["a", "b"], torch.ones(7, 2, dtype=torch.float64),
                          out_dtype=torch.float32, along="last"),
        lambda: T.ram(-x, [x, x], epsilon=1e-5, out_dtype=torch.float32),  # x - (-x) overflows
        lambda: T.nearswap(torch.full((5,), 1.0e5), torch.full((5,), 2.0e5), t=1.0, out_dtype=torch.float16),
    ]
    for i, fn in enumerate(cases):
        with pytest.raises(NonFiniteError, match="overflow") as exc:
            fn()
        assert exc.value.overflow, i
    # at the edge, still finite: no error
    assert T.scaled_copy(torch.full((5,), 3.38e38), scale=1.0, out_dtype=torch.bfloat16).isfinite().all()
    assert T.scaled_copy(torch.full((5,), 6.5e4), scale=1.0, out_dtype=torch.float16).isfinite().all()


# ---- sce (triton_kernels/sce.py; triton_methods.sce, cpu_methods.sce's signature) -----------

def _sce_inputs(shape, K, dtype, seed):
    b, ms = sparse_models(shape, K, 0.6, seed=seed)
    return b.to(dtype), [m.to(dtype) for m in ms]


@pytest.mark.parametrize("K", [1, 3, 5])
def test_sce_variance_and_top_k_are_the_reference_selection(K):
    """The variance pass gives torch.var's bytes (Welford in double), and the exact top-k on it
    keeps the reference's elements (ties to the lowest index: bf16 inputs make many ties)."""
    from fastmerge.backends.triton import kernels
    from fastmerge.backends.triton_methods import _sce_threshold
    from fastmerge.methods.sce import select_mask

    b, ms = _sce_inputs((37, 53), K, torch.bfloat16, seed=K)
    deltas = [m.float() - b.float() for m in ms]
    bd, md = _to_dev(b), _to_dev(ms)
    var, res = kernels().sce_variance(bd, md, n=b.numel())
    want = torch.var(torch.stack(deltas), dim=0, unbiased=False).reshape(-1)
    assert torch.equal(var.cpu(), want) and res.tolist()[0] == int(torch.count_nonzero(want))
    for topk in (0.3, 0.77):
        mode, v, thr = _sce_threshold(kernels(), bd, md, b.numel(), topk)
        keep = select_mask(deltas, topk).reshape(-1)
        if not keep.any():
            assert mode == 2
            continue
        T, J = thr.tolist()
        key = v.cpu().view(torch.int32).long() & 0x7FFFFFFF
        i = torch.arange(key.numel())
        assert torch.equal((key > T) | ((key == T) & (i <= J)), keep), topk


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_sce_matches_reference(dtype):
    """Within fp32 round-off of the reference (the weights come from float64 energies where the
    reference's fp32 mean rounds differently), on odd shapes, 1-D, 0-d, empty, K = 1 and none."""
    from fastmerge.methods.sce import reference

    T, _ = ops()
    for shape, K, seed in (((37, 53), 3, 0), ((129,), 2, 1), ((), 3, 2), ((0,), 2, 3), ((7, 5), 1, 4),
                           ((9, 11), 0, 5)):
        b, ms = _sce_inputs(shape, max(K, 1), dtype, seed)
        ms = ms[:K]
        for topk in (1.0, 0.4, 0.0, 0.95):
            got = T.sce(b, ms, select_topk=topk, out_dtype=dtype)
            want = reference(b, ms, select_topk=topk).to(dtype)
            _sce_close(got, want, dtype, f"{shape} K={K} topk={topk}")
    b, ms = _sce_inputs((19, 23), 3, dtype, 6)
    views = [m.t() for m in ms]
    _sce_close(T.sce(b.t(), views, select_topk=0.5, out_dtype=torch.float32),
               reference(b.t(), views, select_topk=0.5), torch.float32, "non-contiguous")


def _sce_close(got, want, dtype, what):
    """fp32 round-off of the weights, then at most one rounding step of ``dtype``."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=2 * torch.finfo(dtype).eps,
                               msg=what)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_sce_nonfinite_names_the_input():
    T, _ = ops()
    b, ms = _sce_inputs((19, 23), 3, torch.float32, 7)
    for topk in (1.0, 0.5):
        for k in range(3):
            bad = [m.clone() for m in ms]
            bad[k][2, k] = float("nan")
            with pytest.raises(NonFiniteError, match=rf"models\[{k}\]"):
                T.sce(b, bad, select_topk=topk, out_dtype=torch.float32)
        bb = b.clone()
        bb[0, 0] = float("inf")
        with pytest.raises(NonFiniteError, match="base"):
            T.sce(bb, ms, select_topk=topk, out_dtype=torch.float32)


# ---- arcee_fusion (triton_kernels/arcee_fusion.py; cpu_methods.arcee_fusion's signature) -----

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_arcee_fusion_matches_reference(dtype):
    """The importance within fp32 round-off of the reference's, and the merge equal to the
    reference's but for elements whose importance lies within round-off of the threshold (at
    most 0.1%; none in the interpreter, whose exp and log are numpy's): rows longer than one
    block (3x1500), odd shapes, 1-D, 0-d, empty, non-contiguous."""
    from conftest import assert_close_frac

    from fastmerge.backends.triton import kernels
    from fastmerge.methods.arcee_fusion import importance, reference

    T, _ = ops()
    g = torch.Generator().manual_seed(8)
    for shape in ((37, 53), (3, 1500), (129,), (), (0,), (4, 3, 5)):
        b = torch.randn(shape, generator=g)
        m = (b + 0.3 * torch.randn(shape, generator=g)).to(dtype)
        b = b.to(dtype)
        got = T.arcee_fusion(b, m, out_dtype=dtype)
        want = reference(b, [m]).to(dtype)
        assert got.dtype == dtype and got.shape == torch.Size(shape)
        assert_close_frac(got, want, atol=0, rtol=0, max_frac=0.001, msg=str(shape))
        if b.numel():
            length = shape[-1] if shape else 1
            s, _ = kernels().arcee_importance(_to_dev(b), _to_dev(m), rows=b.numel() // length, length=length)
            torch.testing.assert_close(s.cpu().reshape(shape), importance(m.float(), b.float()),
                                       rtol=1e-4, atol=1e-7)
    b = torch.randn(23, 19, generator=g).to(dtype)
    m = (b.float() + 0.3 * torch.randn(23, 19, generator=g)).to(dtype)
    assert_close_frac(T.arcee_fusion(b.t(), m.t(), out_dtype=torch.float32),
                      reference(b.t(), [m.t()]), atol=0, rtol=0, max_frac=0.001)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_arcee_fusion_nonfinite_names_the_input():
    T, _ = ops()
    b = torch.randn(9, 11)
    m = b + 0.1
    bad = m.clone()
    bad[4, 5] = float("inf")
    with pytest.raises(NonFiniteError, match=r"models\[0\]"):
        T.arcee_fusion(b, bad, out_dtype=torch.float32)
    bb = b.clone()
    bb[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="base"):
        T.arcee_fusion(bb, bad, out_dtype=torch.float32)
