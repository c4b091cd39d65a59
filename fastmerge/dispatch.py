"""Backend choice and the one place a merge plan meets a backend: ``backend=`` /
``FASTMERGE_BACKEND`` in {auto, torch, cpu, triton, cuda}.

The native CPU module is optional: when it is missing or fails to load, ``import fastmerge``
still works, one warning says why (``backends/_native.py``), and the ``torch`` reference serves
every op. A tensor is never copied between devices behind the user's back: asking a CPU backend
to work on GPU tensors is an error.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

from . import _registry, methods
from . import _validate as V
from . import backends as _backends
from . import formats

NAMES = ("auto", "torch", "cpu", "triton", "cuda")

# ``auto`` on CUDA tensors: the backends to try in order, the same for every op.
#
# UNMEASURED: no GPU was available when this order was chosen, so it rests on design, not on
# figures. ``python -m bench.gpu`` measures every op on both GPU backends (rows in
# bench/results/gpu_*.json); replace it with a per-op table once figures say an op differs.
# The reasoning until then:
# * selection ops (ties, breadcrumbs*, magnitude_*): triton. Its top-k brackets the threshold
#   from a sample and then needs ONE streaming pass; the CUDA radix select needs three
#   histogram passes (plus a tie scan when ties straddle the threshold).
# * streaming ops (task_arithmetic, linear, dare_*, della*, random_drop, elect_sign,
#   disjoint_merge): one pass on either backend; triton, because its kernels compile in seconds
#   on first use where the CUDA extension's first build (nvcc) takes minutes.
# cuda is the choice when triton is missing; torch (on the GPU) when neither is.
AUTO_CUDA = ("triton", "cuda")


def _status(name: str) -> dict:
    return _backends.module(name).status()


def backends() -> dict:
    """``fastmerge.backends()``: ``{name: {"available": bool, "reason": str}}`` per backend."""
    return _backends.status()


def _auto(device, op) -> str:
    entry = _registry.REGISTRY.get(op)
    if entry is not None and not entry.kernels:  # a method no fused backend runs (the SVD merges)
        return "torch"
    if device.type == "cpu":
        # Measured (bench/results/cpu_*.json): the fused C++ kernels beat the reference on
        # every op and shape on CPU, so auto picks them whenever they are built.
        return "cpu" if _status("cpu")["available"] else "torch"
    if device.type == "cuda":
        for name in AUTO_CUDA:
            info = _status(name)
            if info["available"] and not info.get("interpreter"):
                return name
    return "torch"


_warned_grad = set()


def _warn_no_graph(name: str) -> None:
    """Once per backend: an explicitly chosen fused backend keeps no autograd graph."""
    if name not in _warned_grad:
        _warned_grad.add(name)
        warnings.warn(f"fastmerge: backend={name!r} computes without autograd: the result carries "
                      "no graph although an input requires grad (backend='auto' or 'torch' keeps it)",
                      RuntimeWarning, stacklevel=6)  # the caller of fastmerge.merge


def resolve(backend, device, op: str = "merge", grad: bool = False) -> str:
    """The concrete backend name for op ``op`` on tensors on ``device``. Never moves data: a
    backend that cannot run on ``device`` is an error that says so. ``op`` is a method name (its
    registry entry says which fused backends run it) or a primitive (``magnitude_threshold``,
    ``quantize``, ...); on CUDA every op has the same order today, see ``AUTO_CUDA``.

    ``grad``: the result would need an autograd graph (an input or a weights tensor requires
    grad, grad mode on). Only the ``torch`` backend records one, so ``auto`` picks it; an
    explicit ``cpu``, ``triton`` or ``cuda`` runs as asked and warns once that the result
    carries no graph."""
    name = backend if backend is not None else os.environ.get("FASTMERGE_BACKEND", "auto")
    if not isinstance(name, str) or name.lower() not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(NAMES)}; got {name!r}")
    name = name.lower()
    if name == "auto":
        return "torch" if grad else _auto(device, op)
    name = _resolve_named(name, device)
    if grad and name != "torch":
        _warn_no_graph(name)
    return name


def _resolve_named(name: str, device) -> str:
    """``resolve`` for an explicitly named backend: checks that it can run on ``device``."""
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(
                f"backend='cpu' runs on CPU tensors, but the inputs are on {device}; "
                "use backend='auto' or move the tensors"
            )
        info = _status("cpu")
        if not info["available"]:
            raise RuntimeError(f"backend='cpu' is not available: {info['reason']}")
    if name in ("triton", "cuda"):
        info = _status(name)
        if name == "triton" and info.get("interpreter") and device.type == "cpu":
            return name
        if not info["available"] and not (info.get("build_failed") and device.type == "cuda"):
            raise RuntimeError(f"backend={name!r} is not available: {info['reason']}")
        if device.type != "cuda":
            raise ValueError(
                f"backend={name!r} runs on CUDA tensors, but the inputs are on {device}; "
                "use backend='auto' or move the tensors"
            )
    return name


def module(name: str):
    """The module implementing backend ``name``. ``cuda`` builds its extension on first use;
    if the build fails it warns once and the Triton kernels (or, without Triton, the torch
    reference) serve instead."""
    if name == "cuda":
        cuda = _backends.module("cuda")
        if cuda.extension() is not None:
            return cuda
        triton = _backends.module("triton")
        return triton if triton.version() is not None else _backends.module("torch")
    return _backends.module(name)


def for_op(backend, device, op: str = "merge", grad: bool = False):
    """``module(resolve(backend, device, op, grad))``."""
    return module(resolve(backend, device, op, grad))


# ---- the engine: a plan (or a quantizer) run on the chosen backend ---------------------------

def run(plan, base, inputs, out_dtype, backend, op: str = "merge",
        quantize: Optional[formats.QuantConfig] = None):
    """Execute the merge ``plan`` (:class:`fastmerge._semantics.Plan`) on ``inputs`` (and
    ``base``) with the backend chosen for ``op``: the merged tensor, or with ``quantize`` its
    quantized form (an Int4 dataclass or ``(q, scale)``), fused where the backend fuses it."""
    if quantize is None:  # a quantized result is integer codes: it has no graph on any backend
        grad = plan.weight_grad is not None or V.needs_grad([base, *inputs])
        return for_op(backend, inputs[0].device, op, grad).run_plan(plan, base, inputs, out_dtype)
    mod = for_op(backend, inputs[0].device, op)
    raw = mod.run_plan_quantized(plan, base, inputs, out_dtype, quantize)
    formats.check_int4_scale(raw, quantize, "the merged tensor")
    return formats.wrap(raw, quantize, tuple(inputs[0].shape), out_dtype)


def run_method(name: str, base, models, params: dict, out_dtype, backend):
    """A :mod:`fastmerge.methods` method on the chosen backend: its fused kernel where the
    registry lists one for that backend, else its reference (on the inputs' device)."""
    ref = base if base is not None else models[0]
    chosen = resolve(backend, ref.device, name, V.needs_grad([base, *models]))
    spec = getattr(methods, name)
    checked = False
    kernels = _registry.get(name).kernels
    if chosen == "cuda" and _backends.module("triton").version() is None:
        kernels = ()  # cuda runs these methods on the Triton kernels: without Triton, the reference
    if chosen in kernels:  # the method's fused plan on that backend's kernels
        ops = _backends.method_ops(chosen)
        out = spec.fused(ops, base, models, out_dtype=out_dtype, **params)
        # the plan returns its last kernel's output, and those kernels flag a non-finite result
        # in the pass that writes it: no second pass over the output
        checked = getattr(spec, "RESULT_CHECKED", False) and getattr(ops, "RESULT_CHECKED", False)
    else:
        out = spec.reference(base, models, **params).to(out_dtype)
        if any(x is not None and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
               for x in [base, *models]):
            out = out.clone()  # a merge's result is a new tensor, never one of its inputs
    if not checked:  # the inputs were checked: a non-finite result overflowed (fp32 or out_dtype)
        V.check_result(out, [base, *models], ["base"] + V.input_names(None, len(models)))
    return out


def quantize(w, cfg: formats.QuantConfig, backend):
    """``w`` quantized with ``cfg`` on the chosen backend, as the public result type."""
    mod = for_op(backend, w.device, "quantize")
    raw = mod.quantize(w, cfg, "w")
    formats.check_int4_scale(raw, cfg, "w")
    return formats.wrap(raw, cfg, tuple(w.shape), w.dtype)

