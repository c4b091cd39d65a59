"""PCB-merging (``fastmerge.merge("pcb", ...)``; csrc/pcb.cpp): the torch reference against the
transcription of the authors' pcb-merging.py (``fastmerge.bench.upstream_research``), the
fused CPU kernels against the reference (fp32 round-off: exp and tanh are polynomials there),
the 0/0 edges the authors' code turns into NaN, errors."""
from __future__ import annotations

import pytest
import torch
from conftest import models_for

import fastmerge
from fastmerge.bench import upstream_research as up

SHAPES = [(37, 53), (129,), (3, 4, 5), (1, 7), (160, 70)]
SHAPE_IDS = ["37x53", "1d", "3d", "1x7", "160x70"]  # 160x70: n * 1e-4 >= 1, the clamp moves the minimum


def _upstream(base, models, ratio, weights, lam):
    ptm = base.reshape(-1).float()
    tv = torch.vstack([m.reshape(-1).float() for m in models]) - ptm
    return (ptm + lam * up.pcb_authors(tv, pcb_ratio=ratio, lams=weights)).reshape(base.shape)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("K", [1, 2, 3, 5, 8])
def test_reference_equals_the_authors_code(shape, K):
    base, models = models_for(shape, K, torch.float32, seed=K)
    for ratio in (1.0, 0.5, 0.1, 0.02):
        for weights, lam in ((None, 1.0), ([0.8 + 0.1 * k for k in range(K)], 0.7)):
            ours = fastmerge.merge("pcb", base, models, ratio=ratio, weights=weights, lam=lam, backend="torch")
            theirs = _upstream(base, models, ratio, weights, lam)
            if torch.isnan(theirs).any():  # the score's cut is its max (tiny n): 0/0 there, see below
                assert torch.isfinite(ours).all()
                continue
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=f"ratio={ratio} weights={weights}")


@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 1029)], ids=SHAPE_IDS + ["3d-large"])
@pytest.mark.parametrize("K", [1, 3, 8])
def test_fused_equals_reference(shape, K):
    base, models = models_for(shape, K, torch.float32, seed=10 + K)
    for params in (dict(), dict(ratio=1.0), dict(ratio=0.05, weights=[1.0 + 0.1 * k for k in range(K)], lam=1.2),
                   dict(min_ratio=0.0, max_ratio=0.0), dict(min_ratio=0.1, max_ratio=0.2, ratio=0.3)):
        ref = fastmerge.merge("pcb", base, models, backend="torch", **params)
        got = fastmerge.merge("pcb", base, models, backend="cpu", **params)
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5, msg=str(params))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_low_precision_non_contiguous_large(dtype):
    base, models = models_for((400, 300), 4, dtype, seed=3)  # n = 120000: clamp ranks 12 and n - 13
    bt, mt = base.t(), [m.t() for m in models]
    for out_dtype in (None, torch.float32):
        ref = fastmerge.merge("pcb", bt, mt, backend="torch", out_dtype=out_dtype)
        got = fastmerge.merge("pcb", bt, mt, backend="cpu", out_dtype=out_dtype)
        assert got.dtype == ref.dtype
        tol = dict(atol=2e-6, rtol=1e-5) if got.dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(got.float(), ref.float(), **tol)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_zero_over_zero_edges_stay_finite(backend):
    """Equal clamped magnitudes (hi == lo) and a score max equal to its cut (M == q): the
    authors' normalize divides 0 by 0 (NaN everywhere); here those terms are 0."""
    base = torch.zeros(64, 33)
    models = [base + 0.01, base - 0.01 * torch.ones_like(base), base + 0.02]
    assert torch.isnan(_upstream(base, models, 0.1, None, 1.0)).all()
    got = fastmerge.merge("pcb", base, models, backend=backend)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, fastmerge.merge("pcb", base, models, backend="torch"), atol=1e-6, rtol=1e-5)
    one = fastmerge.merge("pcb", torch.zeros(()), [torch.tensor(0.5)], backend=backend)  # 1 element: hi == lo
    assert torch.isfinite(one)
    assert fastmerge.merge("pcb", base[:0], [m[:0] for m in models], backend=backend).shape == (0, 33)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_errors_name_the_argument(backend):
    base, models = models_for((8, 9), 3, torch.float32, seed=4)
    for ratio in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="ratio must be in"):
            fastmerge.merge("pcb", base, models, ratio=ratio, backend=backend)
    with pytest.raises(ValueError, match="min_ratio and max_ratio"):
        fastmerge.merge("pcb", base, models, min_ratio=0.6, max_ratio=0.5, backend=backend)
    with pytest.raises(ValueError, match="weights has 2 entries"):
        fastmerge.merge("pcb", base, models, weights=[1.0, 2.0], backend=backend)
    bad = models[0].clone()
    bad[1, 1] = float("nan")
    with pytest.raises(fastmerge.NonFiniteError, match=r"models\[0\]"):
        fastmerge.merge("pcb", base, [bad, models[1], models[2]], backend=backend)
    big = torch.randn(200, 100)
    bad = big + 0.01
    bad[5, 5] = float("inf")
    with pytest.raises(fastmerge.NonFiniteError, match=r"models\[1\]"):
        fastmerge.merge("pcb", big, [big + 0.02, bad], backend=backend)
