"""Issue 16, numerics: nothing non-finite leaves fastmerge silently.

* SVD merges (``tsv``, ``iso_c``, ``iso_cts``) detect inf/nan in tensors that are not 2-D
  (biases, norms: averaged, no SVD) and name the input, as the 2-D path does.
* Numbers that are finite in float64 but not in float32 (``weights=[1e300]``, ``lam=1e300``)
  are refused, naming the argument: the kernels compute in fp32.
* A result that overflows from finite inputs is reported on every backend (``NonFiniteError``
  for "the merged tensor"), on the fused fast paths too.
* ``linear`` weights whose fp32 sum (the divisor the kernels use) is 0 are refused even when
  their float64 sum is not.
* torchao-layout INT4 of a group spanning +-3e38 (an inf scale) raises the same ValueError on
  every backend; FP8 of an empty tensor gives the reference's scales on every backend.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastmerge
from conftest import BACKENDS, make_models
from fastmerge import ops, quant
from fastmerge._validate import NonFiniteError

INF, NAN = float("inf"), float("nan")
# every backend that runs on CPU tensors here; triton in its interpreter (tiny shapes only)
FUSED = BACKENDS + (["triton"] if fastmerge.backends()["triton"].get("interpreter") else [])
SVD = ("tsv", "iso_c", "iso_cts")
GTA = [m for m in fastmerge.METHODS if fastmerge._registry.get(m).family in ("gta", "linear")]


def _merge(method, base, models, backend, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the interpreter's and DELLA's unrelated warnings
        if method in ("dare_ties", "dare_linear", "della", "della_linear"):
            kw.setdefault("seed", 3)
            kw.setdefault("density", 0.5)
        if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
            kw.setdefault("density", 0.5)
        return fastmerge.merge(method, base, models, backend=backend, **kw)


# ---------------------------------------------------------------- 1. SVD merges, every rank

@pytest.mark.parametrize("exact", [False, True], ids=["sketch", "exact"])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (), (6, 5)], ids=["1d", "3d", "0d", "2d"])
@pytest.mark.parametrize("value", [INF, -INF, NAN], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("bad", ["base", "models[1]"])
@pytest.mark.parametrize("method", SVD)
def test_svd_merges_name_nonfinite_input_of_any_rank(method, bad, value, shape, exact):
    base, models = make_models(shape, K=3)
    target = base if bad == "base" else models[1]
    target.view(-1)[-1] = value
    with pytest.raises(NonFiniteError) as info:
        fastmerge.merge(method, base, models, exact=exact, seed=0)
    assert info.value.argument == bad
    assert bad in str(info.value)


@pytest.mark.parametrize("shape", [(7,), (6, 5)], ids=["1d", "2d"])
@pytest.mark.parametrize("method", SVD)
def test_svd_merges_report_overflow_from_finite_inputs(method, shape):
    base = torch.full(shape, 3e38)
    models = [torch.full(shape, -3e38), torch.full(shape, -3e38)]  # deltas -6e38: inf in fp32
    with pytest.raises(NonFiniteError, match="overflows") as info:
        fastmerge.merge(method, base, models, seed=0)
    assert info.value.argument == "the merged tensor"


@pytest.mark.parametrize("method", SVD)
def test_svd_merged_delta_names_the_task_vector(method):
    from fastmerge import lowrank

    tvs = [torch.randn(9) for _ in range(3)]
    tvs[2][4] = NAN
    with pytest.raises(NonFiniteError) as info:
        lowrank.merged_delta(method, tvs)
    assert info.value.argument == "task_vectors[2]"


# ------------------------------------------------- 2. numbers beyond fp32, overflowing results

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "linear", "dare_linear", "tsv"])
def test_weights_beyond_fp32_are_refused_naming_them(method, backend):
    base, models = make_models((8, 8), K=2)
    assert 1e300 != float("inf")  # finite in float64, inf in float32
    with pytest.raises(ValueError, match=r"weights\[0\].*float32") as info:
        _merge(method, base, models, backend, weights=[1e300, 1.0])
    assert not isinstance(info.value, NonFiniteError)
    with pytest.raises(ValueError, match=r"^weights = .*float32"):
        _merge(method, base, models, backend, weights=-1e39)


@pytest.mark.parametrize("arg", ["lam", "alpha", "threshold"])
def test_scalars_beyond_fp32_are_refused_naming_them(arg):
    base, models = make_models((8, 8), K=2)
    method = {"lam": "task_arithmetic", "alpha": "tsv", "threshold": "ties"}[arg]
    with pytest.raises(ValueError, match=rf"^{arg}.*float32"):
        fastmerge.merge(method, base, models, **{arg: 1e300})


def test_largest_fp32_numbers_are_still_accepted():
    base, models = make_models((4, 4), K=1)
    big = float(torch.finfo(torch.float32).max)
    out = fastmerge.merge("task_arithmetic", base, [base.clone()], weights=[big], lam=1e-30)
    torch.testing.assert_close(out, base)


def _overflowing(dtype, shape=(4, 16)):
    """Finite inputs whose merge overflows once weighted: deltas of magnitude ~10-20."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g)
    models = [base + 10 + 10 * torch.rand(shape, generator=g) for _ in range(3)]
    return base.to(dtype), [m.to(dtype) for m in models]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("method", GTA)
def test_overflow_from_finite_inputs_is_reported(method, backend, dtype):
    base, models = _overflowing(dtype)
    for t in [base, *models]:
        assert bool(torch.isfinite(t).all())
    with pytest.raises(NonFiniteError, match="overflows") as info:
        _merge(method, base, models, backend, weights=[3e38] * 3, normalize=False)
    assert info.value.argument == "the merged tensor"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties"])
def test_overflow_when_rounding_to_the_output_dtype_is_reported(method, backend):
    # fp32 sums of 50000-ish values are fine in fp32 but beyond fp16's 65504
    base = torch.zeros(4, 16)
    models = [torch.full((4, 16), 50000.0), torch.full((4, 16), 40000.0)]
    ref = _merge(method, base, models, "torch", normalize=False)
    assert bool(torch.isfinite(ref).all())  # fp32 output: finite
    with pytest.raises(NonFiniteError, match="overflows"):
        _merge(method, base, models, backend, normalize=False, out_dtype=torch.float16)


@pytest.mark.parametrize("backend", FUSED)
def test_disjoint_merge_overflow_is_reported(backend):
    tensors = [torch.full((4, 8), 3e38), torch.full((4, 8), 3e38)]
    sign = ops.elect_sign(tensors, backend=backend)
    with pytest.raises(NonFiniteError, match="overflows"):
        ops.disjoint_merge(tensors, sign, [1.0, 1.0], divisor="weight", backend=backend)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("method", GTA)
def test_finite_merges_still_pass_the_output_check(method, backend):
    base, models = make_models((4, 16), K=3, dtype=torch.bfloat16)
    out = _merge(method, base, models, backend, weights=[1.0, 0.5, 0.25])
    torch.testing.assert_close(out, _merge(method, base, models, "torch", weights=[1.0, 0.5, 0.25]),
                               atol=2e-2, rtol=2 ** -6)


# ------------------------------------------------------------------ 3. linear's fp32 weight sum

@pytest.mark.parametrize("backend", FUSED)
def test_linear_weights_cancelling_in_fp32_are_refused(backend):
    w = [1e8, -99999999.0]
    assert sum(w) == 1.0  # float64: not zero
    assert float(torch.tensor(w[0], dtype=torch.float32) + torch.tensor(w[1], dtype=torch.float32)) == 0.0
    _, models = make_models((4, 8), K=2)
    with pytest.raises(ValueError, match="weights.*sum to zero in float32") as info:
        _merge("linear", None, models, backend, weights=w)
    assert not isinstance(info.value, NonFiniteError)
    # without normalize there is no division: a finite result
    out = _merge("linear", None, models, backend, weights=w, normalize=False)
    assert bool(torch.isfinite(out).all())


# ----------------------------------------------------------------------------- 4. quantizers

def _spanning_group(dtype):
    w = torch.zeros(8, 128, dtype=dtype)
    w[0, 0], w[0, 1] = 3e38, -3e38  # (max - min) / 15 overflows fp32
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torchao_int4_of_a_group_beyond_fp32_raises_the_same_error_everywhere(dtype):
    w = _spanning_group(dtype)
    messages = set()
    for backend in FUSED:
        with pytest.raises(ValueError, match="group whose range") as info:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant.quantize_int4(w, layout="torchao", backend=backend)
        assert not isinstance(info.value, NonFiniteError)
        messages.add(str(info.value))
        with pytest.raises(ValueError, match="the merged tensor has a group whose range"):
            _merge("task_arithmetic", torch.zeros_like(w), [w], backend,
                   quantize=quant.Int4Config(layout="torchao"))
    assert len(messages) == 1 and "w has a group" in messages.pop()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torchao_int4_symmetric_and_gptq_of_large_groups_unchanged(dtype):
    # the symmetric scale amax / 8 is finite: no error, and every backend agrees
    w = _spanning_group(dtype)
    ref = quant.quantize_int4(w, layout="torchao", symmetric=True, backend="torch")
    for backend in FUSED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = quant.quantize_int4(w, layout="torchao", symmetric=True, backend=backend)
        for a, b in zip(out.tensors().values(), ref.tensors().values()):
            assert torch.equal(a, b), backend


EMPTY = [(0, 4), (3, 0), (0,), (2, 0, 5)]


@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
@pytest.mark.parametrize("shape", EMPTY, ids=lambda s: "x".join(map(str, s)))
def test_fp8_of_an_empty_tensor_follows_the_reference(shape, granularity):
    if granularity == "block" and len(shape) != 2:
        pytest.skip("block FP8 is 2-D")
    cfg = quant.FP8Config(granularity)
    w = torch.zeros(shape)
    q_ref, s_ref = quant.quantize_fp8(w, granularity=granularity, backend="torch")
    for backend in FUSED:
        for _ in range(3):  # fresh allocations: uninitialised memory would differ between calls
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q, s = quant.quantize_fp8(w, granularity=granularity, backend=backend)
                q2, s2 = _merge("task_arithmetic", w, [w], backend, quantize=cfg)
            for qq, ss in ((q, s), (q2, s2)):
                assert qq.shape == q_ref.shape and qq.dtype == q_ref.dtype
                assert torch.equal(ss, s_ref), (backend, ss, s_ref)


@pytest.mark.parametrize("method", ["bitdelta", "ternary", "int4", "fp8"])
def test_compressed_delta_that_overflows_is_reported(method):
    base = torch.full((8, 128), -3e38)
    finetuned = torch.full((8, 128), 3e38)  # both finite, the fp32 delta 6e38 is not
    with pytest.raises(NonFiniteError, match="overflows"):
        quant.compress_delta(base, finetuned, method=method)


def test_mergekit_methods_report_an_overflow_of_their_result():
    """mergekit's other methods (fastmerge/methods): finite inputs whose result overflows the
    output dtype are reported, not written as inf."""
    base = torch.zeros(4, 16)
    model = torch.full((4, 16), 1e5)
    with pytest.raises(NonFiniteError, match="overflows"):
        fastmerge.merge("nearswap", base, [model], t=1e6, out_dtype=torch.float16)
    with pytest.raises(NonFiniteError, match="overflows"):
        fastmerge.merge("passthrough", None, [model], scale=1e34)
