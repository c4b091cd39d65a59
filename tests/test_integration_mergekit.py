"""``fastmerge.integrations.mergekit`` and ``fastmerge mergekit``: mergekit 0.1.5 patched vs
unpatched, through ``merge_tensors`` / ``merge_state_dicts`` and end to end through
``mergekit-yaml`` on tiny Llama checkpoints built offline.

Random methods are compared exactly: while unpatched mergekit runs, its ``torch.bernoulli``
hands out the masks fastmerge's seeded path draws (``bernoulli_as_fastmerge``), so the one
by-design difference (which random mask) is removed.
"""
from __future__ import annotations

import importlib.metadata
import os
import sys

import pytest
import torch
from torch import nn

import fastmerge
from conftest import (DTYPE_IDS, DTYPES, assert_folders_match_mergekit, bernoulli_as_fastmerge, llama_config,
                      make_models, tiny_llamas)

mergekit = pytest.importorskip("mergekit")
from mergekit.merge_methods import merge_state_dicts, merge_tensors  # noqa: E402
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge  # noqa: E402
from mergekit.merge_methods.linear import linear_merge  # noqa: E402

import fastmerge.integrations.mergekit as fm_mk  # noqa: E402

GTA_ORIGINAL = GeneralizedTaskArithmeticMerge.__dict__["merge_group"]
LINEAR_ORIGINAL = linear_merge.implementation
GTA_METHODS = list(fm_mk.GTA_METHODS)
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}


@pytest.fixture(autouse=True)
def _always_unpatched():
    fm_mk.unpatch()
    yield
    fm_mk.unpatch()


# ---------------------------------------------------------------- patch / unpatch mechanics

def test_patch_unpatch_idempotent_and_exact():
    fm_mk.patch()
    fm_mk.patch()
    patched = GeneralizedTaskArithmeticMerge.__dict__["merge_group"]
    assert patched is not GTA_ORIGINAL and patched.__wrapped__ is GTA_ORIGINAL
    assert linear_merge.implementation.__wrapped__ is LINEAR_ORIGINAL
    fm_mk.unpatch()
    fm_mk.unpatch()
    assert GeneralizedTaskArithmeticMerge.__dict__["merge_group"] is GTA_ORIGINAL
    assert linear_merge.implementation is LINEAR_ORIGINAL
    with fm_mk.patched():
        assert fm_mk.is_patched()
    assert not fm_mk.is_patched() and linear_merge.implementation is LINEAR_ORIGINAL


def test_missing_or_untested_mergekit_is_a_clear_error(monkeypatch):
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "mergekit.merge_methods.generalized_task_arithmetic", None)
        with pytest.raises(ImportError, match=r"needs mergekit.*pip install mergekit==0\.1"):
            fm_mk.patch()
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda d: "0.0.4" if d == "mergekit" else real(d))
    with pytest.raises(RuntimeError, match=r"mergekit 0\.0\.4.*0\.1\.x"):
        fm_mk.patch()
    assert not fm_mk.is_patched()


# ---------------------------------------------------------------- tensor by tensor

def _both(method, tensors, monkeypatch, *, seed=0, k=None, **kw):
    """(unpatched mergekit, patched mergekit) on the same inputs and RNG state."""
    random = method in RANDOM
    torch.manual_seed(seed)
    if random:
        with bernoulli_as_fastmerge(monkeypatch, k):
            expected = merge_tensors(tensors, method, **kw)
    else:
        expected = merge_tensors(tensors, method, **kw)
    with fm_mk.patched():
        torch.manual_seed(seed)
        actual = merge_tensors(tensors, method, **kw)
    return expected, actual


PARAMS = [
    dict(weight=[1.0, 0.5, 0.7], density=[0.3, 0.5, 0.2]),
    dict(weight=[0.4, -0.3, 1.2], density=0.6, normalize=True, rescale=True, **{"lambda": 0.8}),
    dict(weight=1.0, density=[0.9, 0.1, 0.45], normalize=False, rescale=False, int8_mask=True),
    dict(weight=[0.5, 0.5, 0.5], density=1.0, **{"lambda": 1.5}),
]


@pytest.mark.parametrize("method", GTA_METHODS)
@pytest.mark.parametrize("params", range(len(PARAMS)))
@pytest.mark.parametrize("shape", [(37, 53), (211,)], ids=str)
def test_every_gta_method_and_parameter_matches_mergekit(monkeypatch, method, params, shape):
    p = dict(PARAMS[params])
    if method.startswith("breadcrumbs"):
        p["gamma"] = [0.01, 0.05, 0.0]
    if method.startswith("della"):
        dens = p["density"] if isinstance(p["density"], list) else [p["density"]] * 3
        p["density"] = [min(max(d, 0.25), 0.75) for d in dens]  # della needs 0 < d +- eps < 1
        p["epsilon"] = [0.1, 0.2, 0.05]
    base, models = make_models(shape, K=3, seed=params)
    exp, act = _both(method, [base, *models], monkeypatch, k=3, parameters=p, base_index=0)
    assert act.dtype == exp.dtype == base.dtype
    torch.testing.assert_close(act, exp, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties"])
def test_low_precision_working_dtype(dtype, atol, rtol, method, monkeypatch):
    """mergekit computes in the working dtype, fastmerge in fp32 with one rounding. For ties the
    inputs' deltas are chosen exact in every dtype with distinct magnitudes, so the kept sets
    agree and only rounding differs."""
    base, models = make_models((29, 31), K=3, seed=9)
    if method == "ties":
        base = torch.zeros_like(base)
        models = [m - m.mean() for m in models]
        g = torch.Generator().manual_seed(3)
        ladder = torch.tensor([(1 + j / 64) * 2.0 ** -e for e in range(1, 16) for j in range(64)])
        models = [(ladder[torch.randperm(ladder.numel(), generator=g)[:base.numel()]]
                   * torch.where(torch.rand(base.numel(), generator=g) < 0.5, -1.0, 1.0)).reshape(base.shape)
                  for _ in models]
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    p = dict(weight=[1.0, 0.5, 0.25])
    if method == "ties":
        p["density"] = 0.3
    tensors, bi = ([*models], None) if method == "linear" else ([base, *models], 0)
    exp, act = _both(method, tensors, monkeypatch, parameters=p, base_index=bi)
    assert act.dtype == exp.dtype == dtype
    torch.testing.assert_close(act, exp, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16)])
def test_dtype_and_out_dtype_are_honoured(dtype, out_dtype, monkeypatch):
    base, models = make_models((33, 21), K=2, seed=4)
    exp, act = _both("task_arithmetic", [base, *models], monkeypatch, parameters=dict(weight=[0.6, 0.4]),
                     base_index=0, dtype=dtype, out_dtype=out_dtype)
    assert act.dtype == exp.dtype == out_dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}
    t = max(tol[dtype], tol[out_dtype])
    torch.testing.assert_close(act, exp, atol=t, rtol=t)


def test_linear_over_batched_groups_matches_mergekit():
    """merge_state_dicts packs same-shape weights into [B, ...] batches for ``linear``."""
    g = torch.Generator().manual_seed(0)
    sds = [{f"w{i}": torch.randn(8, 12, generator=g) for i in range(5)} | {"b": torch.randn(7, generator=g)}
           for _ in range(3)]
    for normalize in (True, False):
        params = dict(weight=[0.2, 1.0, -0.5], normalize=normalize)
        expected = merge_state_dicts(sds, "linear", parameters=params)
        with fm_mk.patched():
            actual = merge_state_dicts(sds, "linear", parameters=params)
        assert expected.keys() == actual.keys()
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5)


def test_patched_random_merge_really_runs_fastmerge():
    base, models = make_models((64, 64), K=2, seed=6)
    p = dict(weight=[1.0, 1.0], density=0.3)
    torch.manual_seed(5)
    ours = fastmerge.merge("dare_ties", base, models, weights=[1.0, 1.0], density=0.3)
    torch.manual_seed(5)
    theirs = merge_tensors([base, *models], "dare_ties", parameters=p, base_index=0)
    with fm_mk.patched():
        torch.manual_seed(5)
        patched = merge_tensors([base, *models], "dare_ties", parameters=p, base_index=0)
    assert torch.equal(patched, ours) and not torch.equal(patched, theirs)


def test_parameters_outside_fastmerges_domain_run_mergekit_itself():
    base, models = make_models((20, 20), K=2, seed=1)
    for method, p in (("ties", dict(weight=1.0, density=1.7)),       # mergekit: >= 1 keeps all
                      ("ties", dict(weight=1.0, density=[-0.5, 0.5])),  # mergekit: <= 0 zeroes
                      ("linear", dict(weight=[1.0, -1.0]))):          # zero weight sum
        tensors, bi = (models, None) if method == "linear" else ([base, *models], 0)
        expected = merge_tensors(tensors, method, parameters=p, base_index=bi)
        with fm_mk.patched():
            actual = merge_tensors(tensors, method, parameters=p, base_index=bi)
        torch.testing.assert_close(actual, expected, equal_nan=True, atol=0, rtol=0)
    b64, m64 = base.double(), [m.double() for m in models]
    expected = merge_tensors([b64, *m64], "ties", parameters=dict(weight=1.0, density=0.4), base_index=0)
    with fm_mk.patched():
        actual = merge_tensors([b64, *m64], "ties", parameters=dict(weight=1.0, density=0.4), base_index=0)
    assert actual.dtype == torch.float64 and torch.equal(actual, expected)


def test_non_finite_inputs_run_mergekit_with_a_warning():
    base, models = make_models((16, 16), K=2, seed=2)
    models[0][2, 2] = float("inf")
    p = dict(weight=[1.0, 1.0])
    expected = merge_tensors([base, *models], "task_arithmetic", parameters=p, base_index=0)
    with fm_mk.patched(), pytest.warns(RuntimeWarning, match="non-finite.*mergekit"):
        actual = merge_tensors([base, *models], "task_arithmetic", parameters=p, base_index=0)
    torch.testing.assert_close(actual, expected, equal_nan=True)


def test_autograd_through_module_parameters_is_kept():
    mods = [nn.Linear(6, 4) for _ in range(3)]
    sds = [m.state_dict(keep_vars=True) for m in mods]
    with fm_mk.patched():
        merged = merge_state_dicts(sds, "ties", parameters=dict(weight=1.0, density=0.5), base=0)
    assert merged["weight"].grad_fn is not None, "mergekit's differentiable path must be kept"
    with fm_mk.patched(), torch.no_grad():
        fast = merge_state_dicts(sds, "ties", parameters=dict(weight=1.0, density=0.5), base=0)
    torch.testing.assert_close(fast["weight"], merged["weight"].detach(), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- end to end: mergekit-yaml

@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    pytest.importorskip("transformers")
    return tiny_llamas(tmp_path_factory.mktemp("llamas"))


@pytest.mark.parametrize("method,dtype,out_dtype", [
    ("ties", "float32", None), ("ties", "bfloat16", None), ("task_arithmetic", "float32", "bfloat16"),
    ("breadcrumbs_ties", "float32", None), ("dare_ties", "float32", None), ("della", "float32", None),
    ("linear", "float16", None),
])
def test_fastmerge_mergekit_matches_mergekit_yaml(llamas, tmp_path, monkeypatch, method, dtype, out_dtype):
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from fastmerge.cli import main as fastmerge_cli

    cfg = llama_config(llamas, method, dtype, out_dtype)
    args = ["--random-seed", "7", "--no-copy-tokenizer"]
    if method in RANDOM:
        # the same masks in both runs: mergekit's bernoulli replaced by fastmerge's stream
        with bernoulli_as_fastmerge(monkeypatch, 3):
            mergekit_yaml.main(args=[str(cfg), str(tmp_path / "mk"), *args], standalone_mode=False)
    else:
        mergekit_yaml.main(args=[str(cfg), str(tmp_path / "mk"), *args], standalone_mode=False)
    assert not fm_mk.is_patched()
    assert fastmerge_cli(["mergekit", str(cfg), str(tmp_path / "fm"), *args]) == 0
    fm_mk.unpatch()

    assert_folders_match_mergekit(tmp_path / "mk", tmp_path / "fm", method, dtype, out_dtype)
    assert sorted(os.listdir(tmp_path / "mk")) == sorted(os.listdir(tmp_path / "fm"))


def test_fastmerge_mergekit_errors_are_clear(tmp_path, capsys):
    from fastmerge.cli import main as fastmerge_cli

    assert fastmerge_cli(["mergekit", str(tmp_path / "missing.yml"), str(tmp_path / "out")]) != 0
    assert "missing.yml" in capsys.readouterr().err


def test_without_a_fused_backend_the_call_stays_mergekits(monkeypatch):
    base, models = make_models((24, 24), K=2, seed=3)
    p = dict(weight=[1.0, 0.5], density=0.4)
    torch.manual_seed(8)
    theirs = merge_tensors([base, *models], "dare_ties", parameters=p, base_index=0)
    monkeypatch.setenv("FASTMERGE_BACKEND", "torch")
    with fm_mk.patched():
        torch.manual_seed(8)
        patched = merge_tensors([base, *models], "dare_ties", parameters=p, base_index=0)
    assert torch.equal(patched, theirs)
