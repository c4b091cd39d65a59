"""Format facts of the quantized outputs: configurations, shapes, result containers and
their dequantization (GPTQ v1, torchao plain int4, FP8; formats described in
:mod:`fastmerge.quant`). Bottom layer: the backends read these facts, the public
``fastmerge.quant`` re-exports them; nothing here runs a kernel."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch

from . import _validate as V

GROUP_SIZES = (32, 64, 128)
LAYOUTS = ("gptq", "torchao")
FP8_DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
GRANULARITIES = ("tensor", "row", "block")


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


def fill_empty_scales(res, cfg: QuantConfig):
    """``res``, the outputs of quantizing an EMPTY weight (no kernel runs), as the reference
    defines them: FP8 scales of fp32 eps (the amax of no values is 0, and a zero scale becomes
    eps) wherever the scale shape has cells (a ``[3, 0]`` weight has three rows); INT4's
    outputs are empty then."""
    if isinstance(cfg, FP8Config):
        res[1].fill_(torch.finfo(torch.float32).eps)
    return res


def check_int4_scale(raw: dict, cfg: QuantConfig, name: str) -> None:
    """ValueError naming ``name`` when a torchao-layout asymmetric scale ``(max - min) / 15`` is
    not finite: a group spanning more than float32's range (such as +-3e38) has no fp32 scale.
    Read off the (small) scale tensor after the quantizer ran, on every backend."""
    if isinstance(cfg, Int4Config) and cfg.layout == "torchao" and not V.all_finite(raw["scale"]):
        raise ValueError(f"{name} has a group whose range (max - min) exceeds float32's (~3.4e38): "
                         "torchao's int4 scale (max - min) / 15 overflows; such values cannot be "
                         "quantized to int4")


class _Int4:
    """What every INT4 result offers; ``FIELDS`` names its tensors."""

    FIELDS: ClassVar[tuple] = ()

    def tensors(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    @property
    def nbytes(self) -> int:
        return nbytes(self.tensors())

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


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def wrap(raw, cfg: QuantConfig, shape: tuple, dtype: torch.dtype):
    """A backend's raw output as the public result: an Int4 dataclass or ``(q, scale)``."""
    if isinstance(cfg, FP8Config):
        return raw
    cls = GPTQInt4 if cfg.layout == "gptq" else TorchAOInt4
    return cls(**raw, shape=tuple(shape), group_size=cfg.group_size, symmetric=cfg.symmetric, dtype=dtype)


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

def expand_fp8_scale(scale: torch.Tensor, shape, block) -> torch.Tensor:
    """A tensor / row / block scale broadcast (or repeated) to ``shape``."""
    if scale.numel() == 1 or tuple(scale.shape) == tuple(shape[:-1]) + (1,):
        return scale
    br, bc = block
    return scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[: shape[0], : shape[1]]
