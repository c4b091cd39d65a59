"""EMR-Merging's unified model: Elect, Mask & Rescale (Huang et al. 2024, "EMR-Merging:
Tuning-Free High-Performance Model Merging", NeurIPS 2024, https://arxiv.org/abs/2405.17461;
FusionBench ``emr_merging``). As a merge method (``fastmerge.merge("emr", ...)``, ``merge_method:
emr`` in YAML) the result is ``base + tau_uni``; the per-task masks and rescalers that rebuild
each task come from :func:`fastmerge.emr` (and ``fastmerge merge`` writes them to
``emr.safetensors`` next to the unified model)."""
from __future__ import annotations

import torch

from fastmerge.methods._common import checked, inputs

CONTRACT = dict(base="required", min_models=1, max_models=None)
PARAMS: dict = {}
KERNELS = ("cpu", "triton", "cuda")


def unified(deltas: list) -> tuple:
    """``(tau_uni, [m_t])``: ``gamma = sign(sum_t tau_t)`` with a zero sum negative
    (FusionBench's ``_sign``), ``m_t = tau_t * gamma > 0``, ``tau_uni = gamma * max_t |tau_t *
    m_t|``."""
    flag = torch.where(sum(deltas) > 0, 1.0, -1.0)
    masks = [d * flag > 0 for d in deltas]
    top = torch.zeros_like(deltas[0])
    for d, m in zip(deltas, masks):
        top = torch.maximum(top, (d * m).abs())
    return top * flag, masks


def reference(base, models) -> torch.Tensor:
    """``base + tau_uni`` (:func:`unified` of the fp32 task vectors ``models[t] - base``)."""
    b, ms = inputs("emr", CONTRACT, base, models)
    return b + unified([m - b for m in ms])[0]


def fused(ops, base, models, *, out_dtype) -> torch.Tensor:
    """:func:`reference` from EMR's one pass (``ops.emr``), in ``out_dtype``."""
    b, ms = checked("emr", CONTRACT, base, models)
    return (b.float() + ops.emr(b, ms)[0]).to(out_dtype)
