"""The ``torch`` backend: pure PyTorch, readable, the definition of correct.

Every computation runs in fp32 (inputs are upcast once), sums over models run in model order,
and the output is cast once at the end. Notation for K inputs with base ``b``:

* ``d_k = m_k - b`` (mergekit) or ``d_k = t_k`` (PEFT task tensors).
* sparsify: ``s_k = mask_k * d_k``, then rescale: ``s_k *= |d_k| / |s_k|`` (L1/L2/Linf norm
  matching, skipped when either norm < 1e-7) or ``s_k /= density`` (DARE's 1/p rescale).
* weight: ``v_k = w_k * s_k``.
* consensus (TIES, Yadav et al. 2023, arXiv:2306.01708): ``M = +1 where sum_k e_k >= 0 else -1``
  with ``e_k = v_k`` (mergekit) or ``s_k`` (PEFT); ``count`` uses ``sum_k sign(e_k)``.
  ``a_k = [sign(e_k) == M]`` (exact zeros never agree).
* merge: ``mixed = sum_k a_k v_k``; divisor ``sum_k a_k w_k`` (0 -> 1, mergekit) or
  ``max(sum_k a_k, 1)`` (PEFT). Without consensus ``mixed = sum_k v_k``, divisor ``sum_k w_k``
  (``|.| < 1e-8`` -> 1).
* ``normalize``: ``mixed /= divisor``; ``mixed *= lam``; ``out = b + mixed`` cast to the output
  dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _validate as V
from .. import formats, philox
from .._semantics import MaskSpec, Plan, fp32, norm_scale, rows_of, weight_sum_divisor
from ._host import norm_of  # the norms of norm-matching rescale (shared with the fused backends)

NAME = "torch"


def status() -> dict:
    return {"available": True, "reason": "pure PyTorch reference; every op, every device"}


def _f32(x: float) -> torch.Tensor:
    # 0-d CPU tensors mix with tensors on any device and keep the arithmetic in fp32.
    return torch.tensor(x, dtype=torch.float32)


def priority_order(a: torch.Tensor) -> torch.Tensor:
    """Flat indices sorted by (|value| descending, index ascending)."""
    return torch.sort(a.reshape(-1), descending=True, stable=True).indices


def range_keep(a: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bool mask of the elements at priority positions ``start <= pos < stop``."""
    keep = torch.zeros(a.numel(), dtype=torch.bool, device=a.device)
    keep[priority_order(a)[start:stop]] = True
    return keep.reshape(a.shape)


def della_probs(d: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """Per-element keep probabilities of DELLA, ranks along dim 1 (see philox.py)."""
    outer, length, inner = rows_of(d.shape)
    rows = d.abs().reshape(outer, length, inner).transpose(1, 2).reshape(-1, length)
    # descending priority position -> ascending rank a = length - 1 - pos
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices
    pos = torch.empty_like(order)
    pos.scatter_(1, order, torch.arange(length, device=d.device).expand_as(order))
    asc = (length - 1 - pos).to(torch.float32)
    rn = asc / float(length - 1) if length > 1 else torch.zeros_like(asc)
    probs = _f32(spec.c1) + rn * _f32(spec.c2)
    return probs.reshape(outer, inner, length).transpose(1, 2).reshape(d.shape)


def keep_mask(d: torch.Tensor, spec: MaskSpec, seed: int, stream: int) -> torch.Tensor | None:
    """The bool keep mask of ``spec`` on fp32 delta ``d`` (None when everything is kept)."""
    if spec.kind == "none":
        return None
    if spec.kind == "zero":
        return torch.zeros(d.shape, dtype=torch.bool, device=d.device)
    if spec.kind == "range":
        return range_keep(d.abs(), spec.start, spec.stop)
    if spec.kind == "given":
        return spec.keep.reshape(d.shape).to(device=d.device, dtype=torch.bool)
    u = philox.uniform(d.numel(), seed, stream, d.device).reshape(d.shape)
    if spec.kind == "random":
        return u < _f32(spec.p)
    if spec.kind == "della":
        return u < della_probs(d, spec)
    raise ValueError(f"unknown mask kind {spec.kind!r}")




def sparsify(d: torch.Tensor, spec: MaskSpec, rescale, seed: int, stream: int) -> torch.Tensor:
    """``s = mask * d`` then the rescale of the plan (fp32 in, fp32 out)."""
    keep = keep_mask(d, spec, seed, stream) if d.numel() else None
    if keep is None:
        return d
    s = torch.where(keep, d, torch.zeros((), dtype=d.dtype))
    if rescale == "density":
        # DARE / PEFT: divide by the keep probability (0 when everything was dropped).
        return s / _f32(spec.density) if spec.density > 0 else torch.zeros_like(s)
    if rescale in ("l1", "l2", "linf") and spec.kind != "zero":
        scale = (norm_scale(norm_of(d, rescale), norm_of(s, rescale)) if spec.factor is None
                 else fp32(spec.factor))
        if scale is not None:
            s = s * _f32(scale)
    return s



def _weights(plan: Plan, dev) -> list:
    """The K weights as 0-d fp32 tensors: rounded from ``plan.weights``, or slices of
    ``plan.weight_grad`` (same values) so that the result keeps their autograd graph."""
    if plan.weight_grad is None:
        return [_f32(w) for w in plan.weights]
    wt = plan.weight_grad.to(device=dev, dtype=torch.float32)
    return [wt[k] for k in range(len(plan.weights))]


def _weight_sum(plan: Plan, weights: list):
    """The divisor of merges without consensus (``weight_sum_divisor``; None for none), as a
    0-d tensor; with ``plan.weight_grad`` the same fp32 sum of the weight tensors, in order."""
    wsum = weight_sum_divisor(plan)
    if wsum is None or plan.weight_grad is None:
        return _f32(wsum) if wsum is not None else None
    total = torch.zeros((), dtype=torch.float32, device=weights[0].device)
    for w in weights:
        total = total + w
    return total if float(total.detach()) == wsum else _f32(wsum)  # sumw's |sum| < 1e-8 -> 1


def run_plan(plan: Plan, base: torch.Tensor | None, inputs: Sequence[torch.Tensor],
             out_dtype: torch.dtype) -> torch.Tensor:
    """Execute a merge plan on K inputs (deltas from ``base`` when one is given)."""
    b = base.to(torch.float32) if base is not None else None
    if base is not None:
        V.check_finite(base, "base")
    values = []
    names = V.input_names(plan.names, len(inputs))
    shape, dev = inputs[0].shape, inputs[0].device
    weights = _weights(plan, dev)
    for k, (x, spec, w) in enumerate(zip(inputs, plan.masks, weights)):
        V.check_finite(x, names[k])
        d = x.to(torch.float32) - b if b is not None else x.to(torch.float32)
        s = sparsify(d, spec, plan.rescale, plan.seed, k)
        values.append((s, s * w))

    zero = torch.zeros((), dtype=torch.float32, device=dev)
    if plan.consensus is None:
        mixed = torch.zeros(shape, dtype=torch.float32, device=dev)
        for _, v in values:
            mixed = mixed + v
        divisor = _weight_sum(plan, weights)
    else:
        elect = [v if plan.elect_weighted else s for s, v in values]
        total = torch.zeros(shape, dtype=torch.float32, device=dev)
        for e in elect:
            total = total + (e if plan.consensus == "sum" else torch.sign(e))
        positive = total >= 0
        mixed = torch.zeros(shape, dtype=torch.float32, device=dev)
        divisor = torch.zeros(shape, dtype=torch.float32, device=dev)
        for e, (_, v), w in zip(elect, values, weights):
            agree = torch.where(positive, e > 0, e < 0)
            mixed = mixed + torch.where(agree, v, zero)
            if plan.divisor == "count":
                divisor = divisor + agree.to(torch.float32)
            else:
                divisor = divisor + torch.where(agree, w, zero)
        if plan.divisor == "count":
            divisor = torch.clamp(divisor, min=1.0)
        else:
            divisor = torch.where(divisor == 0, _f32(1.0), divisor)
    if plan.normalize and divisor is not None:
        mixed = mixed / divisor
    if plan.lam != 1:
        mixed = mixed * _f32(plan.lam)
    if b is not None:
        mixed = b + mixed
    return _finite_result(mixed.to(out_dtype))


def _finite_result(out: torch.Tensor) -> torch.Tensor:
    """``out``, a merge of finite inputs (checked before): inf or nan in it is an overflow."""
    if not V.all_finite(out):
        raise V.NonFiniteError(V.MERGED, overflow=True)
    return out


# ---- primitives (fastmerge.ops) -------------------------------------------------------------

def elect_sign(tensors: Sequence[torch.Tensor], weights, method: str) -> torch.Tensor:
    """Majority sign (int8, +1/-1) of ``sum_k w_k t_k`` (``sum``) or ``sum_k sign(w_k t_k)``."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for k, (t, w) in enumerate(zip(tensors, weights)):
        V.check_finite(t, f"tensors[{k}]")
        e = t.to(torch.float32) * _f32(w)
        total = total + (e if method == "sum" else torch.sign(e))
    return torch.where(total >= 0, 1, -1).to(torch.int8)


def disjoint_merge(tensors, sign, weights, divisor: str, out_dtype) -> torch.Tensor:
    """``sum_k w_k t_k [sign(t_k) == sign] / divisor`` (count: max(#agree, 1); weight: sum w)."""
    positive = sign > 0
    dev = tensors[0].device
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    mixed = torch.zeros(tensors[0].shape, dtype=torch.float32, device=dev)
    div = torch.zeros(tensors[0].shape, dtype=torch.float32, device=dev)
    for k, (t, w) in enumerate(zip(tensors, weights)):
        V.check_finite(t, f"tensors[{k}]")
        e = t.to(torch.float32)
        agree = torch.where(positive, e > 0, e < 0)
        mixed = mixed + torch.where(agree, e * _f32(w), zero)
        div = div + (agree.to(torch.float32) if divisor == "count" else torch.where(agree, _f32(w), zero))
    div = torch.clamp(div, min=1.0) if divisor == "count" else torch.where(div == 0, _f32(1.0), div)
    return _finite_result((mixed / div).to(out_dtype))


def magnitude_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |x| (``inf`` when k == 0), in x's dtype."""
    V.check_finite(x, "x")
    if k == 0:
        return torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    a = x.detach().reshape(-1).to(torch.float32).abs()
    return a[priority_order(a)[k - 1]].to(x.dtype)


# ---- quantizers (fastmerge.quant): the formats' definitions ---------------------------------
# Every step is the float32 operation the format's own quantizer performs, in its order, with
# torch's round-half-to-even; the C++ kernels (csrc/quant.cpp) repeat them bit for bit.

FP16_TINY = 2.0 ** -24  # smallest fp16 subnormal: an fp16 scale that rounds to 0 becomes this


def _half_scale(s: torch.Tensor, name: str) -> torch.Tensor:
    """GPTQ's scales as stored (fp16), returned as fp32 values."""
    h = s.to(torch.float16)
    if bool(torch.isinf(h).any()):
        raise ValueError(f"{name} has a group whose range needs an fp16 scale above 65504 "
                         "(|values| beyond ~1e6): GPTQ's fp16 scales cannot hold it")
    return torch.where(h == 0, torch.tensor(FP16_TINY, dtype=torch.float16, device=h.device), h).float()


def _gptq_int4(x: torch.Tensor, symmetric: bool, name: str):
    """AutoGPTQ's quantizer (``Quantizer.find_params`` with ``min <= 0 <= max``, then
    ``clamp(round(x / s) + z, 0, 15)``) on groups ``x [..., G]`` in fp32. The scale is rounded to
    fp16 first (what every GPTQ kernel multiplies by), and so is the scale used to find the zero
    and the codes. v1 stores ``zero - 1``, so a zero of 0 cannot be stored: such a group (no
    value below ``-s/2``) takes ``s = max / 14`` and zero 1 instead. Symmetric: ``s = 2 amax /
    15``, zero 8 (GPTQ's own rule for groups without negatives differs: it halves their range)."""
    mn, mx = x.amin(-1), x.amax(-1)
    if symmetric:
        amax = torch.maximum(mn.abs(), mx.abs())
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        s = _half_scale((amax + amax) / 15.0, name)
        z = torch.full_like(s, 8.0)
    else:
        lo, hi = torch.clamp(mn, max=0.0), torch.clamp(mx, min=0.0)
        both = lo == hi  # an all-zero group: GPTQ's [-1, 1]
        lo = torch.where(both, -torch.ones_like(lo), lo)
        hi = torch.where(both, torch.ones_like(hi), hi)
        s = _half_scale((hi - lo) / 15.0, name)
        z = torch.clamp(torch.round(-lo / s), max=15.0)
        z0 = z == 0
        s = torch.where(z0, _half_scale(hi / 14.0, name), s)
        z = torch.where(z0, torch.ones_like(z), z)
    q = torch.clamp(torch.round(x / s[..., None]) + z[..., None], 0.0, 15.0)
    return q.to(torch.int32), z.to(torch.int32), s.to(torch.float16)


def pack_int4_rows(codes: torch.Tensor) -> torch.Tensor:
    """int32 codes ``[..., 8 m]`` -> int32 ``[..., m]``: eight consecutive codes per word,
    code j of each eight at bits ``4 j`` (GPTQ's packing)."""
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 8, 8)
    out = torch.zeros_like(c[..., 0])
    for j in range(8):
        out = out | ((c[..., j] & 0xF) << (4 * j))
    return out


def _torchao_int4(x: torch.Tensor, symmetric: bool):
    """mslk's ``int4_row_quantize_zp`` / ``int4_row_quantize`` (torchao's plain Int4Tensor) on
    groups ``x [..., G]`` in fp32: int8 codes in [-8, 7], fp32 scale and float zero point."""
    if symmetric:
        scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-6) / 8
        q = x.div(scale).round().clamp(-8, 7)
        zero = torch.zeros_like(scale)
    else:
        mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
        scale = (mx - mn).clamp(min=1e-6) / 15
        zero = mn + scale * 8
        q = x.sub(mn).div(scale).round().clamp(0, 15) - 8
    return q.to(torch.int8), scale[..., 0], zero[..., 0]


def quantize_int4(w: torch.Tensor, cfg, name: str = "w") -> dict:
    """INT4 of a 2-D weight ``[out, in]`` in groups of ``cfg.group_size`` along ``in``."""
    out_f, in_f = w.shape
    G = cfg.group_size
    x = w.to(torch.float32).reshape(out_f, in_f // G, G)
    if cfg.layout == "gptq":
        q, z, s = _gptq_int4(x, cfg.symmetric, name)
        return {"qweight": pack_int4_rows(q.reshape(out_f, in_f)).T.contiguous(),
                "qzeros": pack_int4_rows((z - 1).T.contiguous()),
                "scales": s.T.contiguous()}
    q, scale, zero = _torchao_int4(x, cfg.symmetric)
    formats.check_int4_scale({"scale": scale}, cfg, name)
    q = q.reshape(out_f, in_f)
    # mslk's pack_int4: the even element in the low nibble
    qdata = (q[:, ::2] & 0xF) | (q[:, 1::2] << 4)
    return {"qdata": qdata.contiguous(), "scale": scale.T.contiguous().to(w.dtype),
            "zero_point": zero.T.contiguous().to(w.dtype)}


def fp8_amax(x: torch.Tensor, granularity: str, block) -> torch.Tensor:
    """``max |x|`` (in x's dtype: exact) per tensor ``[1]*ndim``, per row ``[*shape[:-1], 1]``
    or per block."""
    shape = formats.fp8_scale_shape(tuple(x.shape), granularity, block)
    if x.numel() == 0:
        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    a = x.abs()
    if granularity == "tensor":
        return a.amax().reshape(shape)
    if granularity == "row":
        return a.amax(-1, keepdim=True)
    (br, bc), (nr, nc) = block, shape
    # |x| >= 0, so zero padding of the edge blocks leaves every amax unchanged
    a = torch.nn.functional.pad(a, (0, nc * bc - x.shape[1], 0, nr * br - x.shape[0]))
    return a.reshape(nr, br, nc, bc).amax(dim=(1, 3))




def quantize_fp8(w: torch.Tensor, cfg, name: str = "w"):
    """torchao's ``_choose_scale_float8`` + ``_quantize_affine_float8`` (and compressed-tensors'
    FP8): ``s = amax / fmax`` divided in ``w``'s dtype (as both do) and stored in fp32 (0 -> fp32
    eps, as compressed-tensors), codes ``fp8(clamp(x / s, -fmax, fmax))`` in fp32 with the cast
    rounding to nearest even."""
    dt = formats.FP8_DTYPES[cfg.fmt]
    fmax = torch.finfo(dt).max
    x = w.to(torch.float32)
    s = (fp8_amax(w, cfg.granularity, cfg.block) / fmax).to(torch.float32)
    s = torch.where(s == 0, torch.tensor(torch.finfo(torch.float32).eps, device=s.device), s)
    q = (x / formats.expand_fp8_scale(s, x.shape, cfg.block)).clamp(-fmax, fmax).to(dt)
    return q, s


def quantize(w: torch.Tensor, cfg, name: str = "w"):
    V.check_finite(w, name)
    if hasattr(cfg, "layout"):
        return quantize_int4(w, cfg, name)
    return quantize_fp8(w, cfg, name)


def run_plan_quantized(plan: Plan, base, inputs, out_dtype, cfg):
    """The definition of merge-and-quantize: the merge, in ``out_dtype``, then the quantizer."""
    merged = run_plan(plan, base, inputs, out_dtype)
    return quantize(merged, cfg, V.MERGED)
