"""passthrough (C++: ``csrc/passthrough.cpp``; spec: ``fastmerge/methods/passthrough.py``):
``out = scale * x`` in fp32, rounded once to the output dtype (scale 1 is an exact copy). One
read, one write, the inf/nan flags of the input and of the result as stored in the same pass. Flat 1-D grid, int64 indices."""
import torch
import triton
import triton.language as tl

from ._common import bad_bits, block_tile, store_checked

BLOCK = 1024


@triton.jit
def _scaled_copy_kernel(x, out, flags, n, scale, BLK: tl.constexpr):
    i, inb = block_tile(tl.program_id(0), n, BLK)
    v = tl.load(x + i, mask=inb, other=0.0).to(tl.float32)
    tl.store(flags, 1, mask=tl.max(bad_bits(v), axis=0) > 0)
    tl.store(flags + 1, 1, mask=store_checked(out + i, v * scale, inb) > 0)


def scaled_copy(x, out, *, n: int, scale: float):
    """Launch over ``n`` elements of contiguous ``x`` into ``out``; returns the int32 device
    flags ``[x, result]`` (result: a stored value is inf/nan)."""
    flags = torch.zeros(2, dtype=torch.int32, device=x.device)
    if n:
        _scaled_copy_kernel[(triton.cdiv(n, BLOCK),)](x, out, flags, n, float(scale), BLK=BLOCK,
                                                      num_warps=4, enable_fp_fusion=False)
    return flags
