"""Passthrough: one tensor, optionally scaled (mergekit ``passthrough``, used for frankenmerges)."""
from __future__ import annotations

import torch

from fastmerge import _validate as V
from fastmerge.methods._common import checked, inputs

# mergekit ignores the base flag and takes exactly one input: here that input is models[0].
CONTRACT = dict(base="none", min_models=1, max_models=1)
PARAMS = {"scale": None}
KERNELS = ("cpu", "triton", "cuda")
RESULT_CHECKED = True  # fused returns a checked kernel's output (methods/__init__.py)


def reference(base, models, *, scale=None) -> torch.Tensor:
    """``out = scale * models[0]``, or ``models[0]`` itself when ``scale`` is None. ``scale``
    is mergekit's per-input value: a number, None, or a sequence of one of them.

    Differences from mergekit: a base is refused (TypeError naming ``base``); mergekit ignores
    the base flag, so its one input, base or not, is passed here as ``models[0]``.
    """
    _, (x,) = inputs("passthrough", CONTRACT, base, models)
    scale = scale_of(scale)
    return x if scale is None else x * scale


def scale_of(scale):
    """mergekit's ``scale`` (a number, None, or a sequence of one of them) as a float or None."""
    if isinstance(scale, (list, tuple)):
        if len(scale) != 1:
            raise ValueError(f"scale has {len(scale)} entries for 1 input")
        (scale,) = scale
    return None if scale is None else V.number(scale, "scale")


def fused(ops, base, models, *, out_dtype, scale=None) -> torch.Tensor:
    """:func:`reference` as one scaled copy (``ops.scaled_copy``; scale None: an exact copy),
    in ``out_dtype``."""
    _, (x,) = checked("passthrough", CONTRACT, base, models)
    scale = scale_of(scale)
    return ops.scaled_copy(x, scale=1.0 if scale is None else scale, out_dtype=out_dtype)
