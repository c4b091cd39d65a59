"""The kernels' integer codes have one source, ``fastmerge/abi.py``.

* ``csrc/abi.h`` (included by the C++ and CUDA kernels) is what ``python -m fastmerge.abi``
  generates, in the checkout and in an installed ``fastmerge/_csrc``;
* no other file under ``csrc/`` declares an enum or writes one of those codes by hand;
* the Triton kernels' constants are ``abi``'s, and their sources compare no code parameter
  with a bare number.
"""
from __future__ import annotations

import importlib
import pathlib
import re

import pytest

import fastmerge
from fastmerge import abi

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
TRITON_SRC = ROOT / "triton_kernels"

# every name abi.h defines: the enumerators and the two constants
CODE_NAMES = {name for codes in abi.ENUMS.values() for name in codes} | {"NONE_T", "MAX_K"}


def _code(path: pathlib.Path) -> str:
    """C/C++/CUDA source without its comments (string literals are left alone)."""
    text = re.sub(r"/\*.*?\*/", " ", path.read_text(), flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _sources():
    return sorted(p for p in CSRC.iterdir()
                  if p.suffix in (".h", ".cpp", ".cu", ".cuh") and p.name != "abi.h")


def test_header_is_generated_from_abi():
    assert (CSRC / "abi.h").read_text() == abi.header(), (
        "csrc/abi.h is stale: regenerate it with `python -m fastmerge.abi > csrc/abi.h`")


def test_installed_sources_ship_the_header():
    # pip install puts the CUDA sources in fastmerge/_csrc (setup.py's package_data); they
    # include abi.h, so it must be there too (a source tree has no _csrc: nothing to check)
    shipped = pathlib.Path(fastmerge.__file__).parent / "_csrc"
    if not (shipped / "cuda_kernels.h").exists():
        pytest.skip("fastmerge runs from a source tree (no fastmerge/_csrc)")
    assert (shipped / "abi.h").read_text() == abi.header()


def test_kernel_headers_include_abi():
    for name in ("common.h", "cuda_kernels.h"):
        assert re.search(r'^#include "abi\.h"', (CSRC / name).read_text(), re.M), name


def test_no_hand_written_codes_in_csrc():
    names = "|".join(sorted(CODE_NAMES | {"SENTINEL_NONE"}))
    # an enumerator or constant initialised (`NAME = ...`, not `NAME == ...`), or #defined
    redefined = re.compile(rf"\b({names})\s*=(?!=)|#\s*define\s+({names})\b")
    problems = []
    for path in _sources():
        code = _code(path)
        for m in re.finditer(r"\benum\b[^;{]*\{", code):
            problems.append(f"{path.name}: declares `{m.group(0)}`")
        for m in redefined.finditer(code):
            problems.append(f"{path.name}: defines {m.group(1) or m.group(2)}")
    assert not problems, ("csrc/ must take its codes from abi.h (generated from fastmerge/abi.py; "
                          "add a code there and regenerate): " + "; ".join(problems))


def test_no_bare_code_comparisons_in_triton_sources():
    # a code parameter of the kernels or launchers compared with a number, e.g. `CONSENSUS == 1`
    params = r"CONSENSUS|DIVISOR|SCALE_MODE|NORM|norm|KIND|KINDS\[\w+\]|LAYOUT|DT"
    bare = re.compile(rf"\b({params})\s*[!=]=\s*\d")
    problems = [f"{p.name}:{n}: {line.strip()}"
                for p in sorted(TRITON_SRC.glob("*.py"))
                for n, line in enumerate(p.read_text().splitlines(), 1)
                if bare.search(line.split("#", 1)[0])]
    assert not problems, "compare with the fastmerge.abi codes instead: " + "; ".join(problems)


def _triton_kernels():
    """``fastmerge.triton_kernels``, loaded by the triton backend's own loader (installed, or
    ``triton_kernels/`` of a source tree under that name). conftest has set TRITON_INTERPRET=1
    on machines without CUDA before anything imported Triton."""
    for name in ("fastmerge.backends.triton", "fastmerge.triton"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # not this layout of the package
            raise
        if hasattr(module, "kernels"):
            return module.kernels()
    pytest.fail("no triton backend module with a kernels() loader found")


def test_triton_constants_are_abi_codes():
    pytest.importorskip("triton")
    import triton.language as tl

    K = _triton_kernels()
    prefixes = tuple(e + "_" for e in abi.ENUM_NAMES)
    seen = {}
    for mod in ("_common", "fused_merge", "mask_norms", "della", "magnitude_select", "quant"):
        module = importlib.import_module(f"{K.__name__}.{mod}")
        for name, value in vars(module).items():
            if isinstance(value, tl.constexpr):
                value = value.value
            if not (name in CODE_NAMES or name.startswith(prefixes)):
                continue
            assert name in CODE_NAMES, f"{mod}.{name} is not a fastmerge.abi code"
            assert isinstance(value, int) and value == getattr(abi, name), (mod, name, value)
            seen[name] = value
    # the codes the kernels branch on are there (and were checked above)
    for name in ("MASK_RANGE", "MASK_RANDOM", "MASK_BITS", "MASK_ZERO", "NORM_L2", "NORM_LINF",
                 "CONSENSUS_NONE", "CONSENSUS_GIVEN", "DIVISOR_CONST", "SCALE_DIV",
                 "QUANT_INT4_GPTQ", "DTYPE_BF16"):
        assert name in seen, name
