"""Bad input gets a clear ValueError / TypeError naming the argument at fault, identically on
every available backend (non-finite detection included, which the fused backends do inside
their kernels)."""
from __future__ import annotations

import pytest
import torch

import fastmerge
import fastmerge.peft as FP
from fastmerge import ops
from conftest import BACKENDS

SHAPE = (5, 7)


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    b = torch.randn(SHAPE, generator=g)
    ms = [b + 0.1 * torch.randn(SHAPE, generator=g) for _ in range(3)]
    return b.to(dtype), [m.to(dtype) for m in ms]


B, MS = _data()
NAN, INF = float("nan"), float("inf")


def _poison(t, value, idx=(1, 2)):
    t = t.clone()
    t[idx] = value
    return t


def _models_with(k, value, ms=MS):
    out = [m.clone() for m in ms]
    out[k] = _poison(out[k], value)
    return out


def merge(*args, **kwargs):
    return lambda be: fastmerge.merge(*args, backend=be, **kwargs)


# (id, call(backend), exception type, substrings the message must contain)
MERGE_CASES = [
    ("unknown-method", merge("tie", B, MS), ValueError, ["method", "'tie'"]),
    ("method-not-str", merge(3, B, MS), ValueError, ["method"]),
    ("base-list", merge("ties", [1.0], MS), TypeError, ["base"]),
    ("base-none", merge("ties", None, MS), TypeError, ["base"]),
    ("models-empty", merge("ties", B, []), ValueError, ["models", "empty"]),
    ("models-single-tensor", merge("ties", B, MS[0]), TypeError, ["models", "list"]),
    ("models-not-iterable", merge("ties", B, 3), TypeError, ["models"]),
    ("models-non-tensor", merge("ties", B, [MS[0], 2.0]), TypeError, ["models[1]"]),
    ("shape-mismatch", merge("ties", B, [MS[0], MS[1].T.contiguous()]), ValueError,
     ["models[1]", "shape", "(7, 5)"]),
    ("shape-mismatch-linear", merge("linear", None, [MS[0], MS[1].reshape(-1)]), ValueError,
     ["models[1]", "shape"]),
    ("dtype-mismatch", merge("ties", B, [MS[0], MS[1].half(), MS[2]]), TypeError,
     ["models[1]", "float16"]),
    ("device-mismatch-meta", merge("ties", B, [MS[0], torch.empty(SHAPE, device="meta")]),
     ValueError, ["models[1]", "meta"]),
    ("dtype-int", merge("ties", B.int(), [m.int() for m in MS]), TypeError, ["base", "int32"]),
    ("dtype-float64", merge("ties", B.double(), [m.double() for m in MS]), TypeError,
     ["base", "float64"]),
    ("dtype-float64-models", merge("ties", B, [m.double() for m in MS]), TypeError,
     ["models[0]", "float64"]),
    ("dtype-float64-linear", merge("linear", None, [m.double() for m in MS]), TypeError,
     ["models[0]", "float64"]),
    ("weights-count", merge("ties", B, MS, weights=[1.0, 0.5]), ValueError, ["weights", "2", "3"]),
    ("weights-count-tensor", merge("ties", B, MS, weights=torch.ones(4)), ValueError, ["weights"]),
    ("weights-type", merge("ties", B, MS, weights="1"), TypeError, ["weights"]),
    ("weights-nan", merge("ties", B, MS, weights=[1.0, NAN, 1.0]), ValueError, ["weights[1]"]),
    ("density-negative", merge("ties", B, MS, density=-0.1), ValueError, ["density"]),
    ("density-above-one", merge("ties", B, MS, density=1.5), ValueError, ["density"]),
    ("density-per-model", merge("ties", B, MS, density=[0.5, 1.1, 0.5]), ValueError, ["density[1]"]),
    ("density-nan", merge("ties", B, MS, density=NAN), ValueError, ["density"]),
    ("density-count", merge("ties", B, MS, density=[0.5, 0.5]), ValueError, ["density"]),
    ("density-type", merge("dare_ties", B, MS, density="0.5", seed=1), TypeError, ["density"]),
    ("gamma-above-one", merge("breadcrumbs", B, MS, density=0.5, gamma=1.5), ValueError, ["gamma"]),
    ("gamma-negative", merge("breadcrumbs_ties", B, MS, density=0.5, gamma=[0.1, -0.1, 0.1]),
     ValueError, ["gamma[1]"]),
    ("epsilon-range", merge("della", B, MS, density=0.5, epsilon=1.5, seed=1), ValueError, ["epsilon"]),
    ("epsilon-density-plus", merge("della", B, MS, density=0.5, epsilon=0.5, seed=1), ValueError,
     ["epsilon", "density"]),
    ("epsilon-density-minus", merge("della_linear", B, MS, density=0.1, epsilon=0.1, seed=1),
     ValueError, ["epsilon", "density"]),
    ("epsilon-density-high", merge("della", B, MS, density=0.9, epsilon=0.2, seed=1), ValueError,
     ["epsilon"]),
    ("rescale-string", merge("ties", B, MS, density=0.5, rescale="l3"), ValueError, ["rescale", "l3"]),
    ("rescale-int", merge("dare_linear", B, MS, density=0.5, rescale=1, seed=1), ValueError, ["rescale"]),
    ("normalize-type", merge("ties", B, MS, normalize="yes"), TypeError, ["normalize"]),
    ("lam-inf", merge("ties", B, MS, lam=INF), ValueError, ["lam"]),
    ("lam-type", merge("ties", B, MS, lam="1"), TypeError, ["lam"]),
    ("out-dtype-string", merge("ties", B, MS, out_dtype="float16"), TypeError, ["out_dtype"]),
    ("out-dtype-float64", merge("ties", B, MS, out_dtype=torch.float64), TypeError, ["out_dtype"]),
    ("out-dtype-int", merge("ties", B, MS, out_dtype=torch.int8), TypeError, ["out_dtype"]),
    ("seed-negative", merge("dare_ties", B, MS, density=0.5, seed=-1), ValueError, ["seed"]),
    ("seed-too-big", merge("dare_linear", B, MS, density=0.5, seed=2**64), ValueError, ["seed"]),
    ("seed-float", merge("della", B, MS, density=0.5, epsilon=0.1, seed=1.0), TypeError, ["seed"]),
    ("seed-str", merge("dare_ties", B, MS, density=0.5, seed="1"), TypeError, ["seed"]),
    ("seed-bool", merge("dare_ties", B, MS, density=0.5, seed=True), TypeError, ["seed"]),
    ("linear-zero-weight-sum", merge("linear", None, MS, weights=[1.0, -1.0, 0.0]), ValueError,
     ["weights", "zero"]),
]

# non-finite inputs: every method, inf and nan, in a model or in the base
NONFINITE_CASES = []
for method, kw in [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.0}),  # the poisoned model is dropped whole: still detected
    ("dare_ties", {"density": 0.5, "seed": 1}),
    ("dare_linear", {"density": 0.0, "seed": 1}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
    ("breadcrumbs_ties", {"density": 0.3}),
    ("della", {"density": 0.5, "epsilon": 0.1, "seed": 1}),
    ("della_linear", {"density": 0.5, "epsilon": 0.1, "seed": 1}),
    ("ties", {"density": 0.5, "weights": [1.0, 1.0, 0.0]}),  # zero weight: still detected
]:
    for value in (INF, -INF, NAN):
        tag = f"{method}-{kw.get('density', 1)}-{value}"
        NONFINITE_CASES.append((f"model-{tag}", merge(method, B, _models_with(2, value), **kw),
                                ValueError, ["non-finite", "models[2]"]))
    NONFINITE_CASES.append((f"base-{method}-{kw.get('density', 1)}",
                            merge(method, _poison(B, NAN), MS, **kw), ValueError, ["non-finite", "base"]))
for dt in (torch.bfloat16, torch.float16):
    b, ms = _data(dt)
    NONFINITE_CASES.append((f"ties-{dt}", merge("ties", b, _models_with(1, INF, ms), density=0.5),
                            ValueError, ["non-finite", "models[1]"]))
    NONFINITE_CASES.append((f"base-dare-{dt}", merge("dare_ties", _poison(b, NAN), ms, density=0.5, seed=3),
                            ValueError, ["non-finite", "base"]))
NONFINITE_CASES += [
    ("linear-model", merge("linear", None, _models_with(0, NAN)), ValueError, ["non-finite", "models[0]"]),
    ("first-of-many", merge("task_arithmetic", B, _models_with(0, INF)), ValueError, ["models[0]"]),
]

OPS_CASES = [
    ("prune-k-too-big", lambda be: ops.magnitude_prune(B, k=B.numel() + 1, backend=be), ValueError, ["k"]),
    ("prune-k-negative", lambda be: ops.magnitude_prune(B, k=-1, backend=be), ValueError, ["k"]),
    ("threshold-k-too-big", lambda be: ops.magnitude_threshold(B, k=100, backend=be), ValueError, ["k"]),
    ("prune-k-float", lambda be: ops.magnitude_prune(B, k=3.0, backend=be), TypeError, ["k"]),
    ("prune-density-and-k", lambda be: ops.magnitude_prune(B, 0.5, k=3, backend=be), ValueError,
     ["density", "k"]),
    ("threshold-neither", lambda be: ops.magnitude_threshold(B, backend=be), TypeError, ["density", "k"]),
    ("prune-density-range", lambda be: ops.magnitude_prune(B, 1.5, backend=be), ValueError, ["density"]),
    ("prune-x-type", lambda be: ops.magnitude_prune([1.0], 0.5, backend=be), TypeError, ["x"]),
    ("prune-x-dtype", lambda be: ops.magnitude_prune(B.double(), 0.5, backend=be), TypeError, ["x", "float64"]),
    ("prune-rescale-density", lambda be: ops.magnitude_prune(B, 0.5, rescale="density", backend=be),
     ValueError, ["rescale"]),
    ("drop-density", lambda be: ops.random_drop(B, 1.5, seed=1, backend=be), ValueError, ["density"]),
    ("drop-seed", lambda be: ops.random_drop(B, 0.5, seed=-3, backend=be), ValueError, ["seed"]),
    ("drop-rescale", lambda be: ops.random_drop(B, 0.5, seed=1, rescale="foo", backend=be), ValueError,
     ["rescale"]),
    ("drop-nonfinite", lambda be: ops.random_drop(_poison(B, INF), 0.5, seed=1, backend=be), ValueError,
     ["non-finite", "x "]),
    ("prune-nonfinite", lambda be: ops.magnitude_prune(_poison(B, INF), 0.5, backend=be), ValueError,
     ["non-finite", "x "]),
    ("prune-nonfinite-k0", lambda be: ops.magnitude_prune(_poison(B, NAN), k=0, backend=be), ValueError,
     ["non-finite", "x "]),
    ("threshold-nonfinite", lambda be: ops.magnitude_threshold(_poison(B, NAN), 0.5, backend=be),
     ValueError, ["non-finite", "x "]),
    ("threshold-nonfinite-inf", lambda be: ops.magnitude_threshold(_poison(B, -INF), k=3, backend=be),
     ValueError, ["non-finite", "x "]),
    ("threshold-nonfinite-k0", lambda be: ops.magnitude_threshold(_poison(B, INF), k=0, backend=be),
     ValueError, ["non-finite", "x "]),
    ("threshold-nonfinite-all", lambda be: ops.magnitude_threshold(_poison(B, INF), k=B.numel(),
                                                                    backend=be), ValueError, ["non-finite"]),
    ("elect-method", lambda be: ops.elect_sign(MS, method="mean", backend=be), ValueError, ["method"]),
    ("elect-weights", lambda be: ops.elect_sign(MS, [1.0], backend=be), ValueError, ["weights"]),
    ("elect-empty", lambda be: ops.elect_sign([], backend=be), ValueError, ["tensors"]),
    ("elect-non-tensor", lambda be: ops.elect_sign([MS[0], 1.0], backend=be), TypeError, ["tensors[1]"]),
    ("elect-shape", lambda be: ops.elect_sign([MS[0], MS[1], MS[2][:2]], backend=be), ValueError,
     ["tensors[2]", "shape"]),
    ("elect-dtype", lambda be: ops.elect_sign([MS[0], MS[1].half()], backend=be), TypeError,
     ["tensors[1]", "float16"]),
    ("disjoint-shape", lambda be: ops.disjoint_merge([MS[0], MS[1][:2]], torch.ones(SHAPE), backend=be),
     ValueError, ["tensors[1]"]),
    ("elect-nonfinite", lambda be: ops.elect_sign(_models_with(2, NAN), backend=be), ValueError,
     ["non-finite", "tensors[2]"]),
    ("disjoint-sign-shape", lambda be: ops.disjoint_merge(MS, torch.ones(3, 3), backend=be), ValueError,
     ["sign"]),
    ("disjoint-sign-type", lambda be: ops.disjoint_merge(MS, 1, backend=be), TypeError, ["sign"]),
    ("disjoint-divisor", lambda be: ops.disjoint_merge(MS, torch.ones(SHAPE), divisor="x", backend=be),
     ValueError, ["divisor"]),
    ("disjoint-out-dtype", lambda be: ops.disjoint_merge(MS, torch.ones(SHAPE), out_dtype=torch.float64,
                                                         backend=be), TypeError, ["out_dtype"]),
    ("disjoint-nonfinite", lambda be: ops.disjoint_merge(_models_with(1, INF), torch.ones(SHAPE), backend=be),
     ValueError, ["non-finite", "tensors[1]"]),
]

W3 = torch.tensor([1.0, 0.5, -0.3])
PEFT_CASES = [
    ("ties-weights-count", lambda be: FP.ties(MS, torch.tensor([1.0, 1.0]), 0.5, backend=be), ValueError,
     ["weights"]),
    ("ties-weights-2d", lambda be: FP.ties(MS, torch.ones(3, 1), 0.5, backend=be), ValueError, ["weights"]),
    ("ties-sign-method", lambda be: FP.ties(MS, W3, 0.5, "mean", backend=be), ValueError,
     ["majority_sign_method"]),
    ("dare-ties-sign-method", lambda be: FP.dare_ties(MS, W3, 0.5, "avg", seed=1, backend=be), ValueError,
     ["majority_sign_method"]),
    ("ties-density-negative", lambda be: FP.ties(MS, W3, -0.5, backend=be), ValueError, ["ensity"]),
    ("ties-density-nan", lambda be: FP.magnitude_prune(MS, W3, NAN, backend=be), ValueError, ["density"]),
    ("dare-seed", lambda be: FP.dare_linear(MS, W3, 0.5, seed=-1, backend=be), ValueError, ["seed"]),
    ("tasks-empty", lambda be: FP.task_arithmetic([], torch.ones(0), backend=be), ValueError, ["task_tensors"]),
    ("tasks-single-tensor", lambda be: FP.task_arithmetic(MS[0], W3, backend=be), TypeError, ["task_tensors"]),
    ("tasks-dtype", lambda be: FP.task_arithmetic([MS[0], MS[1].bfloat16(), MS[2]], W3, backend=be),
     TypeError, ["task_tensors[1]", "bfloat16"]),
    ("tasks-shape", lambda be: FP.ties([MS[0], MS[1].T.contiguous()], torch.tensor([1.0, 1.0]), 0.5,
                                       backend=be), ValueError, ["task_tensors[1]", "shape"]),
    ("tasks-shape-third", lambda be: FP.task_arithmetic([MS[0], MS[1], MS[2][:2]], W3, backend=be),
     ValueError, ["task_tensors[2]", "shape"]),
    ("tasks-nonfinite", lambda be: FP.ties(_models_with(2, INF), W3, 0.5, backend=be), ValueError,
     ["non-finite", "task_tensors[2]"]),
    ("dare-nonfinite", lambda be: FP.dare_ties(_models_with(0, NAN), W3, 0.5, seed=1, backend=be), ValueError,
     ["non-finite", "task_tensors[0]"]),
    ("prune-method", lambda be: FP.prune(B, 0.5, "bogus", backend=be), ValueError, ["method"]),
    ("prune-density", lambda be: FP.prune(B, -0.5, "random", seed=1, backend=be), ValueError, ["ensity"]),
    ("csm-method", lambda be: FP.calculate_majority_sign_mask(torch.stack(MS), "avg", backend=be),
     ValueError, ["method"]),
    ("csm-not-tensor", lambda be: FP.calculate_majority_sign_mask(MS, backend=be), TypeError, ["tensor"]),
    ("csm-nonfinite", lambda be: FP.calculate_majority_sign_mask(torch.stack(_models_with(1, NAN)),
                                                                 backend=be), ValueError, ["non-finite"]),
    ("disjoint-shape", lambda be: FP.disjoint_merge(torch.stack(MS), torch.ones(2, *SHAPE)), ValueError,
     ["majority_sign_mask"]),
    ("disjoint-type", lambda be: FP.disjoint_merge(MS, torch.ones(3, *SHAPE)), TypeError, ["task_tensors"]),
]


def _ids(cases):
    return [c[0] for c in cases]


def _check(call, backend, exc, needles):
    with pytest.raises(exc) as info:
        call(backend)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error message {msg!r}"
    return msg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MERGE_CASES, ids=_ids(MERGE_CASES))
def test_merge_errors(case, backend):
    _check(case[1], backend, *case[2:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=_ids(NONFINITE_CASES))
def test_nonfinite_inputs(case, backend):
    _check(case[1], backend, *case[2:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OPS_CASES, ids=_ids(OPS_CASES))
def test_ops_errors(case, backend):
    _check(case[1], backend, *case[2:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PEFT_CASES, ids=_ids(PEFT_CASES))
def test_peft_errors(case, backend):
    _check(case[1], backend, *case[2:])


@pytest.mark.parametrize("case", MERGE_CASES + NONFINITE_CASES + OPS_CASES + PEFT_CASES,
                         ids=_ids(MERGE_CASES + NONFINITE_CASES + OPS_CASES + PEFT_CASES))
def test_every_backend_raises_the_same(case):
    """Same exception type and message on every available backend."""
    msgs = set()
    for be in BACKENDS:
        with pytest.raises(case[2]) as info:
            case[1](be)
        msgs.add((type(info.value), str(info.value)))
    assert len(msgs) == 1, msgs


@pytest.mark.parametrize("backend", BACKENDS)
def test_aliases_validate_like_merge(backend):
    with pytest.raises(ValueError, match=r"models\[1\]"):
        fastmerge.ties(B, [MS[0], MS[1][:2]], density=0.5, backend=backend)
    with pytest.raises(ValueError, match="density"):
        fastmerge.dare_linear(B, MS, density=2.0, backend=backend)
    with pytest.raises(ValueError, match="non-finite"):
        fastmerge.della(B, _models_with(1, INF), density=0.5, epsilon=0.1, seed=0, backend=backend)


def test_bad_backend_name():
    for name in ("gpu", "CPUX", "", 3):
        with pytest.raises(ValueError, match="backend"):
            fastmerge.merge("ties", B, MS, backend=name)


def test_bad_backend_env(monkeypatch):
    monkeypatch.setenv("FASTMERGE_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend"):
        fastmerge.merge("ties", B, MS)


def test_unavailable_backend_says_why():
    for name, info in fastmerge.backends().items():
        if not info["available"]:
            with pytest.raises(RuntimeError, match=name):
                fastmerge.merge("ties", B, MS, backend=name)


def test_cpu_backend_refuses_non_cpu_tensors():
    """Never copies between devices: CPU kernels on (meta) non-CPU tensors is an error that
    names the backend (a real GPU is not needed to check this)."""
    b, ms = torch.empty(SHAPE, device="meta"), [torch.empty(SHAPE, device="meta")]
    with pytest.raises(ValueError, match="backend='cpu'"):
        fastmerge.merge("ties", b, ms, density=0.5, backend="cpu")


def test_valid_edge_inputs_do_not_raise():
    """The boundaries themselves are valid (guards against over-strict checks)."""
    for be in BACKENDS:
        fastmerge.merge("ties", B, MS, density=[0.0, 1.0, 0.5], backend=be)
        fastmerge.merge("breadcrumbs", B, MS, density=0.5, gamma=[0.0, 1.0, 0.5], backend=be)
        fastmerge.merge("della", B, MS, density=0.5, epsilon=0.0, seed=0, backend=be)
        fastmerge.merge("dare_ties", B, MS, density=0.5, seed=2**64 - 1, backend=be)
        fastmerge.merge("ties", B, MS, weights=torch.tensor([1.0, 0.5, 0.25]), density=0.5, backend=be)
        fastmerge.merge("ties", B, MS, lam=torch.tensor(0.5), backend=be)
        fastmerge.merge("linear", None, MS, weights=[1.0, -1.0, 0.0], normalize=False, backend=be)

