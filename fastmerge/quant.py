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

Rounding is round-half-to-even everywhere. The ``torch`` backend (``fastmerge/reference.py``)
defines every format; the ``cpu`` backend's C++ kernels (``csrc/quant.cpp``) and the Triton
kernels (``triton_kernels/quant.py``; GPU tensors on ``triton`` and ``cuda``) agree bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

import numpy as np
import torch

from . import _validate as V
from . import dispatch as B

GROUP_SIZES = (32, 64, 128)
LAYOUTS = ("gptq", "torchao")
FP8_DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
GRANULARITIES = ("tensor", "row", "block")
DELTA_METHODS = ("int4", "fp8", "bitdelta", "ternary")


# ---------------------------------------------------------------------------- configurations

@dataclass(frozen=True)
class Int4Config:
    """INT4 weight-only quantization: groups of ``group_size`` (32, 64, 128) along ``in``,
    asymmetric (zero point) unless ``symmetric``, in the ``gptq`` or ``torchao`` layout."""

    group_size: int = 128
    symmetric: bool = False
    layout: str = "gptq"

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) \
                or self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")
        V.flag(self.symmetric, "symmetric")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")


@dataclass(frozen=True)
class FP8Config:
    """FP8 with fp32 dequant scales per ``tensor``, ``row`` or ``block`` (``block`` = rows,
    columns of a tile), format ``e4m3fn`` or ``e5m2``."""

    granularity: str = "tensor"
    fmt: str = "e4m3fn"
    block: tuple = (128, 128)

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.fmt not in FP8_DTYPES:
            raise ValueError(f"fmt must be one of {tuple(FP8_DTYPES)}, got {self.fmt!r}")
        blk = self.block
        if not isinstance(blk, (tuple, list)) or len(blk) != 2 or any(
                isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blk):
            raise ValueError(f"block must be two positive ints (rows, columns), got {blk!r}")
        object.__setattr__(self, "block", tuple(blk))


QuantConfig = Union[Int4Config, FP8Config]


def config(quantize) -> Optional[QuantConfig]:
    """``quantize=`` of :func:`fastmerge.merge`: None, ``"int4"`` / ``"fp8"`` (default configs), or
    an :class:`Int4Config` / :class:`FP8Config`."""
    if quantize is None or isinstance(quantize, (Int4Config, FP8Config)):
        return quantize
    if quantize == "int4":
        return Int4Config()
    if quantize == "fp8":
        return FP8Config()
    raise ValueError(f"quantize must be None, 'int4', 'fp8', an Int4Config or an FP8Config; got {quantize!r}")


def fp8_scale_shape(shape: tuple, granularity: str, block=(128, 128)) -> tuple:
    if granularity == "tensor":
        return (1,) * len(shape)
    if granularity == "row":
        return tuple(shape[:-1]) + (1,)
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def check_shape(shape: tuple, cfg: QuantConfig, name: str = "w") -> None:
    """ValueError naming ``name`` when a weight of ``shape`` cannot take the format ``cfg``."""
    if isinstance(cfg, Int4Config):
        if len(shape) != 2:
            raise ValueError(f"{name} must be a 2-D weight [out_features, in_features] for INT4; "
                             f"got shape {shape}")
        out_f, in_f = shape
        if in_f % cfg.group_size:
            raise ValueError(f"{name}.shape[1] (in_features) = {in_f} is not a multiple of "
                             f"group_size={cfg.group_size}")
        if cfg.layout == "gptq" and out_f % 8:
            raise ValueError(f"{name}.shape[0] (out_features) = {out_f} is not a multiple of 8, "
                             "which layout='gptq' needs (qzeros packs 8 output columns per int32)")
        return
    if len(shape) == 0:
        raise ValueError(f"{name} is 0-d: FP8 quantization needs at least one dimension")
    if cfg.granularity == "block" and len(shape) != 2:
        raise ValueError(f"{name} must be 2-D for granularity='block'; got shape {shape}")


def int4_outputs(cfg: "Int4Config", out_f: int, in_f: int, value_dtype: torch.dtype,
                 device=None) -> dict:
    """Empty tensors of the INT4 layout ``cfg.layout`` for a weight ``[out_f, in_f]`` of
    ``value_dtype`` (the kernels fill them)."""
    G = cfg.group_size
    if cfg.layout == "gptq":
        return {"qweight": torch.empty(in_f // 8, out_f, dtype=torch.int32, device=device),
                "qzeros": torch.empty(in_f // G, out_f // 8, dtype=torch.int32, device=device),
                "scales": torch.empty(in_f // G, out_f, dtype=torch.float16, device=device)}
    return {"qdata": torch.empty(out_f, in_f // 2, dtype=torch.int8, device=device),
            "scale": torch.empty(in_f // G, out_f, dtype=value_dtype, device=device),
            "zero_point": torch.empty(in_f // G, out_f, dtype=value_dtype, device=device)}


def raise_quant_flags(flags, name: str) -> None:
    """A quantizer kernel's last two flags: a non-finite value, a GPTQ fp16 scale overflow."""
    if flags[-2]:
        raise V.NonFiniteError(name)
    if flags[-1]:
        raise ValueError(f"{name} has a group whose range needs an fp16 scale above 65504 "
                         "(|values| beyond ~1e6): GPTQ's fp16 scales cannot hold it")


def _check_weight(w, cfg: QuantConfig, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    V.check_dtype(w, name)
    check_shape(tuple(w.shape), cfg, name)


# ---------------------------------------------------------------------------------- INT4

class _Int4:
    """What every INT4 result offers; ``FIELDS`` names its tensors."""

    FIELDS: ClassVar[tuple] = ()

    def tensors(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    @property
    def nbytes(self) -> int:
        return _nbytes(self.tensors())

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_int4(self, dtype)


@dataclass
class GPTQInt4(_Int4):
    """GPTQ v1 tensors of a weight ``[out, in]`` (see the module docstring).
    ``state_dict()`` gives the names AutoGPTQ / transformers load (``qweight, qzeros, scales,
    g_idx``)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    shape: tuple
    group_size: int
    symmetric: bool = False
    dtype: torch.dtype = torch.float16  # dtype of the weight that was quantized
    layout: ClassVar[str] = "gptq"
    FIELDS: ClassVar[tuple] = ("qweight", "qzeros", "scales")

    @property
    def g_idx(self) -> torch.Tensor:
        return torch.arange(self.shape[1], dtype=torch.int32, device=self.qweight.device) // self.group_size

    def state_dict(self, prefix: str = "") -> dict:
        return {prefix + "qweight": self.qweight, prefix + "qzeros": self.qzeros,
                prefix + "scales": self.scales, prefix + "g_idx": self.g_idx}


@dataclass
class TorchAOInt4(_Int4):
    """torchao's plain int4 tensors of a weight ``[out, in]`` (see the module docstring);
    ``to_torchao()`` wraps them in ``torchao.quantization.Int4Tensor``."""

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    shape: tuple
    group_size: int
    symmetric: bool = False
    dtype: torch.dtype = torch.bfloat16
    layout: ClassVar[str] = "torchao"
    FIELDS: ClassVar[tuple] = ("qdata", "scale", "zero_point")

    def to_torchao(self):
        from torchao.quantization import Int4Tensor

        return Int4Tensor(self.qdata, self.scale, self.zero_point, block_size=[1, self.group_size],
                          shape=torch.Size(self.shape))


Int4Weight = Union[GPTQInt4, TorchAOInt4]


def _nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _wrap(raw, cfg: QuantConfig, shape: tuple, dtype: torch.dtype):
    """A backend's raw output as the public result: an Int4 dataclass or ``(q, scale)``."""
    if isinstance(cfg, FP8Config):
        return raw
    cls = GPTQInt4 if cfg.layout == "gptq" else TorchAOInt4
    return cls(**raw, shape=tuple(shape), group_size=cfg.group_size, symmetric=cfg.symmetric, dtype=dtype)


def quantize(w: torch.Tensor, cfg: QuantConfig, *, backend: Optional[str] = None):
    """Quantize ``w`` with ``cfg`` (:class:`Int4Config` -> Int4 dataclass, :class:`FP8Config` ->
    ``(q, scale)``)."""
    cfg = config(cfg)
    _check_weight(w, cfg)
    mod = B.for_op(backend, w.device, "quantize")
    if not hasattr(mod, "quantize"):  # a backend without quantizers: the torch reference
        mod = B.module("torch")
    raw = mod.quantize(w, cfg, "w")
    return _wrap(raw, cfg, tuple(w.shape), w.dtype)


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = False, layout: str = "gptq",
                  *, backend: Optional[str] = None) -> Int4Weight:
    """INT4 weight-only quantization of ``w [out, in]`` (fp32, fp16 or bf16) in groups of
    ``group_size`` along ``in``: :class:`GPTQInt4` (``layout="gptq"``) or :class:`TorchAOInt4`
    (``"torchao"``). Shapes that the groups do not divide raise a ValueError (no padding)."""
    return quantize(w, Int4Config(group_size, symmetric, layout), backend=backend)


_SHIFTS = {}


def _shifts(device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = 4 * torch.arange(8, dtype=torch.int32, device=device)
    return _SHIFTS[device]


def dequantize_int4(packed: Int4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight ``[out, in]`` an INT4 result stands for, computed in fp32 (``s (q - z)`` for
    GPTQ v1, ``q s + zero`` for torchao) and cast to ``dtype`` (default: the quantized weight's)."""
    out_f, in_f = packed.shape
    G = packed.group_size
    if isinstance(packed, GPTQInt4):
        sh = _shifts(packed.qweight.device)
        q = (packed.qweight.unsqueeze(1) >> sh[None, :, None]) & 0xF  # [in/8, 8, out]
        q = q.reshape(in_f, out_f).T
        z = ((packed.qzeros.unsqueeze(-1) >> sh) & 0xF).reshape(in_f // G, out_f) + 1
        w = (q.reshape(out_f, in_f // G, G) - z.T[..., None]).float() * packed.scales.T.float()[..., None]
    elif isinstance(packed, TorchAOInt4):
        d = packed.qdata
        q = torch.stack([(d << 4) >> 4, d >> 4], dim=-1).reshape(out_f, in_f // G, G)
        w = q.float() * packed.scale.T.float()[..., None] + packed.zero_point.T.float()[..., None]
    else:
        raise TypeError(f"packed must be a GPTQInt4 or TorchAOInt4, got {type(packed).__name__}")
    return w.reshape(out_f, in_f).to(dtype or packed.dtype)


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
    from .reference import expand_fp8_scale

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
        return _nbytes(self.data)

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
        from . import _semantics as sem
        from .api import run

        cfg = Int4Config(group_size, False, "torchao") if method == "int4" else FP8Config(granularity, fmt)
        check_shape(shape, cfg, "finetuned")
        plan = sem.Plan(masks=[sem.MaskSpec("none")] * 2, weights=[1.0, -1.0], names=["finetuned", "base"])
        res = run(plan, None, [finetuned, base], dtype, backend, quantize=cfg)
        data = res.tensors() if method == "int4" else {"q": res[0], "scale": res[1]}
        params = {"group_size": group_size} if method == "int4" else {"granularity": granularity, "fmt": fmt}
        return CompressedDelta(method, shape, dtype, data, params)
    B.resolve(backend, base.device)  # same backend errors as every other entry point
    d = finetuned.to(torch.float32) - base.to(torch.float32)
    if not bool(torch.isfinite(d).all()):  # a non-finite input always makes d non-finite
        from .reference import check_finite

        check_finite(finetuned, "finetuned")
        check_finite(base, "base")
    if method == "bitdelta":
        scale = d.abs().mean() if d.numel() else torch.zeros((), device=d.device)
        return CompressedDelta(method, shape, dtype, {"bits": pack_bits(d >= 0), "scale": scale.float()})
    dens = V.per_model(density, 1, "density", 0.0, 1.0)[0]
    from .ops import magnitude_threshold

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
