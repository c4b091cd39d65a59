"""EMR-Merging (``fastmerge.emr``; csrc/emr.cpp): the reference against the transcription of
FusionBench's ``emr_merge`` (``fastmerge.bench.upstream_research``), the fused CPU pass against
the reference, task reconstruction, state dicts, errors."""
from __future__ import annotations

import pytest
import torch
from conftest import make_models, models_for

import fastmerge
from fastmerge.bench import upstream_research as up

SHAPES = [(37, 53), (129,), (3, 4, 5), (1, 7), ()]
SHAPE_IDS = ["37x53", "1d", "3d", "1x7", "0d"]


def _state_dicts(K, seed=0):
    shapes = {"a.weight": (33, 17), "a.bias": (33,), "b.weight": (5, 4, 3), "norm": (1,)}
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    models = [{n: v + 0.05 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(K)]
    return base, models


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("K", [1, 2, 3, 8])
def test_state_dicts_equal_fusionbench(backend, K):
    base, models = _state_dicts(K, seed=K)
    tvs = [{n: m[n] - base[n] for n in base} for m in models]
    uni, masks, rescalers = up.emr_fb(tvs)
    got = fastmerge.emr(base, models, backend=backend)
    assert len(got) == K
    torch.testing.assert_close(got.rescalers, rescalers, atol=0, rtol=2e-6)
    for n in base:
        assert torch.equal(got.unified[n], uni[n]), n
        for t in range(K):
            assert torch.equal(got.mask(t, n), masks[n][t]), (n, t)
    for t in range(K):
        rebuilt = got.task(t)
        for n in base:  # FusionBench's EMRTaskModulator.apply: theta + tau_uni * mask * rescaler
            want = base[n] + uni[n] * masks[n][t] * rescalers[t]
            torch.testing.assert_close(rebuilt[n], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("K", [1, 2, 5, 8])
def test_tensor_fused_equals_reference(shape, K):
    base, models = make_models(shape, K, seed=K)
    a = fastmerge.emr(base, models, backend="cpu")
    b = fastmerge.emr(base, models, backend="torch")
    assert torch.equal(a.unified, b.unified) and torch.equal(a.masks, b.masks)
    torch.testing.assert_close(a.rescalers, b.rescalers, atol=0, rtol=1e-6)
    uni, masks, rescalers = up.emr_fb([{"x": m.float() - base.float()} for m in models])
    assert torch.equal(b.unified, uni["x"])
    fine = torch.isfinite(rescalers)  # where a task keeps nothing FusionBench divides by 0; we give 0
    torch.testing.assert_close(b.rescalers[fine], rescalers[fine], atol=0, rtol=2e-6)
    assert torch.equal(b.rescalers[~fine], torch.zeros(int((~fine).sum())))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_non_contiguous_and_large(dtype):
    base, models = models_for((700, 300), 4, dtype, seed=2)
    bt, mt = base.t(), [m.t() for m in models]
    a = fastmerge.emr(bt, mt, backend="cpu")
    b = fastmerge.emr(bt, mt, backend="torch")
    assert a.unified.dtype == torch.float32 and torch.equal(a.unified, b.unified)
    assert torch.equal(a.masks, b.masks)
    torch.testing.assert_close(a.rescalers, b.rescalers, atol=0, rtol=1e-6)
    assert a.task(1).dtype == dtype and torch.equal(a.task(1), b.task(1))


def test_edge_cases():
    base = torch.zeros(10)
    same = fastmerge.emr(base, [base.clone(), base.clone()])
    assert torch.equal(same.unified, base) and torch.equal(same.rescalers, torch.zeros(2))  # nothing kept
    assert torch.equal(same.task(0), base)
    # one model: the unified vector is that model's task vector and its rescaler 1
    b, (m,) = make_models((20, 3), 1, seed=3)
    one = fastmerge.emr(b, [m])
    torch.testing.assert_close(one.task(0), m, atol=1e-6, rtol=0)
    torch.testing.assert_close(one.rescalers, torch.ones(1))
    empty = fastmerge.emr(b[:0], [m[:0]], backend="cpu")
    assert empty.unified.shape == (0, 3) and empty.masks.shape == (1, 0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_errors_name_the_argument(backend):
    base, models = make_models((8, 8), 3, seed=4)
    bad = models[2].clone()
    bad[0, 0] = float("inf")
    with pytest.raises(fastmerge.NonFiniteError, match=r"models\[2\]"):
        fastmerge.emr(base, [models[0], models[1], bad], backend=backend)
    with pytest.raises(ValueError, match="at least 1|empty"):
        fastmerge.emr(base, [], backend=backend)
    with pytest.raises(ValueError, match=r"models\[1\] has shape"):
        fastmerge.emr(base, [models[0], models[1][:4]], backend=backend)
    sd, sms = _state_dicts(2)
    with pytest.raises(ValueError, match=r"models\[1\] and base differ in tensor names"):
        fastmerge.emr(sd, [sms[0], {k: v for k, v in sms[1].items() if k != "norm"}], backend=backend)
    sms[1]["a.bias"] = sms[1]["a.bias"][:3]
    with pytest.raises(ValueError, match="tensor 'a.bias'"):
        fastmerge.emr(sd, sms, backend=backend)
    with pytest.raises(IndexError, match="task index 3"):
        fastmerge.emr(base, models, backend=backend).task(3)


def test_more_than_eight_models_take_the_runtime_k_path():
    base, models = models_for((33, 70), 10, torch.float32, seed=9)
    a, b = fastmerge.emr(base, models, backend="cpu"), fastmerge.emr(base, models, backend="torch")
    assert torch.equal(a.unified, b.unified) and torch.equal(a.masks, b.masks)
    torch.testing.assert_close(a.rescalers, b.rescalers, atol=0, rtol=1e-6)
