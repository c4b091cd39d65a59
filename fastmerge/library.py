"""fastmerge's public functions as ``torch.library`` custom ops, so they work inside
``torch.compile`` (``fullgraph=True`` included).

Called eagerly, the public functions run their backend directly (no op-dispatch overhead). While
``torch.compile`` traces them (``torch.compiler.is_compiling()``), they call these ops instead:
opaque to the compiler, a fake implementation gives the output's shape, dtype and device, and at
run time the op runs the same eager path (validation, backend dispatch, kernels). The ops record
no autograd formula: merges are not differentiated.

Arguments cross the op boundary as the schema allows: per-model values as float lists (one
entry means "the same for every model"), ``rescale`` as a string, seeds as signed 64-bit ints
(two's complement of the unsigned seed). Under ``torch.compile`` pass Python numbers for
weights/densities (tensors there force a graph break) and an explicit ``seed`` for random
methods if the compiled function must be reproducible.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor
AVAILABLE = hasattr(torch.library, "custom_op")  # torch >= 2.4


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller (always False without custom ops)."""
    check = getattr(torch.compiler, "is_compiling", None)
    return AVAILABLE and check is not None and bool(check())


def floats(value) -> Optional[list]:
    """A per-model argument (number or sequence of numbers) as a float list; None stays None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(value)]


def unfloats(values):
    """Inverse of :func:`floats`: one entry means a scalar again."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else list(values)


def seed_in(seed) -> Optional[int]:
    if seed is None:
        return None
    from .philox import resolve_seed

    seed = resolve_seed(seed)  # type and range checks, at trace time
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def seed_out(seed) -> Optional[int]:
    return None if seed is None else seed + (1 << 64) if seed < 0 else seed


def rescale_in(rescale) -> Optional[str]:
    return None if rescale is None else ("true" if rescale else "false") if isinstance(rescale, bool) else rescale


def rescale_out(rescale):
    return {"true": True, "false": False}.get(rescale, rescale)


if AVAILABLE:
    from torch.library import custom_op

    @custom_op("fastmerge::merge", mutates_args=())
    def merge_op(method: str, base: Optional[Tensor], models: list[Tensor], weights: Optional[list[float]],
                 density: list[float], lam: float, normalize: Optional[bool], rescale: Optional[str],
                 gamma: list[float], epsilon: list[float], seed: Optional[int],
                 out_dtype: Optional[torch.dtype], backend: Optional[str], alpha: Optional[float],
                 exact: bool, common_space_fraction: float) -> Tensor:
        from .api import merge

        return merge(method, base, models, weights=unfloats(weights), density=unfloats(density), lam=lam,
                     normalize=normalize, rescale=rescale_out(rescale), gamma=unfloats(gamma),
                     epsilon=unfloats(epsilon), seed=seed_out(seed), out_dtype=out_dtype, backend=backend,
                     alpha=alpha, exact=exact, common_space_fraction=common_space_fraction)

    @merge_op.register_fake
    def _(method, base, models, weights, density, lam, normalize, rescale, gamma, epsilon, seed,
          out_dtype, backend, alpha, exact, common_space_fraction):
        ref = base if base is not None else models[0]
        return models[0].new_empty(models[0].shape, dtype=out_dtype or ref.dtype)

    @custom_op("fastmerge::magnitude_threshold", mutates_args=())
    def magnitude_threshold_op(x: Tensor, density: Optional[float], k: Optional[int],
                               backend: Optional[str]) -> Tensor:
        from .ops import magnitude_threshold

        return magnitude_threshold(x, density, k=k, backend=backend)

    @magnitude_threshold_op.register_fake
    def _(x, density, k, backend):
        return x.new_empty(())

    @custom_op("fastmerge::magnitude_prune", mutates_args=())
    def magnitude_prune_op(x: Tensor, density: Optional[float], k: Optional[int], rescale: Optional[str],
                           backend: Optional[str]) -> Tensor:
        from .ops import magnitude_prune

        return magnitude_prune(x, density, k=k, rescale=rescale_out(rescale), backend=backend)

    @magnitude_prune_op.register_fake
    def _(x, density, k, rescale, backend):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @custom_op("fastmerge::random_drop", mutates_args=())
    def random_drop_op(x: Tensor, density: float, seed: Optional[int], rescale: str,
                       backend: Optional[str]) -> Tensor:
        from .ops import random_drop

        return random_drop(x, density, seed=seed_out(seed), rescale=rescale_out(rescale), backend=backend)

    @random_drop_op.register_fake
    def _(x, density, seed, rescale, backend):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @custom_op("fastmerge::elect_sign", mutates_args=())
    def elect_sign_op(tensors: list[Tensor], weights: Optional[list[float]], method: str,
                      backend: Optional[str]) -> Tensor:
        from .ops import elect_sign

        return elect_sign(tensors, unfloats(weights), method=method, backend=backend)

    @elect_sign_op.register_fake
    def _(tensors, weights, method, backend):
        return tensors[0].new_empty(tensors[0].shape, dtype=torch.int8)

    @custom_op("fastmerge::disjoint_merge", mutates_args=())
    def disjoint_merge_op(tensors: list[Tensor], sign: Tensor, weights: Optional[list[float]], divisor: str,
                          out_dtype: Optional[torch.dtype], backend: Optional[str]) -> Tensor:
        from .ops import disjoint_merge

        return disjoint_merge(tensors, sign, unfloats(weights), divisor=divisor, out_dtype=out_dtype,
                              backend=backend)

    @disjoint_merge_op.register_fake
    def _(tensors, sign, weights, divisor, out_dtype, backend):
        return tensors[0].new_empty(tensors[0].shape, dtype=out_dtype or tensors[0].dtype)

    @custom_op("fastmerge::peft_merge", mutates_args=())
    def peft_merge_op(fn: str, task_tensors: list[Tensor], weights: Tensor, density: float,
                      majority_sign_method: Optional[str], seed: Optional[int],
                      backend: Optional[str]) -> Tensor:
        from . import peft

        kwargs = {"backend": backend}
        if fn.startswith("dare"):
            kwargs["seed"] = seed_out(seed)
        if fn == "task_arithmetic":
            return peft.task_arithmetic(task_tensors, weights, **kwargs)
        if majority_sign_method is not None:
            kwargs["majority_sign_method"] = majority_sign_method
        return getattr(peft, fn)(task_tensors, weights, density, **kwargs)

    @peft_merge_op.register_fake
    def _(fn, task_tensors, weights, density, majority_sign_method, seed, backend):
        from .peft import result_dtype

        dtype = result_dtype(task_tensors[0].dtype, weights.dtype, majority_sign_method is not None)
        return task_tensors[0].new_empty(task_tensors[0].shape, dtype=dtype)
