"""PCB-merging: Parameter Competition Balancing (Du et al. 2024, "Parameter Competition
Balancing for Model Merging", NeurIPS 2024, https://arxiv.org/abs/2410.02396; the authors'
code: github.com/duguodong7/pcb-merging, ``pcb-merging.py``)."""
from __future__ import annotations

import torch

from fastmerge import _validate as V
from fastmerge.methods._common import checked, inputs

CONTRACT = dict(base="required", min_models=1, max_models=None)
# ratio: PCB_merge's pcb_ratio default (its script then uses 0.05); min_ratio / max_ratio: the
# clamp of |tau| at those quantiles, 1e-4 in pcb-merging.py
PARAMS = {"ratio": 0.1, "weights": None, "lam": 1.0, "min_ratio": 1e-4, "max_ratio": 1e-4}
KERNELS = ("cpu", "triton", "cuda")
RESULT_CHECKED = True  # fused returns a checked kernel's output (methods/__init__.py)


def ranks(n: int, ratio: float, min_ratio: float, max_ratio: float) -> tuple:
    """The 0-based ascending order statistics the method reads, as the authors' code indexes
    its sorted rows (Python floats, truncated): ``(lo, hi)`` of ``|tau|``'s clamp and ``q``,
    the score's cut."""
    return int(n * min_ratio), int(n * (1 - max_ratio) - 1), int(n * (1 - ratio))


def check_params(K: int, ratio, weights, lam, min_ratio, max_ratio) -> tuple:
    ratio = V.number(ratio, "ratio")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    lo = V.number(min_ratio, "min_ratio")
    hi = V.number(max_ratio, "max_ratio")
    if not (0 <= lo < 1 and 0 <= hi < 1 and lo + hi < 1):
        raise ValueError(f"min_ratio and max_ratio must be in [0, 1) with min_ratio + max_ratio < 1, "
                         f"got {lo} and {hi}")
    w = V.per_model(1.0 if weights is None else weights, K, "weights")
    return ratio, w, V.number(lam, "lam"), lo, hi


def minmax(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The code's ``normalize`` of a row clamped to ``[lo, hi]``: ``(x - lo) / (hi - lo)``, 0
    where ``hi == lo`` (the code divides 0 by 0 there: NaN)."""
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)


def score(d: torch.Tensor, total: torch.Tensor, lo, hi, K: int) -> tuple:
    """One task's ``(c_t, b_t)``: its clamped task vector and balancing score, given the clamp
    bounds ``lo``, ``hi`` and the task vectors' sum ``total`` (see :func:`reference`)."""
    a = torch.clamp(d.abs(), lo, hi)
    return torch.sign(d) * a, torch.exp(K * minmax(a, lo, hi) ** 2) * torch.tanh(d * total)


def merge_with(deltas: list, stats: tuple, weights: list) -> torch.Tensor:
    """The merged task vector from the per-task statistics ``stats = (lo, hi, q, M)`` (lists of
    K floats: the clamp bounds, the score cut and the score max), over whatever scope they were
    taken (a tensor in :func:`reference`; the whole model with ``fastmerge merge``'s
    ``topk_scope: model``)."""
    lo, hi, q, M = stats
    total = sum(deltas)
    K = len(deltas)
    num, den = 0, 0
    for t, d in enumerate(deltas):
        c, b = score(d, total, torch.tensor(lo[t]), torch.tensor(hi[t]), K)
        sc = minmax(torch.clamp(b, min=q[t]), torch.tensor(q[t]), torch.tensor(M[t]))
        num = num + weights[t] * c * sc
        den = den + sc
    return num / torch.clamp(den, min=1e-12)


def reference(base, models, *, ratio=0.1, weights=None, lam=1.0, min_ratio=1e-4, max_ratio=1e-4) -> torch.Tensor:
    """With task vectors ``tau_t = models[t] - base`` (fp32) of ``n`` elements, ``K`` tasks,
    and ``s[r]`` the ``r``-th smallest (0-based) of a row:

    1. clamp: ``a_t = clamp(|tau_t|, lo_t, hi_t)`` with ``lo_t = s[int(n min_ratio)]``,
       ``hi_t = s[int(n (1 - max_ratio) - 1)]`` of ``|tau_t|``; ``c_t = sign(tau_t) a_t``;
    2. intra-balancing ``exp(K ((a_t - lo_t) / (hi_t - lo_t))^2)``;
    3. inter-balancing ``tanh(tau_t * sum_j tau_j)``;
    4. ``b_t`` = their product; ``q_t = s[int(n (1 - ratio))]``, ``M_t = max(b_t)`` of
       ``b_t``; ``scale_t = (max(b_t, q_t) - q_t) / (M_t - q_t)`` (so about the top ``ratio``
       of each task's scores count, in proportion);
    5. ``out = base + lam * sum_t w_t c_t scale_t / max(sum_t scale_t, 1e-12)`` (``weights``:
       the per-task lambdas the authors' ``compute_acc`` multiplies in, default 1).

    Differences from pcb-merging.py: where ``hi_t == lo_t`` (every clamped magnitude equal,
    e.g. 1-element tensors or deltas more than ``1 - max_ratio`` zero) or ``M_t == q_t``, the
    code's ``normalize`` divides 0 by 0 and the whole merge becomes NaN; here that term is 0
    (no intra-task competition; no score above the cut, so the task contributes nothing).
    The scope is the tensor; the code flattens the whole model into one row per task
    (``fastmerge merge`` offers that scope).
    """
    b, ms = inputs("pcb", CONTRACT, base, models)
    ratio, w, lam, min_ratio, max_ratio = check_params(len(ms), ratio, weights, lam, min_ratio, max_ratio)
    if b.numel() == 0:
        return b.clone()
    deltas = [m - b for m in ms]
    n, K = b.numel(), len(ms)
    r_lo, r_hi, r_q = ranks(n, ratio, min_ratio, max_ratio)
    total = sum(deltas)
    lo, hi, q, M = [], [], [], []
    for d in deltas:
        srt = torch.sort(d.abs().reshape(-1)).values
        lo.append(float(srt[r_lo]))
        hi.append(float(srt[r_hi]))
        srt = torch.sort(score(d, total, srt[r_lo], srt[r_hi], K)[1].reshape(-1)).values
        q.append(float(srt[r_q]))
        M.append(float(srt[-1]))
    return b + lam * merge_with(deltas, (lo, hi, q, M), w)


def fused(ops, base, models, *, out_dtype, ratio=0.1, weights=None, lam=1.0, min_ratio=1e-4,
          max_ratio=1e-4) -> torch.Tensor:
    """:func:`reference` from the kernels ``ops.pcb`` (the clamp's order statistics by radix
    select, the scores' cut selected exactly, one merge pass), in ``out_dtype``."""
    b, ms = checked("pcb", CONTRACT, base, models)
    ratio, w, lam, min_ratio, max_ratio = check_params(len(ms), ratio, weights, lam, min_ratio, max_ratio)
    return ops.pcb(b, ms, ranks=ranks(b.numel(), ratio, min_ratio, max_ratio), weights=w, lam=lam,
                   out_dtype=out_dtype)
