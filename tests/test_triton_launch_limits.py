"""Host-side launch bounds of the Triton kernels, checked without running them: CUDA's grid
limits (y and z at most 65,535) and the 64-bit slot offsets of the selection's candidate
buffer. The launchers are called with a stand-in kernel that records the grid."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

Q = pytest.importorskip("fastmerge.quant")
GRID_YZ_MAX = 65535


class Recorder:
    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def test_int4_quantizer_grid_fits_above_65535_groups(monkeypatch):
    from fastmerge.triton_kernels import quant as TQ

    rec = Recorder()
    monkeypatch.setattr(TQ, "_int4_kernel", rec)
    w = torch.empty(8, 32 * 65536 + 32 * 7, dtype=torch.bfloat16)  # 65,543 groups of 32 per row
    TQ.quantize_int4(w, Q.Int4Config(32))
    (grid,) = rec.grids
    assert all(d <= GRID_YZ_MAX for d in grid[1:]), grid
    assert grid[0] <= 2**31 - 1 and grid[0] * (grid[1] if len(grid) > 1 else 1) >= 65543


def test_fused_int4_grid_fits_above_65535_groups(monkeypatch):
    from fastmerge.triton_kernels import quant as TQ

    rec = Recorder()
    monkeypatch.setattr(TQ, "_merge_int4_kernel", rec)
    C = 32 * 65536 + 32 * 7
    xs = [torch.empty(8, C, dtype=torch.bfloat16) for _ in range(2)]
    kw = dict(kinds=[0, 0], thr=torch.zeros(8, dtype=torch.int64), scale=torch.ones(2),
              weights=[1.0, 1.0], probs=[1.0, 1.0], keeps=[None, None], seed=0, strides=[(C, 1)] * 2,
              base_strides=(C, 1), strided=False, scale_mode=0, consensus=0, elect_weighted=True,
              divisor=0, const_div=1.0, normalize=False, lam=1.0)
    TQ.fused_merge_int4(None, xs, Q.Int4Config(32), torch.bfloat16, n=8 * C, C=C, **kw)
    (grid,) = rec.grids
    assert all(d <= GRID_YZ_MAX for d in grid[1:]), grid
