"""Backend registry and dispatch: ``backend=`` / ``FASTMERGE_BACKEND`` in {auto, torch, cpu,
triton, cuda}.

The native CPU module is optional: when it is missing or fails to load, ``import fastmerge``
still works, one warning says why, and the ``torch`` reference serves every op. A tensor is never
copied between devices behind the user's back: asking a CPU backend to work on GPU tensors is
an error.
"""
from __future__ import annotations

import importlib
import os
import warnings

NAMES = ("auto", "torch", "cpu", "triton", "cuda")

_native = None
_native_error = None


def _load_native():
    """Import the C++ extension, preferring the AVX2 build on CPUs that have AVX2."""
    global _native, _native_error
    if os.environ.get("FASTMERGE_DISABLE_NATIVE") == "1":
        _native_error = "disabled by FASTMERGE_DISABLE_NATIVE=1"
        warnings.warn(f"fastmerge: native CPU kernels {_native_error}; the torch reference serves every op.",
                      RuntimeWarning, stacklevel=3)
        return
    errors = []
    candidates = ["fastmerge._C"]
    if _cpu_has_avx2():
        candidates.insert(0, "fastmerge._C_avx2")
    for name in candidates:
        try:
            _native = importlib.import_module(name)
            _native_error = None
            return
        except ImportError as exc:  # missing build, wrong ABI, missing libgomp ...
            errors.append(f"{name}: {exc}")
    _native_error = "; ".join(errors)
    warnings.warn(
        "fastmerge: the native CPU kernels could not be loaded, so the (slow) torch reference "
        f"backend will serve every op. Reinstall with `pip install .` to build them. ({_native_error})",
        RuntimeWarning,
        stacklevel=3,
    )


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx2" in flags and "f16c" in flags and "fma" in flags
    except OSError:
        pass
    return False


_load_native()


def native():
    return _native


def backends() -> dict:
    """Which backends this machine can run, and why not where it cannot.

    Returns ``{name: {"available": bool, "reason": str}}``.
    """
    import torch

    out = {"torch": {"available": True, "reason": "pure PyTorch reference; every op, every device"}}
    if _native is not None:
        out["cpu"] = {"available": True, "reason": f"C++/OpenMP kernels ({_native.__name__}, "
                      f"{_native.isa()}, {_native.max_threads()} OpenMP threads)"}
    else:
        out["cpu"] = {"available": False, "reason": f"native module not loaded: {_native_error}"}
    gpu = "no CUDA device visible to torch" if not torch.cuda.is_available() else None
    reason = gpu or "GPU kernels are not part of this release yet"
    out["triton"] = {"available": False, "reason": reason}
    out["cuda"] = {"available": False, "reason": reason}
    return out


def resolve(backend, device) -> str:
    """The concrete backend name for tensors on ``device``."""
    name = backend if backend is not None else os.environ.get("FASTMERGE_BACKEND", "auto")
    if not isinstance(name, str) or name.lower() not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(NAMES)}; got {name!r}")
    name = name.lower()
    if name == "auto":
        # Measured (bench/results/cpu_*.json): the fused C++ kernels beat the reference on
        # every op and shape on CPU, so auto picks them whenever they are built.
        return "cpu" if device.type == "cpu" and _native is not None else "torch"
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(
                f"backend='cpu' runs on CPU tensors, but the inputs are on {device}; "
                "use backend='auto' or move the tensors"
            )
        if _native is None:
            raise RuntimeError(f"backend='cpu' is not available: {_native_error}")
    if name in ("triton", "cuda"):
        raise RuntimeError(f"backend={name!r} is not available: {backends()[name]['reason']}")
    return name


def module(name: str):
    if name == "cpu":
        from . import cpu

        return cpu
    from . import reference

    return reference
