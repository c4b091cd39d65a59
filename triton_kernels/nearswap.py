"""nearswap (C++: ``csrc/nearswap.cpp``; spec: ``fastmerge/methods/nearswap.py``), a = base,
b = the model::

    w = clamp(t * (1 / max(|a - b|, 1e-6)), 0, 1),  out = w b + (1 - w) a

in fp32 with the C++ kernel's (and the torch reference's) operations: an IEEE division
(``div_rn``), no FMA contraction, the clamps as selects, so the bytes agree. One read of each
input, one write; flags ``{model, base, result}`` in the same pass (result: a value stored,
after the rounding to the output dtype, is inf/nan). Flat 1-D grid, int64 indices.
"""
import torch
import triton
import triton.language as tl

from ._common import bad_bits, block_tile, store_checked

BLOCK = 1024


@triton.jit
def _nearswap_kernel(base, model, out, flags, n, t, BLK: tl.constexpr):
    i, inb = block_tile(tl.program_id(0), n, BLK)
    a = tl.load(base + i, mask=inb, other=0.0).to(tl.float32)
    b = tl.load(model + i, mask=inb, other=0.0).to(tl.float32)
    tl.store(flags, 1, mask=tl.max(bad_bits(b), axis=0) > 0)
    tl.store(flags + 1, 1, mask=tl.max(bad_bits(a), axis=0) > 0)
    d = tl.abs(a - b)
    w = tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), tl.where(d < 1e-6, 1e-6, d)) * t
    w = tl.where(w < 0.0, 0.0, w)
    w = tl.where(1.0 < w, 1.0, w)
    tl.store(flags + 2, 1, mask=store_checked(out + i, w * b + (1.0 - w) * a, inb) > 0)


def nearswap(base, model, out, *, n: int, t: float):
    """Launch over ``n`` elements of the contiguous ``base``, ``model`` into ``out``; returns
    the int32 device flags ``[model, base, result]`` (result: a stored value is inf/nan)."""
    flags = torch.zeros(3, dtype=torch.int32, device=base.device)
    if n:
        _nearswap_kernel[(triton.cdiv(n, BLOCK),)](base, model, out, flags, n, float(t), BLK=BLOCK,
                                                   num_warps=4, enable_fp_fusion=False)
    return flags
