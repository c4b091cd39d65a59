"""PEFT's ``peft.utils.merge_utils`` with its signatures and semantics, fused.

Inputs are task tensors (deltas) and the result is a delta, as in PEFT 0.21.2. Differences by
design: random pruning draws its mask from fastmerge's seeded Philox stream (keyword ``seed=``)
instead of torch's global generator; top-k ties go to the lowest flat index; arithmetic is fp32
with the output in ``torch.result_type(task_tensors[0], weights)`` as PEFT's would be.
Extra keyword-only arguments (``seed``, ``backend``) keep PEFT's positional signatures intact.
"""
from __future__ import annotations

import warnings
from typing import Literal, Optional

import torch

from . import _compile as C
from . import _semantics as sem
from . import _validate as V
from . import dispatch as B
from .ops import _same_inputs
from .philox import resolve_seed

_SIGN_METHODS = {"total": "sum", "frequency": "count"}


def _density(density) -> Optional[float]:
    """PEFT's ``prune`` rules: >= 1 warns and keeps everything, < 0 raises."""
    d = V.number(density, "density")
    if d >= 1:
        warnings.warn(f"The density {d} is greater than or equal to 1, no pruning will be performed.")
        return None
    if d < 0:
        raise ValueError(f"Density should be >= 0, got {d}")
    return d


def _weights(weights, k: int):
    if isinstance(weights, torch.Tensor):
        if weights.dim() == 0:  # PEFT broadcasts a 0-d weight over every task
            return [V.number(weights, "weights")] * k, weights.dtype
        if weights.dim() != 1 or weights.numel() != k:
            raise ValueError(f"weights must be a 1-D tensor of {k} entries, got shape {tuple(weights.shape)}")
        return weights.tolist(), weights.dtype
    return V.per_model(weights, k, "weights"), torch.get_default_dtype()


def result_dtype(task_dtype, weights_dtype, consensus: bool) -> torch.dtype:
    """PEFT's result dtype: tasks times weights; a consensus merge also divides by
    ``clamp(mask.sum(0), min=1.0)``, a tensor of torch's default float dtype."""
    out = torch.promote_types(task_dtype, weights_dtype)
    return torch.promote_types(out, torch.get_default_dtype()) if consensus else out


# (sparsification, consensus) -> PEFT function, for the custom op under torch.compile
_FUNCTIONS = {("none", False): "task_arithmetic", ("magnitude", False): "magnitude_prune",
              ("magnitude", True): "ties", ("random", False): "dare_linear", ("random", True): "dare_ties"}


def _merge(task_tensors, weights, density, method: str, rescale: bool, sign_method,
           seed, backend, keep=None) -> torch.Tensor:
    if C.compiling() and keep is None:  # torch.compile: the opaque custom op (fastmerge/library.py)
        if not isinstance(weights, torch.Tensor):
            w = C.floats(weights)
            weights = torch.tensor(w if isinstance(weights, (list, tuple)) else w[0])
        return torch.ops.fastmerge.peft_merge(
            _FUNCTIONS[(method, sign_method is not None)], list(task_tensors), weights, float(density),
            sign_method, C.seed_in(seed), backend)
    tasks = _same_inputs(task_tensors, "task_tensors")
    w, wdtype = _weights(weights, len(tasks))
    consensus = None
    if sign_method is not None:
        if sign_method not in _SIGN_METHODS:
            raise ValueError(f'majority_sign_method must be "total" or "frequency", got {sign_method!r}')
        consensus = _SIGN_METHODS[sign_method]
    out_dtype = result_dtype(tasks[0].dtype, wdtype, consensus is not None)
    # kernels write fp32/fp16/bf16; a wider PEFT result type (float64 weights) is a final cast
    work_dtype = out_dtype if out_dtype in V.SUPPORTED_DTYPES else torch.float32
    d = _density(density) if method != "none" else None
    n = tasks[0].numel()
    if d is None:
        masks = [sem.MaskSpec("none")] * len(tasks)
    elif method == "magnitude":
        masks = [sem.magnitude_mask(d, n, convention="peft")] * len(tasks)
    elif keep is None:
        masks = [sem.random_mask(d)] * len(tasks)
    else:  # drawn by the caller (PEFT's own torch.bernoulli calls under patch(rng="torch"))
        keep = V.keep_masks(keep, tasks, "keep")
        if any(k is None for k in keep):
            raise TypeError("keep must hold one bool tensor per task tensor (no None)")
        masks = [sem.given_mask(k, d) for k in keep]
    if keep is not None and (method != "random" or d is None):
        raise ValueError("keep masks apply to random pruning with density < 1 only")
    plan = sem.Plan(
        masks=masks,
        weights=w,
        rescale="density" if (rescale and d is not None) else None,
        consensus=consensus,
        elect_weighted=False,
        divisor="count" if consensus else "none",
        normalize=consensus is not None,
        # a seed is drawn (from torch's default generator) only for fastmerge's own masks
        seed=resolve_seed(seed) if method == "random" and d is not None and keep is None else 0,
        names=[f"task_tensors[{i}]" for i in range(len(tasks))],
        weight_grad=V.grad_weights(weights, len(tasks)),
    )
    return B.run(plan, None, tasks, work_dtype, backend, "peft").to(out_dtype)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor, *, backend=None) -> torch.Tensor:
    """``sum_k w_k t_k`` (Ilharco et al. 2023, arXiv:2212.04089)."""
    return _merge(task_tensors, weights, 1.0, "none", False, None, None, backend)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float, *,
                    backend=None) -> torch.Tensor:
    """``sum_k w_k topk_density(t_k)`` with ``k = int(density * numel)``."""
    return _merge(task_tensors, weights, density, "magnitude", False, None, None, backend)


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total", *, backend=None) -> torch.Tensor:
    """TIES (arXiv:2306.01708) as PEFT: prune each ``t_k`` to its top ``int(density*n)``, elect
    the sign on the UNWEIGHTED pruned tensors, then ``sum_k w_k t_k [agree] / max(#agree, 1)``."""
    return _merge(task_tensors, weights, density, "magnitude", False, majority_sign_method, None, backend)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float, *,
                seed: Optional[int] = None, backend=None, keep=None) -> torch.Tensor:
    """DARE (arXiv:2311.03099): ``sum_k w_k (mask_k * t_k) / density``.

    ``keep``: optional masks drawn by the caller (one bool tensor per task tensor, True = kept)
    in place of the Philox draws; the rest of the merge is the same."""
    return _merge(task_tensors, weights, density, "random", True, None, seed, backend, keep)


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total", *,
              seed: Optional[int] = None, backend=None, keep=None) -> torch.Tensor:
    """DARE drop-and-rescale followed by TIES's election and disjoint merge (PEFT order);
    ``keep`` as in :func:`dare_linear`."""
    return _merge(task_tensors, weights, density, "random", True, majority_sign_method, seed, backend,
                  keep)


def magnitude_based_pruning(tensor: torch.Tensor, density: float, *, backend=None) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest-magnitude entries."""
    from .ops import magnitude_prune as _mp

    return _mp(tensor, k=int(V.number(density, "density") * tensor.numel()), backend=backend)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool, *, seed: Optional[int] = None,
                   backend=None) -> torch.Tensor:
    """Keep each entry with probability ``density``; divide by ``density`` if ``rescale``."""
    from .ops import random_drop

    return random_drop(tensor, density, seed=seed, rescale="density" if rescale else False, backend=backend)


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"],
          rescale: bool = False, *, seed: Optional[int] = None, backend=None) -> torch.Tensor:
    """PEFT's ``prune``: density >= 1 warns and returns ``tensor``; density < 0 raises."""
    if method not in ("magnitude", "random"):
        raise ValueError(f"Unknown method {method}")
    d = _density(density)
    if d is None:
        return tensor
    if method == "magnitude":
        return magnitude_based_pruning(tensor, d, backend=backend)
    return random_pruning(tensor, d, rescale, seed=seed, backend=backend)


def calculate_majority_sign_mask(tensor: torch.Tensor,
                                 method: Literal["total", "frequency"] = "total", *, backend=None) -> torch.Tensor:
    """``sign(T) == M`` for T stacked on dim 0, M = +1 where ``T.sum(0) >= 0`` (``total``) or
    ``sign(T).sum(0) >= 0`` (``frequency``), else -1. Returns a bool tensor shaped like T."""
    from .ops import elect_sign

    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 1:
        raise TypeError("tensor must be a torch.Tensor with the task tensors stacked on dim 0")
    if method not in _SIGN_METHODS:
        raise ValueError(f'method must be "total" or "frequency", got {method!r}')
    sign = elect_sign(list(tensor.unbind(0)), method=_SIGN_METHODS[method], backend=backend)
    return tensor.sign() == sign


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """``(T * mask).sum(0) / max(mask.sum(0), 1)`` on PEFT's stacked inputs.

    The inputs arrive stacked by PEFT's signature, so this is the one helper computed with torch
    ops; the fused merges above never build the stack.
    """
    if not isinstance(task_tensors, torch.Tensor) or not isinstance(majority_sign_mask, torch.Tensor):
        raise TypeError("task_tensors and majority_sign_mask must be torch.Tensors")
    if task_tensors.shape != majority_sign_mask.shape:
        raise ValueError(
            f"majority_sign_mask has shape {tuple(majority_sign_mask.shape)} but task_tensors has "
            f"{tuple(task_tensors.shape)}"
        )
    mixed = (task_tensors * majority_sign_mask).sum(dim=0)
    return mixed / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)
