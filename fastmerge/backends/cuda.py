"""The ``cuda`` backend: the CUDA kernels of ``csrc/cuda_kernels.cu`` driven by
:mod:`fastmerge.backends._gpu`.

Build: on first use, with ``torch.utils.cpp_extension.load`` (nvcc from ``CUDA_HOME``, the
architectures of ``TORCH_CUDA_ARCH_LIST`` or of the visible GPU), cached by torch under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) and rebuilt only when the
sources change. The sources ship inside the wheel (``fastmerge/_csrc``). The kernels take raw
device pointers (no torch headers in the kernels or the binding). If the build fails,
:func:`extension` warns once and ``fastmerge.dispatch.module("cuda")`` hands GPU ops to the
Triton kernels (or, without Triton, to the torch reference on the GPU) -- never a crash.

Selection here is the histogram radix select (three digit passes with per-block shared-memory
histograms, then the tie scan by lowest index); the merge pass gives each thread a group of four
elements, so one Philox call serves four elements, with vector loads where inputs allow.
"""
from __future__ import annotations

import os
import warnings

import torch

from .. import abi
from . import _gpu as gpu

NAME = "cuda"
_DT = abi.dtype_code
SOURCES = ("cuda_kernels.cu", "cuda_bindings.cpp")
MAX_K = abi.MAX_K

_ext = None
_error = None  # why the extension is not usable (set once a build has failed)
_tried = False


def sources_dir():
    """``fastmerge/_csrc`` when installed, ``csrc/`` next to the package in a source tree."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fastmerge/
    for d in (os.path.join(pkg, "_csrc"), os.path.join(os.path.dirname(pkg), "csrc")):
        if all(os.path.isfile(os.path.join(d, f)) for f in SOURCES):
            return d
    return None


def status() -> dict:
    """Whether the cuda backend can serve this machine, without building anything."""
    if _error is not None:
        # build_failed: backend="cuda" still resolves, and dispatch hands the ops to Triton
        return {"available": False, "build_failed": _tried,
                "reason": f"the CUDA kernels are not available: {_error}"}
    if not torch.cuda.is_available():
        return {"available": False, "reason": "no CUDA device visible to torch"}
    if torch.version.cuda is None:
        return {"available": False, "reason": "this torch build has no CUDA support (ROCm or CPU)"}
    if sources_dir() is None:
        return {"available": False, "reason": "the CUDA sources (csrc/cuda_kernels.cu) are not installed"}
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return {"available": False, "reason": "no CUDA toolkit found (set CUDA_HOME to one with nvcc); "
                                              "the triton backend serves GPU tensors"}
    if _ext is not None:
        return {"available": True, "reason": f"CUDA kernels built from {sources_dir()} ({_ext.__file__})"}
    return {"available": True, "reason": f"CUDA kernels from {sources_dir()}, built on first use with "
                                         f"{CUDA_HOME}/bin/nvcc and cached by torch.utils.cpp_extension"}


def extension():
    """The built extension module, building it on first call; None (after one warning) when it
    cannot be built."""
    global _ext, _error, _tried
    if _ext is not None or _tried:
        return _ext
    _tried = True
    reason = status()
    if not reason["available"]:
        _error = reason["reason"]
    else:
        try:
            from torch.utils.cpp_extension import load

            src = sources_dir()
            _ext = load(
                name="fastmerge_cuda",
                sources=[os.path.join(src, f) for f in SOURCES],
                extra_include_paths=[src],
                extra_cflags=["-O3"],
                # every fp32 multiply/add is rounded separately (the kernels also use the _rn
                # intrinsics): results must match the reference bit for bit
                extra_cuda_cflags=["-O3", "--fmad=false"],
                verbose=os.environ.get("FASTMERGE_CUDA_VERBOSE") == "1",
            )
        except Exception as exc:  # no nvcc, compiler error, unsupported arch ...
            text = f"{type(exc).__name__}: {exc}".strip()
            _error = text if len(text) < 600 else text[:600] + " ..."
        if _ext is not None:
            # a build for an architecture list without this GPU's loads fine and fails at
            # every launch ("no kernel image is available"): one launch now, before any
            # merge relies on it, and the Triton kernels serve if it fails
            try:
                _probe_launch()
            except Exception as exc:
                _ext = None
                text = f"{type(exc).__name__}: {exc}".strip()
                _error = "the built kernels do not launch on this GPU (" + text[:500] + ")"
    if _ext is None:
        warnings.warn(
            f"fastmerge: the CUDA kernels are not available ({_error}); GPU ops run on the Triton "
            "kernels instead (set FASTMERGE_CUDA_VERBOSE=1 to see the build log).",
            RuntimeWarning, stacklevel=3)
    return _ext


def _probe_launch():
    """One tiny launch of the merge kernel on the current GPU, synchronised (raises if the
    extension has no kernel image for it)."""
    t = torch.ones(8, device="cuda")
    gpu.elect_sign(_Kernels, [t], [1.0], "sum")  # reads its flags: the launch has completed
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------- kernel set


def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream


def _ptr(t):
    return t.data_ptr() if t is not None else 0


def _views(base, base_strides, xs, strides):
    return (_ptr(base), base_strides[0], base_strides[1], [x.data_ptr() for x in xs],
            [s[0] for s in strides], [s[1] for s in strides])


def _blocks(n_items: int, device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-n_items // 256), 4 * sms))


def select(base, xs, *, qm, qk, n, C, strides, base_strides, strided, flag=None):
    ext = extension()
    dev = xs[0].device
    Q = len(qm)
    if flag is None:
        flag = torch.zeros(1, dtype=torch.int32, device=dev)
    out = torch.empty(Q, 2, dtype=torch.int64, device=dev)
    ntiles = -(-n // ext.SELECT_TILE)
    hist = torch.empty(Q * ext.RADIX_BINS, dtype=torch.int64, device=dev)
    state = torch.empty(Q * 4, dtype=torch.int64, device=dev)
    counts = torch.empty(Q * ntiles, dtype=torch.int64, device=dev)
    ext.select(*_views(base, base_strides, xs, strides), _DT(xs[0].dtype), list(qm), list(qk), n, C,
               strided, out.data_ptr(), flag.data_ptr(), hist.data_ptr(), state.data_ptr(),
               counts.data_ptr(), ntiles, _stream(dev))
    return out


def mask_norms(base, xs, *, kinds, thr, probs, seed, n, C, strides, base_strides, strided, norm):
    dev = xs[0].device
    K = len(xs)
    blocks = _blocks(-(-n // 4), dev)
    partial = torch.zeros(blocks, K, 2, dtype=torch.float64, device=dev)
    extension().mask_norms(*_views(base, base_strides, xs, strides), _DT(xs[0].dtype), list(kinds),
                           [float(p) for p in probs], thr.data_ptr(), seed, n, C, strided, norm,
                           partial.data_ptr(), blocks, _stream(dev))
    if norm == 3:
        return partial.amax(dim=0)
    total = partial.sum(dim=0)
    return total.sqrt() if norm == 2 else total


def della_keep(base, x, order, *, stream, c1, c2, seed, n, L, inner, C, strides, base_strides,
               strided, norm):
    dev = x.device
    blocks = _blocks(n, dev)
    keep = torch.empty(n, dtype=torch.uint8, device=dev)
    partial = torch.zeros(blocks, 2, dtype=torch.float64, device=dev)
    extension().della_keep(_ptr(base), base_strides[0], base_strides[1], x.data_ptr(), strides[0],
                           strides[1], _DT(x.dtype), order.data_ptr(), keep.data_ptr(),
                           partial.data_ptr(), blocks, float(c1), float(c2), seed, stream, n, L, inner,
                           C, strided, norm, _stream(dev))
    if norm == 3:
        return keep, partial.amax(dim=0)
    total = partial.sum(dim=0)
    return keep, (total.sqrt() if norm == 2 else total)


def fused_merge(base, xs, out, *, kinds, thr, scale, weights, probs, keeps, seed, n, C, strides,
                base_strides, strided, scale_mode, consensus, elect_weighted, divisor, const_div,
                normalize, lam, sign=None, sign_only=False):
    dev = xs[0].device
    K = len(xs)
    flags = torch.zeros(K + 1, dtype=torch.int32, device=dev)
    esize = xs[0].element_size()
    tensors = list(xs) + ([base] if base is not None else [])
    vec = not strided and all(t.data_ptr() % (4 * esize) == 0 for t in tensors)
    extension().merge(
        *_views(base, base_strides, xs, strides), _DT(xs[0].dtype), _ptr(out),
        _DT(out.dtype) if out is not None else 0, _ptr(sign), flags.data_ptr(), thr.data_ptr(),
        scale.data_ptr(), [_ptr(k) for k in keeps], list(kinds), [float(w) for w in weights],
        [float(p) for p in probs], seed, n, C, strided, vec, scale_mode, consensus, elect_weighted,
        divisor, float(const_div), normalize, float(lam), sign_only, _stream(dev))
    return flags


class _Kernels:
    """This module's kernel functions as the kernel set :mod:`fastmerge.gpu` drives."""
    select = staticmethod(select)
    mask_norms = staticmethod(mask_norms)
    della_keep = staticmethod(della_keep)
    fused_merge = staticmethod(fused_merge)


def _check_k(K: int):
    if K > MAX_K:
        raise ValueError(f"backend='cuda' merges at most {MAX_K} inputs at once, got {K}; "
                         "use backend='triton'")


def run_plan(plan, base, inputs, out_dtype):
    _check_k(len(inputs))
    return gpu.run_plan(_Kernels, plan, base, inputs, out_dtype)


def elect_sign(tensors, weights, method):
    _check_k(len(tensors))
    return gpu.elect_sign(_Kernels, tensors, weights, method)


def disjoint_merge(tensors, sign, weights, divisor, out_dtype):
    _check_k(len(tensors))
    return gpu.disjoint_merge(_Kernels, tensors, sign, weights, divisor, out_dtype)


def magnitude_threshold(x, k):
    return gpu.magnitude_threshold(_Kernels, x, k)


_delegated = []


def _quantizers():
    """The CUDA extension has no quantizers and no fused merge->quantize: the ``triton``
    backend's serve, or the torch reference (on the GPU) without Triton. Said once, in a
    warning, so that a timing or a profile of ``backend="cuda"`` is not misread."""
    from . import torch as reference
    from . import triton

    q = triton if triton.version() is not None else reference
    if not _delegated:
        _delegated.append(q.NAME)
        warnings.warn(f"fastmerge: backend='cuda' has no quantizers of its own; quantizing runs on "
                      f"the {q.NAME!r} backend's kernels", RuntimeWarning, stacklevel=4)
    return q


def quantize(w, cfg, name="w"):
    return _quantizers().quantize(w, cfg, name)


def run_plan_quantized(plan, base, inputs, out_dtype, cfg):
    """Triton's pass (INT4 fused; FP8 merged, then quantized); without Triton, the CUDA merge,
    then the torch reference quantizer."""
    q = _quantizers()
    if q.NAME == "torch":
        return q.quantize(run_plan(plan, base, inputs, out_dtype), cfg, "the merged tensor")
    return q.run_plan_quantized(plan, base, inputs, out_dtype, cfg)
