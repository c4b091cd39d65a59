"""The integer codes that cross from the Python drivers into the kernels: the one source.

The C++ kernels (``csrc/``), the CUDA kernels and the Triton kernels all take these codes as
plain integers. This module is the only place they are written down:

* ``csrc/abi.h`` is generated from it (``python -m fastmerge.abi > csrc/abi.h``) and included
  by ``common.h``/``kernels.h`` and ``cuda_kernels.h``; ``tests/test_abi.py`` fails when the
  committed header is not what this module generates;
* ``fastmerge.triton_kernels`` reads the codes from here (``tl.constexpr(abi.MASK_RANGE)``);
* the drivers (``fastmerge.backends``) translate a :class:`~fastmerge._semantics.Plan` into
  codes with the tables below.

Bottom layer: imports nothing from fastmerge.
"""
from __future__ import annotations

import sys

# Every code, one line per enum. The C++ enumerator of the same name (``MASK_RANGE``) lives in
# namespace ``fm``.
DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_I8 = 0, 1, 2, 3  # element types the kernels read/write
# How one model's delta is masked inside the fused merge. BITS: a keep mask computed by an
# earlier pass (bit-packed on the CPU, one byte per element on the GPU), for DELLA and for DARE
# under norm matching.
MASK_NONE, MASK_ZERO, MASK_RANGE, MASK_RANDOM, MASK_BITS = 0, 1, 2, 3, 4
NORM_NONE, NORM_L1, NORM_L2, NORM_LINF = 0, 1, 2, 3  # norm-matching rescale of kept values
CONSENSUS_NONE, CONSENSUS_SUM, CONSENSUS_COUNT, CONSENSUS_GIVEN = 0, 1, 2, 3  # GIVEN: sign is an input
# What the merged sum is divided by under normalize; CONST: a number computed on the host.
DIVISOR_NONE, DIVISOR_WEIGHT, DIVISOR_COUNT, DIVISOR_CONST = 0, 1, 2, 3
SCALE_NONE, SCALE_MUL, SCALE_DIV = 0, 1, 2  # per-model scale of kept values (norm match, 1/density)
QUANT_INT4_GPTQ, QUANT_INT4_TORCHAO, QUANT_FP8 = 0, 1, 2
GRANULARITY_TENSOR, GRANULARITY_ROW, GRANULARITY_BLOCK = 0, 1, 2
FP8_FORMAT_E4M3FN, FP8_FORMAT_E5M2 = 0, 1

ENUM_NAMES = ("DTYPE", "MASK", "NORM", "CONSENSUS", "DIVISOR", "SCALE", "QUANT", "GRANULARITY",
              "FP8_FORMAT")
# {enum: {CONSTANT_NAME: code}} in definition order, read off the constants above
ENUMS = {e: {k: v for k, v in list(globals().items())
             if k.startswith(e + "_") and isinstance(v, int)
             and not any(k.startswith(o + "_") for o in ENUM_NAMES if o != e and o.startswith(e))}
         for e in ENUM_NAMES}

# A selection threshold that no 31-bit magnitude key exceeds: the empty top set.
NONE_T = 1 << 32
# Inputs per merge the GPU kernels accept (their keep decisions live in 64-bit masks).
MAX_K = 64

# ---- Python-side names -> codes (the drivers' translation tables) --------------------------
# Plan.divisor: the two weight-sum divisors are both a host constant to the kernels.
DIVISOR_OF_PLAN = {"none": DIVISOR_NONE, "weight": DIVISOR_WEIGHT, "count": DIVISOR_COUNT,
                   "sumw": DIVISOR_CONST, "sumw_exact": DIVISOR_CONST}
CONSENSUS_OF_PLAN = {None: CONSENSUS_NONE, "sum": CONSENSUS_SUM, "count": CONSENSUS_COUNT,
                     "given": CONSENSUS_GIVEN}
NORM_OF_PLAN = {None: NORM_NONE, "l1": NORM_L1, "l2": NORM_L2, "linf": NORM_LINF}
# MaskSpec.kind -> mask code: DELLA's keeps always come from a pass before the merge
MASK_OF_SPEC = {"none": MASK_NONE, "zero": MASK_ZERO, "range": MASK_RANGE, "random": MASK_RANDOM,
                "della": MASK_BITS, "given": MASK_BITS}
QUANT_OF_LAYOUT = {"gptq": QUANT_INT4_GPTQ, "torchao": QUANT_INT4_TORCHAO, "fp8": QUANT_FP8}
GRANULARITY_OF = {"tensor": GRANULARITY_TENSOR, "row": GRANULARITY_ROW, "block": GRANULARITY_BLOCK}
FP8_FORMAT_OF = {"e4m3fn": FP8_FORMAT_E4M3FN, "e5m2": FP8_FORMAT_E5M2}


def dtype_code(dtype) -> int:
    """The kernels' code for a torch floating dtype (float32, float16, bfloat16, int8)."""
    import torch

    codes = {torch.float32: DTYPE_F32, torch.float16: DTYPE_F16, torch.bfloat16: DTYPE_BF16,
             torch.int8: DTYPE_I8}
    try:
        return codes[dtype]
    except KeyError:
        raise TypeError(f"no kernel dtype code for {dtype}") from None


def header() -> str:
    """The text of ``csrc/abi.h``."""
    lines = [
        "// GENERATED from fastmerge/abi.py by `python -m fastmerge.abi > csrc/abi.h`: do not edit.",
        "// The integer codes the Python drivers pass to the C++, CUDA and Triton kernels;",
        "// tests/test_abi.py checks that this file is what fastmerge/abi.py generates.",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "namespace fm {",
        "",
    ]
    for enum, codes in ENUMS.items():
        body = ", ".join(f"{name} = {code}" for name, code in codes.items())
        lines.append(f"enum {enum.title().replace('_', '')} : int {{ {body} }};")
    lines += [
        "",
        f"constexpr int64_t NONE_T = (int64_t)1 << {NONE_T.bit_length() - 1};  "
        "// threshold no 31-bit key exceeds: empty top set",
        f"constexpr int MAX_K = {MAX_K};  // inputs per GPU merge (keep decisions in 64-bit masks)",
        "",
        "}  // namespace fm",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(header())
