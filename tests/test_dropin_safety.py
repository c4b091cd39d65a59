"""Issue 16, drop-in behaviour and autograd.

* The PEFT patch hands calls with a ``weights`` tensor that requires grad (learnable merge
  coefficients) to PEFT's own code, so the gradient reaches the coefficients as unpatched.
* The mergekit patch hands back to mergekit, instead of raising, whatever mergekit itself
  accepts (``weight: nan``, a weight beyond fp32): the result equals unpatched mergekit's.
* Autograd policy: ``backend="auto"`` runs any call with a requires-grad input (a tensor or
  a weights tensor) on the ``torch`` backend, which keeps the graph (through the weights too);
  an explicit ``cpu`` / ``triton`` / ``cuda`` runs as asked and warns once that the result
  carries no graph.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastmerge
from conftest import make_models, make_tasks, mergekit_merge
from fastmerge import dispatch

HAS_CPU = fastmerge.backends()["cpu"]["available"]
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the cpu backend (native module) is not built")


# --------------------------------------------------------------------------------- PEFT patch

@pytest.mark.parametrize("fn,extra", [("task_arithmetic", ()), ("ties", (0.5, "total")),
                                      ("magnitude_prune", (0.5,))])
def test_peft_patch_keeps_the_graph_of_learnable_weights(fn, extra):
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    import fastmerge.integrations.peft as fm_peft

    tasks = make_tasks((6, 10), K=3)

    def grads():
        w = torch.tensor([0.7, -0.3, 1.2], requires_grad=True)
        out = getattr(merge_utils, fn)(tasks, w, *extra)
        assert out.grad_fn is not None, "the merge dropped the weights' graph"
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), w.grad

    ref_out, ref_grad = grads()
    with fm_peft.patched():
        out, grad = grads()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad, ref_grad)


def test_peft_patch_still_fuses_weights_without_grad():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    import fastmerge.integrations.peft as fm_peft

    tasks = make_tasks((6, 10), K=3)
    w = torch.tensor([0.7, -0.3, 1.2], requires_grad=True)
    ref = merge_utils.task_arithmetic(tasks, w.detach())
    with fm_peft.patched(), torch.no_grad():
        torch.testing.assert_close(merge_utils.task_arithmetic(tasks, w), ref)


# ----------------------------------------------------------------------------- mergekit patch

CASES = [("ties", float("nan")), ("task_arithmetic", float("nan")), ("linear", float("nan")),
         ("breadcrumbs", float("nan")), ("task_arithmetic", 1e300), ("ties", 1e300),
         ("linear", float("inf"))]


@pytest.mark.parametrize("method,weight", CASES, ids=[f"{m}-{w}" for m, w in CASES])
def test_mergekit_patch_hands_back_what_mergekit_accepts(method, weight):
    pytest.importorskip("mergekit")
    import fastmerge.integrations.mergekit as fm_mergekit

    base, models = make_models((8, 16), K=2)
    kw = dict(weight=[weight, 1.0])
    if method != "linear" and method != "task_arithmetic":
        kw["density"] = [0.5, 0.5]
    b = None if method == "linear" else base
    ref = mergekit_merge(method, b, models, **kw)
    with fm_mergekit.patched(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-only "running mergekit's own ..." note
        out = mergekit_merge(method, b, models, **kw)
    torch.testing.assert_close(out, ref, equal_nan=True)


# ------------------------------------------------------------------------------ autograd policy

def _leaves(shape=(5, 7), K=2):
    base, models = make_models(shape, K=K)
    return base.requires_grad_(), [m.requires_grad_() for m in models]


def _grads(method, backend, **kw):
    base, models = _leaves()
    out = fastmerge.merge(method, base, models, backend=backend, **kw)
    assert out.grad_fn is not None
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), [base.grad] + [m.grad for m in models]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "linear", "dare_linear"])
def test_auto_keeps_autograd_for_inputs_that_require_grad(method):
    kw = dict(weights=[0.6, 0.9], seed=1) if method == "dare_linear" else dict(weights=[0.6, 0.9])
    if method in ("ties", "dare_linear"):
        kw["density"] = 0.5
    out, grads = _grads(method, None, **kw)
    ref_out, ref_grads = _grads(method, "torch", **kw)
    assert torch.equal(out, ref_out)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "linear"])
def test_auto_keeps_the_graph_of_a_weights_tensor(method):
    base, models = make_models((5, 7), K=3)
    w = torch.tensor([0.5, 1.5, -0.25], requires_grad=True)
    kw = dict(density=0.5) if method == "ties" else {}
    out = fastmerge.merge(method, None if method == "linear" else base, models, weights=w, **kw)
    assert out.grad_fn is not None
    out.sum().backward()
    # the same merge written with torch autograd ops in float64
    w64 = w.detach().double().requires_grad_()
    b64, m64 = base.double(), [m.double() for m in models]
    if method == "task_arithmetic":
        expect = b64 + sum(w64[k] * (m64[k] - b64) for k in range(3))
    elif method == "linear":
        expect = sum(w64[k] * m64[k] for k in range(3)) / w64.sum()
    else:  # ties: the kept, agreeing deltas are fixed by the merge; the divisor is their weights
        plain = fastmerge.merge(method, base, models, weights=w.detach(), density=0.5, backend="torch")
        assert torch.equal(out.detach(), plain)
        return _ties_weight_grad_check(base, models, w, out)
    expect.sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-4)


def _ties_weight_grad_check(base, models, w, out):
    """d out / d w_k by central differences of the same (piecewise smooth) merge."""
    eps = 1e-3
    for k in range(3):
        hi, lo = w.detach().clone(), w.detach().clone()
        hi[k] += eps
        lo[k] -= eps
        num = (fastmerge.merge("ties", base, models, weights=hi, density=0.5, backend="torch").double().sum()
               - fastmerge.merge("ties", base, models, weights=lo, density=0.5, backend="torch").double().sum())
        assert abs(float(w.grad[k]) - float(num) / (2 * eps)) < 5e-2 * (1 + abs(float(num) / (2 * eps)))


def test_fastmerge_peft_functions_keep_the_weights_graph():
    from fastmerge import peft as fpeft

    tasks = make_tasks((4, 6), K=2)
    w = torch.tensor([2.0, -1.0], requires_grad=True)
    out = fpeft.task_arithmetic(tasks, w)
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.stack([t.sum() for t in tasks]))


@needs_cpu
def test_explicit_fused_backend_warns_once_that_no_graph_is_kept(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned_grad", set())
    base, models = _leaves()
    with pytest.warns(RuntimeWarning, match="backend='cpu'.*no graph"):
        out = fastmerge.merge("ties", base, models, density=0.5, backend="cpu")
    assert out.grad_fn is None and not out.requires_grad
    ref = fastmerge.merge("ties", base, models, density=0.5, backend="torch")
    assert torch.equal(out, ref.detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        fastmerge.merge("ties", base, models, density=0.5, backend="cpu")
    w = torch.tensor([1.0, 0.5], requires_grad=True)  # a weights tensor counts too
    monkeypatch.setattr(dispatch, "_warned_grad", set())
    with pytest.warns(RuntimeWarning, match="no graph"):
        fastmerge.merge("task_arithmetic", base.detach(), [m.detach() for m in models], weights=w,
                        backend="cpu")


@needs_cpu
def test_no_warning_and_fused_backend_without_grad(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned_grad", set())
    base, models = _leaves()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            fastmerge.merge("ties", base, models, density=0.5, backend="cpu")
        fastmerge.merge("ties", base.detach(), [m.detach() for m in models], density=0.5, backend="cpu")
    assert dispatch.resolve(None, base.device, grad=False) == "cpu"
    assert dispatch.resolve(None, base.device, grad=True) == "torch"
