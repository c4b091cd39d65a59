"""Drop-in acceleration of mergekit's generalized task arithmetic and linear merges.

    import fastmerge.integrations.mergekit as fm_mergekit
    fm_mergekit.patch()      # or: with fm_mergekit.patched(): ...
    # mergekit.merge.run_merge(...), merge_tensors(...), mergekit-yaml's main(): unchanged code

Or from the shell, as a drop-in for ``mergekit-yaml``: ``fastmerge mergekit CONFIG OUT [...]``.

``patch()`` replaces ``GeneralizedTaskArithmeticMerge.merge_group`` (the one code path of
``task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della,
della_linear``) and the kernel of mergekit's ``linear`` method. Every parameter mergekit binds
is honoured: ``weight, density, gamma, epsilon`` per model; ``normalize, rescale, lambda``
shared; ``int8_mask`` only chooses mergekit's mask storage, so it changes nothing here; ``dtype``
and ``out_dtype`` are applied by mergekit around the call exactly as before. The tensors stay on
the device mergekit put them on. Other methods (slerp, model_stock, ...) remain mergekit's own.

Same results as mergekit except by design: fastmerge computes in fp32 and rounds once where
mergekit computes in the working dtype (so bf16/fp16 merges differ by about an ulp, and a
top-k boundary between equal bf16 magnitudes may fall differently); random methods draw from
fastmerge's Philox stream seeded by torch's default generator instead of ``torch.bernoulli``
(``torch.manual_seed`` still makes runs reproducible). Parameters outside fastmerge's domain
(densities outside [0, 1], ``nan`` or fp32-overflowing weights, float64 tensors, ...), inputs
holding inf/nan, results that overflow, and calls whose
result would need an autograd graph (``merge_state_dicts`` on module parameters with grad mode
on) run mergekit's own code; so do tensors on a device no fused fastmerge backend serves (see
``fastmerge.backends()``: a ``--cuda`` merge runs on the triton or cuda backend where one is
available, and stays mergekit's where neither is).
"""
from __future__ import annotations

import torch

from .. import api
from ._patch import Patch, controls, fused_can_take, require, with_fallback

TESTED = (0, 1)
METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
           "breadcrumbs_ties", "della", "della_linear", "linear")
_PER_MODEL = {"weight": "weights", "density": "density", "gamma": "gamma", "epsilon": "epsilon"}

_patch = Patch("mergekit")


def _in_unit(values) -> bool:
    return all(0.0 <= float(v) <= 1.0 for v in values)


def _gta_covered(self, group, /, **parameters) -> bool:
    if self.method_name not in METHODS or group.base is None or not group.non_base:
        return False
    if not fused_can_take(e.tensor for e in group.entries):
        return False
    return all(_in_unit(parameters[p].values()) for p in ("density", "gamma", "epsilon")
               if p in parameters)


def _gta_merge_group(self, group, /, **parameters) -> torch.Tensor:
    """``GeneralizedTaskArithmeticMerge.merge_group`` on fastmerge's fused kernels."""
    entries = group.non_base
    kwargs = {ours: [parameters[theirs][e.id] for e in entries]
              for theirs, ours in _PER_MODEL.items() if theirs in parameters}
    return api.merge(
        self.method_name, group.base.tensor, [e.tensor for e in entries],
        lam=parameters["lambda"], normalize=parameters["normalize"],
        rescale=parameters["rescale"], **kwargs,
    )


def _linear_covered(batch, weight, normalize=True) -> bool:
    if not fused_can_take(batch.tensors):
        return False
    # mergekit divides by a zero weight sum (inf/nan out); fastmerge refuses: let mergekit do it
    return not (normalize and bool((weight.sum(dim=1) == 0).any()))


def _linear_merge(batch, weight, normalize=True) -> torch.Tensor:
    """mergekit's ``linear`` kernel: ``batch.tensors`` are the inputs, each ``[B, *shape]`` for
    B packed groups, ``weight`` is ``[B, n_inputs]``; ``sum_i w_i x_i (/ sum_i w_i)``."""
    tensors = batch.tensors
    rows = [api.merge("linear", None, [t[b] for t in tensors], weights=weight[b].tolist(),
                      normalize=normalize)
            for b in range(tensors[0].shape[0])]
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)


def patch(*, allow_untested: bool = False) -> None:
    """Route mergekit's task-arithmetic family and ``linear`` through fastmerge. Idempotent;
    undo with :func:`unpatch`. Raises ImportError if mergekit is missing, RuntimeError for a
    release other than 0.1.x (unless ``allow_untested=True``)."""
    if _patch.active:
        return
    gta = require("mergekit.merge_methods.generalized_task_arithmetic", "mergekit", TESTED,
                  allow_untested)
    linear = require("mergekit.merge_methods.linear", "mergekit", TESTED, allow_untested)
    cls = gta.GeneralizedTaskArithmeticMerge
    if "merge_group" not in vars(cls) or not hasattr(linear.linear_merge, "implementation"):
        raise RuntimeError("this mergekit has no GeneralizedTaskArithmeticMerge.merge_group / "
                           "linear_merge.implementation to patch; fastmerge supports mergekit 0.1.x")
    _patch.apply([
        (cls, "merge_group",
         lambda orig: with_fallback(_gta_merge_group, orig, _gta_covered, "mergekit")),
        (linear.linear_merge, "implementation",
         lambda orig: with_fallback(_linear_merge, orig, _linear_covered, "mergekit")),
    ])


unpatch, is_patched, patched = controls(_patch, patch)
