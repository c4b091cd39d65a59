"""Revertible monkey-patches shared by the PEFT and mergekit integrations.

A :class:`Patch` is a list of ``(owner, attribute, replacement)`` triples applied together:
applying twice is a no-op, reverting restores the very objects that were there before (identity,
not a copy), and every replacement keeps its original as ``__wrapped__``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import warnings
from typing import Callable, List, Optional, Tuple

import torch

from .. import _registry, dispatch
from .._validate import SUPPORTED_DTYPES, needs_grad

RNG_MODES = ("philox", "torch")


def rng_mode(rng) -> str:
    """``patch(rng=...)``: ``"philox"`` (fastmerge's seeded counter-based stream, the fast path)
    or ``"torch"`` (the library's own ``torch.bernoulli`` draws, reproducing it bit for bit)."""
    if not isinstance(rng, str) or rng not in RNG_MODES:
        raise ValueError(f"rng must be one of {', '.join(map(repr, RNG_MODES))}, got {rng!r}")
    return rng


def require(module: str, dist: str, tested: Tuple[int, int], allow_untested: bool):
    """Import ``module`` (from distribution ``dist``) or raise a clear ImportError; refuse
    versions other than the tested ``major.minor`` unless ``allow_untested``: the semantics
    fastmerge reproduces were read from that release, and a silent mismatch is worse than none."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"fastmerge.integrations.{dist}.patch() needs {dist}, which is not importable here "
            f"({exc}); install it with `pip install {dist}=={tested[0]}.{tested[1]}.*`"
        ) from exc
    version = importlib.metadata.version(dist)
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if major_minor != tuple(tested) and not allow_untested:
        raise RuntimeError(
            f"{dist} {version} is installed but fastmerge's {dist} integration is tested with "
            f"{dist} {tested[0]}.{tested[1]}.x only; its merge semantics may differ. Install "
            f"{dist}=={tested[0]}.{tested[1]}.* or call patch(allow_untested=True) to try anyway."
        )
    return mod


_warned = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def fused_can_take(tensors, op: str = "merge") -> bool:
    """Whether fastmerge's fused path can stand in for the library on these tensors: all are
    fp32/fp16/bf16 tensors; none needs an autograd graph (fastmerge's kernels record none, and
    differentiating through a merge is rare but must not silently lose its gradient); and a
    fused backend serves their device (``auto`` or the ``FASTMERGE_BACKEND`` choice resolves to
    something other than the torch reference -- where none does, as on a GPU without Triton or a
    CUDA toolkit, the library's own code is at least as fast as fastmerge's reference).

    ``op``: a method of :mod:`fastmerge.methods` is fused only where its registry entry lists
    the chosen backend among its ``kernels`` (elsewhere fastmerge would run its reference)."""
    tensors = list(tensors)
    if not tensors or not all(isinstance(t, torch.Tensor) and t.dtype in SUPPORTED_DTYPES
                              for t in tensors):
        return False
    if needs_grad(tensors):
        return False
    chosen = dispatch.resolve(None, tensors[0].device, op)
    entry = _registry.REGISTRY.get(op)
    if entry is not None and entry.family == "method":
        return chosen in entry.kernels
    return chosen != "torch"


def replacing(original: Callable):
    """Decorator: give a replacement ``original``'s name, docstring, signature and
    ``__wrapped__``, and the mark :meth:`Patch.apply` uses to refuse patching twice."""

    def decorate(fn: Callable) -> Callable:
        fn = functools.wraps(original)(fn)
        fn.__fastmerge_patch__ = True
        return fn

    return decorate


def with_fallback(fast: Callable, original: Callable, covered: Callable, library: str) -> Callable:
    """A function with ``original``'s name, docstring and signature that runs ``fast`` when
    ``covered(*args, **kwargs)`` is true and ``original`` otherwise.

    Calls fastmerge refuses are handed to ``original`` too (after one warning), because a drop-in
    must not turn a run that used to finish into an error: non-finite inputs and results
    (``NonFiniteError``: fastmerge refuses them, the library propagates them), and every
    other ValueError or TypeError of fastmerge's argument checks (a ``nan`` or ``1e300`` weight,
    a weight sum that cancels in fp32, ...). Those checks run before any kernel, and the
    library then either computes its own result or raises its own error, as it did unpatched."""
    label = f"{library}'s own {getattr(original, '__qualname__', original)}"

    @replacing(original)
    def wrapper(*args, **kwargs):
        if covered(*args, **kwargs):
            try:
                return fast(*args, **kwargs)
            except (ValueError, TypeError) as exc:  # NonFiniteError is a ValueError
                _warn_once(f"fastmerge: {exc}; running {label} instead")
        return original(*args, **kwargs)

    return wrapper


class Patch:
    """The replacements one integration makes, applied and reverted as a unit."""

    def __init__(self, library: str):
        self.library = library
        self._saved: List[tuple] = []  # (owner, name, original), in application order
        self.options: dict = {}  # the options of the patch() that applied them

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def apply(self, targets, options: Optional[dict] = None) -> None:
        """``targets``: ``(owner, name, make)`` where ``make(original)`` returns the replacement.
        Owners are modules, classes or instances, and each names an attribute the owner defines
        itself (so setting the original back restores it exactly). ``options``: those of the
        ``patch()`` call, kept in :attr:`options` while the replacements are in place."""
        if self.active:
            return
        try:
            for owner, name, make in targets:
                original = getattr(owner, name)
                if getattr(original, "__fastmerge_patch__", False):
                    raise RuntimeError(f"{owner!r}.{name} is already patched by another fastmerge "
                                       "Patch object")
                self._saved.append((owner, name, original))
                setattr(owner, name, make(original))
        except BaseException:
            self.revert()
            raise
        self.options = dict(options or {})

    def revert(self) -> None:
        self.options = {}
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)



def controls(patch_obj: Patch, patch_fn: Callable):
    """The ``unpatch, is_patched, patched`` functions of an integration module whose ``patch``
    is ``patch_fn`` (``patched(**options)`` passes the options to it) and whose replacements
    ``patch_obj`` holds."""
    library = patch_obj.library

    def unpatch() -> None:
        patch_obj.revert()

    def is_patched() -> bool:
        return patch_obj.active

    @contextlib.contextmanager
    def patched(**options):
        was_active = patch_obj.active
        patch_fn(**options)
        try:
            yield
        finally:
            if not was_active:  # a block inside an explicit patch() leaves it in place
                patch_obj.revert()

    unpatch.__doc__ = f"Restore {library}'s own code (the identical objects). A no-op when not patched."
    is_patched.__doc__ = f"Whether {library} is patched now."
    patched.__doc__ = (f"Context manager: {library} patched (``patch(**options)``) inside the ``with`` "
                       "block and restored after it (unless it was patched before the block).")
    return unpatch, is_patched, patched
