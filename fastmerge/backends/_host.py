"""Host-side steps that every fused backend (``cpu`` and the GPU driver) takes the same way:
naming the culprit of a non-finite flag, DARE's 1/density rescale, the selection shortcuts
that need no kernel, and the sign input of ``disjoint_merge``."""
from __future__ import annotations

import struct

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


def given_scale(spec, base, x, norm: str):
    """The norm-matching factor of a ``given`` mask (``MaskSpec.factor`` when the caller gave
    one), or None (no rescale: a norm below ``NORM_EPS``), as the reference computes it: double
    norms of the fp32 delta before and after the mask, their ratio rounded to fp32. A pass over
    the input on the host's torch ops: given masks are a compatibility path (a library's own
    random draws), whose ``torch.bernoulli`` call has already read a tensor of this size."""
    from .._semantics import fp32, norm_scale

    if spec.factor is not None:
        return fp32(spec.factor)
    d = x.to(torch.float32) - base.to(torch.float32) if base is not None else x.to(torch.float32)
    kept = torch.where(spec.keep.reshape(d.shape).to(device=d.device, dtype=torch.bool), d, 0.0)
    return norm_scale(norm_of(d, norm), norm_of(kept, norm))


def norm_of(x: torch.Tensor, norm: str) -> float:
    """The ``l1`` / ``l2`` / ``linf`` norm of ``x`` in double (norm-matching rescale)."""
    x = x.detach().double()  # a constant factor: no graph through it (and no scalar warning)
    if norm == "l1":
        return float(x.abs().sum())
    if norm == "l2":
        return float(x.square().sum().sqrt())
    return float(x.abs().max()) if x.numel() else 0.0


_BIT_WEIGHTS = {}


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A bool keep mask as the CPU kernels' bit mask: int64 words, element ``i`` at bit
    ``i & 63`` of word ``i >> 6`` (``MASK_BITS``; see csrc/masks.h)."""
    flat = keep.reshape(-1).to(device="cpu", dtype=torch.bool)
    n = flat.numel()
    words = (n + 63) // 64
    padded = torch.zeros(words * 64, dtype=torch.int64)
    padded[:n] = flat
    if "w" not in _BIT_WEIGHTS:
        # bit 63 is the sign bit: its weight wraps to -2^63, and a sum of distinct powers of two
        # never carries, so the int64 sum is exactly the word's bit pattern
        _BIT_WEIGHTS["w"] = torch.tensor([1 << j if j < 63 else -(1 << 63) for j in range(64)],
                                         dtype=torch.int64)
    return (padded.reshape(words, 64) * _BIT_WEIGHTS["w"]).sum(dim=1)


def key_float(key: int) -> float:
    """The float whose fp32 bit pattern is ``key`` (a magnitude key of the selects)."""
    return struct.unpack("<f", struct.pack("<I", key & 0xFFFFFFFF))[0]


def threshold_cuts(thresholds) -> list:
    """Top sets ``(T, J)`` (key > T or key == T and index <= J, keys the fp32 bits of ``|d|``)
    that keep ``|d| >= t`` for each magnitude ``t`` (rounded to fp32 as the comparison of an fp32
    tensor with it rounds): ``T = bits(t) - 1``, no tie cut."""
    cuts = []
    for t in thresholds:
        key = struct.unpack("<i", struct.pack("<f", float(t)))[0]
        cuts += [key - 1, -1]
    return cuts
