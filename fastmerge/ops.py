"""Merge primitives, each fused on the ``cpu`` backend and defined by the ``torch`` reference.

Every magnitude selection uses the same total order: larger ``|x|`` first, then lower flat
index, so exactly ``k`` elements are kept and ties at the threshold go to the lowest indices.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _compile as C
from . import _semantics as sem
from . import _validate as V
from . import dispatch as B
from .philox import resolve_seed


def _one(x, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    V.check_dtype(x, name)
    return x


def _k(x, density, k) -> int:
    n = x.numel()
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if not 0 <= k <= n:
            raise ValueError(f"k must be in [0, {n}] (x.numel()), got {k}")
        if density is not None:
            raise ValueError("pass either density or k, not both")
        return k
    if density is None:
        raise TypeError("magnitude selection needs density= or k=")
    return int(V.per_model(density, 1, "density", 0.0, 1.0)[0] * n)


def magnitude_threshold(x: torch.Tensor, density: Optional[float] = None, *, k: Optional[int] = None,
                        backend: Optional[str] = None) -> torch.Tensor:
    """The exact k-th largest ``|x|`` (``k = int(density * x.numel())``), a 0-d tensor of x's
    dtype; ``inf`` when ``k == 0``. Found by radix select on the ``cpu`` backend (no sort)."""
    if C.compiling():  # torch.compile: the opaque custom op (fastmerge/library.py)
        return torch.ops.fastmerge.magnitude_threshold(x, None if density is None else float(density), k, backend)
    x = _one(x)
    k = _k(x, density, k)
    return B.for_op(backend, x.device, "magnitude_threshold").magnitude_threshold(x, k)


def magnitude_prune(x: torch.Tensor, density: Optional[float] = None, *, k: Optional[int] = None,
                    rescale=None, backend: Optional[str] = None) -> torch.Tensor:
    """Keep the ``k = int(density * numel)`` largest-magnitude entries of ``x``, zero the rest;
    ``rescale`` ("l1" | "l2" | "linf") matches the norm of the result to that of ``x``."""
    if C.compiling():
        return torch.ops.fastmerge.magnitude_prune(x, None if density is None else float(density), k,
                                                   C.rescale_in(rescale), backend)
    x = _one(x)
    kk = _k(x, density, k)
    plan = sem.Plan(masks=[sem.MaskSpec("range", 0, kk)], weights=[1.0],
                    rescale=sem.rescale_mode(rescale, False), names=["x"])
    if plan.rescale == "density":
        raise ValueError("rescale='density' applies to random_drop; use 'l1', 'l2' or 'linf'")
    return B.run(plan, None, [x], x.dtype, backend, "magnitude_prune")


def random_drop(x: torch.Tensor, density: float, *, seed: Optional[int] = None, rescale=True,
                backend: Optional[str] = None) -> torch.Tensor:
    """DARE (Yu et al. 2024, arXiv:2311.03099): keep each entry with probability ``density``.

    The mask comes from the Philox counter layout in :mod:`fastmerge.philox` (stream 0), so a
    seed gives the same mask on every backend. ``rescale``: True / "density" divides the kept
    entries by ``density``; "l1" | "l2" | "linf" match the norm of ``x``; False keeps them as is.
    """
    if C.compiling():
        return torch.ops.fastmerge.random_drop(x, float(density), C.seed_in(seed),
                                               C.rescale_in(rescale), backend)
    x = _one(x)
    d = V.per_model(density, 1, "density", 0.0, 1.0)[0]
    mode = "density" if rescale is True else sem.rescale_mode(rescale, False)
    plan = sem.Plan(masks=[sem.random_mask(d)], weights=[1.0], rescale=mode, seed=resolve_seed(seed),
                    names=["x"])
    return B.run(plan, None, [x], x.dtype, backend, "random_drop")


def _same_inputs(tensors, name="tensors"):
    tensors = V.tensor_list(tensors, name)
    V.check_dtype(tensors[0], f"{name}[0]")
    V.same_as(tensors[0], f"{name}[0]", tensors[1:], name, start=1)
    return tensors


def elect_sign(tensors: Sequence[torch.Tensor], weights=None, *, method: str = "sum",
               backend: Optional[str] = None) -> torch.Tensor:
    """TIES sign election: int8 ``+1`` where ``sum_k w_k t_k >= 0`` (``method="sum"``) or
    ``sum_k sign(w_k t_k) >= 0`` (``"count"``), else ``-1``."""
    if C.compiling():
        return torch.ops.fastmerge.elect_sign(list(tensors), C.floats(weights), method, backend)
    tensors = _same_inputs(tensors)
    if method not in ("sum", "count"):
        raise ValueError(f"method must be 'sum' or 'count', got {method!r}")
    w = V.per_model(1.0 if weights is None else weights, len(tensors), "weights")
    return B.for_op(backend, tensors[0].device, "elect_sign").elect_sign(tensors, w, method)


def disjoint_merge(tensors: Sequence[torch.Tensor], sign: torch.Tensor, weights=None, *,
                   divisor: str = "count", out_dtype=None, backend: Optional[str] = None) -> torch.Tensor:
    """TIES disjoint merge: ``sum_k w_k t_k [sign(t_k) == sign] / D`` with ``D`` the number of
    agreeing inputs (``divisor="count"``, at least 1, as PEFT) or their summed weight
    (``"weight"``, 0 -> 1, as mergekit)."""
    if C.compiling():
        return torch.ops.fastmerge.disjoint_merge(list(tensors), sign, C.floats(weights), divisor,
                                                  out_dtype, backend)
    tensors = _same_inputs(tensors)
    if not isinstance(sign, torch.Tensor):
        raise TypeError(f"sign must be a torch.Tensor, got {type(sign).__name__}")
    if sign.shape != tensors[0].shape:
        raise ValueError(f"sign has shape {tuple(sign.shape)} but tensors[0] has {tuple(tensors[0].shape)}")
    if sign.device != tensors[0].device:
        raise ValueError(f"sign is on {sign.device} but tensors[0] is on {tensors[0].device}")
    if divisor not in ("count", "weight"):
        raise ValueError(f"divisor must be 'count' or 'weight', got {divisor!r}")
    w = V.per_model(1.0 if weights is None else weights, len(tensors), "weights")
    dtype = V.out_dtype(out_dtype, tensors[0].dtype)
    mod = B.for_op(backend, tensors[0].device, "disjoint_merge", V.needs_grad(tensors))
    return mod.disjoint_merge(tensors, sign, w, divisor, dtype)
