"""Argument checks shared by the method references: every error names the argument at fault."""
from __future__ import annotations

import inspect
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


def checked(method: str, contract: dict, base, models):
    """Check ``base`` and ``models`` against the method's ``CONTRACT`` (count, base policy,
    dtype, one shape and device) and return them as given, ``(base or None, [models])``. Values
    are not looked at: a fused kernel detects inf/nan itself, in the pass it makes anyway."""
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
    return base, models


def inputs(method: str, contract: dict, base, models):
    """:func:`checked`, finite values too, and the fp32 upcasts ``(base or None, [models])``
    (the references' inputs): the inputs are read once, never modified."""
    base, models = checked(method, contract, base, models)
    if base is not None:
        V.check_finite(base, "base")
    for k, m in enumerate(models):
        V.check_finite(m, f"models[{k}]")
    return (None if base is None else base.float()), [m.float() for m in models]
