"""Drop-in acceleration of mergekit 0.1.5's merge methods.

    import fastmerge.integrations.mergekit as fm_mergekit
    fm_mergekit.patch()      # or: with fm_mergekit.patched(): ...
    # mergekit.merge.run_merge(...), merge_tensors(...), merge_state_dicts(...),
    # mergekit-yaml's main(): unchanged code

Or from the shell, as a drop-in for ``mergekit-yaml``: ``fastmerge mergekit CONFIG OUT [...]``.

What ``patch()`` replaces (every replacement keeps mergekit's own code as ``__wrapped__`` and
runs it for the calls fastmerge does not take, see below):

* ``GeneralizedTaskArithmeticMerge.merge_group``: the one code path of ``task_arithmetic, ties,
  dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear``. Every parameter
  mergekit binds is honoured: ``weight, density, gamma, epsilon`` per model; ``normalize,
  rescale, lambda`` shared; ``int8_mask`` only chooses mergekit's mask storage.
* the ``implementation`` of mergekit's other merge-method objects: ``linear`` and ``slerp``
  (batch kernels: each input arrives as ``[B, *shape]`` for B packed groups and is merged group
  by group, ``t``/``weight`` one row per group), and the group kernels of ``nuslerp, multislerp,
  karcher, model_stock, sce, nearswap, arcee_fusion, ram, ramplus_tl, passthrough``, each run
  as ``fastmerge.merge(name, base, models, ...)`` with mergekit's parameters under their own
  names and its per-model ``weight`` as ``weights`` in model order. The base is the group's base
  entry where the method has one; ``karcher`` (which mergekit runs over every entry, base
  included, with equal weights) and ``passthrough`` (one input, base or not) get the entries as
  mergekit orders them.

``dtype`` and ``out_dtype`` are applied by mergekit around each call exactly as before, and the
tensors stay on the device mergekit put them on. A method is fused where a fastmerge backend
runs it on that device (``fastmerge.backends()``; for the methods of :mod:`fastmerge.methods`
the backends their registry entry lists): a method without a fused kernel there stays
mergekit's own.

Same results as mergekit except by design: fastmerge computes in fp32 and rounds once where
mergekit computes in the working dtype (so bf16/fp16 merges differ by about an ulp, and a top-k
boundary between equal bf16 magnitudes may fall differently; ties of magnitude or variance at a
top-k cut go to the lowest index); DARE/DELLA masks come from fastmerge's Philox stream seeded
by torch's default generator (``torch.manual_seed`` still makes runs reproducible), unless
``patch(rng="torch")``; ``arcee_fusion`` takes exact quartiles over all elements where mergekit,
above 10^6 elements, estimates them from 10^6 ``torch.randint`` samples (a different threshold on
every run; at or below 10^6 elements the two agree).

Run by mergekit itself: parameters outside fastmerge's domain (densities outside [0, 1], ``nan``
or fp32-overflowing weights, weights that cancel where fastmerge divides by their sum, ...),
float64 tensors, inputs holding inf/nan, results that overflow, model counts fastmerge's method
does not take, calls whose result would need an autograd graph (``merge_state_dicts`` on module
parameters with grad mode on), and tensors on a device no fused fastmerge backend serves (a
``--cuda`` merge runs on the triton or cuda backend where one is available).
"""
from __future__ import annotations

import importlib

import torch

from .. import api
from .._registry import REGISTRY
from ._patch import Patch, controls, fused_can_take, require, rng_mode, with_fallback

TESTED = (0, 1)
GTA_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
               "breadcrumbs_ties", "della", "della_linear")
# mergekit's other methods: (module under mergekit.merge_methods, merge-method object) whose
# ``implementation`` -- the kernel mergekit calls with a TensorGroup (slerp: a TensorBatch) --
# is replaced
OTHER_METHODS = {
    "slerp": ("slerp", "slerp_merge_method"),
    "nuslerp": ("nuslerp", "nuslerp_merge_method"),
    "multislerp": ("multislerp", "multislerp"),
    "karcher": ("karcher", "karcher_merge_method"),
    "model_stock": ("model_stock", "model_stock_merge_method"),
    "sce": ("sce", "sce_merge"),
    "nearswap": ("nearswap", "nearswap_merge"),
    "arcee_fusion": ("arcee_fusion", "arcee_fusion_merge_method"),
    "ram": ("ram", "ram_merge"),
    "ramplus_tl": ("ram", "ramplus_tl_merge"),
    "passthrough": ("passthrough", "passthrough_merge_method"),
}
METHODS = GTA_METHODS + ("linear",) + tuple(OTHER_METHODS)
_PER_MODEL = {"weight": "weights", "density": "density", "gamma": "gamma", "epsilon": "epsilon"}
# methods whose mergekit kernel sees every entry of the group as one input list (no base role)
_ALL_ENTRIES = ("karcher", "passthrough")
# methods whose mergekit kernel returns float32 for bf16/fp16 inputs (an fp32 mask or factor
# multiplies the inputs' dtype): the patched kernel returns the same dtype
_FP32_RESULT = ("arcee_fusion", "ramplus_tl")

_patch = Patch("mergekit")


def _in_unit(values) -> bool:
    return all(0.0 <= float(v) <= 1.0 for v in values)


# ---- generalized task arithmetic ------------------------------------------------------------

def _gta_covered(self, group, /, **parameters) -> bool:
    if self.method_name not in GTA_METHODS or group.base is None or not group.non_base:
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
    common = dict(lam=parameters["lambda"], normalize=parameters["normalize"],
                  rescale=parameters["rescale"], **kwargs)
    base, models = group.base.tensor, [e.tensor for e in entries]
    sparsify = REGISTRY[self.method_name].sparsify
    if _patch.options.get("rng") == "torch" and sparsify in ("random", "della"):
        from ._torch_rng import mergekit_keeps, restoring_rng

        with restoring_rng(base.device):  # a refused call falls back to mergekit's own draws
            keep, factors = mergekit_keeps(sparsify, base, models, kwargs["density"],
                                           kwargs.get("epsilon"), bool(parameters["rescale"]))
            return api.merge_with_keep(self.method_name, base, models, keep, factors=factors,
                                       **common)
    return api.merge(self.method_name, base, models, **common)


# ---- batch kernels: linear and slerp --------------------------------------------------------

def _rows(tensors, merge_row) -> torch.Tensor:
    """``[B, *shape]`` from ``merge_row(b)`` for each of the B packed groups."""
    rows = [merge_row(b) for b in range(tensors[0].shape[0])]
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)


def _linear_covered(batch, weight, normalize=True) -> bool:
    if not fused_can_take(batch.tensors):
        return False
    # mergekit divides by a zero weight sum (inf/nan out); fastmerge refuses: let mergekit do it
    return not (normalize and bool((weight.sum(dim=1) == 0).any()))


def _linear_merge(batch, weight, normalize=True) -> torch.Tensor:
    """mergekit's ``linear`` kernel: ``batch.tensors`` are the inputs, each ``[B, *shape]`` for
    B packed groups, ``weight`` is ``[B, n_inputs]``; ``sum_i w_i x_i (/ sum_i w_i)``."""
    tensors = batch.tensors
    return _rows(tensors, lambda b: api.merge("linear", None, [t[b] for t in tensors],
                                              weights=weight[b].tolist(), normalize=normalize))


def _slerp_covered(batch, t) -> bool:
    return (batch.base_index is not None and len(batch.tensors) == 2
            and fused_can_take(batch.tensors, "slerp"))


def _slerp_merge(batch, t) -> torch.Tensor:
    """mergekit's ``slerp`` kernel: the base ``batch.tensors[base_index]`` and the other input,
    each ``[B, *shape]``, and ``t`` (``[B]``, one per group); each group's tensor is one vector."""
    v0, v1 = batch.tensors[batch.base_index], batch.tensors[1 - batch.base_index]
    ts = t.reshape(-1).tolist()
    return _rows(batch.tensors, lambda b: api.merge("slerp", v0[b], [v1[b]], t=ts[b]))


# ---- group kernels --------------------------------------------------------------------------

def _split(name: str, group):
    """``(base, models, entries)`` as fastmerge's method ``name`` takes them from a group."""
    if name in _ALL_ENTRIES:
        return None, [e.tensor for e in group.entries], group.entries
    entries = group.non_base
    return (group.base.tensor if group.base is not None else None), [e.tensor for e in entries], entries


def _group_params(name: str, group, entries, parameters: dict) -> dict:
    """mergekit's bound parameters as fastmerge's keyword arguments: per-model ``weight`` as
    ``weights`` in model order, ``passthrough``'s per-input ``scale`` as the one input's."""
    out = {}
    for key, value in parameters.items():
        if key == "weight":
            out["weights"] = [value[e.id] for e in entries]
        elif key == "scale":
            out["scale"] = value[group.entries[0].id]
        else:
            out[key] = value
    return out


def _group_covered(name: str):
    entry = REGISTRY[name]

    def covered(group, /, **parameters) -> bool:
        base, models, _ = _split(name, group)
        if base is None and entry.base == "required":
            return False
        if len(models) < entry.min_models or (entry.max_models is not None and len(models) > entry.max_models):
            return False
        if base is None and not models:
            return False
        return fused_can_take([e.tensor for e in group.entries], name)

    return covered


def _group_merge(name: str):
    def merge_group(group, /, **parameters) -> torch.Tensor:
        base, models, entries = _split(name, group)
        params = _group_params(name, group, entries, parameters)
        if name in _FP32_RESULT:
            params["out_dtype"] = torch.promote_types(group.entries[0].tensor.dtype, torch.float32)
        return api.merge(name, base, models, **params)

    merge_group.__doc__ = f"mergekit's ``{name}`` kernel as ``fastmerge.merge({name!r}, ...)``."
    return merge_group


_BATCH_KERNELS = {"slerp": (_slerp_merge, _slerp_covered)}


def _method_targets(allow_untested: bool) -> list:
    """``(owner, "implementation", make)`` for linear and every method of ``OTHER_METHODS``."""
    linear = require("mergekit.merge_methods.linear", "mergekit", TESTED, allow_untested)
    targets = [(linear.linear_merge, _linear_merge, _linear_covered)]
    for name, (module, attr) in OTHER_METHODS.items():
        owner = getattr(importlib.import_module(f"mergekit.merge_methods.{module}"), attr)
        fast, covered = _BATCH_KERNELS.get(name, (_group_merge(name), _group_covered(name)))
        targets.append((owner, fast, covered))
    for owner, _, _ in targets:
        if "implementation" not in vars(owner):
            raise RuntimeError(f"this mergekit's {owner!r} has no implementation attribute to "
                               "patch; fastmerge supports mergekit 0.1.x")
    return [(owner, "implementation",
             lambda orig, fast=fast, covered=covered: with_fallback(fast, orig, covered, "mergekit"))
            for owner, fast, covered in targets]


def patch(*, allow_untested: bool = False, rng: str = "philox") -> None:
    """Route mergekit's merge methods through fastmerge. Idempotent; undo with :func:`unpatch`.

    ``rng``: ``"philox"`` (default, the fast path: DARE/DELLA masks from fastmerge's seeded
    Philox stream) or ``"torch"``: the masks are drawn with mergekit's own ``torch.bernoulli``
    calls (same calls, order, dtype and generator, and the L1 rescale factor of mergekit's
    fp32 sums), and the rest of the merge stays fused, so a patched fp32 run equals the
    unpatched one bit for bit for the same ``torch.manual_seed``.

    Raises ImportError if mergekit is missing, RuntimeError for a release other than 0.1.x
    (unless ``allow_untested=True``), ValueError for an unknown ``rng`` or for patching again
    with another ``rng`` while patched."""
    rng = rng_mode(rng)
    if _patch.active:
        if rng != _patch.options.get("rng"):
            raise ValueError(f"mergekit is already patched with rng={_patch.options.get('rng')!r}; "
                             "call unpatch() before patching with another rng")
        return
    gta = require("mergekit.merge_methods.generalized_task_arithmetic", "mergekit", TESTED,
                  allow_untested)
    cls = gta.GeneralizedTaskArithmeticMerge
    if "merge_group" not in vars(cls):
        raise RuntimeError("this mergekit has no GeneralizedTaskArithmeticMerge.merge_group to "
                           "patch; fastmerge supports mergekit 0.1.x")
    _patch.apply([
        (cls, "merge_group",
         lambda orig: with_fallback(_gta_merge_group, orig, _gta_covered, "mergekit")),
        *_method_targets(allow_untested),
    ], {"rng": rng})


unpatch, is_patched, patched = controls(_patch, patch)
