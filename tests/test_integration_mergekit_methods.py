"""``fastmerge.integrations.mergekit.patch()`` on mergekit's methods outside the task-arithmetic
family: each patched ``merge_tensors`` / ``merge_state_dicts`` against the unpatched one on the
same inputs (issue 17's acceptance: >= 99.9% of the elements within rtol 1e-4 on random fp32,
odd shapes and 1-D; bf16 inputs against mergekit on their fp32 upcast, rounded to bf16), and
fastmerge's fused kernels really called (a spy around ``fastmerge.backends.method_ops``, which
hands a method's fused plan its backend's kernels; the spy calls through)."""
from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, assert_close_frac, make_models

import fastmerge
from fastmerge import _registry, backends, dispatch

mergekit = pytest.importorskip("mergekit")
from mergekit.merge_methods import merge_state_dicts, merge_tensors

import fastmerge.integrations.mergekit as fm_mk

FRAC, RTOL, ATOL = 0.001, 1e-4, 1e-6
# method: (non-base inputs, base, [parameter sets]) -- mergekit's parameter names
CASES = {
    "slerp": (1, True, [dict(t=0.3), dict(t=0.0), dict(t=1.2)]),
    "nuslerp": (2, True, [dict(weight=[0.3, 0.7]), dict(weight=[1.0, 2.0], nuslerp_flatten=False),
                          dict(weight=[0.5, 0.5], nuslerp_flatten=False, nuslerp_row_wise=True)]),
    "multislerp": (3, True, [dict(weight=[0.3, 0.7, 0.5]), dict(weight=[1.0, 2.0, 0.5], normalize_weights=False)]),
    "karcher": (2, True, [dict(), dict(max_iter=3, tol=1e-4)]),
    "model_stock": (3, True, [dict(), dict(filter_wise=True)]),
    "sce": (3, True, [dict(), dict(select_topk=0.4)]),
    "nearswap": (1, True, [dict(t=0.01), dict(t=0.5)]),
    "arcee_fusion": (1, True, [dict()]),
    "ram": (3, True, [dict(), dict(epsilon=0.02)]),
    "ramplus_tl": (3, True, [dict(), dict(r=0.3, alpha=0.5, epsilon=0.02)]),
    "passthrough": (1, False, [dict(), dict(scale=0.5)]),
}
SHAPES = [(37, 53), (211,), (3, 5, 7)]


@pytest.fixture(autouse=True)
def _always_unpatched():
    fm_mk.unpatch()
    yield
    fm_mk.unpatch()


@pytest.fixture
def kernel_calls(monkeypatch):
    """The backends whose method kernels fastmerge handed out (a spy: the real kernels run)."""
    calls = []
    real = backends.method_ops

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(backends, "method_ops", spy)
    return calls


def fused_here(method, device="cpu") -> bool:
    """Whether a fastmerge backend runs ``method`` fused on ``device`` (its registry kernels)."""
    return dispatch.resolve(None, torch.device(device), method) in _registry.get(method).kernels


def _inputs(method, shape, dtype=torch.float32, seed=0):
    k, with_base, _ = CASES[method]
    base, models = make_models(shape, K=k, seed=seed)
    if method in ("ram", "ramplus_tl"):  # sparse deltas: unique and shared changes both occur
        g = torch.Generator().manual_seed(seed)
        models = [base + (m - base) * (torch.rand(shape, generator=g) < 0.4) for m in models]
    tensors = [base, *models] if with_base else models
    return [t.to(dtype) for t in tensors], (0 if with_base else None)


def _both(method, tensors, base_index, params):
    expected = merge_tensors(tensors, method, parameters=params, base_index=base_index)
    with fm_mk.patched():
        actual = merge_tensors(tensors, method, parameters=params, base_index=base_index)
    return expected, actual


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", list(CASES))
def test_patched_method_matches_mergekit_and_runs_fastmerge(method, shape, kernel_calls):
    tensors, bi = _inputs(method, shape)
    for params in CASES[method][2]:
        if method == "model_stock" and params.get("filter_wise") and len(shape) == 1:
            continue  # covered by test_model_stock_filter_wise_on_1d
        kernel_calls.clear()
        expected, actual = _both(method, tensors, bi, params)
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert_close_frac(actual, expected, atol=ATOL, rtol=RTOL, max_frac=FRAC, msg=f"{method} {params}")
        if fused_here(method):
            assert kernel_calls, f"patched {method} did not run fastmerge's kernels"
        else:  # no fused kernel for it here: mergekit's own code, not fastmerge's reference
            assert not kernel_calls


def test_model_stock_filter_wise_on_1d(kernel_calls):
    tensors, bi = _inputs("model_stock", (64,))
    expected, actual = _both("model_stock", tensors, bi, dict(filter_wise=True))
    assert_close_frac(actual, expected, atol=ATOL, rtol=RTOL, max_frac=FRAC)
    assert bool(kernel_calls) == fused_here("model_stock")


@pytest.mark.parametrize("method", list(CASES))
def test_bf16_inputs(method, kernel_calls):
    """mergekit computes in bf16, fastmerge in fp32 with one rounding: compare with mergekit on
    the fp32 upcast rounded to bf16 (the more accurate answer), within bf16 round-off."""
    tensors, bi = _inputs(method, (37, 53), seed=2)
    params = CASES[method][2][0]
    low = [t.to(torch.bfloat16) for t in tensors]
    tensors = [t.float() for t in low]  # the same values in fp32
    with fm_mk.patched():
        actual = merge_tensors(low, method, parameters=params, base_index=bi)
    # mergekit's own result dtype (arcee_fusion and ramplus_tl return fp32)
    assert actual.dtype == merge_tensors(low, method, parameters=params, base_index=bi).dtype
    if not fused_here(method):  # mergekit's own bf16 code ran
        assert torch.equal(actual, merge_tensors(low, method, parameters=params, base_index=bi))
        assert not kernel_calls
        return
    expected = merge_tensors(tensors, method, parameters=params, base_index=bi).to(actual.dtype)
    _, atol, rtol = next(d for d in DTYPES if d[0] == torch.bfloat16)
    # rounding fp32 results to bf16 twice may differ by an ulp; a selection boundary (sign,
    # threshold) may fall on the other side of one in a few elements
    assert_close_frac(actual.to(torch.bfloat16), expected.to(torch.bfloat16), atol=atol, rtol=rtol,
                      max_frac=0.01, msg=method)
    assert bool(kernel_calls) == fused_here(method)


def test_slerp_over_batched_groups(kernel_calls):
    """merge_state_dicts packs same-shape weights into [B, ...] batches for slerp, t per group."""
    g = torch.Generator().manual_seed(1)
    sds = [{f"w{i}": torch.randn(8, 12, generator=g) for i in range(4)} | {"b": torch.randn(7, generator=g)}
           for _ in range(2)]
    expected = merge_state_dicts(sds, "slerp", parameters=dict(t=0.4), base=0)
    with fm_mk.patched():
        actual = merge_state_dicts(sds, "slerp", parameters=dict(t=0.4), base=0)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert_close_frac(actual[name], expected[name], atol=ATOL, rtol=RTOL, max_frac=FRAC, msg=name)
    assert bool(kernel_calls) == fused_here("slerp")


def test_base_position_and_ids_follow_mergekit(kernel_calls):
    """The base may be any input and per-model values may be keyed by id: fastmerge gets the
    non-base inputs and their weights in mergekit's order."""
    tensors, _ = _inputs("multislerp", (19, 23), seed=4)
    order = [tensors[2], tensors[0], tensors[3], tensors[1]]  # the base is input 1
    params = dict(weight={"a": 0.2, "c": 0.5, "d": 0.9})
    ids = ["a", "b", "c", "d"]
    expected = merge_tensors(order, "multislerp", parameters=params, ids=ids, base_index=1)
    with fm_mk.patched():
        actual = merge_tensors(order, "multislerp", parameters=params, ids=ids, base_index=1)
    assert_close_frac(actual, expected, atol=ATOL, rtol=RTOL, max_frac=FRAC)
    assert bool(kernel_calls) == fused_here("multislerp")


def test_calls_fastmerge_does_not_take_run_mergekit(kernel_calls):
    """float64 inputs, inf, a model count fastmerge's method refuses and autograd all stay
    mergekit's own code, with its own result."""
    tensors, bi = _inputs("nearswap", (16, 16))
    as64 = [t.double() for t in tensors]
    for ts, params in ((as64, dict(t=0.5)),):
        expected = merge_tensors(ts, "nearswap", parameters=params, base_index=bi)
        with fm_mk.patched():
            actual = merge_tensors(ts, "nearswap", parameters=params, base_index=bi)
        assert actual.dtype == torch.float64 and torch.equal(actual, expected)
    bad = [t.clone() for t in tensors]
    bad[1][3, 3] = float("inf")
    expected = merge_tensors(bad, "slerp", parameters=dict(t=0.5), base_index=0)
    with fm_mk.patched(), pytest.warns(RuntimeWarning, match="non-finite.*mergekit"):
        actual = merge_tensors(bad, "slerp", parameters=dict(t=0.5), base_index=0)
    torch.testing.assert_close(actual, expected, equal_nan=True)
    # karcher of one input, sce / ram without models: mergekit returns the input itself
    base = tensors[0]
    for method in ("karcher", "sce", "ram"):
        with fm_mk.patched():
            out = merge_tensors([base], method, base_index=0 if method != "karcher" else None)
        assert torch.equal(out, base)
    # autograd: module parameters with grad mode on keep mergekit's differentiable path
    mods = [torch.nn.Linear(6, 4) for _ in range(2)]
    sds = [m.state_dict(keep_vars=True) for m in mods]
    kernel_calls.clear()
    with fm_mk.patched():
        merged = merge_state_dicts(sds, "slerp", parameters=dict(t=0.3), base=0)
    assert merged["weight"].grad_fn is not None and not kernel_calls


def test_a_method_without_a_fused_backend_stays_mergekits(monkeypatch, kernel_calls):
    monkeypatch.setenv("FASTMERGE_BACKEND", "torch")
    tensors, bi = _inputs("model_stock", (24, 24))
    expected = merge_tensors(tensors, "model_stock", base_index=bi)
    with fm_mk.patched():
        actual = merge_tensors(tensors, "model_stock", base_index=bi)
    assert torch.equal(actual, expected) and not kernel_calls


def test_patch_replaces_every_method_revertibly():
    from mergekit.merge_methods import registry

    originals = {name: registry.get(name).implementation for name in fm_mk.OTHER_METHODS}
    with fm_mk.patched():
        for name, original in originals.items():
            assert registry.get(name).implementation.__wrapped__ is original, name
    for name, original in originals.items():
        assert registry.get(name).implementation is original, name
    research = {m.__name__.rpartition(".")[2] for m in fastmerge.methods.RESEARCH}  # not mergekit's
    assert set(fm_mk.METHODS) >= set(fastmerge.METHODS) - {"tsv", "iso_c", "iso_cts"} - research


@pytest.mark.parametrize("method", [m for m in CASES if not fused_here(m)] or ["sce"])
def test_methods_without_a_kernel_here_map_mergekits_parameters(method, monkeypatch):
    """A method whose fused kernel has not landed stays mergekit's; forced through fastmerge
    (its reference, via ``fastmerge.merge``), the patch's parameter and dtype mapping must
    still give mergekit's result."""
    calls = []
    real = dispatch.run_method

    def spy(name, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(fm_mk, "fused_can_take", lambda *a, **k: True)
    monkeypatch.setattr(dispatch, "run_method", spy)
    for dtype in (torch.float32, torch.bfloat16):
        tensors, bi = _inputs(method, (37, 53))
        low = [t.to(dtype) for t in tensors]
        for params in CASES[method][2]:
            calls.clear()
            expected = merge_tensors([t.float() for t in low], method, parameters=params, base_index=bi)
            with fm_mk.patched():
                actual = merge_tensors(low, method, parameters=params, base_index=bi)
            assert calls == [method]
            assert actual.dtype == merge_tensors(low, method, parameters=params, base_index=bi).dtype
            if dtype == torch.float32:
                assert_close_frac(actual, expected, atol=ATOL, rtol=RTOL, max_frac=FRAC, msg=method)
            else:
                _, atol, rtol = next(d for d in DTYPES if d[0] == torch.bfloat16)
                assert_close_frac(actual.to(dtype), expected.to(dtype), atol=atol, rtol=rtol,
                                  max_frac=0.01, msg=method)
