"""Host-side steps that every fused backend (``cpu`` and the GPU driver) takes the same way:
naming the culprit of a non-finite flag, DARE's 1/density rescale, the selection shortcuts
that need no kernel, and the sign input of ``disjoint_merge``."""
from __future__ import annotations

import torch

from .. import _validate as V
from .. import abi


def raise_nonfinite(flags, names) -> None:
    """``NonFiniteError`` naming the first input whose kernel flag is set."""
    for flag, name in zip(flags, names):
        if flag:
            raise V.NonFiniteError(name)


def result_flag(out: torch.Tensor) -> torch.Tensor:
    """A 1-element int32 device tensor: 1 when ``out`` holds inf or nan (one reduction, no
    host sync: read it together with the kernel's flags)."""
    lo, hi = torch.aminmax(out)
    return (~(torch.isfinite(lo) & torch.isfinite(hi))).to(torch.int32).reshape(1)


def raise_merge_flags(flags, names) -> None:
    """Flags of a merge whose kernel checked every input: per input (then base, as ``names``),
    and last the :func:`result_flag` of the output. A non-finite input is named; a non-finite
    result from finite inputs is an overflow."""
    raise_nonfinite(flags[:-1], names)
    if flags[-1]:
        raise V.NonFiniteError(V.MERGED, overflow=True)


def merge_names(plan, k: int) -> list:
    """Names of a merge's K inputs, then the base, in the order of the kernels' flags."""
    return V.input_names(plan.names, k) + ["base"]


def density_scales(masks, kinds):
    """``rescale="density"``: the per-model divisor of kept values and the mask codes with a
    density of 0 turned into ZERO (that model is dropped whole: no 0/0)."""
    scale = [s.density if s.kind != "none" and s.density > 0 else 1.0 for s in masks]
    kinds = [abi.MASK_ZERO if s.kind != "none" and s.density <= 0 else k for s, k in zip(masks, kinds)]
    return scale, kinds


def threshold_without_select(x: torch.Tensor, k: int):
    """``magnitude_threshold`` for k == 0 (``inf``) and k == numel (the smallest ``|x|``), where no
    selection pass runs and so the input is checked here; None for every other k."""
    if k != 0 and k != x.numel():
        return None
    V.check_finite(x, "x")
    if k == 0:
        return torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    return x.detach().abs().min()


def sign_input(sign: torch.Tensor) -> torch.Tensor:
    """``disjoint_merge``'s sign as the kernels read it: contiguous int8 (+1 / -1)."""
    return (sign if sign.dtype == torch.int8 else (sign > 0).to(torch.int8)).contiguous()
