"""Argument checks shared by every public entry point: errors name the argument at fault."""
from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NonFiniteError(ValueError):
    """An input holds inf or nan. A ValueError; its own type so that the drop-in integrations
    can hand such tensors back to the library they replace (which propagates them)."""

    def __init__(self, name: str):
        super().__init__(f"{name} contains non-finite values (inf or nan)")
        self.argument = name


def tensor_list(models, name: str = "models") -> list:
    if isinstance(models, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors, got a single tensor")
    try:
        models = list(models)
    except TypeError:
        raise TypeError(f"{name} must be a list of tensors, got {type(models).__name__}") from None
    if not models:
        raise ValueError(f"{name} is empty: at least one tensor is needed")
    for k, m in enumerate(models):
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{name}[{k}] must be a torch.Tensor, got {type(m).__name__}")
    return models


def check_dtype(t: torch.Tensor, name: str, allowed=SUPPORTED_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {names}")


def same_as(ref: torch.Tensor, ref_name: str, tensors: Sequence[torch.Tensor], name: str,
            start: int = 0) -> None:
    """Every tensor must match ``ref`` in shape, dtype and device (``name[start + i]``)."""
    for k, t in enumerate(tensors, start):
        if t.shape != ref.shape:
            raise ValueError(
                f"{name}[{k}] has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}"
            )
        if t.dtype != ref.dtype:
            raise TypeError(f"{name}[{k}] has dtype {t.dtype} but {ref_name} has {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(
                f"{name}[{k}] is on {t.device} but {ref_name} is on {ref.device}; "
                "move the tensors to one device (fastmerge never copies between devices)"
            )


def number(x, name: str) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def integer(x, name: str, lo=None, hi=None) -> int:
    """A Python int (or 0-d integer tensor) within ``[lo, hi]``; bools are rejected."""
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if lo is not None and x < lo or hi is not None and x > hi:
        bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {'in ' if hi is not None else ''}{bounds}, got {x}")
    return x


def flag(x, name: str) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def per_model(value, k: int, name: str, lo=None, hi=None) -> list:
    """A scalar or a sequence of K numbers, each within ``[lo, hi]``."""
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.dim() else value.item()
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise ValueError(f"{name} has {len(value)} entries for {k} models")
        values = [number(v, f"{name}[{i}]") for i, v in enumerate(value)]
    else:
        values = [number(value, name)] * k
    for i, v in enumerate(values):
        label = name if len(set(values)) == 1 and not isinstance(value, (list, tuple)) else f"{name}[{i}]"
        if lo is not None and v < lo or hi is not None and v > hi:
            raise ValueError(f"{label} must be in [{lo}, {hi}], got {v}")
    return values


def out_dtype(dtype, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"out_dtype must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype {dtype} unsupported; supported: float32, float16, bfloat16")
    return dtype


def check_finite(x: torch.Tensor, name: str) -> None:
    """``NonFiniteError`` naming ``x`` when a floating tensor holds inf or nan."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(name)


def input_names(names, k: int) -> list:
    """The names error messages give a merge's K inputs: ``names`` when given (the CLI passes
    tensor and model names), else ``models[i]``."""
    return list(names) if names is not None else [f"models[{i}]" for i in range(k)]
