"""Shared checks of the tests of ``fastmerge.methods`` (``tests/test_<method>.py``): each
method's reference against mergekit 0.1.5's own ``merge_tensors``.

The acceptance of issue 17: at least 99.9% of the elements within rtol 1e-4 on random fp32
data (``FRAC``, ``RTOL``; ``ATOL`` for the elements near zero). bf16/fp16 inputs: our fp32
compute on them against mergekit on their fp32 upcast, both rounded to the input dtype and
compared with conftest's ``DTYPES`` tolerances.
"""
from __future__ import annotations

import importlib
import inspect
import re
from unittest import mock

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, assert_close_frac, make_models, mergekit_merge

import fastmerge
from fastmerge._validate import NonFiniteError

FRAC, RTOL, ATOL = 0.001, 1e-4, 1e-6
SHAPES = [(37, 53), (1, 9), (129,), (3, 4, 5), ()]
SHAPE_IDS = ["37x53", "1x9", "1d", "3d", "0d"]
LOW = [d for d in DTYPES if d[0] != torch.float32]
LOW_IDS = [i for i in DTYPE_IDS if i != "fp32"]


def sparse_models(shape, K, density=0.3, *, seed=0):
    """``(base, models)`` whose deltas are nonzero (and above 1e-3) on about ``density`` of
    the elements, each model its own random support: unique and shared changes both occur."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(K):
        keep = torch.rand(shape, generator=g) < density
        delta = (0.01 + 0.05 * torch.rand(shape, generator=g)) * torch.randn(shape, generator=g).sign()
        models.append(base + delta * keep)
    return base, models


def method(name):
    return importlib.import_module(f"fastmerge.methods.{name}")


def mk_params(params: dict) -> dict:
    """Our keyword arguments under mergekit's names (its per-model ``weight``)."""
    return {("weight" if k == "weights" else k): v for k, v in params.items()}


# the fused kernels against the reference: fp32 round-off (far inside issue 17's rtol 1e-4)
FUSED_FP32 = dict(atol=1e-6, rtol=2e-5, max_frac=FRAC)


def fused_matches(name, base, models, *, backend="cpu", out_dtype=None, **params):
    """Where the method has fused kernels on ``backend``: ``fastmerge.merge(name, ...,
    backend=backend)`` equals the reference (both in ``out_dtype``, default the inputs' dtype)
    within fp32 round-off; returns the fused result (None for a method without kernels)."""
    if backend not in getattr(method(name), "KERNELS", ()) and backend != "auto":
        return None
    ref = models[0] if base is None else base
    dtype = out_dtype or ref.dtype
    try:
        want = method(name).reference(base, models, **params).to(dtype)
    except ValueError as exc:  # the fused plan refuses the same inputs alike
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            fastmerge.merge(name, base, models, backend=backend, out_dtype=dtype, **params)
        return None
    got = fastmerge.merge(name, base, models, backend=backend, out_dtype=dtype, **params)
    tol = FUSED_FP32 if dtype == torch.float32 else next(
        dict(atol=a, rtol=r, max_frac=FRAC) for d, a, r in DTYPES if d == dtype)
    try:
        assert_close_frac(got, want, msg=f"{name} fused ({backend}) vs reference", **tol)
    except AssertionError:
        # an ill-conditioned case (cosines near +-1): the fp32 reference is off by more than
        # fp32 round-off there, so the fused result must then match the reference in float64
        assert_close_frac(got, reference_fp64(name, base, models, **params).to(dtype),
                          msg=f"{name} fused ({backend}) vs the float64 reference", **tol)
    return got


def reference_fp64(name, base, models, **params):
    """The method's reference computed in float64 (its inputs upcast to double, not fp32)."""
    mod = method(name)
    fp32_inputs = mod.inputs

    def fp64_inputs(*args):
        b, ms = fp32_inputs(*args)
        return (None if b is None else b.double()), [m.double() for m in ms]

    with mock.patch.object(mod, "inputs", fp64_inputs):
        return mod.reference(base, models, **params)


def against_mergekit(name, base, models, *, max_frac=FRAC, atol=ATOL, rtol=RTOL, fused=True,
                     **params):
    """Our reference and mergekit on the same inputs, and (unless not ``fused``) the fused
    kernels, where the method has them, against our reference; returns ours."""
    if fused:
        fused_matches(name, base, models, **params)
    got = method(name).reference(base, models, **params)
    expected = mergekit_merge(name, base, models, **mk_params(params))
    assert got.dtype == torch.float32
    assert_close_frac(got, expected.float(), atol=atol, rtol=rtol, max_frac=max_frac, msg=name)
    return got


def random_case(name, shape, K, *, base=True, seed=0, scale=0.05, **params):
    """:func:`against_mergekit` on ``make_models(shape, K)`` (without the base if not ``base``)."""
    b, ms = make_models(shape, K, seed=seed, scale=scale)
    return against_mergekit(name, b if base else None, ms, **params)


def low_precision(name, K, dtype, atol, rtol, *, base=True, max_frac=FRAC, **params):
    """bf16/fp16 inputs: our fp32 result against mergekit on the fp32 upcast."""
    b, ms = make_models((37, 53), K, dtype)
    b = b if base else None
    got = method(name).reference(b, ms, **params)
    assert got.dtype == torch.float32 and got.shape == ms[0].shape
    fused_matches(name, b, ms, **params)
    fused_matches(name, b, ms, out_dtype=torch.float32, **params)
    expected = mergekit_merge(name, None if b is None else b.float(), [m.float() for m in ms],
                              **mk_params(params))
    assert_close_frac(got.to(dtype), expected.to(dtype), atol=atol, rtol=rtol, max_frac=max_frac)


def non_contiguous(name, K, *, base=True, **params):
    """Transposed views give what their contiguous copies give (mergekit on the copies)."""
    b, ms = make_models((53, 37), K)
    views = [m.t() for m in ms]
    bv = b.t() if base else None
    assert not views[0].is_contiguous()
    got = against_mergekit(name, bv, views, **params)
    again = method(name).reference(None if bv is None else bv.contiguous(),
                                   [v.contiguous() for v in views], **params)
    torch.testing.assert_close(got, again, atol=ATOL, rtol=1e-5)


def input_errors(name, K, **params):
    """The contract's errors: missing or unwanted base, model counts, non-finite values,
    mismatched shapes, unsupported dtypes; each names the argument. The same from the fused
    plan on every backend that has one (its kernels flag the non-finite values)."""
    mod = method(name)
    _input_errors(mod, K, mod.reference, **params)
    for backend in cpu_tensor_backends(getattr(mod, "KERNELS", ())):
        ops = fastmerge.backends.method_ops(backend)

        def fused(b, ms, **p):
            return mod.fused(ops, b, ms, out_dtype=torch.float32, **p)

        _input_errors(mod, K, fused, **params)


def cpu_tensor_backends(kernels) -> list:
    """The backends of a method's ``KERNELS`` whose kernels run on CPU tensors here: ``cpu``, and
    ``triton`` in its interpreter (``cuda`` runs these methods on triton's kernels)."""
    run = ["cpu"] + (["triton"] if fastmerge.backends()["triton"].get("interpreter") else [])
    return [b for b in kernels if b in run]


def _input_errors(mod, K, ref, **params):
    c = mod.CONTRACT
    b, ms = make_models((5, 7), K)
    base = b if c["base"] != "none" else None
    if c["base"] == "required":
        with pytest.raises(ValueError, match="base"):
            ref(None, ms, **params)
    if c["base"] == "none":
        with pytest.raises(TypeError, match="base"):
            ref(b, ms, **params)
    if c["min_models"] > 0:
        with pytest.raises(ValueError, match="models"):
            ref(base, ms[: c["min_models"] - 1], **params)
    if c["max_models"] is not None:
        with pytest.raises(ValueError, match="models"):
            ref(base, ms + [ms[0]] * (c["max_models"] + 1 - len(ms)), **params)
    bad = ms[0].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"models\[0\]"):
        ref(base, [bad] + ms[1:], **params)
    if base is not None:
        with pytest.raises(NonFiniteError, match="base"):
            ref(torch.full_like(b, float("inf")), ms, **params)
    if base is not None or len(ms) > 1:
        with pytest.raises(ValueError, match="shape"):
            ref(base, ms[:-1] + [ms[-1][:, :3]], **params)
    with pytest.raises(TypeError, match="dtype"):
        ref(base, ms[:-1] + [ms[-1].double()], **params)
    with pytest.raises(TypeError, match="models"):
        ref(base, ms[0], **params)


_POLICY = {"required": "required", "optional": "optional"}


def contract_matches_mergekit(name):
    """``PARAMS`` are mergekit's parameters and defaults (its ``weight`` as ``weights``), the
    reference's keyword arguments are ``PARAMS``, and ``CONTRACT`` is mergekit's input contract
    where mergekit's base policy is required or optional (karcher and passthrough ignore the
    base flag; their tests state their contracts)."""
    from mergekit.merge_methods import get
    from mergekit.merge_methods.base import MISSING

    mod = method(name)
    spec = get(name).spec
    expected = {("weights" if p.name == "weight" else p.name):
                (inspect.Parameter.empty if p.default is MISSING else p.default)
                for p in spec.parameters}
    assert mod.PARAMS == expected
    sig = inspect.signature(mod.reference).parameters
    assert list(sig)[:2] == ["base", "models"]
    assert {k: p.default for k, p in sig.items() if p.kind is p.KEYWORD_ONLY} == mod.PARAMS
    c, policy = spec.contract, spec.contract.base.value
    assert set(mod.CONTRACT) == {"base", "min_models", "max_models"}
    if policy in _POLICY:
        has = int(policy == "required")
        assert mod.CONTRACT["base"] == policy
        assert mod.CONTRACT["min_models"] == max(c.min_inputs - has, c.min_non_base or 0)
        hi = [x for x in (None if c.max_inputs is None else c.max_inputs - has, c.max_non_base)
              if x is not None]
        assert mod.CONTRACT["max_models"] == (min(hi) if hi else None)
    return spec


def standard_tests(name, K, *, base=True, **params):
    """The checks every method's test file runs, as pytest functions to bind at module level:
    ``globals().update(standard_tests(...))``."""

    def test_contract():
        contract_matches_mergekit(name)

    @pytest.mark.parametrize("dtype,atol,rtol", LOW, ids=LOW_IDS)
    def test_low_precision_inputs(dtype, atol, rtol):
        low_precision(name, K, dtype, atol, rtol, base=base, **params)

    def test_non_contiguous():
        non_contiguous(name, K, base=base, **params)

    def test_errors():
        input_errors(name, K, **params)

    tests = [test_contract, test_low_precision_inputs, test_non_contiguous, test_errors]
    if "cpu" in getattr(method(name), "KERNELS", ()):
        @pytest.mark.parametrize("backend", ["cpu", "auto"])
        @pytest.mark.parametrize("shape", SHAPES + [(0,), (5, 0), (3, 700)],
                                 ids=SHAPE_IDS + ["empty", "5x0", "3x700"])
        @pytest.mark.parametrize("dtype", [d for d, _, _ in DTYPES], ids=DTYPE_IDS)
        def test_fused_cpu(backend, shape, dtype):
            """fastmerge.merge(..., backend=cpu or auto) equals the reference; auto picks cpu
            (the registry reads the method's KERNELS)."""
            from fastmerge import _registry, dispatch

            assert "cpu" in _registry.get(name).kernels
            if backend == "auto":
                assert dispatch.resolve("auto", torch.device("cpu"), name) == "cpu"
            b, ms = make_models(shape, K, dtype)
            got = fused_matches(name, b if base else None, ms, backend=backend, **params)
            assert got is None or got.dtype == dtype and got.shape == torch.Size(shape)

        tests.append(test_fused_cpu)
    return {f.__name__: f for f in tests}
    return {f.__name__: f for f in (test_contract, test_low_precision_inputs,
                                    test_non_contiguous, test_errors)}


# ---- fused kernels (a method's KERNELS and fused): equal to the reference, cast ----------------
FUSED_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FUSED_DTYPE_IDS = ["fp32", "bf16", "fp16"]


def _bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def merged_cpu(name, base, models, *, backend="cpu", out_dtype=None, **params):
    import fastmerge

    return fastmerge.merge(name, base, models, backend=backend, out_dtype=out_dtype, **params)


def fused_equals_reference(name, base, models, *, dtype=torch.float32, **params):
    """``fastmerge.merge(name, ..., backend="cpu")`` on the inputs cast to ``dtype`` gives the
    bytes of the reference's fp32 result cast to the output dtype (the input dtype, and fp32)."""
    base = None if base is None else base.to(dtype)
    models = [m.to(dtype) for m in models]
    expected = method(name).reference(base, models, **params)
    for out_dtype in dict.fromkeys((dtype, torch.float32)):
        got = merged_cpu(name, base, models, out_dtype=out_dtype, **params)
        want = expected.to(out_dtype)
        assert got.dtype == out_dtype and got.shape == want.shape
        if not torch.equal(_bits(got), _bits(want)):
            diff = (got.double() - want.double()).abs().reshape(-1)
            i = int(diff.argmax()) if diff.numel() else 0
            raise AssertionError(f"{name} {dtype}->{out_dtype}: {int((diff > 0).sum())}/{diff.numel()} "
                                 f"differ; worst at {i}: {got.reshape(-1)[i].item()} vs {want.reshape(-1)[i].item()}")
    return got


def fused_tests(name, K, *, base=True, **params):
    """The fused kernels' checks every such method's test file runs (bind with
    ``globals().update(fused_tests(...))``): reference equality on the low-precision dtypes and
    on non-contiguous views, ``auto`` picking cpu, inf/nan naming the input, thread counts."""
    import fastmerge
    from fastmerge import dispatch

    def inputs_of(shape=(37, 53), dtype=torch.float32, seed=0):
        b, ms = sparse_models(shape, K, 0.5, seed=seed)
        return (b.to(dtype) if base else None), [m.to(dtype) for m in ms]

    @pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=FUSED_DTYPE_IDS)
    def test_fused_dtypes(dtype):
        b, ms = inputs_of()
        fused_equals_reference(name, b, ms, dtype=dtype, **params)

    def test_fused_non_contiguous():
        b, ms = inputs_of((53, 37))
        views = [m.t() for m in ms]
        assert not views[0].is_contiguous()
        fused_equals_reference(name, None if b is None else b.t(), views, **params)

    def test_fused_is_auto_on_cpu(monkeypatch):
        assert "cpu" in method(name).KERNELS and fastmerge.backends()["cpu"]["available"]
        assert dispatch.resolve("auto", torch.device("cpu"), name) == "cpu"
        calls = []
        real = method(name).fused
        monkeypatch.setattr(method(name), "fused", lambda *a, **k: calls.append(1) or real(*a, **k))
        b, ms = inputs_of()
        merged_cpu(name, b, ms, backend="auto", **params)
        merged_cpu(name, b, ms, backend="torch", **params)
        assert calls == [1]

    def test_fused_nonfinite():
        b, ms = inputs_of()
        for k in range(K):
            bad = [m.clone() for m in ms]
            bad[k].view(-1)[100] = float("nan") if k % 2 == 0 else float("-inf")
            with pytest.raises(NonFiniteError, match=rf"models\[{k}\]"):
                merged_cpu(name, b, bad, **params)
        if b is not None:
            bad = b.clone()
            bad.view(-1)[-1] = float("inf")
            with pytest.raises(NonFiniteError, match="base"):
                merged_cpu(name, bad, ms, **params)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    def test_fused_thread_count(dtype):
        """Big enough for two threads (fastmerge.backends._native.MIN_PER_THREAD each)."""
        b, ms = inputs_of((601, 1103), dtype, seed=3)
        before = torch.get_num_threads()
        try:
            outs = []
            for nt in (1, 2):
                torch.set_num_threads(nt)
                outs.append(_bits(merged_cpu(name, b, ms, **params)))
        finally:
            torch.set_num_threads(before)
        assert torch.equal(outs[0], outs[1])
        fused_equals_reference(name, b, ms, dtype=dtype, **params)

    return {f.__name__: f for f in (test_fused_dtypes, test_fused_non_contiguous, test_fused_is_auto_on_cpu,
                                    test_fused_nonfinite, test_fused_thread_count)}
