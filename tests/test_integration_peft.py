"""``fastmerge.integrations.peft``: PEFT 0.21.2 patched vs unpatched, function by function and
through ``LoraModel.add_weighted_adapter`` for every combination type.

Random pruning is compared exactly: while the unpatched PEFT runs, its ``torch.bernoulli`` is
replaced by the masks fastmerge's seeded path draws (``bernoulli_as_fastmerge``), so the only
by-design difference (which random mask) is removed and everything else must agree.
"""
from __future__ import annotations

import copy
import importlib.metadata
import math
import sys
import warnings

import pytest
import torch
from torch import nn

import fastmerge
from conftest import DTYPE_IDS, DTYPES, bernoulli_as_fastmerge, make_tasks, make_tie_free_tasks

peft = pytest.importorskip("peft")
import peft.tuners.lora.model as lora_model  # noqa: E402
import peft.utils.merge_utils as mu  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

import fastmerge.integrations.peft as fm_peft  # noqa: E402

ORIGINALS = {name: getattr(mu, name) for name in fm_peft.FUNCTIONS}
SVD_METHOD = lora_model.LoraModel._svd_generalized_task_arithmetic_weighted_adapter


@pytest.fixture(autouse=True)
def _always_unpatched():
    fm_peft.unpatch()
    yield
    fm_peft.unpatch()


def _peft_state():
    return ({n: getattr(mu, n) for n in fm_peft.FUNCTIONS},
            {n: getattr(lora_model, n) for n in ("task_arithmetic", "magnitude_prune", "ties",
                                                 "dare_linear", "dare_ties")},
            lora_model.LoraModel.__dict__["_svd_generalized_task_arithmetic_weighted_adapter"])


# ---------------------------------------------------------------- patch / unpatch mechanics

def test_patch_replaces_every_name_and_unpatch_restores_the_same_objects():
    before = _peft_state()
    fm_peft.patch()
    assert fm_peft.is_patched()
    for name in fm_peft.FUNCTIONS:
        fn = getattr(mu, name)
        assert fn is not ORIGINALS[name], name
        assert fn.__wrapped__ is ORIGINALS[name], name
        assert fn.__name__ == name
    for name in ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"):
        assert getattr(lora_model, name) is getattr(mu, name), name  # the names LoraModel calls
    svd = lora_model.LoraModel.__dict__["_svd_generalized_task_arithmetic_weighted_adapter"]
    assert svd.__wrapped__ is SVD_METHOD
    fm_peft.unpatch()
    assert not fm_peft.is_patched()
    after = _peft_state()
    assert all(a is b for a, b in zip(before[0].values(), after[0].values()))
    assert all(a is b for a, b in zip(before[1].values(), after[1].values()))
    assert before[2] is after[2]


def test_patch_is_idempotent_and_unpatch_without_patch_is_a_noop():
    fm_peft.unpatch()
    fm_peft.patch()
    first = _peft_state()
    fm_peft.patch()
    second = _peft_state()
    assert all(a is b for a, b in zip(first[0].values(), second[0].values()))
    assert mu.ties.__wrapped__ is ORIGINALS["ties"]  # not wrapped twice
    fm_peft.unpatch()
    fm_peft.unpatch()
    assert mu.ties is ORIGINALS["ties"]


def test_patched_context_manager_restores_and_nests():
    with fm_peft.patched():
        assert mu.ties is not ORIGINALS["ties"]
    assert mu.ties is ORIGINALS["ties"]
    fm_peft.patch()
    with fm_peft.patched():
        pass
    assert fm_peft.is_patched(), "a block inside an explicit patch() must not unpatch"
    with pytest.raises(KeyError):
        with fm_peft.patched():
            raise KeyError("boom")
    assert fm_peft.is_patched()
    fm_peft.unpatch()
    with pytest.raises(KeyError):
        with fm_peft.patched():
            raise KeyError("boom")
    assert mu.ties is ORIGINALS["ties"], "an exception in the block must still restore PEFT"


def test_a_users_own_replacement_in_lora_model_is_left_alone(monkeypatch):
    def mine(*a, **k):
        raise AssertionError("not called")

    monkeypatch.setattr(lora_model, "ties", mine)
    fm_peft.patch()
    assert lora_model.ties is mine and mu.ties is not ORIGINALS["ties"]
    fm_peft.unpatch()
    assert lora_model.ties is mine and mu.ties is ORIGINALS["ties"]


def test_missing_peft_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft.utils.merge_utils", None)
    with pytest.raises(ImportError, match=r"needs peft.*pip install peft==0\.21"):
        fm_peft.patch()
    assert not fm_peft.is_patched()


def test_untested_peft_version_is_refused_unless_allowed(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda d: "0.9.0" if d == "peft" else real(d))
    with pytest.raises(RuntimeError, match=r"peft 0\.9\.0.*0\.21\.x.*allow_untested=True"):
        fm_peft.patch()
    assert mu.ties is ORIGINALS["ties"]
    fm_peft.patch(allow_untested=True)
    assert mu.ties is not ORIGINALS["ties"]


def test_importing_the_integration_does_not_patch():
    assert not fm_peft.is_patched() and mu.ties is ORIGINALS["ties"]


# ---------------------------------------------------------------- function by function

def _both(fn_name, *args, random_k=None, monkeypatch=None, seed=0):
    """(unpatched PEFT result, patched result) of ``merge_utils.<fn_name>(*args)``; for random
    pruning the unpatched run gets fastmerge's masks and both start from the same RNG state."""
    torch.manual_seed(seed)
    if random_k:
        with bernoulli_as_fastmerge(monkeypatch, random_k):
            expected = getattr(mu, fn_name)(*args)
    else:
        expected = getattr(mu, fn_name)(*args)
    with fm_peft.patched():
        torch.manual_seed(seed)
        actual = getattr(mu, fn_name)(*args)
    return expected, actual


def _close(actual, expected, atol, rtol):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(23, 41), (257,), (4, 5, 6)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_and_magnitude_prune_match_peft(dtype, atol, rtol, shape, density, sign):
    # magnitudes distinct in every dtype: PEFT's topk breaks ties arbitrarily, fastmerge by
    # lowest index (that by-design difference is covered in test_peft_conformance.py)
    tasks = make_tie_free_tasks(shape, 3, dtype, seed=3)
    w = torch.tensor([1.0, 0.6, -0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT's "density >= 1" warning
        _close(*reversed(_both("ties", tasks, w, density, sign)), atol, rtol)
        _close(*reversed(_both("magnitude_prune", tasks, w, density)), atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_task_arithmetic_and_the_helpers_match_peft(dtype, atol, rtol):
    tasks = make_tasks((29, 31), K=4, dtype=dtype, seed=5)
    w = torch.tensor([0.5, 1.0, 0.25, 2.0])
    _close(*reversed(_both("task_arithmetic", tasks, w)), atol, rtol)
    stacked = torch.stack(tasks)
    for method in ("total", "frequency"):
        exp, act = _both("calculate_majority_sign_mask", stacked, method)
        assert torch.equal(act, exp)
    mask = ORIGINALS["calculate_majority_sign_mask"](stacked)
    _close(*reversed(_both("disjoint_merge", stacked, mask)), atol, rtol)
    for density in (0.05, 0.5):
        _close(*reversed(_both("magnitude_based_pruning", tasks[0], density)), 0, 0)
        _close(*reversed(_both("prune", tasks[1], density, "magnitude")), 0, 0)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(37, 53), (301,)])
def test_random_pruning_family_matches_peft_given_the_same_masks(monkeypatch, density, shape):
    tasks = make_tasks(shape, K=3, seed=7)
    w = torch.tensor([1.0, 0.5, 0.75])
    for fn, args in (("dare_linear", (tasks, w, density)),
                     ("dare_ties", (tasks, w, density, "total")),
                     ("dare_ties", (tasks, w, density, "frequency"))):
        exp, act = _both(fn, *args, random_k=3, monkeypatch=monkeypatch)
        _close(act, exp, 1e-6, 1e-5)
    for rescale in (False, True):
        exp, act = _both("random_pruning", tasks[0], density, rescale, random_k=1,
                         monkeypatch=monkeypatch)
        _close(act, exp, 1e-6, 1e-5)
        exp, act = _both("prune", tasks[0], density, "random", rescale, random_k=1,
                         monkeypatch=monkeypatch)
        _close(act, exp, 1e-6, 1e-5)


def test_patched_random_pruning_really_runs_fastmerge():
    """The patched result is fastmerge's seeded Philox mask (drawn from torch's generator), not
    PEFT's bernoulli one: proof that the call was routed, without mocking our code."""
    tasks = make_tasks((64, 64), K=2, seed=1)
    w = torch.tensor([1.0, 1.0])
    torch.manual_seed(11)
    ours = fastmerge.peft.dare_linear(tasks, w, 0.3)
    torch.manual_seed(11)
    theirs = mu.dare_linear(tasks, w, 0.3)
    with fm_peft.patched():
        torch.manual_seed(11)
        patched = mu.dare_linear(tasks, w, 0.3)
    assert torch.equal(patched, ours)
    assert not torch.equal(patched, theirs)


def test_peft_errors_and_warnings_are_kept():
    tasks = make_tasks((8, 8), K=2)
    with fm_peft.patched():
        with pytest.raises(ValueError, match="Density"):
            mu.prune(tasks[0], -0.1, "magnitude")
        with pytest.warns(UserWarning, match="greater than or equal to 1"):
            out = mu.prune(tasks[0], 1.5, "magnitude")
        assert out is tasks[0]
        with pytest.raises(ValueError):
            mu.prune(tasks[0], 0.5, "nope")


def test_unsupported_inputs_run_peft_itself():
    """float64 task tensors (fastmerge's kernels take fp32/fp16/bf16) and tensors that need an
    autograd graph stay on PEFT's code: bit-identical results, gradients intact."""
    tasks = make_tasks((17, 19), K=3, dtype=torch.float64, seed=2)
    w = torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64)
    exp, act = _both("ties", tasks, w, 0.3)
    assert torch.equal(act, exp) and act.dtype == torch.float64
    leaf = [t.float().requires_grad_() for t in tasks]
    with fm_peft.patched():
        out = mu.task_arithmetic(leaf, w.float())
        out.sum().backward()
    assert all(torch.equal(t.grad, torch.full_like(t, wk)) for t, wk in zip(leaf, w.tolist()))
    with fm_peft.patched(), torch.no_grad():  # no graph wanted: the fused path may run
        out = mu.task_arithmetic(leaf, w.float())
    assert out.grad_fn is None


def test_non_finite_inputs_fall_back_to_peft_with_one_warning():
    tasks = make_tasks((16, 16), K=2, seed=4)
    tasks[1][3, 3] = float("nan")
    w = torch.tensor([1.0, 1.0])
    expected = mu.task_arithmetic(tasks, w)
    with fm_peft.patched():
        with pytest.warns(RuntimeWarning, match="non-finite.*peft"):
            actual = mu.task_arithmetic(tasks, w)
    torch.testing.assert_close(actual, expected, equal_nan=True)
    assert math.isnan(float(actual[3, 3]))


# ---------------------------------------------------------------- add_weighted_adapter

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 24)
        self.lin1 = nn.Linear(24, 36)
        self.lin2 = nn.Linear(36, 20, bias=False)
        # conv layers (PEFT flattens a kxk kernel's delta and squeezes a 1x1 one); not in forward
        self.conv = nn.Conv2d(3, 6, 3)
        self.conv1 = nn.Conv2d(8, 7, 1)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(self.emb(x))))


TARGETS = ["emb", "lin1", "lin2", "conv", "conv1"]


def _tiny_lora_model():
    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                               init_lora_weights=False), adapter_name="x")
    # equal ranks: PEFT's non-SVD combinations require them
    model.add_adapter("y", LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS,
                                      init_lora_weights=False))
    model.add_adapter("z", LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS,
                                      init_lora_weights=False))
    return model


def _merged_factors(model, name):
    """{layer: (B, A)} of adapter ``name`` (Linear, Embedding and Conv2d layers alike)."""
    out = {}
    for key, mod in model.named_modules():
        if hasattr(mod, "lora_A") and name in mod.lora_A:  # conv factors as (out, r) @ (r, in*k*k)
            out[key] = (mod.lora_B[name].weight.detach().flatten(1).clone(),
                        mod.lora_A[name].weight.detach().flatten(1).clone())
        elif hasattr(mod, "lora_embedding_A") and name in mod.lora_embedding_A:
            out[key] = (mod.lora_embedding_B[name].detach().clone(), mod.lora_embedding_A[name].detach().clone())
    return out


COMBINATIONS = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "svd", "ties_svd",
                "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


# majority_sign_method only matters for the ties combinations
CASES = [(c, "total") for c in COMBINATIONS] + [(c, "frequency") for c in COMBINATIONS if "ties" in c]


@pytest.mark.parametrize("combination,sign", CASES)
@pytest.mark.parametrize("svd_mode", ["auto", "exact"])
def test_add_weighted_adapter_matches_peft(monkeypatch, combination, sign, svd_mode):
    if svd_mode == "exact" and not combination.endswith("svd"):
        return  # the SVD mode only concerns the *_svd combinations (covered by "auto" above)
    kwargs = dict(combination_type=combination, density=0.4, majority_sign_method=sign)
    if combination.endswith("svd"):
        kwargs["svd_rank"] = 5
        kwargs["svd_clamp"] = 0.95 if sign == "frequency" else None
    model = _tiny_lora_model()
    twin = copy.deepcopy(model)
    random = combination.startswith("dare")

    torch.manual_seed(21)
    if random:
        with bernoulli_as_fastmerge(monkeypatch, 3) as calls:
            model.add_weighted_adapter(["x", "y", "z"], [1.0, 0.7, -0.4], "m", **kwargs)
        assert calls[0] > 0
    else:
        model.add_weighted_adapter(["x", "y", "z"], [1.0, 0.7, -0.4], "m", **kwargs)
    expected = _merged_factors(model, "m")

    with fm_peft.patched(svd=svd_mode):
        torch.manual_seed(21)
        twin.add_weighted_adapter(["x", "y", "z"], [1.0, 0.7, -0.4], "m", **kwargs)
    actual = _merged_factors(twin, "m")

    assert expected.keys() == actual.keys() and len(actual) == len(TARGETS)
    for layer in expected:
        (eb, ea), (ab, aa) = expected[layer], actual[layer]
        if combination.endswith("svd"):
            # singular vectors' signs are arbitrary: compare the delta B @ A
            torch.testing.assert_close(ab @ aa, eb @ ea, atol=1e-5, rtol=1e-4, msg=layer)
        else:
            torch.testing.assert_close(ab, eb, atol=1e-6, rtol=1e-5, msg=layer)
            torch.testing.assert_close(aa, ea, atol=1e-6, rtol=1e-5, msg=layer)
    # the merged adapter is usable: forward agrees
    x = torch.randint(0, 40, (3, 5))
    model.set_adapter("m")
    twin.set_adapter("m")
    torch.testing.assert_close(twin(x), model(x), atol=1e-4, rtol=1e-4)


def test_without_a_fused_backend_the_call_stays_peft(monkeypatch):
    """FASTMERGE_BACKEND=torch (as on a device no fused backend serves): PEFT's own code runs,
    so its own bernoulli mask is used, not fastmerge's."""
    tasks = make_tasks((32, 32), K=2, seed=8)
    w = torch.tensor([1.0, 0.5])
    torch.manual_seed(3)
    theirs = mu.dare_ties(tasks, w, 0.4)
    monkeypatch.setenv("FASTMERGE_BACKEND", "torch")
    with fm_peft.patched():
        torch.manual_seed(3)
        patched = mu.dare_ties(tasks, w, 0.4)
    assert torch.equal(patched, theirs)


class _Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(80, 96)
        self.down = nn.Linear(96, 80)


@pytest.mark.parametrize("svd_mode", ["auto", "randomized"])
def test_svd_combination_skips_the_full_svd_and_matches_peft(monkeypatch, svd_mode):
    """The ``svd`` combination's delta sum_k w_k B_k A_k has rank <= sum_k r_k (12 here), so the
    randomized re-rank with a sketch of 20 columns is exact: no 80x96 SVD runs, and B @ A is
    PEFT's."""
    torch.manual_seed(1)
    model = get_peft_model(_Wide(), LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False),
                           adapter_name="x")
    for name in ("y", "z"):
        model.add_adapter(name, LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    twin = copy.deepcopy(model)
    kwargs = dict(combination_type="svd", svd_rank=6)
    model.add_weighted_adapter(["x", "y", "z"], [1.0, -0.5, 0.8], "m", **kwargs)
    shapes = []
    real_svd = torch.linalg.svd

    def spy(a, *args, **kw):
        shapes.append(tuple(a.shape))
        return real_svd(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    with fm_peft.patched(svd=svd_mode):
        twin.add_weighted_adapter(["x", "y", "z"], [1.0, -0.5, 0.8], "m", **kwargs)
    assert shapes and all(max(s) <= 40 for s in shapes), shapes
    expected, actual = _merged_factors(model, "m"), _merged_factors(twin, "m")
    for layer in expected:
        (eb, ea), (ab, aa) = expected[layer], actual[layer]
        torch.testing.assert_close(ab @ aa, eb @ ea, atol=1e-5, rtol=1e-4, msg=layer)


def test_svd_mode_is_checked():
    with pytest.raises(ValueError, match="svd must be one of"):
        fm_peft.patch(svd="fast")
    assert not fm_peft.is_patched()


def test_svd_combination_with_clamp_matches_peft():
    """With ``svd_clamp`` the clamp's quantile depends on the singular vectors' signs, so "auto"
    keeps LAPACK's SVD there and the result is PEFT's."""
    torch.manual_seed(2)
    model = get_peft_model(_Wide(), LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False),
                           adapter_name="x")
    model.add_adapter("y", LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    twin = copy.deepcopy(model)
    kwargs = dict(combination_type="svd", svd_rank=6, svd_clamp=0.9)
    model.add_weighted_adapter(["x", "y"], [1.0, 0.6], "m", **kwargs)
    with fm_peft.patched():
        twin.add_weighted_adapter(["x", "y"], [1.0, 0.6], "m", **kwargs)
    expected, actual = _merged_factors(model, "m"), _merged_factors(twin, "m")
    for layer in expected:
        (eb, ea), (ab, aa) = expected[layer], actual[layer]
        torch.testing.assert_close(ab @ aa, eb @ ea, atol=1e-5, rtol=1e-4, msg=layer)


def test_repatching_with_another_svd_mode_is_refused():
    fm_peft.patch(svd="exact")
    fm_peft.patch(svd="exact")  # same options: idempotent
    with pytest.raises(ValueError, match="already patched with svd='exact'"):
        fm_peft.patch()
    fm_peft.unpatch()
    fm_peft.patch(svd="randomized")
    assert fm_peft.is_patched()
