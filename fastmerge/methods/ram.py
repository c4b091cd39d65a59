"""RAM: Reinforced Agent Merging. Deltas only one model changes are kept whole; where several
change an element their deltas are averaged (mergekit ``ram``; https://arxiv.org/abs/2601.13572)."""
from __future__ import annotations

import torch

from fastmerge import _validate as V
from fastmerge.methods._common import checked, inputs

CONTRACT = dict(base="required", min_models=0, max_models=None)
PARAMS = {"epsilon": 1e-5}
KERNELS = ("cpu", "triton", "cuda")
RESULT_CHECKED = True  # fused returns a checked kernel's output (methods/__init__.py)


def contributions(deltas: list, epsilon: float):
    """``(nz, count)``: ``nz[k] = |d_k| > epsilon`` (model k changes the element) and
    ``count = sum_k nz[k]`` (how many models change it)."""
    nz = [d.abs() > epsilon for d in deltas]
    return nz, sum(n.to(torch.int64) for n in nz)


def reference(base, models, *, epsilon=1e-5) -> torch.Tensor:
    """With ``d_k = m_k - base``, ``nz_k = |d_k| > epsilon`` and ``c = sum_k nz_k``::

        out = base + sum_k nz_k d_k / max(c, 1)

    i.e. an element one model changes (``c = 1``) takes that model's delta, one several change
    (``c > 1``) their mean, one none changes stays the base's. Any finite ``epsilon`` is accepted
    (``epsilon < 0`` counts every element). No models: the base.

    Differences from mergekit: none (mergekit sums ``d_k / c`` where this divides the sum once).
    """
    b, ms = inputs("ram", CONTRACT, base, models)
    epsilon = V.number(epsilon, "epsilon")
    if not ms:
        return b
    deltas = [m - b for m in ms]
    nz, count = contributions(deltas, epsilon)
    return b + sum(d * n for d, n in zip(deltas, nz)) / count.clamp(min=1)


def fused(ops, base, models, *, out_dtype, epsilon=1e-5) -> torch.Tensor:
    """:func:`reference` in one pass over the inputs (``ops.ram``), in ``out_dtype``."""
    b, ms = checked("ram", CONTRACT, base, models)
    return ops.ram(b, ms, epsilon=V.number(epsilon, "epsilon"), out_dtype=out_dtype)
