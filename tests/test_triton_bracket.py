"""The selection's sample bracket on layouts that defeat a strided sample, and on heavily tied
deltas, in Triton's interpreter: every answer is checked against the torch reference's top-k
set, and the runs of the radix fallback are counted (zero for column-scaled matrices, where
the old sample ``(s * n) // S`` saw one column in ``n / S`` and missed; zero for tied deltas
too, where the bracket lands in the run of ties (``lo == hi``) and only the ties are scanned)."""
from __future__ import annotations

import pytest
import torch

import fastmerge

pytestmark = pytest.mark.skipif(
    not fastmerge.backends()["triton"].get("interpreter"),
    reason="needs Triton's interpreter (TRITON_INTERPRET=1, set by conftest without CUDA)")

ROWS, COLS = 256, 1024  # n = 2**18: the old sample took every 4th column only


def matrix(case):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(ROWS, COLS, generator=g)
    if case == "every_4th_column_x16":
        x[:, ::4] *= 16.0
    elif case == "random_column_scales":
        x *= torch.exp(2.0 * torch.randn(1, COLS, generator=g))
    elif case == "frozen":
        x.zero_()
    elif case == "sparse":
        x[torch.rand(ROWS, COLS, generator=g) < 0.97] = 0.0
    return x


def run_select(x, ks, monkeypatch):
    from fastmerge.backends import _gpu as gpu
    from fastmerge.backends.triton import kernels

    ms = kernels().magnitude_select
    runs = {"radix": 0, "ties": 0}
    real_radix, real_ties = ms._radix, ms._ties

    def radix(*a, **k):
        runs["radix"] += 1
        return real_radix(*a, **k)

    def ties(*a, **k):
        runs["ties"] += 1
        return real_ties(*a, **k)

    monkeypatch.setattr(ms, "_radix", radix)
    monkeypatch.setattr(ms, "_ties", ties)
    _, bst, xs, sts, C, strided = gpu.layout(None, [x])
    tj = ms.select(None, xs, qm=[0] * len(ks), qk=ks, n=x.numel(), C=C, strides=sts,
                   base_strides=bst, strided=strided)
    return tj.tolist(), runs


def check_exact(x, ks, tj):
    from fastmerge.backends.torch import range_keep

    a = x.reshape(-1).float()
    key = a.view(torch.int32) & 0x7FFFFFFF
    i = torch.arange(a.numel())
    for (T, J), k in zip(tj, ks):
        kept = (key > T) | ((key == T) & (i <= J))
        assert torch.equal(kept, range_keep(a.abs(), 0, k).reshape(-1)), k


@pytest.mark.parametrize("case", ["every_4th_column_x16", "random_column_scales"])
def test_column_scaled_never_falls_back(case, monkeypatch):
    x = matrix(case)
    n = x.numel()
    ks = [n // 10, n * 3 // 10, n // 2]  # densities 0.1, 0.3, 0.5
    tj, runs = run_select(x, ks, monkeypatch)
    check_exact(x, ks, tj)
    assert runs["radix"] == 0, runs


@pytest.mark.parametrize("case", ["frozen", "sparse"])
def test_tied_deltas_scan_only_the_ties(case, monkeypatch):
    x = matrix(case)
    n = x.numel()
    ks = [n // 2, n * 9 // 10]  # thresholds inside the run of zeros
    tj, runs = run_select(x, ks, monkeypatch)
    check_exact(x, ks, tj)
    assert runs["radix"] == 0, runs  # lo == hi: T known, only the tie scan ran
