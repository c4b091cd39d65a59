"""The research methods of issue 24 whose result is more than one merged tensor: TALL masks
(compression), EMR-Merging (a unified task vector with per-task masks and rescalers) and Fisher
merging (per-element statistics). The per-tensor merges among them are ``fastmerge.merge``
methods (``consensus_ta``, ``consensus_ties``, ``pcb``; ``fastmerge/methods/``); RegMean and
OPCM are in :mod:`fastmerge.regmean` and :mod:`fastmerge.opcm`.

Every function has a ``torch`` reference (the specification, ``backend="torch"``) and fused
kernels: C++ on CPU tensors (``backend="cpu"``, the default there: ``fastmerge/backends/
cpu_methods.py``, ``csrc/consensus.cpp``, ``emr.cpp``, ``fisher.cpp``) and Triton on CUDA tensors
(``backend="triton"``, and ``"cuda"``, which delegates to it: ``backends/triton_methods.py``,
``triton_kernels/``); elsewhere the reference runs where the tensors are. Masks are bit-packed
as ``numpy.packbits`` packs a flat bool array (8 elements a byte, the first in the most
significant bit), so FusionBench's and tall_masks' ``np.unpackbits`` read them.

Inputs follow ``fastmerge.merge``: same shape, dtype (fp32/fp16/bf16) and device, fp32
compute, inf/nan inputs raise :class:`~fastmerge.NonFiniteError`. ``emr`` and ``fisher`` also
take state dicts (``{name: tensor}``; every model with the base's names), where the method's
statistics span the whole model as FusionBench computes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch

from . import _validate as V
from . import backends as _backends
from . import dispatch
from .methods._common import checked, model_names
from .methods.consensus_ta import tall_masks as _tall_masks_ref
from .methods.emr import unified as _emr_unified
from .methods import pcb as _pcb

_ANY = dict(base="required", min_models=1, max_models=None)
_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


# ---- bit packing (numpy.packbits order) ------------------------------------------------------

def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as ``ceil(n / 8)`` uint8, ``numpy.packbits(mask.ravel())``'s bytes."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.reshape(-1, 8) << _SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """:func:`pack_bits` inverted: the bool tensor of ``shape``."""
    shape = tuple(shape)
    n = math.prod(shape)
    bits = (packed.reshape(-1, 1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:n].to(torch.bool).reshape(shape)


def _kernels(backend, ref: torch.Tensor, op: str):
    """The fused kernels ``backend`` resolves to: the cpu backend's (``backends/cpu_methods.py``)
    for ``cpu``; for ``triton`` or ``cuda`` the Triton kernels (``backends/triton_methods.py``)
    when that module has ``op``; else None (the reference)."""
    # "research.<op>": not a registry name, so auto picks the fused backend of the device (the
    # registry's fisher / regmean entries are fastmerge merge's, whose tensors are read by files)
    chosen = dispatch.resolve(backend, ref.device, "research." + op, V.needs_grad([ref]))
    if chosen == "cpu":
        return _backends.method_ops("cpu")
    if chosen in ("triton", "cuda"):
        ops = _backends.method_ops(chosen)
        return ops if hasattr(ops, op) else None
    return None


# ---- TALL masks ----------------------------------------------------------------------------

@dataclass
class TallMasks:
    """Per-task TALL masks, bit-packed: ``packed[t]`` holds task ``t``'s mask of ``shape``."""

    packed: torch.Tensor  # uint8 [K, ceil(n / 8)]
    shape: tuple

    def __len__(self) -> int:
        return self.packed.shape[0]

    def mask(self, t: int) -> torch.Tensor:
        """Task ``t``'s mask as a bool tensor."""
        return unpack_bits(self.packed[t], self.shape)

    def task(self, t: int, base: torch.Tensor, mtl: torch.Tensor) -> torch.Tensor:
        """Task ``t`` rebuilt from the multi-task vector, as the paper compresses:
        ``base + m_t * mtl`` (fp32, in ``base``'s dtype)."""
        m = self.mask(t).to(base.device)
        return (base.float() + m * mtl.float()).to(base.dtype)


def tall_masks(base, models, *, tall_lambda=0.6, mtl: Optional[torch.Tensor] = None,
               backend: Optional[str] = None) -> TallMasks:
    """TALL masks (Wang et al. 2024, "Localizing Task Information for Improved Model Merging and
    Compression", https://arxiv.org/abs/2405.07813; FusionBench ``tall_mask``):
    ``m_t = |tau_t| > lambda_t |tau_MTL - tau_t|`` with ``tau_t = models[t] - base`` and
    ``tau_MTL = mtl`` (default ``sum_t tau_t``, task arithmetic's). ``tall_lambda``: one value
    or one per task (FusionBench's ``tall_mask_lambda``, default 0.6). The masks come back
    bit-packed (:class:`TallMasks`); ``TallMasks.task(t, base, mtl)`` rebuilds task ``t``.
    """
    b, ms = checked("tall_masks", _ANY, base, models)
    lambdas = V.per_model(tall_lambda, len(ms), "tall_lambda", 0.0)
    if mtl is not None:
        if not isinstance(mtl, torch.Tensor):
            raise TypeError(f"mtl must be a torch.Tensor or None, got {type(mtl).__name__}")
        V.check_dtype(mtl, "mtl")  # any supported dtype: the kernel reads it as it is
        if mtl.shape != b.shape or mtl.device != b.device:
            raise ValueError(f"mtl must have base's shape {tuple(b.shape)} and device {b.device}, "
                             f"got {tuple(mtl.shape)} on {mtl.device}")
    ops = _kernels(backend, b, "tall_masks")
    if ops is not None:
        packed = ops.tall_masks(b, ms, lambdas, mtl)
    else:
        for t, name in zip([b, *ms] + ([mtl] if mtl is not None else []),
                           ["base", *model_names(len(ms)), "mtl"]):
            V.check_finite(t, name)
        deltas = [m.float() - b.float() for m in ms]
        total = sum(deltas) if mtl is None else mtl.float()
        packed = torch.stack([pack_bits(m) for m in _tall_masks_ref(deltas, total, lambdas)])
    return TallMasks(packed, tuple(b.shape))


# ---- EMR-Merging -------------------------------------------------------------------------------

@dataclass
class EMR:
    """EMR-Merging's result: the unified task vector, per-task masks (bit-packed, as
    :class:`TallMasks` packs them) and per-task rescalers. For state dicts, ``unified`` and
    ``masks`` are dicts by tensor name and ``base`` the base state dict."""

    base: Union[torch.Tensor, dict]
    unified: Union[torch.Tensor, dict]  # fp32 tau_uni
    masks: Union[torch.Tensor, dict]  # uint8 [K, ceil(n / 8)] per tensor
    rescalers: torch.Tensor  # fp32 [K]

    def __len__(self) -> int:
        return self.rescalers.numel()

    def mask(self, t: int, name: Optional[str] = None) -> torch.Tensor:
        """Task ``t``'s mask (of tensor ``name`` for state dicts) as a bool tensor."""
        if isinstance(self.unified, dict):
            return unpack_bits(self.masks[name][t], self.unified[name].shape)
        return unpack_bits(self.masks[t], self.unified.shape)

    def task(self, t: int):
        """Task ``t`` rebuilt: ``base + rescaler_t * (mask_t * tau_uni)`` (fp32, in the base's
        dtype), a tensor or a state dict."""
        if not 0 <= t < len(self):
            raise IndexError(f"task index {t} out of range for {len(self)} tasks")
        r = float(self.rescalers[t])

        def one(base, uni, packed):
            m = unpack_bits(packed[t], uni.shape).to(uni.device)
            return (base.float() + r * (m * uni)).to(base.dtype)

        if isinstance(self.unified, dict):
            return {n: one(self.base[n], u, self.masks[n]) for n, u in self.unified.items()}
        return one(self.base, self.unified, self.masks)


def _emr_tensor_ref(b: torch.Tensor, ms: list):
    """One tensor of the reference: ``(tau_uni, packed masks, sum_t |tau_t|, sum_t |tau_uni
    m_t|)`` (the sums in float64 over the tensor)."""
    deltas = [m.float() - b.float() for m in ms]
    uni, masks = _emr_unified(deltas)
    abs_sum = [float(d.abs().sum(dtype=torch.float64)) for d in deltas]
    kept_sum = [float((uni * m).abs().sum(dtype=torch.float64)) for m in masks]
    return uni, torch.stack([pack_bits(m) for m in masks]), abs_sum, kept_sum


def _state_dicts(base, models, what: str):
    """``(names, base dict, [model dicts])`` with every model holding exactly the base's names."""
    models = list(models)
    for i, m in enumerate(models):
        if not isinstance(m, Mapping):
            raise TypeError(f"models[{i}] must be a state dict (a mapping) like base, got {type(m).__name__}")
        if set(m) != set(base):
            diff = sorted(set(m) ^ set(base))
            raise ValueError(f"models[{i}] and {what} differ in tensor names: {diff[:3]}")
    return list(base), base, models


def emr(base, models, *, backend: Optional[str] = None) -> EMR:
    """EMR-Merging: Elect, Mask & Rescale (Huang et al. 2024, "EMR-Merging: Tuning-Free
    High-Performance Model Merging", NeurIPS 2024, https://arxiv.org/abs/2405.17461; FusionBench
    ``emr_merging``). With ``tau_t = models[t] - base`` (fp32):

    1. elect: ``gamma = sign(sum_t tau_t)``, a zero sum counted negative (FusionBench's
       ``_sign``);
    2. mask: ``m_t = tau_t * gamma > 0``;
    3. unify: ``tau_uni = gamma * max_t |tau_t * m_t|``;
    4. rescale: ``r_t = sum_p mean|tau_t| / sum_p mean|tau_uni * m_t|`` over the tensors ``p`` of
       the model (one tensor: its two means);

    and task ``t`` is ``base + r_t * (m_t * tau_uni)`` (:meth:`EMR.task`). ``base`` and
    ``models``: tensors, or state dicts with the same names (the rescalers then span the
    model, as FusionBench sums its per-tensor means).

    Difference from FusionBench: a task whose mask keeps nothing (``sum_p mean|tau_uni m_t| =
    0``) gets ``r_t = 0`` where FusionBench divides by zero (inf or NaN); its rebuilt weights
    are the base either way.
    """
    if isinstance(base, Mapping):
        names, bdict, mdicts = _state_dicts(base, models, "base")
        if not mdicts:
            raise ValueError("models is empty: emr needs at least one model")
        parts = {n: emr_parts(bdict[n], [m[n] for m in mdicts], backend=backend, name=n) for n in names}
        return EMR(dict(bdict), {n: parts[n][0] for n in names}, {n: parts[n][1] for n in names},
                   emr_rescalers([(p[0].numel(), p[2], p[3]) for p in parts.values()]))
    uni, packed, abs_sum, kept_sum = emr_parts(base, models, backend=backend)
    return EMR(base, uni, packed, emr_rescalers([(uni.numel(), abs_sum, kept_sum)]))


def emr_parts(base, models, *, backend: Optional[str] = None, name: Optional[str] = None):
    """One tensor's share of :func:`emr` over a whole model: ``(tau_uni fp32, packed masks
    uint8 [K, ceil(n / 8)], sum_j |tau_t[j]|, sum_j |tau_uni[j] m_t[j]|)``, the sums for
    :func:`emr_rescalers` (``fastmerge merge`` collects them tensor by tensor). ``name`` names
    the tensor in errors."""
    try:
        b, ms = checked("emr", _ANY, base, models)
    except (TypeError, ValueError) as e:
        raise type(e)(f"tensor {name!r}: {e}" if name is not None else str(e)) from None
    ops = _kernels(backend, b, "emr")
    if ops is not None:
        return ops.emr(b, ms)
    for t, label in zip([b, *ms], ["base", *model_names(len(ms))]):
        V.check_finite(t, label if name is None else f"{label} of tensor {name!r}")
    return _emr_tensor_ref(b, ms)


def emr_rescalers(parts) -> torch.Tensor:
    """EMR's rescalers over the tensors ``parts = [(numel, sum |tau_t|, sum |tau_uni m_t|)]``
    (:func:`emr_parts`' sums): ``r_t = sum_p mean|tau_t| / sum_p mean|tau_uni m_t|`` in fp32, 0
    where nothing is kept."""
    parts = list(parts)
    K = len(parts[0][1]) if parts else 0
    scale = [sum(a[t] / max(n, 1) for n, a, _ in parts) for t in range(K)]
    kept = [sum(k[t] / max(n, 1) for n, _, k in parts) for t in range(K)]
    return rescalers(scale, kept)


def rescalers(scale, kept) -> torch.Tensor:
    """EMR's ``r_t = scale_t / kept_t`` (sums of per-tensor means) in fp32, 0 where nothing is
    kept."""
    return torch.tensor([s / k if k > 0 else 0.0 for s, k in zip(scale, kept)], dtype=torch.float32)


# fastmerge merge's masks and rescalers: OUT/emr/emr.safetensors (a subfolder, so that readers of
# OUT's weights never take the masks for model tensors); fastmerge.load_emr reads them back
EMR_DIR, EMR_FILE = "emr", "emr.safetensors"


# ---- PCB over a whole model ----------------------------------------------------------------------

def pcb_with_stats(base, models, stats, *, weights=None, lam: float = 1.0, out_dtype=None,
                   backend: Optional[str] = None) -> torch.Tensor:
    """One tensor of PCB-merging with the per-task statistics ``stats = (lo, hi, q, M)`` taken
    over a wider scope (``fastmerge merge`` with ``topk_scope: model``: the whole model, as the
    authors' code flattens it): :func:`fastmerge.methods.pcb.merge_with`, fused on CPU."""
    b, ms = checked("pcb", _ANY, base, models)
    K = len(ms)
    w = V.per_model(1.0 if weights is None else weights, K, "weights")
    lam = V.number(lam, "lam")
    dtype = V.out_dtype(out_dtype, b.dtype)
    if any(len(x) != K for x in stats):
        raise ValueError(f"stats must hold K = {K} values each of lo, hi, q and M")
    ops = _kernels(backend, b, "pcb")
    if ops is not None and hasattr(ops, "pcb") and b.device.type == "cpu":
        return ops.pcb(b, ms, ranks=None, weights=w, lam=lam, out_dtype=dtype, stats=stats)
    for t, label in zip([b, *ms], ["base", *model_names(K)]):
        V.check_finite(t, label)
    deltas = [m.float() - b.float() for m in ms]
    out = (b.float() + lam * _pcb.merge_with(deltas, stats, w)).to(dtype)
    V.check_result(out, [b, *ms], ["base", *model_names(K)])
    return out


# ---- Fisher merging ----------------------------------------------------------------------------

def fisher(models, fishers, *, weights=None, normalize_fisher_weight: bool = True,
           minimal_fisher_weight: float = 1e-6, out_dtype: Optional[torch.dtype] = None,
           backend: Optional[str] = None):
    """Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging",
    NeurIPS 2022, https://arxiv.org/abs/2111.09832; FusionBench ``fisher_merging``'s
    ``merging_with_fisher_weights``): with ``F_t`` the diagonal Fisher of model ``t``,
    ``eps = minimal_fisher_weight`` and ``c_t`` the scaling coefficients (``weights``, default
    ``1/K`` each, FusionBench's ``fisher_scaling_coefficients``)::

        c_t <- c_t * (1 / (||F_t|| + eps)) / sum_j (1 / (||F_j|| + eps))   (normalize_fisher_weight)
        out = sum_t c_t (F_t + eps) theta_t / sum_t c_t (F_t + eps)

    ``||F_t||`` is the L2 norm of model ``t``'s Fisher over the whole model (state dicts: every
    tensor, as FusionBench's ``get_models_fisher_norm``; tensors: that tensor). ``models`` and
    ``fishers``: K tensors (or K state dicts with the same names) each; a Fisher must be finite
    and non-negative. Returns a tensor (or state dict) in ``out_dtype`` (default the models').
    """
    models, fishers = list(models), list(fishers)
    if not models:
        raise ValueError("models is empty: fisher needs at least one model")
    if len(fishers) != len(models):
        raise ValueError(f"fishers has {len(fishers)} entries for {len(models)} models")
    K = len(models)
    c = [1.0 / K] * K if weights is None else V.per_model(weights, K, "weights")
    eps = V.number(minimal_fisher_weight, "minimal_fisher_weight")
    if eps < 0:
        raise ValueError(f"minimal_fisher_weight must be >= 0, got {eps}")
    normalize = V.flag(normalize_fisher_weight, "normalize_fisher_weight")
    if isinstance(models[0], Mapping):
        names, _, mdicts = _state_dicts(models[0], models[1:], "models[0]")
        _, _, fdicts = _state_dicts(models[0], fishers, "models[0]")
        groups = {n: ([m[n] for m in [models[0], *mdicts]], [f[n] for f in fdicts]) for n in names}
    else:
        groups = {None: (models, fishers)}
    checked_groups = {n: _fisher_inputs(ms, fs, n, backend) for n, (ms, fs) in groups.items()}
    if normalize:
        sq = [0.0] * K
        for n, (ms, fs, ops) in checked_groups.items():
            sq = [a + b for a, b in zip(sq, _sum_squares(fs, ops, _fisher_names(K, n)))]
        c = fisher_coefficients(c, sq, eps)
    out = {}
    for n, (ms, fs, ops) in checked_groups.items():
        dtype = V.out_dtype(out_dtype, ms[0].dtype)
        if ops is not None:
            out[n] = ops.fisher(ms, fs, c, eps, out_dtype=dtype, names=_fisher_names(K, n))
        else:
            coef = torch.tensor(c, dtype=torch.float32, device=ms[0].device)
            num = sum(coef[t] * (fs[t].float() + eps) * ms[t].float() for t in range(K))
            den = sum(coef[t] * (fs[t].float() + eps) for t in range(K))
            out[n] = (num / den).to(dtype)
            V.check_result(out[n], ms + fs, _fisher_names(K, n))
    return out[None] if None in out else out


def _sum_squares(fs, ops, names) -> list:
    """``sum F_t^2`` per Fisher in float64 (the kernels flag inf/nan and negative entries)."""
    if ops is not None:
        return ops.sum_squares(fs, names)
    return [float(f.double().square().sum()) for f in fs]


def fisher_sum_squares(fishers, *, backend: Optional[str] = None, name: Optional[str] = None) -> list:
    """One tensor's share of the whole-model Fisher norms ``||F_t||^2`` (``fastmerge merge`` adds
    them up tensor by tensor before :func:`fisher_coefficients`). ``name`` names the tensor."""
    fishers = list(fishers)
    names = _fisher_names(len(fishers), name)
    V.check_dtype(fishers[0], names[len(fishers)])
    V.same_as(fishers[0], names[len(fishers)], fishers[1:], "fishers", 1)
    ops = _kernels(backend, fishers[0], "sum_squares")
    if ops is None:  # the kernels flag inf/nan and negative entries in their pass
        for t, f in enumerate(fishers):
            _check_fisher(f, names[len(fishers) + t])
    return _sum_squares(fishers, ops, names)


def _check_fisher(f: torch.Tensor, name: str) -> None:
    """The reference's checks of one Fisher: finite and non-negative."""
    V.check_finite(f, name)
    if f.numel() and float(f.min()) < 0:
        raise ValueError(f"{name} has negative entries: a diagonal Fisher is >= 0")


def fisher_coefficients(weights, sq, eps: float) -> list:
    """FusionBench's normalized coefficients ``c_t = w_t (1 / (||F_t|| + eps)) / sum_j (1 /
    (||F_j|| + eps))`` from the squared norms ``sq``."""
    zero = [t for t, s in enumerate(sq) if math.sqrt(s) + eps == 0]
    if zero:
        raise ValueError(f"fishers[{zero[0]}] is all zero and minimal_fisher_weight is 0: normalizing by "
                         "its norm divides by zero (give minimal_fisher_weight > 0 or "
                         "normalize_fisher_weight=False)")
    inv = [1.0 / (math.sqrt(s) + eps) for s in sq]
    return [ct * (iv / sum(inv)) for ct, iv in zip(weights, inv)]


def _fisher_names(K: int, name) -> list:
    where = "" if name is None else f" of tensor {name!r}"
    return [f"models[{t}]{where}" for t in range(K)] + [f"fishers[{t}]{where}" for t in range(K)]


def _fisher_inputs(ms: Sequence, fs: Sequence, name, backend):
    """Checks one tensor group: K models and K Fishers of one shape and device, each list of one
    dtype, finite, the Fishers non-negative; returns ``(models, fishers, cpu kernels or None)``."""
    names = _fisher_names(len(ms), name)
    for t, x in enumerate(list(ms) + list(fs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{names[t]} must be a torch.Tensor, got {type(x).__name__}")
    V.check_dtype(ms[0], names[0])
    V.same_as(ms[0], names[0], ms[1:], "models", 1)
    V.check_dtype(fs[0], names[len(ms)])
    V.same_as(fs[0], names[len(ms)], fs[1:], "fishers", 1)
    if fs[0].shape != ms[0].shape or fs[0].device != ms[0].device:
        raise ValueError(f"{names[len(ms)]} must have the models' shape {tuple(ms[0].shape)} and device "
                         f"{ms[0].device}, got {tuple(fs[0].shape)} on {fs[0].device}")
    ops = _kernels(backend, ms[0], "fisher")
    if ops is None:  # the kernels flag inf/nan and negative Fishers in their passes
        for t, f in enumerate(fs):
            V.check_finite(ms[t], names[t])
            _check_fisher(f, names[len(ms) + t])
    return list(ms), list(fs), ops
