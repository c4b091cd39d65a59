"""TALL masks and Consensus merging (``consensus_ta``, ``consensus_ties``,
``fastmerge.research.tall_masks``; csrc/consensus.cpp): the torch reference against the
transcribed upstream code (FusionBench's tall_mask, the tall_masks repository;
``fastmerge.bench.upstream_research``), the fused CPU kernel against the reference, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_match, make_models, models_for

import fastmerge
from fastmerge import research
from fastmerge.bench import upstream_research as up

SHAPES = [(37, 53), (129,), (3, 4, 5), (1, 7), ()]
SHAPE_IDS = ["37x53", "1d", "3d", "1x7", "0d"]
LOW = [torch.bfloat16, torch.float16]


def _consensus_up(base, models, k, lam_t, lam):
    return up.consensus_ta_upstream(base, models, k=k, tall_mask_lambda=lam_t, lam=lam)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("K", [1, 2, 3, 5, 8])
def test_consensus_ta_reference_equals_upstream(shape, K):
    base, models = make_models(shape, K, seed=K)
    for k in sorted({0, 1, 2, K, K + 1}):
        for lam_t in (0.0, 0.6, 1.0, 3.0):
            ours = fastmerge.merge("consensus_ta", base, models, k=k, tall_lambda=lam_t, lam=0.7, backend="torch")
            theirs = _consensus_up(base, models, k, lam_t, 0.7)
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=f"k={k} lambda={lam_t}")


def test_consensus_ta_edges():
    base, models = make_models((41, 9), 4, seed=1)
    ta = fastmerge.merge("task_arithmetic", base, models, lam=0.5, backend="torch")
    torch.testing.assert_close(fastmerge.merge("consensus_ta", base, models, k=0, lam=0.5), ta,
                               atol=1e-6, rtol=1e-6)  # k = 0: every element kept
    assert torch.equal(fastmerge.merge("consensus_ta", base, models, k=5), base)  # k > K: none
    kept = fastmerge.merge("consensus_ta", base, models) != base
    assert 0 < kept.float().mean() < 1  # the default keeps some and drops some


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("K", [1, 2, 4, 8])
def test_consensus_ties_reference_equals_upstream(shape, K):
    """tall_masks' consensus with TIES (dis-sum, top 20%): its ``kthvalue`` trim keeps
    ``int(0.2 n) + 1`` elements on distinct magnitudes, so ours runs with that count."""
    base, models = make_models(shape, K, seed=10 + K)
    n = base.numel()
    density = (int(0.2 * n) + 1.5) / max(n, 1)
    flat_ptm = base.reshape(-1).float()
    flat_ft = torch.vstack([m.reshape(-1).float() for m in models])
    merged = up.ties_tall(flat_ft - flat_ptm, reset_thresh=20, merge_func="sum")
    for k in (0, 1, 2, K + 1):
        for lam_t in (0.2, 0.6):
            mask = up.consensus_fb(up.tall_masks_fb(flat_ft, flat_ptm, merged, lam_t), k)
            theirs = (flat_ptm + 0.9 * (merged * mask)).reshape(base.shape)
            ours = fastmerge.merge("consensus_ties", base, models, k=k, tall_lambda=lam_t, lam=0.9,
                                   density=min(density, 1.0), backend="torch")
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=f"k={k} lambda={lam_t}")


CASES = [("consensus_ta", {}), ("consensus_ta", dict(k=1, tall_lambda=[0.2, 0.5, 1.0], lam=0.8)),
         ("consensus_ta", dict(k=0)), ("consensus_ta", dict(k=4)),
         ("consensus_ties", {}), ("consensus_ties", dict(density=[0.1, 1.0, 0.0], normalize=True)),
         ("consensus_ties", dict(density=1.0, k=1, tall_lambda=0.0)),
         ("consensus_ties", dict(density=0.5, lam=1.3, tall_lambda=[0.3, 0.6, 0.9]))]


@pytest.mark.parametrize("method,params", CASES)
@pytest.mark.parametrize("shape", [(37, 53), (1031,), (5, 0), (2, 3, 1025)], ids=["37x53", "1d", "empty", "3d"])
def test_fused_bit_identical_to_reference(method, params, shape):
    base, models = make_models(shape, 3, seed=3)
    ref = fastmerge.merge(method, base, models, backend="torch", **params)
    assert torch.equal(fastmerge.merge(method, base, models, backend="cpu", **params), ref)


@pytest.mark.parametrize("method", ["consensus_ta", "consensus_ties"])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_fused_low_precision_and_out_dtype(method, dtype):
    base, models = make_models((64, 33), 4, dtype, seed=4)
    for out_dtype in (None, torch.float32, torch.bfloat16):
        ref = fastmerge.merge(method, base, models, backend="torch", out_dtype=out_dtype)
        assert_match(fastmerge.merge(method, base, models, backend="cpu", out_dtype=out_dtype), ref, str(out_dtype))


@pytest.mark.parametrize("method", ["consensus_ta", "consensus_ties"])
def test_fused_non_contiguous_and_large(method):
    base, models = models_for((300, 700), 3, torch.float32, seed=5)
    bt, mt = base.t(), [m.t() for m in models]
    assert torch.equal(fastmerge.merge(method, bt, mt, backend="cpu"), fastmerge.merge(method, bt, mt, backend="torch"))
    # ties at the top-k cut: many equal magnitudes, split by the lowest index
    q = [((m - base) * 50).round() / 50 + base for m in models]
    assert torch.equal(fastmerge.merge(method, base, q, backend="cpu", density=0.3 if method == "consensus_ties" else None),
                       fastmerge.merge(method, base, q, backend="torch", density=0.3 if method == "consensus_ties" else None))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_tall_masks_equal_upstream_and_packbits(backend):
    base, models = make_models((29, 31), 4, seed=6)
    flat_ptm = base.reshape(-1)
    flat_ft = torch.vstack([m.reshape(-1) for m in models])
    for lam_t in (0.2, 0.6, [0.1, 0.4, 0.6, 2.0]):
        got = research.tall_masks(base, models, tall_lambda=lam_t, backend=backend)
        lam_col = torch.tensor(lam_t).reshape(-1, 1) if isinstance(lam_t, list) else lam_t
        want = up.tall_masks_fb(flat_ft, flat_ptm, (flat_ft - flat_ptm).sum(0), lam_col)
        assert len(got) == 4 and got.packed.dtype == torch.uint8
        for t in range(4):
            assert torch.equal(got.mask(t).reshape(-1), want[t]), t
            assert np.array_equal(got.packed[t].numpy(), np.packbits(want[t].numpy()))
        mtl = (flat_ft - flat_ptm).sum(0).reshape(base.shape)
        torch.testing.assert_close(got.task(2, base, mtl), base + got.mask(2) * mtl)


def test_tall_masks_given_mtl_fused_equals_reference():
    base, models = make_models((1000, 3), 3, seed=7)
    mtl = fastmerge.merge("ties", base, models, density=0.2) - base
    for dtype in (torch.float32, torch.bfloat16):
        a = research.tall_masks(base, models, mtl=mtl.to(dtype), backend="cpu")
        b = research.tall_masks(base, models, mtl=mtl.to(dtype), backend="torch")
        assert torch.equal(a.packed, b.packed)
    empty = research.tall_masks(base[:0], [m[:0] for m in models], backend="cpu")
    assert empty.packed.shape == (3, 0) and empty.mask(0).shape == (0, 3)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_errors_name_the_argument(backend):
    base, models = make_models((8, 8), 3, seed=8)
    with pytest.raises(ValueError, match="k must be"):
        fastmerge.merge("consensus_ta", base, models, k=-1, backend=backend)
    with pytest.raises(TypeError, match="k must be an int"):
        fastmerge.merge("consensus_ta", base, models, k=1.5, backend=backend)
    with pytest.raises(ValueError, match="tall_lambda"):
        fastmerge.merge("consensus_ties", base, models, tall_lambda=-0.1, backend=backend)
    with pytest.raises(ValueError, match="tall_lambda has 2 entries"):
        research.tall_masks(base, models, tall_lambda=[0.1, 0.2], backend=backend)
    with pytest.raises(ValueError, match="density"):
        fastmerge.merge("consensus_ties", base, models, density=1.5, backend=backend)
    with pytest.raises(TypeError, match="takes no argument 'gamma'"):
        fastmerge.merge("consensus_ta", base, models, gamma=0.5, backend=backend)
    bad = models[1].clone()
    bad[3, 3] = float("nan")
    for method in ("consensus_ta", "consensus_ties"):
        with pytest.raises(fastmerge.NonFiniteError, match=r"models\[1\]"):
            fastmerge.merge(method, base, [models[0], bad, models[2]], backend=backend)
    with pytest.raises(fastmerge.NonFiniteError, match="mtl"):
        research.tall_masks(base, models, mtl=torch.full_like(base, float("inf")), backend=backend)
    with pytest.raises(ValueError, match="mtl"):
        research.tall_masks(base, models, mtl=base[:4], backend=backend)
    with pytest.raises(ValueError, match="requires base"):
        fastmerge.merge("consensus_ta", None, models, backend=backend)


@pytest.mark.parametrize("method", ["consensus_ta", "consensus_ties"])
def test_more_than_eight_models_take_the_runtime_k_path(method):
    """K > 8: the kernels' loops with K at run time (not the unrolled K <= 8 pass)."""
    base, models = models_for((33, 70), 10, torch.float32, seed=9)
    assert torch.equal(fastmerge.merge(method, base, models, backend="cpu"),
                       fastmerge.merge(method, base, models, backend="torch"))
    a = research.tall_masks(base, models, backend="cpu")
    assert torch.equal(a.packed, research.tall_masks(base, models, backend="torch").packed)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_consensus_ties_thresholds_equal_the_kthvalue_trim(backend):
    """``threshold``: keep ``|tau| >= t`` per model; with the tall_masks code's kthvalue
    thresholds it is that code's TIES (one element more than the top-k count per task)."""
    base, models = make_models((41, 57), 4, seed=12)
    flat_ptm = base.reshape(-1)
    flat_ft = torch.vstack([m.reshape(-1) for m in models])
    tv = flat_ft - flat_ptm
    n = tv.shape[1]
    thr = [float(tv[t].abs().kthvalue(n - int(n * 0.2)).values) for t in range(4)]
    merged = up.ties_tall(tv, reset_thresh=20, merge_func="sum")
    mask = up.consensus_fb(up.tall_masks_fb(flat_ft, flat_ptm, merged, 0.6), 2)
    theirs = (flat_ptm + merged * mask).reshape(base.shape)
    ours = fastmerge.merge("consensus_ties", base, models, threshold=thr, backend=backend)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert torch.equal(ours, fastmerge.merge("consensus_ties", base, models, threshold=thr, backend="torch"))
    with pytest.raises(ValueError, match="either density or threshold"):
        fastmerge.merge("consensus_ties", base, models, threshold=thr, density=0.5, backend=backend)
    with pytest.raises(ValueError, match="threshold"):
        fastmerge.merge("consensus_ties", base, models, threshold=-1.0, backend=backend)


LARGE = [(dict(), 3), (dict(density=[0.1, 1.0, 0.0, 0.3]), 4), (dict(normalize=True, density=0.5), 2),
         (dict(k=1, tall_lambda=[0.2, 0.4, 0.6, 0.8, 1.0], lam=0.8), 5), (dict(density=0.05), 8), (dict(), 1)]


@pytest.mark.parametrize("params,K", LARGE)
def test_consensus_ties_large_bit_identical(params, K):
    """Past 2^20 elements (select_ranges' sampled bracket, many blocks on the fused loop): the
    reference's bytes."""
    base, models = models_for((1100, 1000), K, torch.float32, seed=K)
    ref = fastmerge.merge("consensus_ties", base, models, backend="torch", **params)
    assert torch.equal(fastmerge.merge("consensus_ties", base, models, backend="cpu", **params), ref)


def test_consensus_ties_ties_low_precision_and_a_skewed_sample():
    base, models = models_for((300, 211), 3, torch.float32, seed=4)
    q = [((m - base) * 40).round() / 40 + base for m in models]  # many equal magnitudes at the cut
    assert torch.equal(fastmerge.merge("consensus_ties", base, q, backend="cpu", density=0.3),
                       fastmerge.merge("consensus_ties", base, q, backend="torch", density=0.3))
    b16, m16 = models_for((300, 211), 3, torch.bfloat16, seed=5)
    for out_dtype in (None, torch.float32):
        assert torch.equal(fastmerge.merge("consensus_ties", b16, m16, backend="cpu", out_dtype=out_dtype),
                           fastmerge.merge("consensus_ties", b16, m16, backend="torch", out_dtype=out_dtype))
    # a sample that sees only zero deltas (they sit exactly at select_ranges' sampled runs): its
    # bracket misses and the radix passes take over
    n = 1 << 20
    base = torch.randn(n)
    models = [base + 0.05 * torch.randn(n) for _ in range(2)]
    idx = (torch.arange(1024).unsqueeze(1) * 1024 + torch.arange(16)).reshape(-1)
    for m in models:
        m[idx] = base[idx]
    assert torch.equal(fastmerge.merge("consensus_ties", base, models, backend="cpu"),
                       fastmerge.merge("consensus_ties", base, models, backend="torch"))
    bad = models[1].clone()
    bad[12345] = float("nan")
    with pytest.raises(fastmerge.NonFiniteError, match=r"models\[1\]"):
        fastmerge.merge("consensus_ties", base, [models[0], bad], backend="cpu")
