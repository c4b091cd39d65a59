"""Fisher merging (``fastmerge.fisher``; csrc/fisher.cpp): the reference against the
transcription of FusionBench's ``merging_with_fisher_weights``, the fused CPU passes against
the reference, state dicts (the whole-model Fisher norm), parameters' edges, errors."""
from __future__ import annotations

import pytest
import torch
from conftest import models_for

import fastmerge
from fastmerge.bench import upstream_research as up


def _inputs(shape, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    _, models = models_for(shape, K, dtype, seed=seed)
    fishers = [(torch.rand(shape, generator=g) ** 3 * (k + 1)).to(dtype) for k in range(K)]
    return models, fishers


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("shape", [(37, 53), (129,), (3, 4, 5), ()], ids=["37x53", "1d", "3d", "0d"])
@pytest.mark.parametrize("K", [1, 2, 4, 8])
def test_equals_fusionbench(backend, shape, K):
    models, fishers = _inputs(shape, K, seed=K)
    for params in (dict(), dict(normalize_fisher_weight=False), dict(weights=[0.5 + k for k in range(K)]),
                   dict(minimal_fisher_weight=0.0), dict(minimal_fisher_weight=1e-2, normalize_fisher_weight=False)):
        got = fastmerge.fisher(models, fishers, backend=backend, **params)
        # FusionBench's norm stacking needs >= 1 dimension: a 0-d tensor goes in as 1 element
        want = up.fisher_fb({"x": [m.reshape(-1) for m in models]}, [{"x": f.reshape(-1)} for f in fishers],
                            params.get("weights"), params.get("normalize_fisher_weight", True),
                            params.get("minimal_fisher_weight", 1e-6))["x"].reshape(shape)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=str(params))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_state_dicts_use_the_whole_model_norm(backend):
    names = {"w": (17, 9), "b": (17,), "s": (1,)}  # FusionBench stacks per-tensor norms: no 0-d
    per = {n: _inputs(s, 3, seed=i) for i, (n, s) in enumerate(names.items())}
    models = [{n: per[n][0][k] for n in names} for k in range(3)]
    fishers = [{n: per[n][1][k] for n in names} for k in range(3)]
    got = fastmerge.fisher(models, fishers, weights=[0.2, 0.3, 0.5], backend=backend)
    want = up.fisher_fb({n: [m[n] for m in models] for n in names}, fishers, [0.2, 0.3, 0.5])
    assert set(got) == set(names)
    for n in names:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=n)
    # per tensor, the norms (and so the result) differ: the whole-model norm is what is used
    alone = fastmerge.fisher([m["w"] for m in models], [f["w"] for f in fishers], weights=[0.2, 0.3, 0.5], backend=backend)
    assert not torch.allclose(alone, got["w"], atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_equals_reference_low_precision_non_contiguous(dtype):
    models, fishers = _inputs((300, 500), 4, dtype, seed=5)
    mt, ft = [m.t() for m in models], [f.t() for f in fishers]
    for out_dtype in (None, torch.float32):
        a = fastmerge.fisher(mt, ft, backend="cpu", out_dtype=out_dtype)
        b = fastmerge.fisher(mt, ft, backend="torch", out_dtype=out_dtype)
        assert a.dtype == (out_dtype or dtype)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Fishers in another dtype than the models
    a = fastmerge.fisher([m.float() for m in models], fishers, backend="cpu")
    torch.testing.assert_close(a, fastmerge.fisher([m.float() for m in models], fishers, backend="torch"), atol=0, rtol=0)
    assert fastmerge.fisher([m[:0] for m in models], [f[:0] for f in fishers], backend="cpu").shape == (0, 500)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_errors_name_the_argument(backend):
    models, fishers = _inputs((6, 5), 3, seed=6)
    neg = fishers[1].clone()
    neg[2, 2] = -1e-3
    with pytest.raises(ValueError, match=r"fishers\[1\] has negative entries"):
        fastmerge.fisher(models, [fishers[0], neg, fishers[2]], backend=backend)
    nan = models[2].clone()
    nan[0, 1] = float("nan")
    with pytest.raises(fastmerge.NonFiniteError, match=r"models\[2\]"):
        fastmerge.fisher([models[0], models[1], nan], fishers, backend=backend)
    inf = fishers[0].clone()
    inf[1, 1] = float("inf")
    with pytest.raises(fastmerge.NonFiniteError, match=r"fishers\[0\]"):
        fastmerge.fisher(models, [inf, fishers[1], fishers[2]], backend=backend)
    with pytest.raises(ValueError, match="fishers has 2 entries for 3 models"):
        fastmerge.fisher(models, fishers[:2], backend=backend)
    with pytest.raises(ValueError, match="models' shape"):
        fastmerge.fisher(models, [f[:3] for f in fishers], backend=backend)
    with pytest.raises(ValueError, match="weights has 2 entries"):
        fastmerge.fisher(models, fishers, weights=[1, 2], backend=backend)
    with pytest.raises(ValueError, match="minimal_fisher_weight must be >= 0"):
        fastmerge.fisher(models, fishers, minimal_fisher_weight=-1.0, backend=backend)
    with pytest.raises(ValueError, match="empty"):
        fastmerge.fisher([], [], backend=backend)
    with pytest.raises(ValueError, match=r"fishers\[1\] is all zero and minimal_fisher_weight is 0"):
        fastmerge.fisher(models, [fishers[0], torch.zeros_like(fishers[1]), fishers[2]],
                         minimal_fisher_weight=0.0, backend=backend)


def test_more_than_eight_models_take_the_runtime_k_path():
    models, fishers = _inputs((33, 70), 10, seed=9)
    torch.testing.assert_close(fastmerge.fisher(models, fishers, backend="cpu"),
                               fastmerge.fisher(models, fishers, backend="torch"), atol=0, rtol=1e-6)
