"""Drop-in acceleration of PEFT's merge utilities.

    import fastmerge.integrations.peft as fm_peft
    fm_peft.patch()          # or: with fm_peft.patched(): ...
    model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "ab", combination_type="ties", density=0.2)

``patch()`` replaces the functions of ``peft.utils.merge_utils`` (``task_arithmetic,
magnitude_prune, ties, dare_linear, dare_ties, prune, calculate_majority_sign_mask,
disjoint_merge`` and the two pruning helpers ``magnitude_based_pruning``, ``random_pruning``)
and the copies ``peft.tuners.lora.model`` imported at load time, so
``LoraModel.add_weighted_adapter`` (``linear, ties, dare_*, magnitude_prune`` and every ``*_svd``
combination type) merges through :mod:`fastmerge.peft`. Code that did
``from peft.utils.merge_utils import ties`` *before* ``patch()`` keeps its own reference to
PEFT's function; import the module instead, or patch first.

Same results as PEFT except by design: random pruning (``dare_*``) draws its mask from
fastmerge's Philox stream, seeded from torch's default generator, so ``torch.manual_seed``
still makes runs reproducible but the mask differs from ``torch.bernoulli``'s (unless
``patch(rng="torch")``: PEFT's own ``torch.bernoulli`` draws, the merge fused); top-k ties go to
the lowest index; arithmetic is fp32 with one rounding. Inputs fastmerge does not handle
(float64 or integer task tensors, non-tensors), inputs holding inf/nan, and calls whose result
would need an autograd graph (task tensors or a ``weights`` tensor that require grad -- learnable
merge coefficients -- with grad mode on) run PEFT's own code; so
do tensors on a device no fused fastmerge backend serves (see ``fastmerge.backends()``).
``add_weighted_adapter``'s SVD path runs under ``torch.no_grad()`` (PEFT keeps only ``.data``)
with :func:`fastmerge.lowrank.lora_rerank` in place of the full ``torch.linalg.svd``: see
``patch(svd=...)``.
"""
from __future__ import annotations

import torch

from .. import peft as _fast
from .._validate import needs_grad
from ._patch import Patch, controls, fused_can_take, replacing, require, rng_mode, with_fallback

TESTED = (0, 21)
FUNCTIONS = (
    "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties", "prune",
    "calculate_majority_sign_mask", "disjoint_merge", "magnitude_based_pruning", "random_pruning",
)
# modules that bind merge_utils' functions by name at import (``from ... import ties``)
IMPORTERS = ("peft.tuners.lora.model",)

_patch = Patch("peft")


def _covered(*args, **kwargs) -> bool:
    """fastmerge runs the call when :func:`fused_can_take` its tensor argument(s) and the
    ``weights`` need no autograd graph: learnable merge coefficients (a weights tensor that
    requires grad) get PEFT's own code, whose result carries their gradient."""
    x = args[0] if args else kwargs.get("task_tensors", kwargs.get("tensor"))
    tensors = [x] if isinstance(x, torch.Tensor) else list(x) if isinstance(x, (list, tuple)) else []
    weights = args[1] if len(args) > 1 else kwargs.get("weights")
    if isinstance(weights, torch.Tensor) and needs_grad([weights]):
        return False
    return fused_can_take(tensors)


def _covered_torch_rng(name: str):
    """``_covered`` under ``rng="torch"``: PEFT's random pruning on its own (``random_pruning``,
    ``prune(..., "random")``) is one ``torch.bernoulli`` and a product, which PEFT's own code
    already is; fastmerge runs the merges that use it (``dare_linear``, ``dare_ties``)."""
    if name == "random_pruning":
        return lambda *args, **kwargs: False

    def covered(*args, **kwargs) -> bool:
        if name == "prune" and (args[2] if len(args) > 2 else kwargs.get("method")) == "random":
            return False
        return _covered(*args, **kwargs)

    return covered


def _dare_torch_rng(name: str):
    """``dare_linear`` / ``dare_ties`` with the masks drawn by PEFT's own ``random_pruning``
    calls (``torch.bernoulli(full_like(t, density))`` per task tensor, in order), then fused."""
    from ._torch_rng import peft_keeps, restoring_rng

    fast = getattr(_fast, name)

    def run(task_tensors, weights, density, *args, **kwargs):
        tasks = list(task_tensors)
        d = float(density)
        if not 0 <= d < 1:  # PEFT draws nothing: >= 1 keeps all (with its warning), < 0 raises
            return fast(tasks, weights, density, *args, **kwargs)
        with restoring_rng(tasks[0].device):  # a refused call falls back to PEFT's own draws
            return fast(tasks, weights, density, *args, keep=peft_keeps(tasks, d), **kwargs)

    return run


SVD_MODES = ("auto", "exact", "randomized")
# Sketch columns beyond the merged delta's rank bound: the range finder then spans the delta's
# whole column space, so the truncation is the exact one up to rounding.
_SKETCH_SLACK = 8


def _svd_adapter(mode: str):
    """A replacement for ``LoraModel._svd_generalized_task_arithmetic_weighted_adapter``
    (PEFT 0.21): the same steps -- each adapter's dense ``get_delta_weight``, merged by the
    combination's merge_utils function (fastmerge's, once patched), flattened / transposed for
    conv, ``fan_in_fan_out`` and embedding layers, then the rank-``new_rank`` factors
    ``B = U_r diag(S_r)``, ``A = Vh_r`` with PEFT's optional quantile clamp -- with the SVD done
    by :func:`fastmerge.lowrank.lora_rerank`, under ``torch.no_grad`` (PEFT keeps only ``.data``).

    ``mode``: ``"exact"`` -- LAPACK's thin SVD (``full_matrices`` and ``driver`` change nothing
    in the kept factors); ``"randomized"`` -- the randomized SVD for every combination type
    (approximate for the pruned ``ties_svd``/``dare_*_svd``/``magnitude_prune_svd`` deltas,
    which are full rank); ``"auto"`` -- randomized only where it is exact: the ``svd``
    combination's delta ``sum_k w_k B_k A_k`` has rank <= ``sum_k r_k``, so a sketch of
    ``sum_k r_k + 8`` columns captures all of it (without ``svd_clamp``, whose quantile of signed
    entries depends on the singular vectors' signs); exact otherwise."""
    from ..lowrank import lora_rerank

    def method(self, combination_type, adapters, weights, new_rank, target, target_lora_A,
               target_lora_B, density, majority_sign_method, clamp=None, full_matrices=True,
               driver=None):
        import peft.tuners.lora.model as lm  # the merge functions as bound now (ours once patched)

        merges = {"svd": lambda d, w: lm.task_arithmetic(d, w),
                  "ties_svd": lambda d, w: lm.ties(d, w, density, majority_sign_method),
                  "dare_linear_svd": lambda d, w: lm.dare_linear(d, w, density),
                  "dare_ties_svd": lambda d, w: lm.dare_ties(d, w, density, majority_sign_method),
                  "magnitude_prune_svd": lambda d, w: lm.magnitude_prune(d, w, density)}
        present = [(a, w) for a, w in zip(adapters, weights)
                   if a in target.lora_A or a in target.lora_embedding_A]
        if not present:
            raise ValueError("No matching LoRAs found. Please raise an issue on GitHub.")
        if combination_type not in merges:
            raise ValueError(f"Invalid value passed to combination type: {combination_type}")
        embedding = any(a in target.lora_embedding_A for a in adapters)
        with torch.no_grad():
            deltas = [target.get_delta_weight(a) for a, _ in present]
            w = torch.tensor([w for _, w in present]).to(deltas[0].device)
            delta = merges[combination_type](deltas, w)
            conv = isinstance(target, lm.Conv2d)
            if conv:
                one_by_one = target.weight.size()[2:4] == (1, 1)
                delta = delta.squeeze() if one_by_one else delta.flatten(start_dim=1)
            if getattr(target, "fan_in_fan_out", False) or embedding:
                delta = delta.T
            rank_bound = sum(target.r[a] for a, _ in present)
            # PEFT's clamp is a quantile of the signed factor entries, so it depends on the
            # singular vectors' signs, which only LAPACK's own SVD reproduces
            sketch_exact = (combination_type == "svd" and clamp is None
                            and rank_bound + _SKETCH_SLACK < min(delta.shape) // 2)
            if mode == "exact" or (mode == "auto" and not sketch_exact):
                b, a = lora_rerank(delta, new_rank, clamp=clamp, exact=True)
            else:
                extra = max(rank_bound - new_rank, 0) + _SKETCH_SLACK if sketch_exact else None
                b, a = lora_rerank(delta, new_rank, clamp=clamp, oversample=extra, seed=0)
            if conv:
                b, a = b.reshape(target_lora_B.data.shape), a.reshape(target_lora_A.data.shape)
        return a, b

    return method


def patch(*, allow_untested: bool = False, svd: str = "auto", rng: str = "philox") -> None:
    """Route PEFT's merge utilities, and the SVD of ``add_weighted_adapter``'s ``*_svd``
    combination types, through fastmerge. Idempotent; undo with :func:`unpatch`.

    ``svd``: ``"auto"`` (randomized where that is exact -- the ``svd`` combination, whose delta
    has rank at most the sum of the adapters' ranks -- LAPACK's thin SVD otherwise),
    ``"exact"`` (always LAPACK) or ``"randomized"`` (always randomized: fast, approximate for
    the pruned full-rank deltas).

    ``rng``: ``"philox"`` (default, the fast path: random pruning draws from fastmerge's seeded
    Philox stream) or ``"torch"``: ``dare_linear`` / ``dare_ties`` draw their masks with PEFT's
    own ``torch.bernoulli`` calls (same calls, order and generator) and merge them fused, and
    ``random_pruning`` / ``prune(..., "random")`` stay PEFT's own, so a patched run equals the
    unpatched one bit for bit (fp32) for the same ``torch.manual_seed``.

    Raises ImportError if peft is missing, RuntimeError for a peft release other than 0.21.x
    (unless ``allow_untested=True``), ValueError for an unknown ``svd`` or ``rng`` or for
    patching again with other options while patched."""
    if svd not in SVD_MODES:
        raise ValueError(f"svd must be one of {', '.join(SVD_MODES)}, got {svd!r}")
    rng = rng_mode(rng)
    if _patch.active:
        for key, value in (("svd", svd), ("rng", rng)):
            if value != _patch.options.get(key):
                raise ValueError(f"PEFT is already patched with {key}={_patch.options.get(key)!r}; "
                                 f"call unpatch() before patching with another {key}")
        return
    merge_utils = require("peft.utils.merge_utils", "peft", TESTED, allow_untested)
    importers = [require(name, "peft", TESTED, allow_untested) for name in IMPORTERS]
    originals = {name: getattr(merge_utils, name) for name in FUNCTIONS}

    # one wrapper per function, installed under every name that binds PEFT's original
    def wrapper(name):
        if rng == "torch" and name in ("dare_linear", "dare_ties"):
            return with_fallback(_dare_torch_rng(name), originals[name], _covered, "peft")
        covered = _covered_torch_rng(name) if rng == "torch" else _covered
        return with_fallback(getattr(_fast, name), originals[name], covered, "peft")

    wrappers = {name: wrapper(name) for name in FUNCTIONS}
    targets = [(merge_utils, name, lambda _, w=wrappers[name]: w) for name in FUNCTIONS]
    for module in importers:
        # only names that are still PEFT's own function (a user's replacement is left alone)
        targets += [(module, name, lambda _, w=wrappers[name]: w) for name in FUNCTIONS
                    if getattr(module, name, None) is originals[name]]
    lora_model = getattr(importers[0], "LoraModel", None)
    if lora_model is not None and "_svd_generalized_task_arithmetic_weighted_adapter" in vars(lora_model):
        targets.append((lora_model, "_svd_generalized_task_arithmetic_weighted_adapter",
                        lambda original: replacing(original)(_svd_adapter(svd))))
    _patch.apply(targets, {"svd": svd, "rng": rng})


unpatch, is_patched, patched = controls(_patch, patch)
