"""arcee_fusion (spec: ``fastmerge/methods/arcee_fusion.py``; C++: ``csrc/arcee_fusion.cpp`` on
issue17-sce-arcee), m = the model, b = the base, rows along the last dimension::

    p = softmax(m) + 1e-8, q = softmax(b) + 1e-8, kl_row = sum_row p log(p / q),
    s = |m - b| kl_row, thr = median(s) + 1.5 (q3(s) - q1(s)) (exact order statistics),
    out = b + (m - b) [s >= thr].

``arcee_importance``: one program per row (a 1-D grid over the rows), four sweeps over the row
(which stays in L2): the two maxima, the two sums of ``exp(x - max)`` (torch's softmax order:
max first), the KL, then ``s`` written (fp32, one per element). The order statistics are
``torch.kthvalue`` on ``s`` (exact; on the device). ``arcee_merge``: one flat pass. ``exp`` and
``log`` are Triton's (the GPU's fast approximations) and the row sums a tree: ``s`` differs from
the reference's by fp32 round-off, so an element within round-off of the threshold may be kept
on one side and not the other (as the C++ kernel documents for its own exp/log). Flags: model,
base (and the merge's result as stored). int64 indices.
"""
import torch
import triton
import triton.language as tl

from ._common import bad_bits, block_tile, store_checked

ROW_BLOCK = 1024
BLOCK = 1024


@triton.jit
def _arcee_rows_kernel(base, model, s_out, flags, length, BLK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * length
    cols = tl.arange(0, BLK).to(tl.int64)
    mm = tl.full((BLK,), float("-inf"), tl.float32)
    mb = tl.full((BLK,), float("-inf"), tl.float32)
    bad_m = tl.zeros((BLK,), tl.int32)
    bad_b = tl.zeros((BLK,), tl.int32)
    for c in range(0, length, BLK):
        j = c + cols
        inb = j < length
        x = tl.load(model + start + j, mask=inb, other=0.0).to(tl.float32)
        y = tl.load(base + start + j, mask=inb, other=0.0).to(tl.float32)
        bad_m = bad_m | bad_bits(x)
        bad_b = bad_b | bad_bits(y)
        mm = tl.maximum(mm, tl.where(inb, x, float("-inf")))
        mb = tl.maximum(mb, tl.where(inb, y, float("-inf")))
    tl.store(flags, 1, mask=tl.max(bad_m, axis=0) > 0)
    tl.store(flags + 1, 1, mask=tl.max(bad_b, axis=0) > 0)
    Mm = tl.max(mm, axis=0)
    Mb = tl.max(mb, axis=0)
    zm = tl.zeros((BLK,), tl.float32)
    zb = tl.zeros((BLK,), tl.float32)
    for c in range(0, length, BLK):
        j = c + cols
        inb = j < length
        x = tl.load(model + start + j, mask=inb, other=0.0).to(tl.float32)
        y = tl.load(base + start + j, mask=inb, other=0.0).to(tl.float32)
        zm = zm + tl.where(inb, tl.exp(x - Mm), 0.0)
        zb = zb + tl.where(inb, tl.exp(y - Mb), 0.0)
    Zm = tl.sum(zm, axis=0)
    Zb = tl.sum(zb, axis=0)
    acc = tl.zeros((BLK,), tl.float32)
    for c in range(0, length, BLK):
        j = c + cols
        inb = j < length
        x = tl.load(model + start + j, mask=inb, other=0.0).to(tl.float32)
        y = tl.load(base + start + j, mask=inb, other=0.0).to(tl.float32)
        p = tl.math.div_rn(tl.exp(x - Mm), tl.zeros((BLK,), tl.float32) + Zm) + 1e-8
        q = tl.math.div_rn(tl.exp(y - Mb), tl.zeros((BLK,), tl.float32) + Zb) + 1e-8
        acc = acc + tl.where(inb, p * tl.log(tl.math.div_rn(p, q)), 0.0)
    kl = tl.sum(acc, axis=0)
    for c in range(0, length, BLK):
        j = c + cols
        inb = j < length
        x = tl.load(model + start + j, mask=inb, other=0.0).to(tl.float32)
        y = tl.load(base + start + j, mask=inb, other=0.0).to(tl.float32)
        tl.store(s_out + start + j, tl.abs(x - y) * kl, mask=inb)


@triton.jit
def _arcee_merge_kernel(base, model, s, out, flags, n, thr, BLK: tl.constexpr):
    i, inb = block_tile(tl.program_id(0), n, BLK)
    y = tl.load(base + i, mask=inb, other=0.0).to(tl.float32)
    x = tl.load(model + i, mask=inb, other=0.0).to(tl.float32)
    keep = (tl.load(s + i, mask=inb, other=0.0) >= thr).to(tl.float32)
    tl.store(flags + 2, 1, mask=store_checked(out + i, y + (x - y) * keep, inb) > 0)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def arcee_importance(base, model, *, rows: int, length: int):
    """``(s, flags)``: the fp32 importance ``[rows * length]`` and the int32 device flags
    ``[model, base]`` (contiguous inputs; rows along the last dimension)."""
    dev = base.device
    s = torch.empty(rows * length, dtype=torch.float32, device=dev)
    flags = torch.zeros(2, dtype=torch.int32, device=dev)
    if rows * length:
        _arcee_rows_kernel[(rows,)](base, model, s, flags, length, BLK=min(ROW_BLOCK, _pow2(length)),
                                    num_warps=4, enable_fp_fusion=False)
    return s, flags


def arcee_merge(base, model, s, out, *, n: int, thr: float):
    """``out = base + (model - base) [s >= thr]``; returns the int32 device flags
    ``[model, base, result]`` (the inputs were flagged by :func:`arcee_importance`)."""
    flags = torch.zeros(3, dtype=torch.int32, device=base.device)
    if n:
        _arcee_merge_kernel[(triton.cdiv(n, BLOCK),)](base, model, s, out, flags, n, float(thr), BLK=BLOCK,
                                                      num_warps=4, enable_fp_fusion=False)
    return flags
