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

from . import api, ops, peft
from ._compile import AVAILABLE, MERGE_ARGS, MERGE_PARAMS, rescale_out, seed_out, unfloats

Tensor = torch.Tensor

if AVAILABLE:
    from torch.library import custom_op

    # fastmerge::merge's schema, derived from the registry: every parameter any method takes
    # (except quantize, whose dataclass result no op can return; merge says so when compiling)
    MERGE_SCHEMA = ("(str method, Tensor? base, Tensor[] models, "
                    + ", ".join(f"{MERGE_ARGS[p][0]} {p}" for p in MERGE_PARAMS) + ") -> Tensor")

    def _merge_body(method, base, models, *args):
        kwargs = {p: MERGE_ARGS[p][2](a) for p, a in zip(MERGE_PARAMS, args)}
        return api.merge(method, base, models, **kwargs)

    merge_op = custom_op("fastmerge::merge", _merge_body, mutates_args=(), schema=MERGE_SCHEMA)

    @merge_op.register_fake
    def _(method, base, models, *args):
        out_dtype = args[MERGE_PARAMS.index("out_dtype")]
        ref = base if base is not None else models[0]
        return models[0].new_empty(models[0].shape, dtype=out_dtype or ref.dtype)

    @custom_op("fastmerge::magnitude_threshold", mutates_args=())
    def magnitude_threshold_op(x: Tensor, density: Optional[float], k: Optional[int],
                               backend: Optional[str]) -> Tensor:
        return ops.magnitude_threshold(x, density, k=k, backend=backend)

    @magnitude_threshold_op.register_fake
    def _(x, density, k, backend):
        return x.new_empty(())

    @custom_op("fastmerge::magnitude_prune", mutates_args=())
    def magnitude_prune_op(x: Tensor, density: Optional[float], k: Optional[int], rescale: Optional[str],
                           backend: Optional[str]) -> Tensor:
        return ops.magnitude_prune(x, density, k=k, rescale=rescale_out(rescale), backend=backend)

    @magnitude_prune_op.register_fake
    def _(x, density, k, rescale, backend):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @custom_op("fastmerge::random_drop", mutates_args=())
    def random_drop_op(x: Tensor, density: float, seed: Optional[int], rescale: str,
                       backend: Optional[str]) -> Tensor:
        return ops.random_drop(x, density, seed=seed_out(seed), rescale=rescale_out(rescale), backend=backend)

    @random_drop_op.register_fake
    def _(x, density, seed, rescale, backend):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @custom_op("fastmerge::elect_sign", mutates_args=())
    def elect_sign_op(tensors: list[Tensor], weights: Optional[list[float]], method: str,
                      backend: Optional[str]) -> Tensor:
        return ops.elect_sign(tensors, unfloats(weights), method=method, backend=backend)

    @elect_sign_op.register_fake
    def _(tensors, weights, method, backend):
        return tensors[0].new_empty(tensors[0].shape, dtype=torch.int8)

    @custom_op("fastmerge::disjoint_merge", mutates_args=())
    def disjoint_merge_op(tensors: list[Tensor], sign: Tensor, weights: Optional[list[float]], divisor: str,
                          out_dtype: Optional[torch.dtype], backend: Optional[str]) -> Tensor:
        return ops.disjoint_merge(tensors, sign, unfloats(weights), divisor=divisor, out_dtype=out_dtype,
                              backend=backend)

    @disjoint_merge_op.register_fake
    def _(tensors, sign, weights, divisor, out_dtype, backend):
        return tensors[0].new_empty(tensors[0].shape, dtype=out_dtype or tensors[0].dtype)

    @custom_op("fastmerge::peft_merge", mutates_args=())
    def peft_merge_op(fn: str, task_tensors: list[Tensor], weights: Tensor, density: float,
                      majority_sign_method: Optional[str], seed: Optional[int],
                      backend: Optional[str]) -> Tensor:
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
        dtype = peft.result_dtype(task_tensors[0].dtype, weights.dtype, majority_sign_method is not None)
        return task_tensors[0].new_empty(task_tensors[0].shape, dtype=dtype)
