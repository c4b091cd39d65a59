"""Transcriptions of the upstream code of the research methods of issue 24, kept as the
reference implementations the tests compare with and the benchmark times (``python -m
fastmerge.bench.research``). Each function restates, on plain tensors, what the cited code
computes, in its own operations (full sorts, stacked copies), so that its cost is the upstream
cost:

* ``tall_masks_fb``, ``consensus_fb``: FusionBench 0.2.33 ``fusion_bench/method/tall_mask/
  utils.py`` (``generate_task_masks``, ``construct_consensus_mask``) and tall_masks'
  ``src/eval/aggregation.py`` (nik-dim/tall_masks; TA multi-task vector with k=100, no trim);
* ``ties_tall``: tall_masks' ``ties_merging`` (``src/utils/ties_utils.py``, ``topk_values_mask``);
* ``emr_fb``: FusionBench 0.2.33 ``fusion_bench/method/emr_merging/utils.py`` (``emr_merge``);
* ``fisher_fb``: FusionBench 0.2.33 ``fusion_bench/method/fisher_merging/fisher_merging.py``
  (``get_models_fisher_norm``, ``merging_with_fisher_weights``);
* ``pcb_authors``: ``pcb-merging.py`` of github.com/duguodong7/pcb-merging (``clamp``,
  ``normalize``, ``PCB_merge``) with ``compute_acc``'s per-task lambdas and merge.

FusionBench is MIT licensed (Copyright (c) 2024 Anke Tang); tall_masks and pcb-merging are cited for
reference. The
inputs are state dicts ``{name: tensor}`` or flat rows, as upstream takes them.
"""
from __future__ import annotations

import torch


# ---- TALL masks / Consensus (FusionBench tall_mask, tall_masks repo) --------------------------

def tall_masks_fb(flat_ft: torch.Tensor, flat_ptm: torch.Tensor, tv: torch.Tensor, tall_mask_lambda=0.6):
    """``generate_task_masks``: rows ``flat_ft [K, n]``, ``flat_ptm [n]``, multi-task vector ``tv``."""
    flat_multi = flat_ptm + tv
    diff_pt_ft = (flat_ptm - flat_ft).abs()
    diff_multi_ft = (flat_multi - flat_ft).abs()
    return diff_pt_ft > diff_multi_ft * tall_mask_lambda


def consensus_fb(masks: torch.Tensor, prun_thre_k: int) -> torch.Tensor:
    """``construct_consensus_mask`` on stacked masks ``[K, n]``."""
    consensus = torch.zeros_like(masks[0], dtype=torch.float32)
    for m in masks:
        consensus = consensus + m.float()
    return consensus.float() >= prun_thre_k


def consensus_ta_upstream(base: torch.Tensor, models: list, k=2, tall_mask_lambda=0.6, lam=1.0):
    """tall_masks' consensus with task arithmetic (method.k = 100: no trim): flatten, sum the
    task vectors, TALL masks, consensus, ``ptm + lam * merged_tv * mask``."""
    flat_ptm = base.reshape(-1).float()
    flat_ft = torch.vstack([m.reshape(-1).float() for m in models])
    tv_flat_checks = flat_ft - flat_ptm
    merged_tv = tv_flat_checks.sum(dim=0)
    masks = tall_masks_fb(flat_ft, flat_ptm, merged_tv, tall_mask_lambda)
    merged_tv = merged_tv * consensus_fb(masks, k)
    return (flat_ptm + lam * merged_tv).reshape(base.shape)


def topk_values_mask(M: torch.Tensor, K=0.7):
    """tall_masks' (and TIES-merging's) ``topk_values_mask``: keep ``|M| >= kthvalue(d - int(d K))``."""
    if K > 1:
        K /= 100
    if M.dim() == 1:
        M = M.unsqueeze(0)
    n, d = M.shape
    k = d - int(d * K)
    kth_values, _ = M.abs().kthvalue(k, dim=1, keepdim=True)
    return M * (M.abs() >= kth_values)


def ties_tall(flat_task_checks: torch.Tensor, reset_thresh=20, merge_func="sum") -> torch.Tensor:
    """tall_masks' ``ties_merging``: trim, sign of the sum (zeros to the majority), disjoint agg."""
    updated = topk_values_mask(flat_task_checks.clone(), K=reset_thresh)
    sign = torch.sign(updated.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    rows_to_keep = torch.where(sign.unsqueeze(0) > 0, updated > 0, updated < 0)
    selected = updated * rows_to_keep
    if merge_func == "mean":
        counts = (selected != 0).sum(dim=0).float()
        return selected.sum(dim=0) / torch.clamp(counts, min=1)
    return selected.sum(dim=0)


# ---- EMR (FusionBench emr_merging) -------------------------------------------------------------

def emr_fb(task_vectors: list):
    """``emr_merge`` over state dicts of task vectors: ``(unified, masks {name: [K]}, rescalers)``."""
    num_tasks = len(task_vectors)
    summed = {k: sum(tv[k] for tv in task_vectors) for k in task_vectors[0]}
    flag_dict = {k: (v > 0) * 2 - 1 for k, v in summed.items()}
    vector_unified, masks = {}, {}
    scales = torch.zeros(num_tasks)
    for n, flag in flag_dict.items():
        masks[n] = []
        param_max = torch.zeros_like(task_vectors[0][n])
        for m in range(num_tasks):
            param = task_vectors[m][n]
            mask = (param * flag) > 0
            masks[n].append(mask)
            param_abs = torch.abs(mask * param)
            param_max = torch.where(param_abs > param_max, param_abs, param_max)
            scales[m] += torch.mean(torch.abs(param))
        vector_unified[n] = param_max * flag
    new_scales = torch.zeros(num_tasks)
    for m in range(num_tasks):
        for n in vector_unified:
            p = vector_unified[n] * masks[n][m]
            new_scales[m] += torch.mean(torch.abs(p))
    return vector_unified, masks, scales / new_scales


# ---- Fisher merging (FusionBench fisher_merging) -----------------------------------------------

def fisher_fb(params: dict, fishers: list, coefficients=None, normalize=True, minimal=1e-6) -> dict:
    """``merging_with_fisher_weights``: ``params {name: [K tensors]}``, ``fishers [K dicts]``."""
    K = len(fishers)
    coefficients = torch.ones(K) / K if coefficients is None else torch.Tensor(coefficients)
    if normalize:
        norms = {}
        for name in params:
            stacked = torch.stack([f[name] for f in fishers], dim=0)
            norms[name] = torch.linalg.vector_norm(stacked, dim=list(range(1, stacked.dim())))
        norm = torch.norm(torch.stack(list(norms.values()), dim=1), dim=1)
    merged = {}
    for name, values in params.items():
        values = torch.stack(values, dim=0)
        weights = torch.stack([f[name] for f in fishers], dim=0) + minimal
        shape = (-1, *[1] * (values.dim() - 1))
        coef = coefficients.reshape(shape)
        if normalize:
            inv = 1.0 / (norm + minimal)
            coef = coef * (inv / inv.sum()).reshape(shape)
        merged[name] = (coef * weights * values).sum(dim=0) / (coef * weights).sum(dim=0)
    return merged


# ---- PCB-merging (the authors' pcb-merging.py) ------------------------------------------------

def _normalize(x, dim=0):
    lo, _ = torch.min(x, dim=dim, keepdim=True)
    hi, _ = torch.max(x, dim=dim, keepdim=True)
    return (x - lo) / (hi - lo)


def _clamp(x, min_ratio=0.0, max_ratio=0.0):
    d = x.size(1)
    sorted_x, _ = torch.sort(x, dim=1)
    lo = sorted_x[:, int(d * min_ratio)].unsqueeze(1)
    hi = sorted_x[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
    return torch.clamp(x, lo, hi)


def pcb_authors(flat_task_checks: torch.Tensor, pcb_ratio=0.1, lams=None, clamp_ratio=1e-4) -> torch.Tensor:
    """``PCB_merge`` then ``compute_acc``'s merge: the merged task vector ``[n]`` of rows ``[K, n]``."""
    all_checks = flat_task_checks.clone()
    n, d = all_checks.shape
    all_checks_abs = _clamp(torch.abs(all_checks), min_ratio=clamp_ratio, max_ratio=clamp_ratio)
    clamped_all_checks = torch.sign(all_checks) * all_checks_abs
    self_pcb = _normalize(all_checks_abs, 1) ** 2
    self_pcb_act = torch.exp(n * self_pcb)
    cross_pcb = all_checks * torch.sum(all_checks, dim=0)
    cross_pcb_act = torch.tanh(cross_pcb)
    task_pcb = self_pcb_act * cross_pcb_act
    scale = _normalize(_clamp(task_pcb, 1 - pcb_ratio, 0), dim=1)
    lams = [1.0] * n if lams is None else lams
    tvs = clamped_all_checks * torch.tensor(lams).unsqueeze(1)
    return torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
