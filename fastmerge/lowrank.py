"""Low-rank linear algebra for merging: truncated SVD, rank-r projection, polar factor, the SVD
merge family (TSV-Merge, Iso-C, Iso-CTS) and PEFT's LoRA re-rank.

Every SVD-based merge in FusionBench and PEFT calls a full ``torch.linalg.svd`` per layer (TSV
needs ``T + 2`` of them), although it only uses the top components or the orthogonal polar
factor. This module computes exactly those pieces:

* :func:`svd_lowrank` -- top-``rank`` SVD by randomized subspace iteration (Halko, Martinsson &
  Tropp 2011, arXiv:0909.4061, Algorithms 4.4 + 5.1): ``2*n_iter + 2`` GEMMs of ``x`` with a
  thin block of ``rank + oversample`` columns, a Householder QR after every product
  (re-orthogonalisation, so rounding does not collapse the block onto the top singular
  vector), and an exact SVD of a ``(rank + oversample)``-square matrix at the end.
* :func:`project` -- the rank-r projection ``U_r diag(S_r) Vh_r`` (dense or as LoRA factors).
* :func:`polar` -- the orthogonal polar factor ``W = U Vh`` of ``x = U S Vh`` by scaled
  Newton-Schulz iterations (GEMMs only) with a convergence check and an SVD fallback.
* :func:`tsv_delta`, :func:`iso_c_delta`, :func:`iso_cts_delta` -- FusionBench's merged task
  vector of each method; ``fastmerge.merge("tsv" | "iso_c" | "iso_cts", base, models, ...)``
  adds it to the base (:func:`merge`).
* :func:`lora_rerank` -- PEFT's ``add_weighted_adapter`` SVD step (``B = U_r diag(S_r)``,
  ``A = Vh_r``, optional quantile clamp).

Why GEMMs and no custom kernel: every step above is a matrix product with a thin block, a QR of
a thin block, or a small dense SVD. On the CPU those run in MKL/OpenBLAS near the FPU peak (a
4096³ fp32 GEMM takes 0.9 s on the 2-core EPYC here, ~150 GFLOP/s), so a hand-written C++
kernel has nothing left to win; on a GPU they map to cuBLAS (tensor cores in
TF32/bf16 when the user enables them) and cuSOLVER. The one thing a library call does not do
-- choose *how much* work is needed -- is what this module decides.

Precision: work is done in fp32 (fp64 for fp64 input); fp16/bf16 inputs are upcast once.
Factor outputs (``svd_lowrank``, ``polar``) stay in that working dtype, because singular
vectors rounded to 8 mantissa bits are no longer orthonormal; outputs that replace the input
(``project``, ``lora_rerank``, merges) are returned in the input's dtype (or ``out_dtype``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from . import _registry as R
from . import _validate as V
from .philox import resolve_seed

METHODS = R.names("svd")  # tsv, iso_c, iso_cts
LINALG_DTYPES = V.SUPPORTED_DTYPES + (torch.float64,)

# Randomized SVD defaults (bench/results/cpu_lowrank_4096.json, 4096x4096 fp32, σ_i = 1/i):
# 2 power iterations and max(10, rank/10) extra columns give 1.005-1.008x the Eckart-Young
# error at ranks 64-512, 88x / 20x / 8.4x faster than torch.linalg.svd; one power iteration
# gives 1.02-1.05x.
DEFAULT_N_ITER = 2
# Newton-Schulz defaults: stop when the RMS of XᵀX - I is below tol (then take one more step,
# which squares the error); give up (SVD fallback) after n_iter steps or on stagnation.
NS_TOL = 1e-3
NS_N_ITER = 40
NS_LOWER = 1e-3  # lower end of the normalised spectrum assumed by the step scaling
NS_RESTARTS = 2  # schedule restarts for singular values that were below NS_LOWER


# ----------------------------------------------------------------------------- helpers


def _matrix(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    V.check_dtype(x, name, LINALG_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., m, n), got shape {tuple(x.shape)}")
    return x


def _work(x: torch.Tensor) -> torch.Tensor:
    """fp32 (fp64 stays fp64): the accumulation dtype of every product here."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _generator(seed, device) -> Optional[torch.Generator]:
    """``None`` keeps torch's default generator (so ``torch.manual_seed`` governs the sketch);
    an int seeds a private generator on the tensor's device."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(resolve_seed(seed))


def _finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise V.NonFiniteError(name)


def _exact_svd(a: torch.Tensor, rank: int, name: str):
    _finite(a, name)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


# ----------------------------------------------------------------------------- truncated SVD


def svd_lowrank(x: torch.Tensor, rank: int, *, oversample: Optional[int] = None,
                n_iter: Optional[int] = None, exact: bool = False, seed: Optional[int] = None):
    """Top-``rank`` SVD ``x ≈ U diag(S) Vh`` of a matrix or a batch of matrices.

    Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4 and 5.1) on
    ``A = x`` (or ``xᵀ`` when ``m < n``, so the last QR is on the smaller side),
    with ``l = rank + oversample`` and Gaussian ``Ω`` (``n × l``)::

        Q = qr(A Ω)
        repeat n_iter times:  Q = qr(A qr(Aᵀ Q))           # power steps, re-orthogonalised
        Aᵀ Q = Q₂ R  (QR),  Rᵀ = Ũ diag(S) W̃ᵀ (l × l SVD)   # Rayleigh-Ritz: A ≈ Q Qᵀ A
        U = Q Ũ[:, :rank],  Vh = (Q₂ W̃)[:, :rank]ᵀ

    Cost: ``2*n_iter + 2`` products ``(m × n) · (n × l)``, ``2*n_iter + 2`` thin QRs, one
    ``l × l`` SVD. Error: ``‖x − U S Vh‖_F² = ‖(I − QQᵀ)x‖_F² + ‖B − B_r‖_F²`` (the two terms
    are orthogonal) with ``‖B − B_r‖_F ≤ ‖x − x_r‖_F``; by Halko et al. Thm 10.5 the first term
    is at most ``(1 + rank/(oversample − 1))·‖x − x_r‖_F²`` in expectation without power steps,
    and each power step raises the spectrum's decay to the power ``2·n_iter + 1``. So on
    decaying spectra the error is within a percent of the Eckart-Young optimum
    ``‖x − x_r‖_F = (Σ_{i>r} σ_i²)^½``; on a flat spectrum any rank-r subspace is nearly
    optimal and the ratio is at most ``√(2 + rank/(oversample − 1))`` in expectation
    (tests/test_lowrank.py checks both).

    Args:
        x: ``(..., m, n)`` float tensor (fp32/fp64; fp16/bf16 are computed in fp32).
        rank: number of components, ``0 <= rank <= min(m, n)``.
        oversample: extra sketch columns (default ``max(10, rank // 10)``).
        n_iter: power iterations (default 2).
        exact: use ``torch.linalg.svd`` (LAPACK / cuSOLVER) and truncate: the reference.
        seed: seed of the Gaussian sketch (a generator on ``x``'s device); None uses torch's
            default generator.

    Returns:
        ``(U, S, Vh)`` of shapes ``(..., m, rank)``, ``(..., rank)``, ``(..., rank, n)`` in fp32
        (fp64 for fp64 input), singular values in descending order. When ``rank + oversample``
        reaches ``min(m, n)`` the exact SVD is used (a sketch that large saves nothing).
    """
    x = _matrix(x)
    m, n = x.shape[-2:]
    rank = V.integer(rank, "rank", 0, min(m, n))
    oversample = max(10, rank // 10) if oversample is None else V.integer(oversample, "oversample", 0)
    n_iter = DEFAULT_N_ITER if n_iter is None else V.integer(n_iter, "n_iter", 0)
    exact = V.flag(exact, "exact")
    gen = _generator(seed, x.device)
    a = _work(x)
    if rank == 0:
        batch = a.shape[:-2]
        return a.new_zeros(*batch, m, 0), a.new_zeros(*batch, 0), a.new_zeros(*batch, 0, n)
    if exact or rank + oversample >= min(m, n):
        return _exact_svd(a, rank, "x")
    return _rsvd(a, rank, rank + oversample, n_iter, gen)


def _rsvd(a: torch.Tensor, rank: int, l: int, n_iter: int, gen):
    """Randomized SVD of a finite-or-checked fp32/fp64 ``a`` (see :func:`svd_lowrank`)."""
    flip = a.shape[-2] < a.shape[-1]
    if flip:  # work on the tall orientation: the Rayleigh-Ritz QR is then on the short side
        a = a.mT
    omega = torch.randn(*a.shape[:-2], a.shape[-1], l, generator=gen, device=a.device, dtype=a.dtype)
    y = a @ omega
    _finite(y, "x")  # one check on the thin sketch instead of a pass over x
    q = torch.linalg.qr(y).Q
    for _ in range(n_iter):
        q = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ q).Q).Q
    u, s, vh = _rayleigh_ritz(a, q, rank)
    if flip:
        u, vh = vh.mT, u.mT
    return u, s, vh


def _rayleigh_ritz(a: torch.Tensor, q: torch.Tensor, rank: int):
    """Top-``rank`` SVD of ``Q Qᵀ a`` for orthonormal ``q`` (``m × l``): with ``aᵀ Q = Q₂ R``
    (thin QR) ``Qᵀ a = Rᵀ Q₂ᵀ``, so the SVD of the ``l × l`` matrix ``Rᵀ = Ũ S W̃ᵀ`` gives
    ``U = Q Ũ``, ``Vh = (Q₂ W̃)ᵀ``. Exact for ``a`` itself when ``range(a) ⊆ range(Q)``. (A
    direct ``torch.linalg.svd`` of the wide ``Qᵀ a`` is up to 15x slower in MKL at l ~ 1000.)"""
    q2, r = torch.linalg.qr(a.mT @ q)
    ur, s, wh = torch.linalg.svd(r.mT)
    return q @ ur[..., :rank], s[..., :rank], (q2 @ wh[..., :rank, :].mT).mT


def project(x: torch.Tensor, rank: int, *, factors: bool = False, **svd_kwargs):
    """Rank-``rank`` projection of ``x`` (batched over leading dims).

    Dense (default): ``U_r diag(S_r) Vh_r`` in ``x``'s dtype, the best rank-r approximation up
    to :func:`svd_lowrank`'s error. ``factors=True``: ``(B, A)`` with ``B = U_r diag(S_r)``
    (``..., m, r``) and ``A = Vh_r`` (``..., r, n``) in ``x``'s dtype, so ``B @ A`` is the
    projection (LoRA's layout). ``svd_kwargs`` go to :func:`svd_lowrank` (``oversample``,
    ``n_iter``, ``exact``, ``seed``).
    """
    factors = V.flag(factors, "factors")
    u, s, vh = svd_lowrank(x, rank, **svd_kwargs)
    b = u * s.unsqueeze(-2)
    if factors:
        return b.to(x.dtype), vh.to(x.dtype)
    return (b @ vh).to(x.dtype)


# ----------------------------------------------------------------------------- polar factor


def polar(x: torch.Tensor, *, n_iter: Optional[int] = None, tol: Optional[float] = None,
          method: str = "newton_schulz", return_info: bool = False):
    """Orthogonal polar factor ``W = U Vh`` of ``x = U diag(S) Vh`` (``x = W H``, ``H = (xᵀx)^½``).

    ``W`` is the closest matrix with orthonormal columns (rows, if ``m < n``) to ``x`` in every
    unitarily invariant norm -- the "Procrustes orthogonalisation" TSV-Merge and Iso-CTS apply.

    ``method="newton_schulz"`` (default): GEMM-only iterations on the tall orientation
    (``m >= n``, Gram ``XᵀX`` is ``n × n``). ``X₀ = x / h`` with ``h`` an upper estimate of
    ``σ_max`` (16 power steps on ``xᵀx``, times 1.2, capped by ``‖x‖_F``); one plain step
    ``X ← X(3I − XᵀX)/2`` (safe for ``σ < √3``, so an estimate up to 44% low is harmless),
    then scaled steps (Chen & Chow 2014, "A stable scaling of Newton-Schulz for improving the
    sign function computation of a Hermitian matrix")::

        a_k = √(3 / (1 + ℓ_k + ℓ_k²)),   X ← a_k X (3I − a_k² XᵀX) / 2,
        ℓ_{k+1} = a_k ℓ_k (3 − a_k² ℓ_k²) / 2

    which map ``[ℓ_k, 1]`` into ``[ℓ_{k+1}, 1]``: small singular values grow ~2.6x a step
    instead of 1.5x (``ℓ₀ = 1e-3``). Singular values that were below ``ℓ₀`` get the schedule
    restarted once the others have converged (at most twice). Convergence is checked on the Gram
    matrix every step computes anyway: once ``‖XᵀX − I‖_F / √n ≤ tol`` one more plain step is
    taken (the error squares) and ``X`` is returned. A numerically rank-deficient ``x``
    (``σ_min ≤ min(m,n)·eps·σ_max``, numpy's matrix_rank rule) has no unique polar factor: it
    goes straight to the SVD, whose choice is LAPACK's (FusionBench's); so does an ``x`` that
    has not converged after ``n_iter`` steps.

    ``method="svd"``: ``U Vh`` from ``torch.linalg.svd`` directly. On this 2-core CPU a
    4096² SVD costs ~15 GEMM-equivalents, less than the ~20-25 GEMMs Newton-Schulz needs at
    the conditioning of the matrices TSV and Iso-C orthogonalise (bench/lowrank.py), so the
    merges use it on CPU; on GPUs the GEMMs are far cheaper relative to cuSOLVER.

    Args:
        x: ``(..., m, n)`` float tensor.
        n_iter: maximum Newton-Schulz steps (default 40). tol: convergence threshold
            (default 1e-3; about ``tol/2`` RMS error in the singular values before the last
            step, ``~tol²`` after).
        return_info: also return ``{"method", "iterations", "residual", "converged"}``.

    Returns:
        ``W`` with ``x``'s shape in fp32 (fp64 for fp64 input), or ``(W, info)``.
    """
    x = _matrix(x)
    if method not in ("newton_schulz", "svd"):
        raise ValueError(f"method must be 'newton_schulz' or 'svd', got {method!r}")
    n_iter = NS_N_ITER if n_iter is None else V.integer(n_iter, "n_iter", 0)
    tol = NS_TOL if tol is None else V.number(tol, "tol")
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    return_info = V.flag(return_info, "return_info")
    a = _work(x)
    info = {"method": "svd", "iterations": 0, "residual": None, "converged": True}
    w = None
    if method == "newton_schulz" and a.numel() > 0:
        w, info = _polar_ns(a, n_iter, tol)
    if w is None:
        w = _polar_svd(a)
        info["method"] = "svd"
    return (w, info) if return_info else w


def _polar_svd(a: torch.Tensor) -> torch.Tensor:
    _finite(a, "x")
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def _polar_ns(a: torch.Tensor, n_iter: int, tol: float):
    """Scaled Newton-Schulz (see :func:`polar`); ``(None, info)`` when it does not converge or
    ``a`` is numerically rank-deficient."""
    flip = a.shape[-2] < a.shape[-1]
    x = a.mT if flip else a
    n = x.shape[-1]
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    # Scale by the largest |entry| first: the polar factor does not change, and the Gram
    # matrix of a finite x cannot overflow (|g_ij| <= m).
    x = x / x.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    g = x.mT @ x
    _finite(g, "x")  # a nan/inf anywhere in x reaches its row/column of the Gram matrix
    v = _power(g)
    h2 = torch.minimum(1.44 * (v.mT @ (g @ v)),  # 1.2x a power estimate of σ_max ...
                       torch.diagonal(g, dim1=-2, dim2=-1).sum(-1)[..., None, None])  # ... or ‖x‖_F
    h2 = torch.where(h2 > 0, h2, torch.ones_like(h2))  # an all-zero matrix: no scaling
    x = x / h2.sqrt()
    g = g / h2
    info = {"method": "newton_schulz", "iterations": 0, "residual": None, "converged": False}
    # An upper estimate of σ_min: if even that is below numpy's matrix_rank tolerance, x is
    # numerically rank-deficient and its polar factor is not unique.
    if _sigma_min_estimate(x, g, eye) <= min(x.shape[-2:]) * torch.finfo(x.dtype).eps:
        return None, info
    # Power estimates of σ_min are too coarse to set ℓ (they overshoot by orders of magnitude
    # when many singular values are small), so ℓ starts at a fixed 1e-3, as in Polar Express
    # (Amsel et al. 2025, arXiv:2505.16932).
    ell, restarts = NS_LOWER, 0
    for k in range(n_iter + 1):
        res = float(torch.linalg.matrix_norm(g - eye).amax()) / math.sqrt(n)
        info.update(iterations=k, residual=res)
        if res <= tol:  # converged: one more plain step squares the error
            x = x @ (1.5 * eye - 0.5 * g)
            info.update(iterations=k + 1, converged=True)
            return (x.mT if flip else x), info
        if k == n_iter or not math.isfinite(res):
            break
        if k > 0 and ell > 0.99:
            # The scaled steps are done but some singular values lag (they were below ℓ):
            # restart the schedule from where they are now instead of growing them 1.5x a step.
            if _sigma_min_estimate(x, g, eye) < 0.5:
                if restarts == NS_RESTARTS:
                    break
                ell, restarts = NS_LOWER, restarts + 1
        a_k = 1.0 if k == 0 else math.sqrt(3.0 / (1.0 + ell + ell * ell))
        x = x @ ((1.5 * a_k) * eye - (0.5 * a_k ** 3) * g)
        ell = min(1.0, a_k * ell * (3.0 - a_k * a_k * ell * ell) / 2.0)
        g = x.mT @ x
    return None, info


def _power(m: torch.Tensor, steps: int = 16) -> torch.Tensor:
    """Unit vector(s) ``(..., n, 1)`` after ``steps`` power iterations with the PSD ``m``, from a
    fixed-seed start (so polar() is deterministic)."""
    gen = torch.Generator(device=m.device).manual_seed(0x5EED)
    v = torch.randn(*m.shape[:-1], 1, generator=gen, device=m.device, dtype=m.dtype)
    for _ in range(steps):
        v = m @ v
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    return v


def _sigma_min_estimate(x: torch.Tensor, g: torch.Tensor, eye: torch.Tensor) -> float:
    """``‖x v‖`` for ``v`` from power steps with ``I − xᵀx`` (singular values <= 1): an upper
    estimate of σ_min, the smallest over the batch. ``‖x v‖`` rather than ``vᵀ g v`` keeps
    resolution down to ~eps·σ_max (the Gram matrix only resolves σ² above ~eps)."""
    v = _power(eye - g)
    return float(torch.linalg.vector_norm(x @ v, dim=(-2, -1)).amin())


def _polar_default(device: torch.device) -> str:
    """Which polar method the merges use: bench/results/cpu_lowrank_4096.json shows LAPACK's
    SVD ahead of Newton-Schulz for the square, ill-conditioned factors of TSV/Iso-C on CPU;
    on GPUs Newton-Schulz is GEMM-bound and cuSOLVER's SVD is the slow path."""
    return "svd" if device.type == "cpu" else "newton_schulz"


# ----------------------------------------------------------------------------- LoRA re-rank


def lora_rerank(delta: torch.Tensor, rank: int, *, clamp: Optional[float] = None,
                exact: bool = False, **svd_kwargs):
    """Rank-``rank`` LoRA factors of a dense (merged) delta, as PEFT's
    ``LoraModel.add_weighted_adapter`` SVD path computes them (peft 0.21.2,
    ``_svd_generalized_task_arithmetic_weighted_adapter``)::

        U, S, Vh = svd(delta);  B = U[:, :r] diag(S[:r]);  A = Vh[:r]
        if clamp:  h = quantile(cat(B.flatten(), A.flatten()), clamp);  B, A = clamp(B, A, -h, h)

    PEFT's new adapter gets ``lora_alpha = r``, so its scaling is 1 and ``B @ A`` is the
    re-ranked delta. Merging the adapters' deltas first (PEFT's ``svd``/``ties_svd``/...
    combination types) is :mod:`fastmerge.peft`'s job; reshaping to the adapter's weight
    shapes is the integration's.

    Args:
        delta: ``(out, in)`` delta (``delta.T`` for ``fan_in_fan_out`` layers and embeddings,
            as PEFT does). A conv delta ``(out, in, kh, kw)`` is flattened to
            ``(out, in*kh*kw)`` as PEFT does (also right for 1×1 kernels).
        rank: new rank ``r >= 1``. Beyond ``min(out, in)`` the extra columns of ``B`` and
            rows of ``A`` are zero (PEFT would fill ``A`` with arbitrary orthonormal rows and
            multiply them by no singular value: ``B @ A`` is the same).
        clamp: PEFT's ``svd_clamp``, a quantile in [0, 1] of the signed entries of ``B`` and
            ``A`` together (linear interpolation, as ``torch.quantile``; computed by
            selection, so it has no ``torch.quantile`` size limit).
        exact: full ``torch.linalg.svd`` like PEFT; default randomized (:func:`svd_lowrank`,
            ``svd_kwargs`` go there). Merged LoRA deltas have rank at most the sum of the
            adapters' ranks, so the sketch captures them to rounding error.

    Returns:
        ``(B, A)``: ``(out, rank)`` and ``(rank, in*...)`` in ``delta``'s dtype.
    """
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"delta must be a torch.Tensor, got {type(delta).__name__}")
    if delta.dim() < 2:
        raise ValueError(f"delta must be a 2-D (or conv) weight delta, got shape {tuple(delta.shape)}")
    d2 = delta.flatten(start_dim=1) if delta.dim() > 2 else delta
    rank = V.integer(rank, "rank", 1)
    if clamp is not None:
        clamp = V.number(clamp, "clamp")
        if not 0.0 <= clamp <= 1.0:
            raise ValueError(f"clamp must be in [0, 1] (a quantile), got {clamp}")
    keep = min(rank, *d2.shape)
    u, s, vh = svd_lowrank(d2, keep, exact=exact, **svd_kwargs)
    b, a = u * s.unsqueeze(-2), vh
    if rank > keep:
        b = torch.nn.functional.pad(b, (0, rank - keep))
        a = torch.nn.functional.pad(a, (0, 0, 0, rank - keep))
    if clamp is not None:
        hi = _quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return b.to(delta.dtype), a.to(delta.dtype)


def _quantile(t: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(t, q)`` (linear interpolation) of a 1-D tensor by two k-th value
    selections; no sort of the whole tensor and no 2^24-element limit."""
    n = t.numel()
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    v_lo = torch.kthvalue(t, lo + 1).values
    v_hi = torch.kthvalue(t, hi + 1).values if hi != lo else v_lo
    return torch.lerp(v_lo, v_hi, torch.tensor(pos - lo, dtype=t.dtype, device=t.device))


# ----------------------------------------------------------------------------- SVD merges
#
# Each merge reads its task vectors through ``task(t)`` (fp32, computed on demand as
# ``w_t·(model_t − base)``), so no (T, m, n) stack is ever built; TSV and Iso-CTS only keep
# the thin factors of each task.

TaskFn = Callable[[int], torch.Tensor]


def tsv_k(shape, num_tasks: int) -> int:
    """FusionBench's per-task rank ``int(min(m, n) * (1 / T))``, with the float ``1/T`` as
    FusionBench computes it (equal to ``min(m, n) // T`` for every size checked up to 5000)."""
    return int(min(shape) * (1.0 / num_tasks))


def iso_cts_split(shape, num_tasks: int, fraction: float):
    """FusionBench Iso-CTS sizes ``(common, per_task)``: ``c = int(min·fraction)``, then the
    task-specific total is rounded (Python's round-half-even) to a multiple of T and ``c``
    takes the rest, so ``c + T·per_task = min(m, n)``."""
    r = min(shape)
    c = int(r * fraction)
    c = r - round((r - c) / num_tasks) * num_tasks
    if c < 0:
        raise ValueError(
            f"common_space_fraction={fraction} leaves no common space for {num_tasks} tasks on "
            f"shape {tuple(shape)} (FusionBench would index with a negative size)"
        )
    return c, (r - c) // num_tasks


def _task_sum(task: TaskFn, T: int) -> torch.Tensor:
    acc = task(0)  # a fresh tensor: task() never hands out the caller's storage
    for t in range(1, T):
        acc += task(t)
    return acc


def _tsv(task: TaskFn, T: int, shape, exact: bool, gen, device) -> torch.Tensor:
    """TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in
    Model Merging", arXiv:2412.00081), FusionBench's ``compute_and_sum_svd_mem_reduction``::

        τ_t ≈ U_t S_t V_tᵀ (top k = int(min(m,n)/T) of each),  U = [U_1 … U_T], V = [V_1 … V_T]
        τ = polar(U) · diag(S_1 … S_T) · polar(V)ᵀ

    Exact: full SVD per task and SVD polar factors of the zero-padded ``m × min(m,n)``
    concatenations, as FusionBench. Fast: randomized top-k per task (a task whose top k is
    numerically rank-deficient gets the exact SVD, whose null vectors the polar step mixes in,
    so only LAPACK's own choice reproduces FusionBench), polar factors of the unpadded
    ``m × T·k`` concatenations (identical: the padding columns meet zero singular values).
    """
    m, n = shape
    r = min(m, n)
    k = tsv_k(shape, T)
    if k == 0:  # more tasks than min(m, n): FusionBench keeps no component, τ = 0
        return torch.zeros_like(task(0))
    us, ss, vs = [], [], []
    for t in range(T):
        tau = task(t)
        if exact:
            u, s, vh = _exact_svd(tau, k, "models")
        else:
            u, s, vh = _task_topk(tau, k, gen, *_tsv_sketch(k))
        us.append(u)
        ss.append(s)
        vs.append(vh)
        del tau
    if exact and T * k < r:  # FusionBench's zeros_like(u) buffers: m × min(m, n)
        us.append(us[0].new_zeros(m, r - T * k))
        ss.append(ss[0].new_zeros(r - T * k))
        vs.append(vs[0].new_zeros(r - T * k, n))
    u_cat, s_cat, vh_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0)
    del us, vs
    method = "svd" if exact else _polar_default(device)
    pu = polar(u_cat, method=method)
    pv = polar(vh_cat, method=method)
    return (pu * s_cat) @ pv


def _task_topk(tau: torch.Tensor, k: int, gen, oversample: int, n_iter: int):
    """Randomized top-k for one task of an SVD merge, or the exact SVD when the sketch would
    not be smaller than the matrix or the top k is numerically rank-deficient
    (``σ_k <= min(m,n)·eps·σ_1``, numpy's matrix_rank rule): then the polar step mixes in
    singular vectors that only LAPACK's own choice reproduces."""
    m, n = tau.shape
    if k + oversample >= min(m, n):
        return _exact_svd(tau, k, "models")
    u, s, vh = _rsvd(tau, k, k + oversample, n_iter, gen)
    if float(s[-1]) <= min(m, n) * torch.finfo(s.dtype).eps * float(s[0]):
        return _exact_svd(tau, k, "models")
    return u, s, vh


# The polar steps of TSV and Iso-CTS magnify errors in the per-task singular vectors near the
# cut-off k, where decaying spectra have no gap: with svd_lowrank's default sketch
# (k + k/10 columns, 2 power steps) TSV's merged delta is 0.4 off the exact one at 1024², T = 8,
# 1/i spectra, although every per-task rank-k error is within 1.02x of optimal; with k extra
# columns and 3 steps it is 6e-3. So their sketches are wider and iterate more.
def _tsv_sketch(k: int):
    return max(10, k), 3


def _iso_cts_sketch(p: int):
    return max(20, 4 * p), 6


def _iso_c(task: TaskFn, T: int, shape, exact: bool, device) -> torch.Tensor:
    """Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common
    and Task-Specific Subspaces", arXiv:2502.04959), FusionBench's ``iso_c``::

        Σ τ_t = U diag(S) Vh,   τ = mean(S) · U Vh

    Fast path: ``U Vh`` is the polar factor ``W`` of ``A = Σ τ_t`` and
    ``Σ_i S_i = trace(Wᵀ A) = ⟨W, A⟩``, so ``τ = (⟨W, A⟩ / min(m,n)) · W`` needs no singular
    vectors -- only the polar factor (Newton-Schulz on GPU; on CPU LAPACK is faster, see
    :func:`_polar_default`). A rank-deficient sum has a non-unique polar factor that Iso-C
    still weights by mean(S); Newton-Schulz then does not converge and the SVD result
    (FusionBench's) is used.
    """
    a = _task_sum(task, T)
    if exact:
        _finite(a, "models")
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return (u * s.mean()) @ vh
    w = polar(a, method=_polar_default(device))
    return w * (torch.sum(w * a) / min(shape))


def _iso_cts(task: TaskFn, T: int, shape, exact: bool, gen, device, fraction: float) -> torch.Tensor:
    """Iso-CTS (Marczak et al. 2025, arXiv:2502.04959), FusionBench's ``iso_cts``::

        Σ τ_t = U S Vh;  common space: U_c, S_c, Vh_c = top c of it
        per task: τ_t' = τ_t − U_c U_cᵀ τ_t,  top p = (min(m,n) − c)/T of τ_t'
        Ũ = [U_1' … U_T', U_c],  S̃ = [S_1' … S_T', S_c],  Ṽh = [Vh_1'; …; Vh_T'; Vh_c]
        τ = mean(S̃) · polar(Ũ) polar(Ṽh)

    The common space is 80% of the spectrum by default, so its SVD stays exact on both paths.
    Fast path for the per-task SVDs: when ``m <= n`` the SVD's ``U`` is a full basis of R^m, so
    ``τ_t' = U_r U_rᵀ τ_t`` with ``U_r = U[:, c:]`` (``m − c`` columns) and the exact SVD of
    ``τ_t'`` is a Rayleigh-Ritz step on ``U_r``: a ``(m−c) × n`` problem instead of ``m × n``
    (no randomness, same result up to rounding). When ``m > n`` the residual can have rank
    ``n`` and its top ``p`` (≈ 2.5% of ``n`` for T = 8) are sketched (randomized SVD).
    """
    m, n = shape
    c, p = iso_cts_split(shape, T, fraction)
    a = _task_sum(task, T)
    _finite(a, "models")
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    del a
    uc, sc, vhc = u[:, :c], s[:c], vh[:c]
    complement = u[:, c:] if m <= n and not exact else None
    us, ss, vs = [], [], []
    for t in range(T if p > 0 else 0):  # p = 0: the common space is the whole spectrum
        w = task(t)
        if complement is not None:
            ut, st, vht = _rayleigh_ritz(w, complement, p)
        else:
            w = w - uc @ (uc.mT @ w)
            ut, st, vht = _exact_svd(w, p, "models") if exact else _task_topk(w, p, gen, *_iso_cts_sketch(p))
        us.append(ut)
        ss.append(st)
        vs.append(vht)
        del w
    u_cat = torch.cat(us + [uc], 1)
    s_cat = torch.cat(ss + [sc])
    vh_cat = torch.cat(vs + [vhc], 0)
    method = "svd" if exact else _polar_default(device)
    return (polar(u_cat, method=method) * s_cat.mean()) @ polar(vh_cat, method=method)


def _merged_delta(method: str, task: TaskFn, T: int, shape, device, *, exact: bool, gen,
                  common_space_fraction: float) -> torch.Tensor:
    """The merged task vector of ``method``; tensors that are not 2-D (or are empty) are
    averaged, ``mean_t τ_t``, as all three FusionBench methods do."""
    if len(shape) != 2 or min(shape) == 0:
        return _task_sum(task, T) / T
    if method == "tsv":
        return _tsv(task, T, shape, exact, gen, device)
    if method == "iso_c":
        return _iso_c(task, T, shape, exact, device)
    return _iso_cts(task, T, shape, exact, gen, device, common_space_fraction)


def _fraction(x) -> float:
    f = V.number(x, "common_space_fraction")
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"common_space_fraction must be in [0, 1], got {f}")
    return f


def merged_delta(method: str, task_vectors: Sequence[torch.Tensor], *, weights=None,
                 exact: bool = False, seed: Optional[int] = None,
                 common_space_fraction: float = 0.8) -> torch.Tensor:
    """FusionBench's merged task vector of ``method`` (``"tsv" | "iso_c" | "iso_cts"``) for one
    parameter, from task vectors ``τ_t = θ_t − θ_0``. ``weights`` scale each ``τ_t`` first
    (FusionBench's list-valued TSV ``alpha``; default 1). The result is fp32 (the merge adds
    ``α·τ`` to the base). See :func:`merge` for the methods."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    tvs = V.tensor_list(task_vectors, "task_vectors")
    V.check_dtype(tvs[0], "task_vectors[0]", LINALG_DTYPES)
    V.same_as(tvs[0], "task_vectors[0]", tvs[1:], "task_vectors", start=1)
    T = len(tvs)
    w = V.per_model(1.0 if weights is None else weights, T, "weights")
    exact = V.flag(exact, "exact")
    gen = _generator(seed, tvs[0].device) if seed is not None else None
    fraction = _fraction(common_space_fraction)
    return _finite_merge(
        lambda: _merged_delta(method, lambda t: _work(tvs[t]).mul(w[t]) if w[t] != 1 else _work(tvs[t]).clone(),
                              T, tuple(tvs[0].shape), tvs[0].device, exact=exact, gen=gen,
                              common_space_fraction=fraction),
        tvs, [f"task_vectors[{t}]" for t in range(T)])


def _finite_merge(compute: Callable[[], torch.Tensor], inputs, names) -> torch.Tensor:
    """``compute()``, an SVD merge of ``inputs`` (named ``names``), with inf and nan reported on
    every path: the SVDs and polar steps refuse a non-finite matrix, the mean of tensors that
    are not 2-D (biases, norms) would carry it into the result. Either way the first non-finite
    input is named, and a non-finite result of finite inputs is an overflow."""
    try:
        out = compute()
    except V.NonFiniteError as exc:
        V.name_nonfinite(inputs, names)
        raise V.NonFiniteError(V.MERGED, overflow=True) from exc
    V.check_result(out, inputs, names)
    return out


def tsv_delta(task_vectors, **kwargs) -> torch.Tensor:
    """TSV-Merge's merged task vector; see :func:`merged_delta` and :func:`_tsv`."""
    return merged_delta("tsv", task_vectors, **kwargs)


def iso_c_delta(task_vectors, **kwargs) -> torch.Tensor:
    """Iso-C's merged task vector; see :func:`merged_delta` and :func:`_iso_c`."""
    return merged_delta("iso_c", task_vectors, **kwargs)


def iso_cts_delta(task_vectors, **kwargs) -> torch.Tensor:
    """Iso-CTS's merged task vector; see :func:`merged_delta` and :func:`_iso_cts`."""
    return merged_delta("iso_cts", task_vectors, **kwargs)


def merge(method: str, base: torch.Tensor, models: Sequence[torch.Tensor], *, weights: list,
          alpha: float, exact: bool, seed, common_space_fraction: float,
          out_dtype: torch.dtype) -> torch.Tensor:
    """``base + alpha · τ`` with ``τ`` the merged task vector of ``method`` over
    ``τ_t = weights[t] · (models[t] − base)`` (fp32). Called by :func:`fastmerge.merge` after
    its argument checks; the task vectors are formed one at a time, never stacked."""
    bf = _work(base)
    gen = None if exact else _generator(resolve_seed(seed), base.device)

    def task(t: int) -> torch.Tensor:
        d = _work(models[t]) - bf
        return d.mul_(weights[t]) if weights[t] != 1 else d

    fraction = _fraction(common_space_fraction)

    def compute() -> torch.Tensor:
        tau = _merged_delta(method, task, len(models), tuple(base.shape), base.device, exact=exact,
                            gen=gen, common_space_fraction=fraction)
        return torch.add(bf, tau, alpha=alpha).to(out_dtype)

    return _finite_merge(compute, [base, *models], ["base", *V.input_names(None, len(models))])


# ----------------------------------------------------------------------------- LoRA extraction


def _extraction_rank(s: torch.Tensor, total: float, cap: int, rank_fraction, sv_epsilon: float) -> int:
    """The kept rank: ``cap``, or fewer where ``rank_fraction`` of the energy ``‖ΔW‖_F²`` is
    reached sooner (the smallest ``r`` with ``Σ_{i≤r} σ_i² ≥ fraction·‖ΔW‖_F²``), or where
    singular values fall to ``sv_epsilon`` and below. At least 1 (PEFT needs ``r ≥ 1``)."""
    r = cap
    if rank_fraction is not None and total > 0:
        cum = torch.cumsum(s.double() ** 2, 0)
        reached = torch.nonzero(cum >= rank_fraction * total * (1 - 1e-12))
        if reached.numel():
            r = min(r, int(reached[0, 0]) + 1)
    if sv_epsilon > 0:
        r = min(r, int((s > sv_epsilon).sum()))
    return max(1, min(r, s.numel()) if s.numel() else 1)


def extract_lora(base: torch.Tensor, finetuned: torch.Tensor, rank: Optional[int] = None, *,
                 rank_fraction: Optional[float] = None, sv_epsilon: float = 0.0, exact: bool = False,
                 distribute_scale: bool = True, out_dtype: Optional[torch.dtype] = None,
                 oversample: Optional[int] = None, n_iter: Optional[int] = None,
                 seed: Optional[int] = None, return_info: bool = False):
    """LoRA factors of one fine-tuned matrix: ``B A ≈ ΔW = finetuned − base`` at rank ``r``.

    ``ΔW ≈ U_r diag(S_r) Vh_r`` is the top-``r`` SVD of the delta (:func:`svd_lowrank`: the
    randomized SVD, or ``torch.linalg.svd`` with ``exact=True``), so ``‖ΔW − B A‖_F`` is within
    :func:`svd_lowrank`'s factor of the Eckart-Young optimum ``(Σ_{i>r} σ_i²)^½``. As
    ``mergekit-extract-lora`` does, ``distribute_scale`` (default) splits the singular values
    evenly: ``B = U_r diag(√S_r)``, ``A = diag(√S_r) Vh_r`` (else ``B = U_r``, ``A = diag(S_r) Vh_r``).
    In PEFT's layout (``lora_alpha = r``, scaling 1) the adapted weight is ``W_base + B A``.

    Rank: ``rank`` is the largest ``r`` (default ``min(m, n)``); ``rank_fraction`` keeps the
    smallest ``r`` whose components hold that fraction of ``‖ΔW‖_F²`` (capped by ``rank``; the
    energy of the SVD computed at ``rank``); ``sv_epsilon`` drops singular values ``≤`` it
    (mergekit's ``--sv-epsilon``). At least one of ``rank`` and ``rank_fraction`` is needed.

    Args:
        base, finetuned: ``(m, n)`` float tensors of one shape (a Linear's ``(out, in)``).
        out_dtype: the factors' dtype (default ``finetuned``'s); the SVD runs in fp32 (fp64
            for fp64 input). seed, oversample, n_iter: as :func:`svd_lowrank`.
        return_info: also return ``{"rank", "energy", "residual"}``: the kept fraction of
            ``‖ΔW‖_F²`` and ``‖ΔW − B A‖_F`` from ``‖ΔW‖_F² − Σ_{i≤r} S_i²`` (exact in exact
            arithmetic: ``B A`` is an orthogonal projection of ``ΔW``).

    Returns:
        ``(B, A)`` of shapes ``(m, r)`` and ``(r, n)``, or ``(B, A, info)``.
    """
    base, finetuned = _matrix(base, "base"), _matrix(finetuned, "finetuned")
    if base.dim() != 2 or finetuned.shape != base.shape:
        raise ValueError(f"base and finetuned must be matrices of one shape (m, n), got "
                         f"{tuple(base.shape)} and {tuple(finetuned.shape)}")
    if base.device != finetuned.device:
        raise ValueError(f"base is on {base.device}, finetuned on {finetuned.device}")
    m, n = base.shape
    if rank is None and rank_fraction is None:
        raise ValueError("give rank (the largest LoRA rank) or rank_fraction (or both)")
    cap = min(m, n) if rank is None else min(V.integer(rank, "rank", 1), min(m, n))
    if rank_fraction is not None:
        rank_fraction = V.number(rank_fraction, "rank_fraction")
        if not 0 < rank_fraction <= 1:
            raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction}")
    sv_epsilon = V.number(sv_epsilon, "sv_epsilon")
    if sv_epsilon < 0:
        raise ValueError(f"sv_epsilon must be >= 0, got {sv_epsilon}")
    distribute_scale = V.flag(distribute_scale, "distribute_scale")
    out_dtype = finetuned.dtype if out_dtype is None else out_dtype
    wd = torch.float64 if torch.float64 in (base.dtype, finetuned.dtype) else torch.float32
    delta = finetuned.to(wd) - base.to(wd)
    _finite(delta, "finetuned - base")
    u, s, vh = svd_lowrank(delta, cap, oversample=oversample, n_iter=n_iter, exact=exact, seed=seed)
    total = float(delta.double().square().sum()) if (return_info or rank_fraction is not None) else 0.0
    r = _extraction_rank(s, total, cap, rank_fraction, sv_epsilon)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    if distribute_scale:
        root = s.sqrt()
        b, a = u * root, root[:, None] * vh
    else:
        b, a = u, s[:, None] * vh
    b, a = b.to(out_dtype).contiguous(), a.to(out_dtype).contiguous()
    if not return_info:
        return b, a
    kept = float(s.double().square().sum())
    info = {"rank": r, "energy": kept / total if total > 0 else 1.0,
            "residual": math.sqrt(max(total - kept, 0.0))}
    return b, a, info
