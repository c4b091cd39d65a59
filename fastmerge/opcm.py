"""OPCM: continual model merging by orthogonal projection, one model at a time.

Tang, Li, Shen, Liu, Tao & Wang, "Merging Models on the Fly Without Retraining: A Sequential
Approach to Scalable Continual Model Merging", 2025 (arXiv:2501.09522); FusionBench's
``fusion_bench.method.opcm.opcm.OPCMForCLIP``, whose ``run`` loop :class:`Merger` follows on
tensors and state dicts instead of ``nn.Module``s.

With ``θ_0`` the base, ``τ_t = θ_t - θ_0`` the t-th model's task vector and ``τ̄_{t-1}`` the
merged task vector after ``t - 1`` models (``τ̄_1 = τ_1``: the first model is the merge), step t:

1. For every "linear" 2-D tensor, with ``U S Vᵀ`` the SVD of ``τ̄_{t-1}`` (``k = min(m, n)``):
   ``r`` = the first index with ``cumsum(S)_i / sum(S) > alpha`` (0 when there is none, as
   ``argmax`` of an all-False mask), ``P = Uᵀ τ_t V``; zero ``P``'s diagonal and ``P[:r, :r]``;
   ``τ_t' = U P Vᵀ``: the new task vector with its components along the previous merge's
   top-``r`` singular directions and along every singular pair ``u_i v_iᵀ`` removed.
   Every other tensor: ``τ_t' = τ_t``.
2. ``τ̄_t = λ_{t-1} τ̄_{t-1} + τ_t'`` for every tensor (``λ_0 = 1``).
3. Whole-model rescale: ``N_t = ||τ̄_t||`` (L2 over all tensors together, FusionBench's
   ``get_task_vector_norm``), ``n̄_t`` = the mean of ``||τ_1||, ..., ||τ_t||``;
   ``λ_t = N_t / n̄_t`` and ``τ̄_t ← τ̄_t / λ_t``, so the merge keeps the average task-vector norm
   and the next step's ``λ_t τ̄_t`` is again the unscaled sum of projected task vectors.

Economy SVD, exactly: FusionBench takes the full SVD (``U`` m×m, ``V`` n×n). Write
``U = [U1 U2]``, ``V = [V1 V2]`` with ``U1``, ``V1`` the first ``k`` columns. Every entry it zeroes
-- the diagonal ``(i, i)``, ``i < k``, and ``[:r, :r]`` with ``r < k`` -- lies in the top-left
``k×k`` block ``A = U1ᵀ τ_t V1``. With ``M`` = ``A`` on those entries and 0 elsewhere,
``U P' Vᵀ = U P Vᵀ - U1 M V1ᵀ = τ_t - U1 M V1ᵀ`` because ``U`` and ``V`` are orthogonal
(``U P Vᵀ = U Uᵀ τ_t V Vᵀ = τ_t``). So ``τ_t' = τ_t - U1 M V1ᵀ``: the economy SVD gives the same
result without ever forming ``U2``/``V2`` (a 4096×11008 weight's full ``V`` is 11008²).

Decisions (see also the tests, which compare against a transcription of FusionBench's loop):

* "Linear" tensors: FusionBench projects ``nn.Linear`` weights (``isinstance(module,
  nn.Linear)``), which a state dict cannot show. Default here: 2-D tensors whose key is
  ``"weight"`` or ends with ``".weight"`` (a lone tensor: 2-D). Embedding tables and other 2-D
  weights of non-Linear modules therefore count as linear unless ``linear`` excludes them, e.g.
  ``linear=lambda name, t: t.dim() == 2 and "embed" not in name``.
* ``cumsum(S) / cumsum(S)[-1]`` replaces ``cumsum(S) / S.sum()``: the same up to round-off, but
  the last share is exactly 1, so ``alpha = 1`` always gives ``r = 0`` (with ``S.sum()`` the
  last share exceeds 1 by rounding in ~13% of random fp32 matrices, which makes FusionBench's
  ``alpha = 1`` pick ``r = k - 1`` instead).
* Order: the models are merged in the order of the ``add`` calls (FusionBench shuffles them by
  default, ``shuffle_order=True``; OPCM's result depends on the order).
* ``alpha`` must be in ``[0, 1]`` (FusionBench takes any float, but every value outside behaves
  as ``r = 0``; note that ``alpha = 0`` and ``alpha = 1`` both give ``r = 0``, removing only the
  diagonal pairs).
* A previous merged task vector that is exactly zero in one tensor has no subspace to protect:
  ``τ_t' = τ_t`` there (FusionBench gets a nan split ratio, ``r = 0``, and removes the diagonal
  of ``τ_t`` in whatever basis the SVD of a zero matrix returns).
* Zero norms: when ``N_t = 0`` or ``n̄_t = 0`` there is nothing to rescale; ``τ̄_t`` is kept and
  ``λ_t = 1`` (FusionBench multiplies by ``n̄_t / 0``: nan).
* When ``τ̄_{t-1}`` is rank deficient its singular vectors for zero singular values are any
  basis of the null spaces, so the removed diagonal pairs there are implementation-defined in
  FusionBench and here alike; results then agree with FusionBench only on the other tensors.

Precision: fp16/bf16/fp32 inputs compute in fp32 (the SVD too, as FusionBench on fp32 models),
fp64 in fp64. The merged task vector is kept in that dtype between steps; :attr:`Merger.merged`
is ``base + τ̄`` rounded once to the models' dtype. Memory: one compute-dtype copy of every
tensor (``τ̄``) plus the per-tensor temporaries of one step; ``base`` is referenced, not copied
(do not modify it in place while merging).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Optional, Sequence, Union

import torch

from . import _validate as V

__all__ = ["Merger", "merge", "default_linear"]

DTYPES = V.SUPPORTED_DTYPES + (torch.float64,)
TensorOrDict = Union[torch.Tensor, Mapping]


def default_linear(name: Optional[str], t: torch.Tensor) -> bool:
    """2-D and named ``weight`` / ``*.weight`` (``name`` is None for a lone tensor)."""
    return t.dim() == 2 and (name is None or name == "weight" or name.endswith(".weight"))


class Merger:
    """Sequential OPCM merge onto ``base``; ``add`` one model at a time.

        m = fastmerge.opcm.Merger(base_state_dict, alpha=0.5)
        for sd in fine_tuned_state_dicts:
            m.add(sd)
        merged = m.merged

    Args:
        base: the pretrained model, a floating tensor or a state dict ``{name: tensor}``
            (fp32/fp16/bf16/fp64).
        alpha: the spectral share in ``[0, 1]`` that sets the split rank (FusionBench's
            ``alpha``, default 0.5 as in its configs).
        linear: ``linear(name, tensor) -> bool``, which tensors get the SVD projection
            (default :func:`default_linear`; ``name`` is None when ``base`` is a tensor).
            Evaluated once per tensor here; a selected tensor must be 2-D.

    Attributes: :attr:`merged`, :attr:`count`, :attr:`lambda_t` (FusionBench's
    ``previous_lambda_t`` after the last step), :attr:`norms` (``||τ_t||`` of every model added).
    """

    def __init__(self, base: TensorOrDict, *, alpha: float = 0.5,
                 linear: Optional[Callable[[Optional[str], torch.Tensor], bool]] = None):
        alpha = V.number(alpha, "alpha")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (a share of the singular-value sum), got {alpha}")
        if linear is not None and not callable(linear):
            raise TypeError(f"linear must be a callable (name, tensor) -> bool, got {type(linear).__name__}")
        self.alpha = alpha
        self._single = isinstance(base, torch.Tensor)
        self._base = _as_dict(base, "base")
        for key, t in self._base.items():
            name = _name("base", key, self._single)
            V.check_dtype(t, name, DTYPES)
            V.check_finite(t, name)
        pred = linear or default_linear
        self._linear = {}
        for key, t in self._base.items():
            sel = bool(pred(key, t))
            if sel and t.dim() != 2:
                raise ValueError(f"linear selected {_name('base', key, self._single)} of shape "
                                 f"{tuple(t.shape)}, but the SVD projection needs a 2-D tensor")
            self._linear[key] = sel
        self._tv = {}      # merged task vector τ̄ (compute dtype), FusionBench's merged - pretrained
        self._first = None  # the first model itself: the merge after one add, exactly
        self._norms = []
        self._lambda = 1.0
        self.count = 0

    @property
    def lambda_t(self) -> float:
        return self._lambda

    @property
    def norms(self) -> tuple:
        return tuple(self._norms)

    @property
    def merged(self) -> TensorOrDict:
        """The current merge in the models' dtype (new tensors): the base before any ``add``,
        the first model after one, ``base + τ̄`` after more."""
        with torch.no_grad():
            if self.count == 0:
                out = {k: t.clone() for k, t in self._base.items()}
            elif self.count == 1:
                out = {k: t.clone() for k, t in self._first.items()}
            else:
                out = {k: (self._base[k].to(tv.dtype) + tv).to(self._base[k].dtype)
                       for k, tv in self._tv.items()}
        return out[None] if self._single else out

    def add(self, model: TensorOrDict) -> "Merger":
        """Merge one more fine-tuned model (same structure, shapes, dtypes and devices as
        ``base``) into the running merge; returns ``self``."""
        tensors = self._check(model)
        with torch.no_grad():
            if self.count == 0:
                self._start(tensors)
            else:
                self._step(tensors)
        self.count += 1
        return self

    # ------------------------------------------------------------------------- implementation

    def _check(self, model) -> dict:
        if self._single and not isinstance(model, torch.Tensor):
            raise TypeError(f"model must be a torch.Tensor like base, got {type(model).__name__}")
        if not self._single and not isinstance(model, Mapping):
            raise TypeError(f"model must be a state dict (Mapping) like base, got {type(model).__name__}")
        tensors = _as_dict(model, "model")
        if set(tensors) != set(self._base):
            missing = sorted(map(str, set(self._base) - set(tensors)))
            extra = sorted(map(str, set(tensors) - set(self._base)))
            raise ValueError(f"model has other keys than base: missing {missing[:5]}, extra {extra[:5]}")
        for key, t in tensors.items():
            name, ref = _name("model", key, self._single), self._base[key]
            if t.shape != ref.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but base has {tuple(ref.shape)}")
            if t.dtype != ref.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but base has {ref.dtype}")
            if t.device != ref.device:
                raise ValueError(f"{name} is on {t.device} but base is on {ref.device}")
            V.check_finite(t, name)
        return tensors

    def _start(self, tensors) -> None:
        sq = 0.0
        for key, t in tensors.items():
            tv = _compute(t) - _compute(self._base[key])
            self._tv[key] = tv
            sq += float(torch.linalg.vector_norm(tv)) ** 2
        self._first = tensors
        self._norms = [math.sqrt(sq)]
        self._lambda = 1.0

    def _step(self, tensors) -> None:
        sq_task = sq_merged = 0.0
        for key, t in tensors.items():
            tau = _compute(t) - _compute(self._base[key])
            sq_task += float(torch.linalg.vector_norm(tau)) ** 2
            prev = self._tv[key]
            if self._linear[key]:
                tau = project(prev, tau, self.alpha)
            # λ_{t-1} τ̄_{t-1} + τ_t' (FusionBench divides by lambda_t, which is 1 in this loop)
            merged = prev.mul_(self._lambda).add_(tau)
            sq_merged += float(torch.linalg.vector_norm(merged)) ** 2
        self._first = None
        self._norms.append(math.sqrt(sq_task))
        avg = math.fsum(self._norms) / len(self._norms)
        norm = math.sqrt(sq_merged)
        if norm > 0 and avg > 0:
            scale = avg / norm
            for tv in self._tv.values():
                tv.mul_(scale)
            self._lambda = norm / avg
        else:  # nothing to rescale (FusionBench: avg / 0 -> nan)
            self._lambda = 1.0


def project(prev: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """``τ'``: ``tau`` without its components on the singular pairs ``u_i v_iᵀ`` of ``prev`` and
    on its top-``r`` block (module docstring, step 1), from the economy SVD of ``prev``. Both are
    2-D, same shape, compute dtype; ``tau`` is overwritten and returned."""
    if prev.numel() == 0:
        return tau
    u, s, vh = torch.linalg.svd(prev, full_matrices=False)
    cum = s.cumsum(0)
    if not bool(cum[-1] > 0):  # zero previous task vector: no subspace to protect
        return tau
    r = int((cum / cum[-1] > alpha).float().argmax())
    a = u.mT @ tau @ vh.mT  # [k, k] = U1ᵀ τ V1
    m = torch.zeros_like(a)
    m[:r, :r] = a[:r, :r]
    m.diagonal().copy_(a.diagonal())
    return tau.sub_(u @ m @ vh)


def merge(base: TensorOrDict, models: Sequence[TensorOrDict], *, alpha: float = 0.5,
          linear: Optional[Callable[[Optional[str], torch.Tensor], bool]] = None) -> TensorOrDict:
    """``Merger(base, alpha=alpha, linear=linear)``, every model added in order, ``.merged``."""
    if isinstance(models, (torch.Tensor, Mapping)):
        raise TypeError("models must be a list of tensors or state dicts, got a single one")
    models = list(models)
    if not models:
        raise ValueError("models is empty: at least one model is needed")
    merger = Merger(base, alpha=alpha, linear=linear)
    for m in models:
        merger.add(m)
    return merger.merged


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _as_dict(x, name) -> dict:
    if isinstance(x, torch.Tensor):
        return {None: x}
    if not isinstance(x, Mapping):
        raise TypeError(f"{name} must be a torch.Tensor or a state dict (Mapping), got {type(x).__name__}")
    if not x:
        raise ValueError(f"{name} is an empty state dict")
    for key, t in x.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
    return dict(x)


def _name(what: str, key, single: bool) -> str:
    return what if single else f"{what}[{key!r}]"
