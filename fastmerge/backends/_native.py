"""Loads the native CPU module (``fastmerge._C_avx2`` or ``fastmerge._C``, built from csrc/).

Its absence never breaks ``import fastmerge``: when it is missing or fails to load, one warning
says why and the ``torch`` reference serves every op (as bitsandbytes loads its native library).
The module takes raw data pointers and never links libtorch.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

_native = None
_error = None


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


def _load():
    """Import the C++ extension, preferring the AVX2 build on CPUs that have AVX2."""
    global _native, _error
    if os.environ.get("FASTMERGE_DISABLE_NATIVE") == "1":
        _error = "disabled by FASTMERGE_DISABLE_NATIVE=1"
        warnings.warn(f"fastmerge: native CPU kernels {_error}; the torch reference serves every op.",
                      RuntimeWarning, stacklevel=3)
        return
    errors = []
    candidates = ["fastmerge._C"]
    if _cpu_has_avx2():
        candidates.insert(0, "fastmerge._C_avx2")
    for name in candidates:
        try:
            _native = importlib.import_module(name)
            _error = None
            return
        except ImportError as exc:  # missing build, wrong ABI, missing libgomp ...
            errors.append(f"{name}: {exc}")
    _error = "; ".join(errors)
    warnings.warn(
        "fastmerge: the native CPU kernels could not be loaded, so the (slow) torch reference "
        f"backend will serve every op. Reinstall with `pip install .` to build them. ({_error})",
        RuntimeWarning,
        stacklevel=3,
    )


_load()


def lib():
    """The loaded native module, or None."""
    return _native


def error():
    """Why the native module is not loaded (None when it is)."""
    return _error


# Below this many elements per thread, waking another OpenMP thread costs more than it saves
# (and on a loaded machine the wake-up can wait a whole scheduler tick): LoRA factors and
# norm vectors run on one thread.
MIN_PER_THREAD = 1 << 17


def threads(n: int) -> int:
    """OpenMP threads for a kernel over ``n`` elements: torch's thread count, capped so each
    thread has at least ``MIN_PER_THREAD`` elements."""
    return max(1, min(torch.get_num_threads(), n // MIN_PER_THREAD))
