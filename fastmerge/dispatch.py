"""Backend registry and dispatch: ``backend=`` / ``FASTMERGE_BACKEND`` in {auto, torch, cpu,
triton, cuda}.

The native CPU module is optional: when it is missing or fails to load, ``import fastmerge``
still works, one warning says why, and the ``torch`` reference serves every op. A tensor is never
copied between devices behind the user's back: asking a CPU backend to work on GPU tensors is
an error.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
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


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


TRITON_MIN = (3, 6)  # oldest Triton the kernels are tested with (tuple args, histogram masks)


@functools.lru_cache(maxsize=None)
def triton_version():
    """The installed Triton's version string, or None when ``triton`` cannot be imported.
    Looks at the distribution metadata only: importing triton takes a while and
    ``import fastmerge`` must not pay for it."""
    try:
        if importlib.util.find_spec("triton") is None:
            return None
    except (ImportError, ValueError):  # a broken install, or sys.modules["triton"] = None
        return None
    from importlib import metadata

    for dist in ("triton", "pytorch-triton", "triton-nightly"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def triton_interpreter() -> bool:
    """``TRITON_INTERPRET=1``: Triton runs kernels in its interpreter, on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _triton_status(torch) -> dict:
    ver = triton_version()
    if ver is None:
        return {"available": False, "reason": "triton is not installed (pip install 'triton>=3.6')"}
    if ver != "unknown" and _version_tuple(ver) < TRITON_MIN:
        return {"available": False, "reason": f"triton {ver} is older than 3.6, the oldest release "
                                              "these kernels support"}
    if triton_interpreter():
        return {"available": True, "interpreter": True,
                "reason": f"Triton {ver} interpreter (TRITON_INTERPRET=1): the kernels run on CPU "
                          "tensors, slowly; for tests"}
    if not torch.cuda.is_available():
        return {"available": False, "reason": f"no CUDA device visible to torch (triton {ver} is installed)"}
    return {"available": True, "reason": f"Triton {ver} kernels (fastmerge.triton_kernels) on "
                                         f"{_device_name(torch.cuda.current_device())}"}


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def _status(name: str) -> dict:
    """``backends()[name]`` for a GPU backend, without computing the others (the dispatch of
    every GPU call asks)."""
    import torch

    if name == "triton":
        return _triton_status(torch)
    from . import cuda

    return cuda.status()


def backends() -> dict:
    """Which backends this machine can run, and why not where it cannot.

    Returns ``{name: {"available": bool, "reason": str}}``; the ``triton`` entry also carries
    ``"interpreter": True`` when it runs in Triton's interpreter (CPU tensors, tests only).
    """
    out = {"torch": {"available": True, "reason": "pure PyTorch reference; every op, every device"}}
    if _native is not None:
        out["cpu"] = {"available": True, "reason": f"C++/OpenMP kernels ({_native.__name__}, "
                      f"{_native.isa()}, {_native.max_threads()} OpenMP threads)"}
    else:
        out["cpu"] = {"available": False, "reason": f"native module not loaded: {_native_error}"}
    out["triton"] = _status("triton")
    out["cuda"] = _status("cuda")
    return out


# ``auto`` on CUDA tensors, per op: the backends to try in order.
#
# UNMEASURED: no GPU was available when this table was written, so it rests on design, not on
# figures. ``python -m bench.gpu`` measures every op on both GPU backends (rows in
# bench/results/gpu_*.json); replace this table with what it finds. The reasoning until then:
# * selection ops (ties, breadcrumbs*, magnitude_*): triton. Its top-k brackets the threshold
#   from a sample and then needs ONE streaming pass; the CUDA radix select needs three
#   histogram passes (plus a tie scan when ties straddle the threshold).
# * streaming ops (task_arithmetic, linear, dare_*, della*, random_drop, elect_sign,
#   disjoint_merge): one pass on either backend; triton, because its kernels compile in seconds
#   on first use where the CUDA extension's first build (nvcc) takes minutes.
# cuda is the choice when triton is missing; torch (on the GPU) when neither is.
AUTO_CUDA = {op: ("triton", "cuda") for op in (
    "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "linear", "magnitude_threshold", "magnitude_prune", "random_drop",
    "elect_sign", "disjoint_merge", "peft")}


def _auto(device, op) -> str:
    if device.type == "cpu":
        # Measured (bench/results/cpu_*.json): the fused C++ kernels beat the reference on
        # every op and shape on CPU, so auto picks them whenever they are built.
        return "cpu" if _native is not None else "torch"
    if device.type == "cuda":
        for name in AUTO_CUDA.get(op, ("triton", "cuda")):
            info = _status(name)
            if info["available"] and not info.get("interpreter"):
                return name
    return "torch"


def resolve(backend, device, op: str = "merge") -> str:
    """The concrete backend name for op ``op`` on tensors on ``device``. Never moves data: a
    backend that cannot run on ``device`` is an error that says so."""
    name = backend if backend is not None else os.environ.get("FASTMERGE_BACKEND", "auto")
    if not isinstance(name, str) or name.lower() not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(NAMES)}; got {name!r}")
    name = name.lower()
    if name == "auto":
        return _auto(device, op)
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(
                f"backend='cpu' runs on CPU tensors, but the inputs are on {device}; "
                "use backend='auto' or move the tensors"
            )
        if _native is None:
            raise RuntimeError(f"backend='cpu' is not available: {_native_error}")
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
    """The module implementing backend ``name`` (``run_plan``, ``elect_sign``,
    ``disjoint_merge``, ``magnitude_threshold``). ``cuda`` builds its extension on first use;
    if the build fails it warns once and the Triton kernels (or, without Triton, the torch
    reference) serve instead."""
    if name == "cpu":
        from . import cpu

        return cpu
    if name == "triton":
        from . import triton

        return triton
    if name == "cuda":
        from . import cuda

        if cuda.extension() is not None:
            return cuda
        from . import reference, triton

        return triton if triton_version() is not None else reference
    from . import reference

    return reference


def for_op(backend, device, op: str = "merge"):
    """``module(resolve(backend, device, op))``."""
    return module(resolve(backend, device, op))
