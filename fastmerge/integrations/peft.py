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
still makes runs reproducible but the mask differs from ``torch.bernoulli``'s; top-k ties go to
the lowest index; arithmetic is fp32 with one rounding. Inputs fastmerge does not handle
(float64 or integer task tensors, non-tensors), inputs holding inf/nan, and calls whose result
would need an autograd graph (inputs that require grad, grad mode on) run PEFT's own code; so
do tensors on a device no fused fastmerge backend serves (see ``fastmerge.backends()``).
``add_weighted_adapter``'s SVD path is run under ``torch.no_grad()`` (it keeps only ``.data``).
"""
from __future__ import annotations

import functools

import torch

from .. import peft as _fast
from .._validate import SUPPORTED_DTYPES
from ._patch import Patch, controls, fused_backend_for, needs_autograd, require, with_fallback

TESTED = (0, 21)
FUNCTIONS = (
    "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties", "prune",
    "calculate_majority_sign_mask", "disjoint_merge", "magnitude_based_pruning", "random_pruning",
)
# modules that bind merge_utils' functions by name at import (``from ... import ties``)
IMPORTERS = ("peft.tuners.lora.model",)

_patch = Patch("peft")


def _covered(*args, **kwargs) -> bool:
    """fastmerge runs the call when its tensor argument(s) are fp32/fp16/bf16 tensors."""
    x = args[0] if args else kwargs.get("task_tensors", kwargs.get("tensor"))
    tensors = [x] if isinstance(x, torch.Tensor) else list(x) if isinstance(x, (list, tuple)) else []
    return (bool(tensors)
            and all(isinstance(t, torch.Tensor) and t.dtype in SUPPORTED_DTYPES for t in tensors)
            and not needs_autograd(tensors) and fused_backend_for(tensors[0]))


def _without_graph(original):
    """``LoraModel._svd_generalized_task_arithmetic_weighted_adapter`` under ``torch.no_grad``:
    it merges ``get_delta_weight`` outputs (which require grad) and PEFT only keeps the
    ``.data`` of its result, so no graph is lost, and the merges inside take the fused path."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return original(*args, **kwargs)

    wrapper.__fastmerge_patch__ = True
    return wrapper


def patch(*, allow_untested: bool = False) -> None:
    """Route PEFT's merge utilities through fastmerge. Idempotent; undo with :func:`unpatch`.

    Raises ImportError if peft is missing, RuntimeError for a peft release other than 0.21.x
    (unless ``allow_untested=True``)."""
    if _patch.active:
        return
    merge_utils = require("peft.utils.merge_utils", "peft", TESTED, allow_untested)
    importers = [require(name, "peft", TESTED, allow_untested) for name in IMPORTERS]
    originals = {name: getattr(merge_utils, name) for name in FUNCTIONS}

    # one wrapper per function, installed under every name that binds PEFT's original
    wrappers = {name: with_fallback(getattr(_fast, name), originals[name], _covered, "peft")
                for name in FUNCTIONS}
    targets = [(merge_utils, name, lambda _, w=wrappers[name]: w) for name in FUNCTIONS]
    for module in importers:
        # only names that are still PEFT's own function (a user's replacement is left alone)
        targets += [(module, name, lambda _, w=wrappers[name]: w) for name in FUNCTIONS
                    if getattr(module, name, None) is originals[name]]
    lora_model = getattr(importers[0], "LoraModel", None)
    if lora_model is not None and "_svd_generalized_task_arithmetic_weighted_adapter" in vars(lora_model):
        targets.append((lora_model, "_svd_generalized_task_arithmetic_weighted_adapter", _without_graph))
    _patch.apply(targets)


unpatch, is_patched, patched = controls(_patch, patch)
