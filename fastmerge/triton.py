"""The ``triton`` backend: the Triton kernels of ``fastmerge.triton_kernels`` driven by
:mod:`fastmerge.gpu`. Runs on CUDA tensors, or on CPU tensors inside Triton's interpreter
(``TRITON_INTERPRET=1``, how CI tests the kernels without a GPU).

``triton`` is imported on first use, never by ``import fastmerge``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from . import gpu

_NAME = "fastmerge.triton_kernels"


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
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels")
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
