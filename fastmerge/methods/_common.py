"""Argument checks shared by the method references: every error names the argument at fault."""
from __future__ import annotations

import inspect
import struct
from typing import Optional

import torch

from fastmerge import _validate as V

# PARAMS' marker of a parameter mergekit requires (no default): Python's own "no default".
REQUIRED = inspect.Parameter.empty


def _count_phrase(lo: int, hi: Optional[int]) -> str:
    if hi is None:
        return f"at least {lo}"
    return f"exactly {lo}" if lo == hi else f"{lo} to {hi}"


def _model_list(method: str, models, lo: int, hi: Optional[int]) -> list:
    if isinstance(models, torch.Tensor):
        raise TypeError("models must be a list of tensors, got a single tensor")
    try:
        models = list(models)
    except TypeError:
        raise TypeError(f"models must be a list of tensors, got {type(models).__name__}") from None
    for k, m in enumerate(models):
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"models[{k}] must be a torch.Tensor, got {type(m).__name__}")
    if len(models) < lo or hi is not None and len(models) > hi:
        raise ValueError(f"{method} takes {_count_phrase(lo, hi)} non-base tensors in models, "
                         f"got {len(models)}")
    return models


def inputs(method: str, contract: dict, base, models):
    """Check ``base`` and ``models`` against the method's ``CONTRACT`` (count, base policy,
    dtype, one shape and device, finite values) and return their fp32 upcasts
    ``(base or None, [models])``: the inputs are read once, never modified."""
    base, models = checked(method, contract, base, models, finite=True)
    return (None if base is None else base.float()), [m.float() for m in models]


def checked(method: str, contract: dict, base, models, *, finite: bool = False):
    """:func:`inputs`' checks without the upcast: ``(base or None, [models])`` as given. A fused
    plan leaves the finite check (``finite=False``) to its kernels, which flag inf/nan in the
    pass that reads the inputs anyway."""
    policy = contract["base"]
    if base is None and policy == "required":
        raise ValueError(f"{method} requires base (the base model's tensor), got None")
    if base is not None and policy == "none":
        raise TypeError(f"{method} takes no base; pass its one tensor in models")
    if base is not None and not isinstance(base, torch.Tensor):
        raise TypeError(f"base must be a torch.Tensor or None, got {type(base).__name__}")
    models = _model_list(method, models, contract["min_models"], contract["max_models"])
    if base is None and not models:
        raise ValueError(f"models is empty: {method} needs at least one tensor")
    ref, ref_name, rest, start = ((base, "base", models, 0) if base is not None
                                  else (models[0], "models[0]", models[1:], 1))
    V.check_dtype(ref, ref_name)
    V.same_as(ref, ref_name, rest, "models", start)
    if finite:
        for t, name in zip([base] + models, ["base"] + model_names(len(models))):
            if t is not None:
                V.check_finite(t, name)
    return base, models


def model_names(k: int) -> list:
    """``models[0]`` .. ``models[k-1]``: the names errors give the non-base inputs."""
    return [f"models[{i}]" for i in range(k)]


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (a reference's fp32 scalar, from a double)."""
    return struct.unpack("f", struct.pack("f", x))[0]
