"""``patch(rng="torch")`` of both integrations: DARE/DELLA masks drawn with the library's own
``torch.bernoulli`` calls, the rest of the merge fused. Issue 17's acceptance: a patched
``dare_ties`` merge equals the unpatched one bit for bit for the same seed, in PEFT and in
mergekit. A spy around ``fastmerge.dispatch.run`` (it calls through) checks that fastmerge's
fused merge ran with the library's masks (plan masks of kind ``given``); and
``api.merge_with_keep``, the entry point the patches use, against the torch reference."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_models, make_tasks

from fastmerge import api, dispatch

peft = pytest.importorskip("peft")
mergekit = pytest.importorskip("mergekit")
from mergekit.merge_methods import merge_tensors  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

import fastmerge.integrations.mergekit as fm_mk  # noqa: E402
import fastmerge.integrations.peft as fm_peft  # noqa: E402

RANDOM_GTA = ["dare_ties", "dare_linear", "della", "della_linear"]


@pytest.fixture(autouse=True)
def _always_unpatched():
    fm_mk.unpatch()
    fm_peft.unpatch()
    yield
    fm_mk.unpatch()
    fm_peft.unpatch()


@pytest.fixture
def plans(monkeypatch):
    """The mask kinds of every plan fastmerge's engine ran (a spy: the real merge runs)."""
    seen = []
    real = dispatch.run

    def spy(plan, *args, **kwargs):
        seen.append([m.kind for m in plan.masks])
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(dispatch, "run", spy)
    return seen


# ---------------------------------------------------------------- PEFT

@pytest.mark.parametrize("fn", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("k,shape", [(2, (37, 53)), (3, (211,)), (3, (4, 6, 5))], ids=str)
@pytest.mark.parametrize("density", [0.3, 0.0])
def test_peft_dare_bit_identical(fn, k, shape, density, plans):
    tasks = make_tasks(shape, K=k, seed=k)
    weights = torch.tensor([1.0, 0.6, -0.4][:k])
    extra = ("frequency",) if fn == "dare_ties" and k == 3 else ()
    torch.manual_seed(42)
    expected = getattr(merge_utils, fn)(tasks, weights, density, *extra)
    with fm_peft.patched(rng="torch"):
        torch.manual_seed(42)
        actual = getattr(merge_utils, fn)(tasks, weights, density, *extra)
        after = torch.rand(3)
    torch.manual_seed(42)
    getattr(merge_utils, fn)(tasks, weights, density, *extra)
    assert torch.equal(actual, expected) or (density == 0 and torch.isnan(expected).all())
    assert torch.equal(after, torch.rand(3)), "the patched run must consume the same random stream"
    if density > 0:
        assert plans == [["given"] * k], "fastmerge's fused merge did not run with PEFT's masks"


def test_peft_default_rng_is_philox_and_rng_is_checked(plans):
    tasks = make_tasks((16, 16), K=2, seed=1)
    w = torch.tensor([1.0, 1.0])
    torch.manual_seed(3)
    expected = merge_utils.dare_ties(tasks, w, 0.4)
    with fm_peft.patched():
        torch.manual_seed(3)
        philox = merge_utils.dare_ties(tasks, w, 0.4)
    assert plans == [["random", "random"]] and not torch.equal(philox, expected)
    with pytest.raises(ValueError, match="rng must be one of 'philox', 'torch', got 'numpy'"):
        fm_peft.patch(rng="numpy")
    fm_peft.patch(rng="torch")
    with pytest.raises(ValueError, match="already patched with rng='torch'"):
        fm_peft.patch()
    fm_peft.patch(rng="torch")  # the same options: a no-op


def test_peft_random_pruning_stays_peft_under_torch_rng(plans):
    t = make_tasks((20, 20), K=1, seed=5)[0]
    for call in (lambda: merge_utils.random_pruning(t, 0.3, True),
                 lambda: merge_utils.prune(t, 0.3, "random", rescale=True)):
        torch.manual_seed(9)
        expected = call()
        with fm_peft.patched(rng="torch"):
            torch.manual_seed(9)
            actual = call()
        assert torch.equal(actual, expected)
    assert plans == []
    with fm_peft.patched(rng="torch"):  # magnitude pruning is still fastmerge's
        merge_utils.ties(make_tasks((20, 20), K=2), torch.tensor([1.0, 0.5]), 0.3)
    assert plans == [["range", "range"]]


def test_peft_add_weighted_adapter_dare_ties_bit_identical():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    model = get_peft_model(net, LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False),
                           adapter_name="x")
    model.add_adapter("y", LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    twin = copy.deepcopy(model)
    torch.manual_seed(42)
    model.add_weighted_adapter(["x", "y"], [1.0, 0.5], "m", combination_type="dare_ties", density=0.5)
    with fm_peft.patched(rng="torch"):
        torch.manual_seed(42)
        twin.add_weighted_adapter(["x", "y"], [1.0, 0.5], "m", combination_type="dare_ties", density=0.5)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------- mergekit

@pytest.mark.parametrize("method", RANDOM_GTA)
@pytest.mark.parametrize("k,shape", [(2, (37, 53)), (3, (211,)), (3, (4, 6, 5))], ids=str)
def test_mergekit_random_methods_bit_identical(method, k, shape, plans):
    base, models = make_models(shape, K=k, seed=k)
    p = dict(weight=[1.0, 0.5, -0.3][:k], density=[0.3, 0.6, 1.0][:k])
    if method.startswith("della"):
        p["density"], p["epsilon"] = [0.3, 0.6, 0.5][:k], [0.1, 0.2, 0.05][:k]
    for extra in ({}, {"rescale": False, "normalize": True, "lambda": 0.7}):
        params = dict(p, **extra)
        torch.manual_seed(5)
        expected = merge_tensors([base, *models], method, parameters=params, base_index=0)
        plans.clear()
        with fm_mk.patched(rng="torch"):
            torch.manual_seed(5)
            actual = merge_tensors([base, *models], method, parameters=params, base_index=0)
        assert torch.equal(actual, expected), f"{method} {params}"
        kinds = ["given" if d < 1 else "none" for d in params["density"]]
        assert plans == [kinds], "fastmerge's fused merge did not run with mergekit's masks"


def test_mergekit_bf16_uses_mergekits_masks(plans):
    """bf16: mergekit's own draws (bf16 working dtype on CPU), fastmerge's fp32 arithmetic."""
    base, models = make_models((33, 40), K=2, dtype=torch.bfloat16, seed=3)
    p = dict(weight=[1.0, 0.5], density=0.4, rescale=False)
    torch.manual_seed(1)
    expected = merge_tensors([base, *models], "dare_linear", parameters=p, base_index=0)
    with fm_mk.patched(rng="torch"):
        torch.manual_seed(1)
        actual = merge_tensors([base, *models], "dare_linear", parameters=p, base_index=0)
    assert actual.dtype == torch.bfloat16 and plans == [["given", "given"]]
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2 ** -6)


def test_mergekit_refused_call_restores_the_generator_before_falling_back(plans, monkeypatch):
    from fastmerge.integrations import _patch

    monkeypatch.setattr(_patch, "_warned", set())  # the fallback warns once per message per process
    base, models = make_models((16, 16), K=2, seed=2)
    p = dict(weight=[float("nan"), 1.0], density=0.5)  # fastmerge refuses a nan weight
    torch.manual_seed(11)
    expected = merge_tensors([base, *models], "dare_ties", parameters=p, base_index=0)
    with fm_mk.patched(rng="torch"), pytest.warns(RuntimeWarning, match="weights"):
        torch.manual_seed(11)
        actual = merge_tensors([base, *models], "dare_ties", parameters=p, base_index=0)
    torch.testing.assert_close(actual, expected, equal_nan=True, atol=0, rtol=0)


def test_mergekit_rng_is_checked():
    with pytest.raises(ValueError, match="rng must be one of"):
        fm_mk.patch(rng="Torch")
    fm_mk.patch()
    with pytest.raises(ValueError, match="already patched with rng='philox'"):
        fm_mk.patch(rng="torch")


# ---------------------------------------------------------------- api.merge_with_keep

@pytest.mark.parametrize("method", RANDOM_GTA)
@pytest.mark.parametrize("rescale", [None, False, "density", "l2"])
def test_merge_with_keep_fused_matches_reference(method, rescale):
    base, models = make_models((29, 31), K=3, seed=7)
    g = torch.Generator().manual_seed(0)
    keep = [torch.rand(base.shape, generator=g) < 0.4 for _ in models]
    kw = dict(weights=[1.0, 0.5, 0.7], density=[0.4, 0.4, 0.3], rescale=rescale)
    for factors in (None, [1.25, None, 0.8]):
        ref = api.merge_with_keep(method, base, models, keep, factors=factors, backend="torch", **kw)
        fused = api.merge_with_keep(method, base, models, keep, factors=factors, **kw)
        torch.testing.assert_close(fused, ref, atol=1e-6, rtol=1e-5)
    # the masks are used: task_arithmetic-like formula for dare_linear without rescale
    if method == "dare_linear" and rescale is False:
        want = base + sum(w * torch.where(k, m - base, 0.0) for w, k, m in zip(kw["weights"], keep, models))
        torch.testing.assert_close(fused, want, atol=1e-6, rtol=1e-5)


def test_merge_with_keep_errors_name_the_argument():
    base, models = make_models((8, 8), K=2)
    keep = [torch.ones(8, 8, dtype=torch.bool)] * 2
    with pytest.raises(ValueError, match="not of method 'ties'"):
        api.merge_with_keep("ties", base, models, keep, density=0.5)
    with pytest.raises(TypeError, match=r"keep\[1\] must be a bool tensor"):
        api.merge_with_keep("dare_ties", base, models, [keep[0], keep[1].float()], density=0.5)
    with pytest.raises(ValueError, match=r"keep\[0\] has shape \(4, 16\)"):
        api.merge_with_keep("dare_ties", base, models, [keep[0].reshape(4, 16), keep[1]], density=0.5)
    with pytest.raises(ValueError, match="one entry per model"):
        api.merge_with_keep("dare_ties", base, models, keep[:1], density=0.5)
    with pytest.raises(ValueError, match=r"keep\[1\] must be None"):
        api.merge_with_keep("dare_ties", base, models, keep, density=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"factors must have one entry per model"):
        api.merge_with_keep("dare_ties", base, models, keep, density=0.5, factors=[1.0])


def test_merge_with_keep_on_triton_interpreter():
    """The GPU driver's keep bytes, in Triton's interpreter (CPU tensors, TRITON_INTERPRET=1),
    against the torch reference, with a transposed (strided) input read in place."""
    import fastmerge

    if not fastmerge.backends()["triton"].get("interpreter"):
        pytest.skip("the Triton interpreter runs only without CUDA (TRITON_INTERPRET=1)")
    base, models = make_models((12, 10), K=2, seed=8)
    models[1] = models[1].t().contiguous().t()  # same values, column-major strides
    g = torch.Generator().manual_seed(1)
    keep = [torch.rand(base.shape, generator=g) < 0.5 for _ in models]
    for rescale in (None, "density"):
        kw = dict(weights=[1.0, 0.5], density=0.5, rescale=rescale)
        ref = api.merge_with_keep("dare_ties", base, models, keep, factors=[None, 1.5], backend="torch", **kw)
        got = api.merge_with_keep("dare_ties", base, models, keep, factors=[None, 1.5], backend="triton", **kw)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
