"""``patch(rng="torch")``: DARE/DELLA keep masks drawn with the patched library's own
``torch.bernoulli`` calls -- the same calls, on tensors of the same dtype, shape and device,
in the same order, from the same (default) generator -- so that a patched run consumes torch's
random stream exactly as the unpatched one and keeps the very same elements. The masks then go
into fastmerge's fused merge (``api.merge_with_keep``, ``fastmerge.peft.dare_*(keep=...)``):
only the drawing is the library's.

What each library draws (read from its code):

* mergekit 0.1.5 (``mergekit/sparsify.py``), per non-base model in order, on ``delta = model -
  base`` in the inputs' dtype, in a *working dtype* (float32 for CPU fp32/fp16 tensors, the
  tensor's own dtype for CPU bf16 and on GPUs):

  - ``bernoulli`` (DARE), density < 1: ``torch.bernoulli(full_like(delta, density))``;
  - ``della_magprune``, 0 < density < 1: ``torch.bernoulli(probs)`` with ``probs = (density -
    epsilon) + rank_norm * 2 * epsilon``, ``rank_norm`` the ascending magnitude rank along dim 1
    (1-D tensors as one row), min-max scaled to [0, 1], formed in the working dtype;
  - with ``rescale``, the mask is applied as ``masked * (|delta|_1 / |masked|_1)`` with fp32
    (working-dtype) sums, skipped when either sum is below 1e-7: that factor is computed here
    the same way and handed to the fused merge, so its rounding is mergekit's too.

* PEFT 0.21 (``peft/utils/merge_utils.py``, ``random_pruning``), per task tensor in order:
  ``torch.bernoulli(full_like(tensor, density))``, then ``/ density``.

For fp32 inputs a patched merge then equals the unpatched one bit for bit. In bf16/fp16 the
masks are still the library's, but fastmerge computes the rest in fp32 with one rounding where
the library works in the inputs' dtype (about an ulp apart).
"""
from __future__ import annotations

from typing import Optional

import torch

_NORM_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no norm matching below this


def _working_dtype(t: torch.Tensor) -> torch.dtype:
    """mergekit's dtype for masks and rescaling: torch.bernoulli has no CPU fp16 kernel."""
    if t.device.type != "cpu" or t.dtype == torch.bfloat16:
        return t.dtype
    return torch.float32


def _della_probs(delta: torch.Tensor, density: float, epsilon: float, work) -> torch.Tensor:
    """DELLA's keep probabilities as mergekit forms them (ranks and scaling in ``work``)."""
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, descending=False), dim=1).to(work) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def _l1_factor(delta_w: torch.Tensor, mask: torch.Tensor) -> float:
    """mergekit's L1 norm-matching factor (fp32 sums in the working dtype), 1.0 where it skips."""
    before = delta_w.abs().sum()
    after = (delta_w * mask).abs().sum()
    if before < _NORM_EPS or after < _NORM_EPS:
        return 1.0
    return float(before / after)


def mergekit_keeps(sparsify: str, base: torch.Tensor, models, density, epsilon,
                   rescale: bool):
    """``(keep, factors)`` for ``api.merge_with_keep``: mergekit's own draws for each model.

    ``sparsify``: ``random`` (DARE) or ``della``; ``density`` / ``epsilon``: per-model lists."""
    keep, factors = [], []
    for k, model in enumerate(models):
        d = float(density[k])
        if d >= 1 or (sparsify == "della" and d <= 0):  # mergekit draws nothing for these
            keep.append(None)
            factors.append(None)
            continue
        delta = model - base
        work = _working_dtype(delta)
        if sparsify == "random":
            mask = torch.bernoulli(torch.full_like(delta, d, dtype=work))
        else:
            eps = float(epsilon[k])
            if d + eps >= 1 or d - eps <= 0:  # mergekit raises before drawing; so does fastmerge
                raise ValueError(f"epsilon must be chosen such that density +/- epsilon is in (0, 1); "
                                 f"got density={d}, epsilon={eps}")
            mask = torch.bernoulli(_della_probs(delta, d, eps, work)).to(work).reshape(delta.shape)
        keep.append(mask != 0)
        factors.append(_l1_factor(delta.to(work), mask) if rescale else None)
    return keep, factors


def peft_keeps(task_tensors, density: float) -> Optional[list]:
    """PEFT's ``random_pruning`` draws, one per task tensor in order (None when ``density >=
    1``: PEFT then prunes nothing and draws nothing)."""
    if density >= 1:
        return None
    return [torch.bernoulli(torch.full_like(t, fill_value=density)) != 0 for t in task_tensors]


class restoring_rng:
    """Context manager: if the block raises, torch's default generator of ``device`` is put
    back as it was, so that the library's own code, run as the fallback, draws exactly what it
    would have drawn unpatched."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self.state = (torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                      else torch.random.get_rng_state())
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(self.state, self.device)
            else:
                torch.random.set_rng_state(self.state)
        return False
