"""The ``cpu`` backend's kernels for the :mod:`fastmerge.methods` methods' ``fused`` plans
(C++ in ``csrc/``, one file per kernel). Each function takes the validated inputs read in place
and returns a small host result or the merged tensor in ``out_dtype``."""
from __future__ import annotations


# ---- elementwise merges (nearswap, ram, ramplus_tl, passthrough, sce) -----------------------
# csrc/nearswap.cpp, ram.cpp, passthrough.cpp (declared in csrc/elementwise.h). Each reads its
# inputs in place (a non-contiguous one is made contiguous first), computes in fp32, writes one
# tensor in out_dtype and returns a non-finite flag per input: models in order, then base.
# (this section's imports stand with it, under their own names)
from .. import _validate as _V  # noqa: E402
from .. import abi as _abi  # noqa: E402
from . import _host as _ew_host  # noqa: E402
from . import _native as _ew_native  # noqa: E402


def _ew_prepare(base, models, out_dtype):
    """Contiguous inputs, the empty output, its element count and the native module."""
    ref = base if base is not None else models[0]
    out = ref.new_empty(ref.shape, dtype=out_dtype)
    contig = [t if t is None or t.is_contiguous() else t.contiguous() for t in [base, *models]]
    return contig[0], contig[1:], out, out.numel(), _ew_native.lib()


def _ew_raise(flags, k: int) -> None:
    """``NonFiniteError`` naming the first flagged input (``models[i]`` ..., then ``base``)."""
    _ew_host.raise_nonfinite(flags, _V.input_names(None, k) + ["base"])


def nearswap(base, model, *, t: float, out_dtype):
    """mergekit's nearswap of ``model`` toward ``base`` (:mod:`fastmerge.methods.nearswap`)."""
    base, (model,), out, n, lib = _ew_prepare(base, [model], out_dtype)
    if n:
        _ew_raise(lib.nearswap(base.data_ptr(), model.data_ptr(), _abi.dtype_code(base.dtype),
                               out.data_ptr(), _abi.dtype_code(out_dtype), n, t, _ew_native.threads(n)), 1)
    return out


def ram(base, models, *, epsilon: float, out_dtype, amplify=None):
    """RAM's merge (:mod:`fastmerge.methods.ram`), one pass; no models: base in ``out_dtype``.

    RAM+ (:mod:`fastmerge.methods.ramplus_tl`) passes ``amplify(shared, unique) -> lam``: a
    first pass counts, per model, the elements it changes that others change too (``shared``)
    and that it alone changes (``unique``), then the merge amplifies its unique deltas by
    ``lam[k]``."""
    if not models:
        return scaled_copy(base, scale=1.0, out_dtype=out_dtype, name="base")
    base, models, out, n, lib = _ew_prepare(base, models, out_dtype)
    K, ptrs, dt = len(models), [m.data_ptr() for m in models], _abi.dtype_code(base.dtype)
    lam = []
    if amplify is not None:
        res = lib.ram_counts(base.data_ptr(), ptrs, dt, n, epsilon, _ew_native.threads(n)) if n else [0] * (3 * K + 1)
        _ew_raise(res[2 * K:], K)
        lam = list(amplify(res[0:2 * K:2], res[1:2 * K:2]))
    if n:
        flags = lib.ram_merge(base.data_ptr(), ptrs, dt, out.data_ptr(), _abi.dtype_code(out_dtype), n,
                              epsilon, lam, _ew_native.threads(n))
        _ew_raise(flags, K)
    return out


def scaled_copy(x, *, scale: float, out_dtype, name: str = "models[0]"):
    """``scale * x`` in ``out_dtype`` (``scale`` 1: an exact copy); inf/nan raise naming ``name``."""
    _, (x,), out, n, lib = _ew_prepare(None, [x], out_dtype)
    if n:
        flags = lib.scaled_copy(x.data_ptr(), _abi.dtype_code(x.dtype), out.data_ptr(),
                                _abi.dtype_code(out_dtype), n, scale, _ew_native.threads(n))
        _ew_host.raise_nonfinite(flags, [name])
    return out
