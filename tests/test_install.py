"""Packaging behaviour: the native module is optional at import, required in CI."""
import os
import subprocess
import sys

import pytest

import fastmerge


@pytest.mark.skipif(os.environ.get("FASTMERGE_REQUIRE_NATIVE") != "1",
                    reason="set FASTMERGE_REQUIRE_NATIVE=1 (CI does) to require the built kernels")
def test_native_module_is_built():
    """CI must exercise the fused kernels, not silently fall back to the reference."""
    info = fastmerge.backends()["cpu"]
    assert info["available"], info["reason"]


def test_import_without_native_warns_once_and_torch_serves():
    code = r"""
import warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch, fastmerge
    import fastmerge.ops, fastmerge.peft
b = fastmerge.backends()
assert b["torch"]["available"] and not b["cpu"]["available"], b
assert "FASTMERGE_DISABLE_NATIVE" in b["cpu"]["reason"], b
native = [x for x in w if "native CPU kernels" in str(x.message)]
assert len(native) == 1, [str(x.message) for x in w]
base = torch.zeros(4); out = fastmerge.ties(base, [torch.ones(4), -torch.ones(4) * 2], density=1.0)
assert torch.equal(out, torch.full((4,), -2.0)), out
try:
    fastmerge.ties(base, [torch.ones(4)], backend="cpu")
except RuntimeError as e:
    assert "cpu" in str(e)
else:
    raise AssertionError("backend='cpu' must fail clearly without the native module")
print("ok")
"""
    env = dict(os.environ, FASTMERGE_DISABLE_NATIVE="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_backends_report_reasons():
    b = fastmerge.backends()
    assert set(b) == {"torch", "cpu", "triton", "cuda"}
    for name, info in b.items():
        assert isinstance(info["available"], bool)
        assert info["reason"], name


def test_bad_backend_name():
    import torch

    with pytest.raises(ValueError, match="backend"):
        fastmerge.ties(torch.zeros(3), [torch.ones(3)], backend="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            fastmerge.ties(torch.zeros(3), [torch.ones(3)], backend="cuda")


def test_baseline_native_module_has_no_avx_code():
    """``fastmerge._C`` must load on any x86-64 CPU: no AVX (ymm) instruction may leak into it
    from the AVX2 build, which compiles the same sources (setup.py gives each its own objects)."""
    import glob
    import platform
    import shutil

    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None:
        pytest.skip("objdump on x86-64 needed to read the module's code")
    pkg = os.path.dirname(fastmerge.__file__)
    paths = glob.glob(os.path.join(pkg, "_C.*.so"))
    if not paths:
        pytest.skip("the baseline native module is not built")
    asm = subprocess.run(["objdump", "-d", paths[0]], capture_output=True, text=True, check=True).stdout
    assert "%ymm" not in asm, "the baseline module contains AVX instructions"
