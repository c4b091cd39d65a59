"""Every merge method, declared once.

An entry gives the method's name (mergekit's), the keyword arguments it takes (mergekit's names
where mergekit has them), its defaults, and the function that defines it (``reference``, a
``module:function`` path resolved by :func:`fastmerge.api.reference`, so this bottom-layer file
imports nothing above it). Everything else derives from here: ``fastmerge.METHODS``, the
validation and planning of :func:`fastmerge.merge`, the ``method`` check of ``fastmerge merge``'s
YAML, the ``torch.library`` schema of ``fastmerge::merge`` and the tests' parametrization.

Adding a method: one entry here, its reference, and one kernel file per backend that
accelerates it (the same name in ``csrc/``, ``triton_kernels/``, ``tests/`` and ``bench/``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from . import methods as _methods
from .methods._common import REQUIRED  # noqa: F401  (a PARAMS default: no default)

# the merge of a plan by a backend (mergekit's generalized task arithmetic and linear)
PLAN_REFERENCE = "fastmerge.backends.torch:run_plan"


@dataclass(frozen=True)
class Method:
    """One merge method.

    family: ``gta`` (mergekit's generalized task arithmetic: sparsify, weight, optionally elect
    signs, sum, normalize), ``linear`` (a weighted mean of the models, base unused), ``svd``
    (FusionBench's SVD merges, :mod:`fastmerge.lowrank`) or ``method`` (mergekit's other
    methods, each defined by its module in :mod:`fastmerge.methods`: ``CONTRACT``, ``PARAMS``
    and ``reference``).
    params: the keyword arguments of :func:`fastmerge.merge` the method reads.
    consensus / sparsify / normalize / rescale: mergekit 0.1.5's registry.py settings (gta).
    kernels: the fused backends that run it (``auto`` picks among these, see
    ``fastmerge.dispatch``); svd methods have none and run torch's GEMM/LAPACK on the tensors'
    device whatever the backend.
    """

    name: str
    family: str
    params: tuple
    reference: str = PLAN_REFERENCE
    consensus: Optional[str] = None
    sparsify: Optional[str] = None
    normalize: bool = False
    rescale: bool = False
    base: str = "required"  # "required" | "optional" | "none" (passthrough takes one tensor)
    min_models: int = 1
    max_models: Optional[int] = None
    kernels: tuple = ("cpu", "triton", "cuda")
    defaults: dict = field(default_factory=dict)


_COMMON = ("weights", "lam", "out_dtype", "backend", "quantize")
_SPARSE = {None: (), "magnitude": ("density", "threshold"), "outliers": ("density", "gamma"),
           "random": ("density", "seed"), "della": ("density", "epsilon", "seed")}
# defaults that are the method's own rather than fastmerge.merge's (epsilon: DELLA's 0.15 here,
# RAM's 1e-5 in fastmerge/methods/ram.py)
_SPARSE_DEFAULTS = {"della": {"epsilon": 0.15}}


def _gta(name, consensus, sparsify, normalize, rescale) -> Method:
    params = _COMMON + ("normalize",) + (("rescale",) if sparsify else ()) + _SPARSE[sparsify]
    return Method(name, "gta", params, consensus=consensus, sparsify=sparsify,
                  normalize=normalize, rescale=rescale, defaults=dict(_SPARSE_DEFAULTS.get(sparsify, {})))


def _method(module) -> Method:
    """The entry of a :mod:`fastmerge.methods` module, read off its ``CONTRACT`` and ``PARAMS``."""
    name = module.__name__.rpartition(".")[2]
    c = module.CONTRACT
    return Method(name, "method", tuple(module.PARAMS) + ("out_dtype", "backend", "quantize"),
                  reference=f"{module.__name__}:reference", base=c["base"],
                  min_models=c["min_models"], max_models=c["max_models"],
                  kernels=tuple(getattr(module, "KERNELS", ())),
                  defaults=dict(module.PARAMS))


def _svd(name) -> Method:
    return Method(name, "svd", _COMMON + ("alpha", "exact", "seed", "common_space_fraction"),
                  reference="fastmerge.lowrank:merge", kernels=(),
                  defaults={"common_space_fraction": 0.8})


REGISTRY = {m.name: m for m in (
    # name, consensus, sparsification, default normalize, default rescale (mergekit 0.1.5)
    _gta("task_arithmetic", None, None, False, False),
    _gta("ties", "sum", "magnitude", True, False),
    _gta("dare_ties", "sum", "random", False, True),
    _gta("dare_linear", None, "random", False, True),
    _gta("breadcrumbs", None, "outliers", False, False),
    _gta("breadcrumbs_ties", "sum", "outliers", False, False),
    _gta("della", "sum", "della", True, True),
    _gta("della_linear", None, "della", False, True),
    Method("linear", "linear", _COMMON + ("normalize",), normalize=True, base="optional"),
    _svd("tsv"),
    _svd("iso_c"),
    _svd("iso_cts"),
    *(_method(m) for m in _methods.MODULES),
)}

METHODS = tuple(REGISTRY)


def get(name) -> Method:
    """The entry of ``name``; ValueError listing the methods for an unknown name."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return REGISTRY[name]


def names(family: Optional[str] = None, *, kernels: Optional[bool] = None) -> tuple:
    """Method names, optionally of one family and/or with (or without) fused kernels."""
    return tuple(m.name for m in REGISTRY.values()
                 if (family is None or m.family == family) and (kernels is None or bool(m.kernels) == kernels))


# every keyword argument of fastmerge.merge besides method/base/models: the torch.library
# schema of fastmerge::merge carries exactly these
ALL_PARAMS = tuple(dict.fromkeys(p for m in REGISTRY.values() for p in m.params))
