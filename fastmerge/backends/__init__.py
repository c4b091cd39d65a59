"""One module per backend, each implementing :class:`Backend`:

* ``torch``: pure PyTorch, every op on every device; the specification of correct.
* ``cpu``: the fused C++/OpenMP kernels of ``csrc/`` (loaded by ``_native``).
* ``triton``: the Triton kernels of ``fastmerge.triton_kernels``, driven by ``_gpu``.
* ``cuda``: the CUDA kernels of ``csrc/cuda_kernels.cu``, driven by ``_gpu``.

Shared below them: ``_native`` (the native module's loader), ``_gpu`` (the GPU driver that runs
a plan on a kernel set), ``_host`` (host steps every fused backend takes alike). Nothing here
imports upward: ``fastmerge.dispatch`` chooses among these modules.

The package itself is callable: ``fastmerge.backends()`` says which backends this machine can
run, and why not where it cannot.
"""
from __future__ import annotations

import sys
import types
from typing import Protocol, runtime_checkable

from . import _native  # noqa: F401  (loads the C++ module at import: one warning if it cannot)


@runtime_checkable
class Backend(Protocol):
    """What a backend module provides. ``plan`` is a :class:`fastmerge._semantics.Plan`;
    ``cfg`` a :class:`fastmerge.formats.Int4Config` or ``FP8Config``."""

    NAME: str

    def status(self) -> dict:
        """``{"available": bool, "reason": str, ...}`` without building or launching anything."""

    def run_plan(self, plan, base, inputs, out_dtype):
        """The merge of ``inputs`` (onto ``base``, or without one) as ``plan`` says."""

    def run_plan_quantized(self, plan, base, inputs, out_dtype, cfg):
        """``quantize(run_plan(...), cfg)``'s raw tensors, fused where the backend can."""

    def quantize(self, w, cfg, name: str = "w"):
        """The raw tensors of ``w`` in the format ``cfg`` (a dict for INT4, ``(q, scale)``)."""

    def elect_sign(self, tensors, weights, method: str):
        """int8 majority sign of ``sum w_k t_k`` (``sum``) or of the sign counts (``count``)."""

    def disjoint_merge(self, tensors, sign, weights, divisor: str, out_dtype):
        """The agreeing entries' weighted sum over the divisor (``count`` or ``weight``)."""

    def magnitude_threshold(self, x, k: int):
        """The k-th largest ``|x|`` (``inf`` for k == 0) as a 0-d tensor of x's dtype."""


NAMES = ("torch", "cpu", "triton", "cuda")


def module(name: str):
    """The module of backend ``name`` (imported on first use: importing ``triton`` or building
    the CUDA extension is never paid by ``import fastmerge``)."""
    if name == "cpu":
        from . import cpu

        return cpu
    if name == "triton":
        from . import triton

        return triton
    if name == "cuda":
        from . import cuda

        return cuda
    if name == "torch":
        from . import torch as reference

        return reference
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(NAMES)}")


def method_ops(name: str):
    """The kernels backend ``name`` offers the :mod:`fastmerge.methods` methods' ``fused`` plans
    (``backends/<name>_methods.py``: Gram passes, linear combinations, elementwise merges).
    ``cuda`` delegates them to the Triton kernels (``triton_methods``): the CUDA extension has
    none of its own."""
    if name == "cpu":
        from . import cpu_methods

        return cpu_methods
    if name in ("triton", "cuda"):
        from . import triton_methods

        return triton_methods
    raise ValueError(f"backend {name!r} has no kernels for mergekit's other methods")


def status() -> dict:
    """Which backends this machine can run, and why not where it cannot.

    Returns ``{name: {"available": bool, "reason": str}}``; the ``triton`` entry also carries
    ``"interpreter": True`` when it runs in Triton's interpreter (CPU tensors, tests only), and
    the ``cuda`` entry ``"delegates"``: the ops it hands to another backend (mergekit's other
    methods run on the Triton kernels, see :func:`method_ops`).
    """
    out = {name: module(name).status() for name in NAMES}
    cuda = dict(out["cuda"], delegates={"methods": "triton"})
    if cuda["available"]:
        cuda["reason"] += ("; mergekit's other methods (slerp, nuslerp, multislerp, karcher, "
                           "model_stock, nearswap, ram, ramplus_tl, passthrough) run on the triton kernels")
    out["cuda"] = cuda
    return out


class _CallablePackage(types.ModuleType):
    """``fastmerge.backends()`` is :func:`status` (the package is also the public function)."""

    def __call__(self) -> dict:
        return status()


sys.modules[__name__].__class__ = _CallablePackage
