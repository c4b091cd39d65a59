"""The cpu kernels of mergekit's other methods (csrc/gram.cpp, csrc/lincomb.cpp, driven by
fastmerge/backends/cpu_methods.py) against torch: every layout, odd and empty shapes, every
dtype, strided inputs, thread-count independence, inf/nan flags.

Elements past 2^31 are not testable here (16 GiB of fp32 per input); the kernels index with
int64_t throughout: flat offsets ``(o * length + l) * inner + i`` and block starts are int64_t,
only offsets inside a 512-element block are int (csrc/gram.h)."""
from __future__ import annotations

import pytest
import torch

from fastmerge import backends
from fastmerge._validate import NonFiniteError

pytestmark = pytest.mark.skipif(not backends.module("cpu").status()["available"],
                                reason="native CPU module not built")
C = backends.method_ops("cpu")

SHAPES = [(37, 53), (1, 9), (129,), (3, 4, 5), (), (0,), (0, 5), (5, 0), (2, 1300), (1500, 3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(K)]
    return base.to(dtype), [x.to(dtype) for x in xs]


def _vectors(t: torch.Tensor, along: str) -> torch.Tensor:
    """``[nvec, length]``: the vectors of the layout, by torch's reshape and permute."""
    o, n, i = C.layout(t.shape, along)
    return t.reshape(o, n, i).permute(0, 2, 1).reshape(o * i, n)


def _unvectors(v: torch.Tensor, shape, along: str) -> torch.Tensor:
    o, n, i = C.layout(shape, along)
    return v.reshape(o, i, n).permute(0, 2, 1).reshape(shape)


def _gram_torch(xs, base, along):
    ds = [x.float() - (0 if base is None else base.float()) for x in xs]
    vs = torch.stack([_vectors(d, along).double() for d in ds], dim=1)  # [nvec, K, length]
    return vs @ vs.transpose(1, 2)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("along", ["all", "last", "first"])
@pytest.mark.parametrize("with_base", [True, False], ids=["delta", "raw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_matches_torch(shape, along, with_base, dtype):
    base, xs = _inputs(shape, 3, dtype)
    b = base if with_base else None
    got = C.gram(xs, ["x0", "x1", "x2"], base=b, along=along)
    want = _gram_torch(xs, b, along)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got, got.transpose(1, 2))


@pytest.mark.parametrize("K", [1, 2, 5, 9])
def test_gram_many_inputs(K):
    base, xs = _inputs((67, 41), K)
    for along in ("all", "last", "first"):
        got = C.gram(xs, [f"x{k}" for k in range(K)], base=base, along=along)
        torch.testing.assert_close(got, _gram_torch(xs, base, along), rtol=1e-12, atol=1e-12)


def test_gram_long_vector_and_thread_count():
    """Several chunks per vector (64 * 512 elements each): the sums are the same bits on any
    thread count, and equal to float64 torch."""
    base, xs = _inputs((3 * 2 ** 17 + 77,), 3)
    rows_base, rows = _inputs((5, 40000 + 3), 3)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((C.gram(xs, ["a", "b", "c"], base=base),
                            C.gram(rows, ["a", "b", "c"], base=rows_base, along="last"),
                            C.gram(rows, ["a", "b", "c"], along="first")))
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        for got, first in zip(r, results[0]):
            assert torch.equal(got, first)
    torch.testing.assert_close(results[0][0], _gram_torch(xs, base, "all"), rtol=1e-12, atol=0)


def test_gram_strided_inputs():
    base, xs = _inputs((53, 37), 2)
    views = [x.t() for x in xs]
    got = C.gram(views, ["a", "b"], base=base.t(), along="last")
    torch.testing.assert_close(got, _gram_torch([v.contiguous() for v in views], base.t(), "last"),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("along", ["all", "last", "first"])
@pytest.mark.parametrize("delta", [True, False])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("shape", [(37, 53), (129,), (3, 4, 5), (), (0, 5), (5, 0), (700, 3)], ids=str)
def test_lincomb_matches_torch(along, delta, dtype, out_dtype, shape):
    """fp32 math in input order, rounded once: bit-equal to the same torch expression."""
    base, xs = _inputs(shape, 3, dtype)
    nvec = _vectors(torch.empty(shape), along).shape[0]
    g = torch.Generator().manual_seed(1)
    coef = torch.randn(nvec, 3, generator=g, dtype=torch.float64)
    cb = torch.randn(nvec, generator=g, dtype=torch.float64)
    got = C.lincomb(xs, ["a", "b", "c"], coef, base=base, base_coef=cb, delta=delta, along=along,
                    out_dtype=out_dtype)
    b = _vectors(base.float(), along)
    vs = [_vectors(x.float(), along) - (b if delta else 0) for x in xs]
    c, cbf = coef.float(), cb.float()
    acc = c[:, :1] * vs[0]
    for k in (1, 2):
        acc = acc + c[:, k:k + 1] * vs[k]
    acc = acc + cbf[:, None] * b
    want = _unvectors(acc, shape, along)
    assert got.dtype == out_dtype and got.shape == torch.Size(shape)
    assert torch.equal(got, want.to(out_dtype))


def test_lincomb_scalar_coefficients_no_base():
    _, xs = _inputs((1000, 7), 2)
    got = C.lincomb(xs, ["a", "b"], [0.25, -2.0], out_dtype=torch.float32)
    assert torch.equal(got, 0.25 * xs[0] + -2.0 * xs[1])


@pytest.mark.parametrize("kernel", ["gram", "lincomb"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_flags_name_the_input(kernel, bad, dtype):
    base, xs = _inputs((300, 700), 3, dtype)  # several blocks: the flag comes from a late one

    def call(b, ys):
        if kernel == "gram":
            return C.gram(ys, ["m0", "m1", "m2"], base=b, along="last")
        return C.lincomb(ys, ["m0", "m1", "m2"], [1.0, 1.0, 1.0], base=b, base_coef=1.0,
                         delta=True, out_dtype=torch.float32)

    call(base, xs)
    for k in range(3):
        ys = [x.clone() for x in xs]
        ys[k][299, 698] = bad
        with pytest.raises(NonFiniteError, match=f"m{k}"):
            call(base, ys)
    b = base.clone()
    b[150, 3] = bad
    ys = [x.clone() for x in xs]
    ys[0][0, 0] = bad
    with pytest.raises(NonFiniteError, match="base"):  # the base is named first
        call(b, ys)


def test_layout():
    assert C.layout((4, 5, 6), "all") == (1, 120, 1)
    assert C.layout((4, 5, 6), "last") == (20, 6, 1)
    assert C.layout((4, 5, 6), "first") == (1, 4, 30)
    assert C.layout((), "last") == (1, 1, 1)
    assert C.layout((0, 5), "last") == (0, 5, 1)
    with pytest.raises(ValueError, match="along"):
        C.layout((3,), "rows")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_lincomb_flags_an_overflowing_result(out_dtype):
    """Finite inputs, a result past the output dtype's range: the kernel's result flag (fp32) or
    the scan of a rounded fp16/bf16 output raises the overflow error (no check_result pass)."""
    x = torch.full((3, 700), 2.0)
    big = {torch.float32: 3e38, torch.float16: 1e5, torch.bfloat16: 3e38}[out_dtype]
    with pytest.raises(NonFiniteError, match="overflow"):
        C.lincomb([x], ["x"], [big], out_dtype=out_dtype)
    assert torch.equal(C.lincomb([x], ["x"], [0.5], out_dtype=out_dtype), torch.ones(3, 700, dtype=out_dtype))


def test_gram_same_bits_on_both_isa_builds():
    """The AVX2 module's register-blocked fma loop and the baseline module's generic loop give
    the same Gram, bit for bit, at every thread count (exact products, one summation order)."""
    import importlib

    from fastmerge import abi
    mods = []
    for name in ("fastmerge._C", "fastmerge._C_avx2"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    if len(mods) < 2:
        pytest.skip("needs both native builds")
    base, xs = _inputs((70001,), 4)
    for b in (base, None):
        outs = []
        for m in mods:
            for nt in (1, 2, 3):
                out = torch.empty(1, 4, 4, dtype=torch.float64)
                m.gram(0 if b is None else b.data_ptr(), [x.data_ptr() for x in xs], abi.dtype_code(torch.float32),
                       1, 70001, 1, out.data_ptr(), nt)
                outs.append(out)
        assert all(torch.equal(outs[0], o) for o in outs[1:])
