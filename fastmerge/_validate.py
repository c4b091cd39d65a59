"""Argument checks shared by every public entry point: errors name the argument at fault."""
from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NonFiniteError(ValueError):
    """An input holds inf or nan, or (``overflow=True``) a result does although every input is
    finite. A ValueError; its own type so that the drop-in integrations can hand such tensors
    back to the library they replace (which propagates them)."""

    def __init__(self, name: str, overflow: bool = False):
        msg = f"{name} contains non-finite values (inf or nan)"
        if overflow:
            msg += (" although every input is finite: the merge overflows (the weights, lam or the "
                    "values are too large for float32, the accumulation dtype, or for the output dtype)")
        super().__init__(msg)
        self.argument = name
        self.overflow = overflow


MERGED = "the merged tensor"  # how errors name a merge's result


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


FP32_MAX = float(torch.finfo(torch.float32).max)


def number(x, name: str) -> float:
    """A Python float that is finite once rounded to float32 (the kernels compute in fp32: a
    finite 1e300 would become inf there and turn the whole result into nan)."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if not math.isfinite(float(torch.tensor(x, dtype=torch.float32))):
        raise ValueError(f"{name} = {x:g} is beyond float32's range (|x| <= {FP32_MAX:.7g}); "
                         "fastmerge computes in float32")
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


def all_finite(x: torch.Tensor) -> bool:
    """Whether a floating tensor holds no inf or nan. One reduction, no temporary: min and max
    propagate nan and are +-inf exactly when an inf is present (measured ~10x faster than
    ``isfinite(x).all()`` on a 16M-element bf16 tensor on CPU)."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    if x.dtype not in SUPPORTED_DTYPES + (torch.float64,):  # fp8: no aminmax kernel
        return bool(torch.isfinite(x).all())
    lo, hi = torch.aminmax(x.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(x: torch.Tensor, name: str) -> None:
    """``NonFiniteError`` naming ``x`` when a floating tensor holds inf or nan."""
    if not all_finite(x):
        raise NonFiniteError(name)


def check_result(out: torch.Tensor, inputs, names) -> None:
    """After a merge: when ``out`` holds inf or nan, ``NonFiniteError`` naming the first
    non-finite input (``inputs``, None entries skipped, named by ``names``), or, when every
    input is finite, one that says the merge overflowed. Costs one pass over ``out``."""
    if all_finite(out):
        return
    name_nonfinite(inputs, names)
    raise NonFiniteError(MERGED, overflow=True)


def name_nonfinite(inputs, names) -> None:
    """``NonFiniteError`` naming the first of ``inputs`` (None entries skipped) holding inf or
    nan; nothing when all are finite (the error paths' rescan)."""
    for t, name in zip(inputs, names):
        if t is not None:
            check_finite(t, name)


def grad_weights(weights, k: int):
    """``weights`` as an fp32 ``[k]`` tensor that keeps its autograd graph when it is a tensor
    that requires grad (learnable merge coefficients) and grad mode is on; else None. Call
    after :func:`per_model` has checked it."""
    if not isinstance(weights, torch.Tensor) or not needs_grad([weights]):
        return None
    return weights.to(torch.float32).reshape(-1).expand(k)


def needs_grad(tensors) -> bool:
    """Whether a result computed from ``tensors`` (None entries skipped) would need an autograd
    graph: grad mode is on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def input_names(names, k: int) -> list:
    """The names error messages give a merge's K inputs: ``names`` when given (the CLI passes
    tensor and model names), else ``models[i]``."""
    return list(names) if names is not None else [f"models[{i}]" for i in range(k)]


def keep_masks(keep, models: Sequence[torch.Tensor], name: str = "keep") -> list:
    """Caller-drawn keep masks: one entry per model, None or a bool tensor with that model's
    shape on its device. Returns them as a list."""
    if isinstance(keep, torch.Tensor) or not isinstance(keep, (list, tuple)):
        raise TypeError(f"{name} must be a list of one bool tensor (or None) per model, got "
                        f"{type(keep).__name__}")
    if len(keep) != len(models):
        raise ValueError(f"{name} must have one entry per model ({len(models)}), got {len(keep)}")
    for k, (mask, model) in enumerate(zip(keep, models)):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{name}[{k}] must be a bool tensor or None, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != model.shape or mask.device != model.device:
            raise ValueError(f"{name}[{k}] has shape {tuple(mask.shape)} on {mask.device}; model {k} "
                             f"is {tuple(model.shape)} on {model.device}")
    return list(keep)
