"""Quantized output for serving: INT4 (GPTQ v1, torchao plain), FP8, a fused merge->quantize,
and compressed deltas (BitDelta, ComPEFT-style ternary, INT4, FP8).

    import fastmerge
    from fastmerge import quant

    packed = quant.quantize_int4(w, group_size=128)                # GPTQ v1 tensors
    w_hat = quant.dequantize_int4(packed)
    q, scale = quant.quantize_fp8(w, granularity="row")            # e4m3fn, fp32 dequant scales
    packed = fastmerge.merge("task_arithmetic", base, models, quantize=quant.Int4Config())
    c = quant.compress_delta(base, finetuned, method="bitdelta")   # 1 bit per weight + a scale
    restored = quant.apply_delta(base, c)

Formats (for a weight ``[out, in]``; groups of ``G`` run along ``in``):

* **GPTQ v1** (AutoGPTQ, transformers/optimum, vLLM's ``gptq``): ``qweight [in/8, out] int32``,
  element ``k`` of column ``n`` at bits ``4 (k % 8)`` of ``qweight[k // 8, n]``; ``qzeros
  [in/G, out/8] int32`` stores ``zero - 1`` (the v1 convention) the same way along ``out``;
  ``scales [in/G, out] fp16``. Dequantized ``w = s (q - z)``. Asymmetric: ``s = (max - min) / 15``
  over the group with ``min <= 0 <= max``, ``z = round(-min / s)``, ``q = clamp(round(w / s) +
  z, 0, 15)`` (AutoGPTQ's ``Quantizer``), the scale rounded to fp16 before it is used. Symmetric:
  ``s = 2 amax / 15``, ``z = 8``.
* **torchao plain int4** (``torchao.quantization.Int4Tensor``, torchao 0.18, the quantizer being
  mslk's ``int4_row_quantize_zp``): ``qdata [out, in/2] int8``, two codes ``q in [-8, 7]`` per
  byte, the even element in the low nibble; ``scale`` and ``zero_point [in/G, out]`` in the
  weight's dtype. ``s = (max - min) / 15`` (at least 1e-6 / 15), ``zero = min + 8 s``, ``q =
  clamp(round((w - min) / s), 0, 15) - 8``; dequantized ``w = q s + zero``. Symmetric
  (``int4_row_quantize``): ``s = amax / 8``, ``q = clamp(round(w / s), -8, 7)``, zero 0.
* **FP8** (torchao's ``Float8Tensor``, vLLM / compressed-tensors): ``scale = amax / fmax``, a
  *dequant* scale (``w = q * scale``) divided in the weight's dtype as both libraries do (a bf16
  weight gets a bf16-valued scale) and stored as fp32, per tensor (``[1, 1]``), per row (``[out, 1]``)
  or per block (``[ceil(out/128), ceil(in/128)]``, DeepSeek / vLLM block FP8); codes
  ``fp8(clamp(w / scale, -fmax, fmax))``, ``fmax`` 448 (e4m3fn) or 57344 (e5m2). The clamp comes
  before the cast because eager casts do not saturate. A zero scale (all-zero tile) becomes fp32
  eps, as in compressed-tensors (torchao would produce NaN there).

Rounding is round-half-to-even everywhere. The ``torch`` backend (``fastmerge/backends/torch.py``)
defines every format; the ``cpu`` backend's C++ kernels (``csrc/quant.cpp``) and the Triton
kernels (``triton_kernels/quant.py``; GPU tensors on ``triton`` and ``cuda``) agree bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from . import _validate as V
from . import _semantics as sem
from . import dispatch as B
from .ops import magnitude_threshold
from .formats import (  # noqa: F401  (the public names of fastmerge.quant)
    FP8_DTYPES, GRANULARITIES, GROUP_SIZES, LAYOUTS, FP8Config, GPTQInt4, Int4Config, Int4Weight,
    QuantConfig, TorchAOInt4, check_shape, config, dequantize_int4, expand_fp8_scale,
    fp8_scale_shape, int4_outputs, nbytes, raise_quant_flags, wrap)

DELTA_METHODS = ("int4", "fp8", "bitdelta", "ternary")

def _check_weight(w, cfg: QuantConfig, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    V.check_dtype(w, name)
    check_shape(tuple(w.shape), cfg, name)


# ---------------------------------------------------------------------------------- INT4

def quantize(w: torch.Tensor, cfg: QuantConfig, *, backend: Optional[str] = None):
    """Quantize ``w`` with ``cfg`` (:class:`Int4Config` -> Int4 dataclass, :class:`FP8Config` ->
    ``(q, scale)``)."""
    cfg = config(cfg)
    _check_weight(w, cfg)
    return B.quantize(w, cfg, backend)


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = False, layout: str = "gptq",
                  *, backend: Optional[str] = None) -> Int4Weight:
    """INT4 weight-only quantization of ``w [out, in]`` (fp32, fp16 or bf16) in groups of
    ``group_size`` along ``in``: :class:`GPTQInt4` (``layout="gptq"``) or :class:`TorchAOInt4`
    (``"torchao"``). Shapes that the groups do not divide raise a ValueError (no padding)."""
    return quantize(w, Int4Config(group_size, symmetric, layout), backend=backend)


# ----------------------------------------------------------------------------------- FP8

def quantize_fp8(w: torch.Tensor, granularity: str = "tensor", fmt: str = "e4m3fn", block=(128, 128),
                 *, backend: Optional[str] = None):
    """FP8 quantization: ``(q, scale)`` with ``q`` of ``w``'s shape in ``float8_e4m3fn`` /
    ``float8_e5m2`` and ``scale`` fp32 (``[1, 1]``, ``[*, 1]`` per row over the last dim, or
    ``[ceil(out/br), ceil(in/bc)]`` per block). ``w ~= q.float() * scale`` (broadcast / per block)."""
    return quantize(w, FP8Config(granularity, fmt, block), backend=backend)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                   block=(128, 128)) -> torch.Tensor:
    """``q.float() * scale`` in fp32 (scale broadcast per tensor / row, repeated per ``block``),
    cast to ``dtype`` (torchao's ``_dequantize_affine_float8``)."""
    if not isinstance(q, torch.Tensor) or q.dtype not in FP8_DTYPES.values():
        raise TypeError(f"q must be a float8_e4m3fn or float8_e5m2 tensor, got "
                        f"{getattr(q, 'dtype', type(q).__name__)}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise TypeError("scale must be a float32 tensor")
    shape = tuple(q.shape)
    ok = scale.numel() == 1 or tuple(scale.shape) == shape[:-1] + (1,) or (
        len(shape) == 2 and tuple(scale.shape) == fp8_scale_shape(shape, "block", block))
    if not ok:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, which is no per-tensor, per-row or "
                         f"block={tuple(block)} scale of q with shape {shape}")
    return (q.float() * expand_fp8_scale(scale, shape, block)).to(dtype)


# -------------------------------------------------------------------- fused merge -> quantize

def merge_quantize(method: str, base, models, quantize="int4", **kwargs):
    """``fastmerge.merge(method, base, models, quantize=quantize, **kwargs)``: the merged tensor
    quantized in the same pass (``cpu``: INT4 and per-row FP8; ``triton``: INT4), equal to
    quantizing ``fastmerge.merge(...)``'s output (in ``out_dtype``) but without writing it."""
    from .api import merge

    return merge(method, base, models, quantize=quantize, **kwargs)


# ------------------------------------------------------------------------ delta compression

@dataclass
class CompressedDelta:
    """``finetuned - base`` in a compact form: ``data`` holds the tensors, ``params`` the
    settings (see :func:`compress_delta`)."""

    method: str
    shape: tuple
    dtype: torch.dtype
    data: dict
    params: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return nbytes(self.data)

    @property
    def ratio(self) -> float:
        """Bytes of the dense delta in ``dtype`` over the compressed bytes."""
        dense = math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()
        return dense / max(1, self.nbytes)


def pack_bits(b: torch.Tensor) -> torch.Tensor:
    """Bools -> uint8, 8 per byte, element ``i`` at bit ``i % 8`` of byte ``i // 8``
    (``numpy.packbits(..., bitorder="little")``)."""
    if b.device.type == "cpu":  # numpy's C loop: the same bytes, ~50x faster than the shifts
        return torch.from_numpy(np.packbits(b.reshape(-1).numpy(), bitorder="little"))
    flat = b.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).reshape(-1, 8)
    out = torch.zeros(flat.shape[0], dtype=torch.uint8, device=b.device)
    for j in range(8):
        out |= flat[:, j] << j
    return out


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=n, bitorder="little").view(np.bool_))
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(-1)[:n].bool()


def compress_delta(base: torch.Tensor, finetuned: torch.Tensor, method: str = "bitdelta", *,
                   group_size: int = 128, granularity: str = "row", fmt: str = "e4m3fn",
                   density: float = 0.1, backend: Optional[str] = None) -> CompressedDelta:
    """Compress the fine-tuning delta ``finetuned - base`` (computed in fp32).

    * ``bitdelta`` (Liu et al. 2024, arXiv:2402.10193): ``sign(delta)`` as bits (1 where
      ``delta >= 0``) and one fp32 scale ``mean |delta|``; ~16x smaller than a bf16 delta.
    * ``ternary`` (ComPEFT-style, Yadav et al. 2023, arXiv:2311.13171): the exact top
      ``k = int(density * n)`` magnitudes (:func:`fastmerge.ops.magnitude_threshold`; ties to the
      lowest index) as a position bitmap, their signs as bits, and one scale, the mean ``|delta|``
      over them (the least-squares scale for that support; ComPEFT tunes ``alpha * std`` instead).
    * ``int4``: the delta, rounded to ``finetuned``'s dtype, in torchao's plain int4 layout
      (asymmetric, ``group_size``); ``fp8``: FP8 with ``granularity`` / ``fmt``. Both run the
      fused merge->quantize kernel on ``(finetuned, base)``: the delta is never materialised.
    """
    for t, name in ((base, "base"), (finetuned, "finetuned")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    V.check_dtype(base, "base")
    if finetuned.shape != base.shape:
        raise ValueError(f"finetuned has shape {tuple(finetuned.shape)} but base has {tuple(base.shape)}")
    if finetuned.dtype != base.dtype:
        raise TypeError(f"finetuned has dtype {finetuned.dtype} but base has {base.dtype}")
    if finetuned.device != base.device:
        raise ValueError(f"finetuned is on {finetuned.device} but base is on {base.device}")
    if method not in DELTA_METHODS:
        raise ValueError(f"method must be one of {DELTA_METHODS}, got {method!r}")
    shape, dtype = tuple(base.shape), finetuned.dtype
    if method in ("int4", "fp8"):
        cfg = Int4Config(group_size, False, "torchao") if method == "int4" else FP8Config(granularity, fmt)
        check_shape(shape, cfg, "finetuned")
        plan = sem.Plan(masks=[sem.MaskSpec("none")] * 2, weights=[1.0, -1.0], names=["finetuned", "base"])
        res = B.run(plan, None, [finetuned, base], dtype, backend, quantize=cfg)
        data = res.tensors() if method == "int4" else {"q": res[0], "scale": res[1]}
        params = {"group_size": group_size} if method == "int4" else {"granularity": granularity, "fmt": fmt}
        return CompressedDelta(method, shape, dtype, data, params)
    B.resolve(backend, base.device)  # same backend errors as every other entry point
    d = finetuned.to(torch.float32) - base.to(torch.float32)
    if not V.all_finite(d):  # a non-finite input always makes d non-finite
        V.name_nonfinite([finetuned, base], ["finetuned", "base"])
        raise V.NonFiniteError("the delta finetuned - base", overflow=True)  # e.g. 3e38 - (-3e38)
    if method == "bitdelta":
        scale = d.abs().mean() if d.numel() else torch.zeros((), device=d.device)
        return CompressedDelta(method, shape, dtype, {"bits": pack_bits(d >= 0), "scale": scale.float()})
    dens = V.per_model(density, 1, "density", 0.0, 1.0)[0]

    k = int(dens * d.numel())
    a = d.abs().reshape(-1)
    if k == 0:
        keep = torch.zeros(a.numel(), dtype=torch.bool, device=d.device)
    else:
        t = magnitude_threshold(d, k=k, backend=backend)
        keep = a > t
        need = k - int(keep.sum())
        if need > 0:  # exactly k kept: the ties at the threshold go to the lowest flat indices
            keep[torch.nonzero(a == t).flatten()[:need]] = True
    kept = d.reshape(-1)[keep]
    scale = kept.abs().mean() if kept.numel() else torch.zeros((), device=d.device)
    data = {"mask": pack_bits(keep), "signs": pack_bits(kept >= 0), "scale": scale.float()}
    return CompressedDelta(method, shape, dtype, data, {"density": dens, "k": int(kept.numel())})


def decompress_delta(c: CompressedDelta, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The delta ``c`` stands for, in ``dtype`` (default: the fine-tune's dtype)."""
    if not isinstance(c, CompressedDelta):
        raise TypeError(f"c must be a CompressedDelta, got {type(c).__name__}")
    dtype = dtype or c.dtype
    n = math.prod(c.shape)
    if c.method == "int4":
        return TorchAOInt4(**c.data, shape=c.shape, group_size=c.params["group_size"], dtype=c.dtype).dequantize(dtype)
    if c.method == "fp8":
        return dequantize_fp8(c.data["q"], c.data["scale"], dtype)
    s = c.data["scale"]
    if c.method == "bitdelta":
        bits = unpack_bits(c.data["bits"], n)
        return torch.where(bits, s, -s).reshape(c.shape).to(dtype)
    keep = unpack_bits(c.data["mask"], n)
    out = torch.zeros(n, dtype=torch.float32, device=s.device)
    out[keep] = torch.where(unpack_bits(c.data["signs"], int(keep.sum())), s, -s)
    return out.reshape(c.shape).to(dtype)


def apply_delta(base: torch.Tensor, c: CompressedDelta, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``base + delta`` computed in fp32, cast to ``dtype`` (default: ``base``'s dtype)."""
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"base must be a torch.Tensor, got {type(base).__name__}")
    if tuple(base.shape) != tuple(c.shape):
        raise ValueError(f"base has shape {tuple(base.shape)} but the delta has {tuple(c.shape)}")
    return (base.to(torch.float32) + decompress_delta(c, torch.float32)).to(dtype or base.dtype)


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20 log10(|ref| / |ref - approx|)`` (inf when
    equal), as torchao's ``compute_error``."""
    ref64, err = ref.double(), ref.double() - approx.double()
    e = float(torch.linalg.vector_norm(err))
    return math.inf if e == 0 else 20 * math.log10(float(torch.linalg.vector_norm(ref64)) / e)
