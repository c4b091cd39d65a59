"""One dispatcher for every op: backend names and availability, ``auto``'s per-op choice, no
silent device copies, the CUDA build's fallback, ``import fastmerge`` without Triton, and the
``torch.library`` custom ops under ``torch.compile`` (CPU, cpu backend, fullgraph)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastmerge
from conftest import BACKENDS, make_models
from fastmerge import dispatch, ops

FAST = "cpu" if "cpu" in BACKENDS else "torch"


def test_backends_report_triton_and_cuda_with_reasons():
    b = fastmerge.backends()
    for name in ("triton", "cuda"):
        assert isinstance(b[name]["available"], bool) and b[name]["reason"], b[name]
    if not torch.cuda.is_available():
        assert not b["cuda"]["available"] and "CUDA" in b["cuda"]["reason"]


def test_triton_without_gpu_or_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    info = fastmerge.backends()["triton"]
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert not info["available"]
    assert "CUDA" in info["reason"] or "triton" in info["reason"]
    base, ms = make_models((4, 5), 2)
    with pytest.raises(RuntimeError, match="triton"):
        fastmerge.ties(base, ms, backend="triton")


def test_auto_picks_per_op_and_device():
    cpu = torch.device("cpu")
    for op in ("ties", "dare_ties", "magnitude_threshold", "peft"):
        assert dispatch.resolve("auto", cpu, op) == FAST
    # a device no fused backend serves falls back to the reference, on that device
    assert dispatch.resolve("auto", torch.device("meta"), "ties") == "torch"
    # the CUDA order names a GPU backend first, for every op of the API
    assert dispatch.AUTO_CUDA[0] in ("triton", "cuda")


def test_env_backend(monkeypatch):
    base, ms = make_models((6, 7), 2)
    monkeypatch.setenv("FASTMERGE_BACKEND", "torch")
    assert dispatch.resolve(None, torch.device("cpu")) == "torch"
    ref = fastmerge.ties(base, ms, density=0.5)
    monkeypatch.setenv("FASTMERGE_BACKEND", FAST)
    assert torch.equal(fastmerge.ties(base, ms, density=0.5), ref)


@pytest.mark.parametrize("name", ["cpu", "triton", "cuda"])
def test_no_silent_copy_between_devices(name):
    """A fused backend asked to work on tensors of a device it does not serve raises (meta
    tensors stand in for a GPU here); nothing is moved."""
    b, ms = torch.empty(4, 4, device="meta"), [torch.empty(4, 4, device="meta")]
    with pytest.raises((ValueError, RuntimeError), match=name):
        fastmerge.merge("ties", b, ms, density=0.5, backend=name)


def test_mixed_devices_raise():
    base = torch.zeros(4)
    with pytest.raises(ValueError, match="device|on meta"):
        fastmerge.ties(base, [torch.ones(4), torch.empty(4, device="meta")], density=0.5)


def test_failed_cuda_build_falls_back_with_one_warning(monkeypatch):
    """A build that fails (no nvcc, compiler error) warns once; GPU ops then run on Triton,
    or on the torch reference without Triton. Simulated: this machine has no GPU."""
    from fastmerge.backends import cuda

    monkeypatch.setattr(cuda, "_ext", None)
    monkeypatch.setattr(cuda, "_error", None)
    monkeypatch.setattr(cuda, "_tried", False)
    real_status = cuda.status
    monkeypatch.setattr(cuda, "status", lambda: {"available": True, "reason": "pretend"})

    def broken_load(*args, **kwargs):
        raise RuntimeError("nvcc fatal: simulated failure")

    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "load", broken_load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cuda.extension() is None
        assert cuda.extension() is None  # no second attempt, no second warning
        mod = dispatch.module("cuda")
    msgs = [str(w.message) for w in caught if "CUDA kernels" in str(w.message)]
    assert len(msgs) == 1 and "simulated failure" in msgs[0] and "Triton" in msgs[0], msgs
    assert mod.__name__ in ("fastmerge.backends.triton", "fastmerge.backends.torch")
    assert "simulated failure" in cuda._error
    # later calls with backend="cuda" keep resolving (to the fallback), they do not start failing
    monkeypatch.setattr(cuda, "status", real_status)
    assert cuda.status()["build_failed"] and not cuda.status()["available"]
    assert dispatch.resolve("cuda", torch.device("cuda")) == "cuda"
    with pytest.raises(RuntimeError, match="cuda"):  # but CPU tensors are still refused
        dispatch.resolve("cuda", torch.device("cpu"))


def test_import_without_triton():
    code = r"""
import sys
sys.modules["triton"] = None  # import triton now raises ImportError
import torch, fastmerge
b = fastmerge.backends()
assert not b["triton"]["available"] and "not installed" in b["triton"]["reason"], b["triton"]
base = torch.zeros(5); out = fastmerge.ties(base, [torch.ones(5)], density=1.0)
assert torch.equal(out, torch.ones(5))
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="0"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------- torch.compile

requires_ops = pytest.mark.skipif(not fastmerge.library.AVAILABLE, reason="torch.library.custom_op needs torch >= 2.4")


@requires_ops
def test_ops_registered():
    for name in ("merge", "magnitude_threshold", "magnitude_prune", "random_drop", "elect_sign",
                 "disjoint_merge", "peft_merge"):
        assert hasattr(torch.ops.fastmerge, name), name


@requires_ops
def test_compile_fullgraph_every_op():
    """The whole API inside one fullgraph-compiled function (aot_eager: tracing, fake
    implementations and functionalization, without code generation); same results as eager."""
    torch._dynamo.reset()
    base, ms = make_models((24, 20), 3)

    def f(base, a, b, c):
        t = [a - base, b - base]
        return (
            fastmerge.ties(base, [a, b, c], weights=[1.0, 0.5, 0.5], density=0.2, backend=FAST),
            fastmerge.dare_ties(base, [a, b, c], density=0.3, seed=2**63 + 1, backend=FAST),
            fastmerge.merge("della", base, [a, b, c], density=0.4, epsilon=0.1, seed=5, lam=0.9),
            fastmerge.linear(None, [a, b], weights=[2.0, 1.0]),
            ops.magnitude_threshold(t[0], 0.3),
            ops.magnitude_prune(t[0], 0.3, rescale="l1"),
            ops.random_drop(t[0], 0.5, seed=1),
            ops.elect_sign(t, [1.0, 2.0]),
            ops.disjoint_merge(t, ops.elect_sign(t), [1.0, 2.0], divisor="weight"),
            fastmerge.peft.ties(t, torch.tensor([1.0, 0.5]), 0.3),
            fastmerge.peft.dare_linear(t, [1.0, 0.5], 0.3, seed=3),
            fastmerge.peft.task_arithmetic(t, torch.tensor([1.0, 0.5])),
        )

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(base, *ms), f(base, *ms)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


@requires_ops
def test_compile_inductor():
    """torch.compile's default backend (inductor) around a fused merge, fullgraph."""
    torch._dynamo.reset()
    base, ms = make_models((32, 16), 3)

    def f(base, a, b, c):
        return fastmerge.ties(base, [a, b, c], weights=[1.0, 0.5, 0.5], density=0.2, backend=FAST) * 2

    try:
        compiled = torch.compile(f, fullgraph=True)
        got = compiled(base, *ms)
    except Exception as exc:  # no C++ compiler for inductor's CPU code
        if "compiler" in str(exc).lower() or "InvalidCxxCompiler" in type(exc).__name__:
            pytest.skip(f"inductor cannot compile here: {exc}")
        raise
    assert torch.equal(got, f(base, *ms))


@requires_ops
def test_compile_errors_surface_at_run_time():
    torch._dynamo.reset()
    base, ms = make_models((8, 8), 2)
    ms[1][0, 0] = float("nan")

    def f(base, a, b):
        return fastmerge.ties(base, [a, b], density=0.5, backend=FAST)

    with pytest.raises(ValueError, match=r"models\[1\].*non-finite"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(base, *ms)


@requires_ops
def test_compile_fullgraph_threshold_and_every_registered_parameter():
    """``fastmerge::merge``'s schema is derived from the registry: ``threshold`` (absent from the
    old hand-written schema, so such calls ran eagerly with a graph break) crosses the op, and
    fullgraph tracing succeeds; the result equals eager."""
    from fastmerge import _compile, _registry

    assert set(_compile.MERGE_PARAMS) == set(_registry.ALL_PARAMS) - {"quantize"}
    torch._dynamo.reset()
    base, ms = make_models((24, 20), 3)

    def f(base, a, b, c):
        return (fastmerge.ties(base, [a, b, c], threshold=[0.01, 0.02, 0.0], backend=FAST),
                fastmerge.merge("breadcrumbs", base, [a, b], density=0.5, gamma=[0.1, 0.2]),
                fastmerge.merge("tsv", base, [a, b, c], alpha=0.5, exact=True))

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(base, *ms)
    for g, w in zip(got, f(base, *ms)):
        assert torch.equal(g, w)


@requires_ops
def test_compile_quantize_says_it_runs_eagerly():
    torch._dynamo.reset()
    base, ms = make_models((8, 128), 2)

    def f(base, a, b):
        return fastmerge.task_arithmetic(base, [a, b], quantize="int4", backend=FAST).qweight

    with pytest.warns(RuntimeWarning, match="quantize.*eagerly"):
        got = torch.compile(f, backend="aot_eager")(base, *ms)
    assert torch.equal(got, f(base, *ms))


def test_cuda_backend_says_its_quantizers_are_triton(monkeypatch):
    """backend='cuda' has no quantizers: the first quantizing call warns which backend's kernels
    run instead (once), rather than silently timing Triton as 'cuda'."""
    from fastmerge.backends import cuda

    monkeypatch.setattr(cuda, "_delegated", [])
    with pytest.warns(RuntimeWarning, match="backend='cuda' has no quantizers.*'(triton|torch)'"):
        q = cuda._quantizers()
    assert q.NAME in ("triton", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda._quantizers() is q  # said once


def test_cuda_build_without_this_gpus_kernel_image_falls_back(monkeypatch):
    """An extension built for an architecture list without the GPU's loads, then fails every
    launch ("no kernel image"): the probe launch after the build catches it, and GPU ops go to
    Triton with one warning. Simulated (no GPU here): the build succeeds, the probe raises."""
    from fastmerge.backends import cuda

    monkeypatch.setattr(cuda, "_ext", None)
    monkeypatch.setattr(cuda, "_error", None)
    monkeypatch.setattr(cuda, "_tried", False)
    monkeypatch.setattr(cuda, "status", lambda: {"available": True, "reason": "pretend"})
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "load", lambda *a, **k: object())  # built: loads fine

    def no_image():
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(cuda, "_probe_launch", no_image)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cuda.extension() is None
        mod = dispatch.module("cuda")
    msgs = [str(w.message) for w in caught if "CUDA kernels" in str(w.message)]
    assert len(msgs) == 1 and "no kernel image" in msgs[0] and "Triton" in msgs[0], msgs
    assert mod.__name__ in ("fastmerge.backends.triton", "fastmerge.backends.torch")
