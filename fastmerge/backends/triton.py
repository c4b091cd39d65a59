"""The ``triton`` backend: the Triton kernels of ``fastmerge.triton_kernels`` driven by
:mod:`fastmerge.backends._gpu`. Runs on CUDA tensors, or on CPU tensors inside Triton's interpreter
(``TRITON_INTERPRET=1``, how CI tests the kernels without a GPU).

``triton`` is imported on first use, never by ``import fastmerge``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys

from . import _gpu as gpu

NAME = "triton"
_NAME = "fastmerge.triton_kernels"
MIN_VERSION = (3, 6)  # oldest Triton the kernels are tested with (tuple args, histogram masks)


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def version():
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


def interpreter() -> bool:
    """``TRITON_INTERPRET=1``: Triton runs kernels in its interpreter, on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def status() -> dict:
    import torch

    ver = version()
    if ver is None:
        return {"available": False, "reason": "triton is not installed (pip install 'triton>=3.6')"}
    if ver != "unknown" and _version_tuple(ver) < MIN_VERSION:
        return {"available": False, "reason": f"triton {ver} is older than 3.6, the oldest release "
                                              "these kernels support"}
    if interpreter():
        return {"available": True, "interpreter": True,
                "reason": f"Triton {ver} interpreter (TRITON_INTERPRET=1): the kernels run on CPU "
                          "tensors, slowly; for tests"}
    if not torch.cuda.is_available():
        return {"available": False, "reason": f"no CUDA device visible to torch (triton {ver} is installed)"}
    return {"available": True, "reason": f"Triton {ver} kernels (fastmerge.triton_kernels) on "
                                         f"{_device_name(torch.cuda.current_device())}"}


def kernels():
    """``fastmerge.triton_kernels``: installed by ``pip install .`` (setup.py maps
    triton_kernels/ there); from a source tree, ``triton_kernels/`` next to the package,
    loaded under the same name so its relative imports work."""
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    try:
        return importlib.import_module(_NAME)
    except ModuleNotFoundError as exc:
        if exc.name != _NAME:
            raise  # triton itself (or one of its dependencies) is missing
    here = os.path.dirname(os.path.abspath(__file__))  # fastmerge/backends
    src = os.path.join(os.path.dirname(os.path.dirname(here)), "triton_kernels")
    spec = importlib.util.spec_from_file_location(_NAME, os.path.join(src, "__init__.py"),
                                                  submodule_search_locations=[src])
    if spec is None:
        raise ModuleNotFoundError(f"{_NAME} is not installed; reinstall fastmerge", name=_NAME)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_NAME]
        raise
    return module


def run_plan(plan, base, inputs, out_dtype):
    return gpu.run_plan(kernels(), plan, base, inputs, out_dtype)


def elect_sign(tensors, weights, method):
    return gpu.elect_sign(kernels(), tensors, weights, method)


def disjoint_merge(tensors, sign, weights, divisor, out_dtype):
    return gpu.disjoint_merge(kernels(), tensors, sign, weights, divisor, out_dtype)


def magnitude_threshold(x, k):
    return gpu.magnitude_threshold(kernels(), x, k)


def quantize(w, cfg, name="w"):
    return gpu.quantize(kernels(), w, cfg, name)


def run_plan_quantized(plan, base, inputs, out_dtype, cfg):
    return gpu.run_plan_quantized(kernels(), plan, base, inputs, out_dtype, cfg)
