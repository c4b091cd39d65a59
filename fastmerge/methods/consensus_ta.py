"""Consensus Task Arithmetic: task arithmetic restricted to the weights at least ``k`` TALL
masks keep (Wang et al. 2024, "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024, https://arxiv.org/abs/2405.07813; code: github.com/nik-dim/tall_masks,
FusionBench's ``tall_mask``)."""
from __future__ import annotations

import torch

from fastmerge import _validate as V
from fastmerge.methods._common import checked, inputs

CONTRACT = dict(base="required", min_models=1, max_models=None)
# k: the paper's (and tall_masks' prun_thre_k) 2; tall_lambda: FusionBench's tall_mask_lambda 0.6
PARAMS = {"k": 2, "tall_lambda": 0.6, "lam": 1.0}
KERNELS = ("cpu", "triton", "cuda")
RESULT_CHECKED = True  # fused returns a checked kernel's output (methods/__init__.py)


def tall_masks(deltas: list, mtl: torch.Tensor, lambdas: list) -> list:
    """TALL masks, one per task: ``m_t = |tau_t| > lambda_t |tau_MTL - tau_t|`` (strictly, as
    tall_masks' and FusionBench's ``generate_task_masks``: ``|theta_0 - theta_t| > lambda
    |theta_MTL - theta_t|`` with ``theta_MTL = theta_0 + tau_MTL``)."""
    return [d.abs() > lam_t * (mtl - d).abs() for d, lam_t in zip(deltas, lambdas)]


def consensus_keep(masks: list, k: int) -> torch.Tensor:
    """The consensus mask: the elements that at least ``k`` TALL masks keep (``k = 0``: all;
    ``k > K``: none)."""
    count = torch.zeros(masks[0].shape, dtype=torch.int32, device=masks[0].device)
    for m in masks:
        count = count + m.to(torch.int32)
    return count >= k


def consensus_params(method: str, K: int, k, tall_lambda, lam):
    """The shared parameters checked: ``(k, [lambda_t], lam)``."""
    k = V.integer(k, "k", 0)
    lambdas = V.per_model(tall_lambda, K, "tall_lambda", 0.0)
    return k, lambdas, V.number(lam, "lam")


def reference(base, models, *, k=2, tall_lambda=0.6, lam=1.0) -> torch.Tensor:
    """With task vectors ``tau_t = models[t] - base`` (fp32) and ``tau_MTL = sum_t tau_t``:

    1. TALL masks ``m_t = |tau_t| > lambda_t |tau_MTL - tau_t|`` (:func:`tall_masks`,
       ``tall_lambda``: one value or one per model);
    2. consensus ``c = [sum_t m_t >= k]`` (``k = 2`` drops the "catastrophic" weights no task
       needs and the "selfish" ones only one task needs);
    3. ``out = base + lam * (tau_MTL * c)``.

    ``k = 0`` is task arithmetic (``lam * sum_t tau_t``); ``k > K`` gives the base.

    Differences from the paper's code (tall_masks ``consensus``): the masks are computed from
    the task vectors (``|tau_t|`` and ``|tau_MTL - tau_t|``) rather than from the weights
    (``|theta_0 - theta_t|``, ``|theta_0 + tau_MTL - theta_t|``): the same values up to fp32
    round-off. The code picks each task's lambda on validation data from {0.2, ..., 0.6} and
    stores the masks; here ``tall_lambda`` is given (FusionBench's default 0.6). The scope is
    the tensor (the code flattens the whole model; the masks are elementwise, so the result is
    the same).
    """
    b, ms = inputs("consensus_ta", CONTRACT, base, models)
    k, lambdas, lam = consensus_params("consensus_ta", len(ms), k, tall_lambda, lam)
    deltas = [m - b for m in ms]
    mtl = sum(deltas)
    keep = consensus_keep(tall_masks(deltas, mtl, lambdas), k)
    return b + lam * (mtl * keep)


def fused(ops, base, models, *, out_dtype, k=2, tall_lambda=0.6, lam=1.0) -> torch.Tensor:
    """:func:`reference` in one pass over the inputs (``ops.consensus``), in ``out_dtype``."""
    b, ms = checked("consensus_ta", CONTRACT, base, models)
    k, lambdas, lam = consensus_params("consensus_ta", len(ms), k, tall_lambda, lam)
    return ops.consensus(b, ms, k=k, tall_lambda=lambdas, lam=lam, out_dtype=out_dtype)
