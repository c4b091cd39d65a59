"""How fastmerge's arguments cross a ``torch.library`` op boundary (see :mod:`fastmerge.library`),
and whether ``torch.compile`` is tracing. Bottom layer: the public functions call these to route
to the custom ops while compiling; the op bodies call them to undo the encoding.

Per-model values cross as float lists (one entry means "the same for every model"),
``rescale`` as a string, seeds as signed 64-bit ints (two's complement of the unsigned seed),
quantization configs as a short string.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._registry import ALL_PARAMS
from .philox import resolve_seed

AVAILABLE = hasattr(torch.library, "custom_op")  # torch >= 2.4


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller (always False without custom ops)."""
    check = getattr(torch.compiler, "is_compiling", None)
    return AVAILABLE and check is not None and bool(check())


def floats(value) -> Optional[list]:
    """A per-model argument (number or sequence of numbers) as a float list; None stays None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(value)]


def unfloats(values):
    """Inverse of :func:`floats`: one entry means a scalar again."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else list(values)


def seed_in(seed) -> Optional[int]:
    if seed is None:
        return None
    seed = resolve_seed(seed)  # type and range checks, at trace time
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def seed_out(seed) -> Optional[int]:
    return None if seed is None else seed + (1 << 64) if seed < 0 else seed


def rescale_in(rescale) -> Optional[str]:
    return None if rescale is None else ("true" if rescale else "false") if isinstance(rescale, bool) else rescale


def rescale_out(rescale):
    return {"true": True, "false": False}.get(rescale, rescale)


def _same(x):
    return x


def _opt_float(x):
    return None if x is None else float(x)


def _opt_floats(x):
    return None if x is None else floats(x)


# fastmerge.merge's keyword arguments as they cross fastmerge::merge: (schema type, encode,
# decode). The schema is built from the registry's parameters with this table (library.py);
# ``quantize`` is absent: its result is a dataclass, which no op can return.
MERGE_ARGS = {
    "weights": ("float[]?", _opt_floats, unfloats),
    "density": ("float[]?", _opt_floats, unfloats),
    "lam": ("float", float, _same),
    "normalize": ("bool?", _same, _same),
    "rescale": ("str?", lambda r: rescale_in(r), lambda r: rescale_out(r)),
    "gamma": ("float[]?", _opt_floats, unfloats),
    "epsilon": ("float[]?", _opt_floats, unfloats),
    "threshold": ("float[]?", _opt_floats, unfloats),
    "seed": ("int?", lambda s: seed_in(s), lambda s: seed_out(s)),
    "out_dtype": ("ScalarType?", _same, _same),
    "backend": ("str?", _same, _same),
    "alpha": ("float?", _opt_float, _same),
    "exact": ("bool", bool, _same),
    "common_space_fraction": ("float", float, _same),
    # mergekit's other methods (fastmerge/methods/): None stands for the method's default
    "t": ("float?", _opt_float, _same),
    "nuslerp_row_wise": ("bool?", _same, _same),
    "nuslerp_flatten": ("bool?", _same, _same),
    "normalize_weights": ("bool?", _same, _same),
    "eps": ("float?", _opt_float, _same),
    "max_iter": ("int?", _same, _same),
    "tol": ("float?", _opt_float, _same),
    "filter_wise": ("bool?", _same, _same),
    "int8_mask": ("bool?", _same, _same),
    "select_topk": ("float?", _opt_float, _same),
    "r": ("float?", _opt_float, _same),
    "scale": ("float[]?", _opt_floats, unfloats),
    # the research methods (consensus_ta, consensus_ties, pcb)
    "k": ("int?", _same, _same),
    "tall_lambda": ("float[]?", _opt_floats, unfloats),
    "ratio": ("float?", _opt_float, _same),
    "min_ratio": ("float?", _opt_float, _same),
    "max_ratio": ("float?", _opt_float, _same),
    # fastmerge merge's fisher / regmean: each model's statistics folder (their merges themselves
    # are fastmerge.fisher / fastmerge.regmean)
    "fisher": ("str[]?", lambda x: None if x is None else [str(p) for p in x], _same),
    "grams": ("str[]?", lambda x: None if x is None else [str(p) for p in x], _same),
    "normalize_fisher_weight": ("bool?", _same, _same),
    "minimal_fisher_weight": ("float?", _opt_float, _same),
}
# the order of those arguments in the schema: the registry's parameter order
MERGE_PARAMS = tuple(p for p in ALL_PARAMS if p in MERGE_ARGS)
