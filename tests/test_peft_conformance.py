"""fastmerge.peft versus ``peft.utils.merge_utils`` (PEFT 0.21.2) on random task tensors.

Differences by design (everything else must agree):

1. Random pruning (DARE): PEFT draws ``torch.bernoulli(full_like(t, density))`` from torch's
   global generator; fastmerge uses its seeded Philox stream (task k -> stream k, keep iff
   ``u < fp32(density)``). The tests replace PEFT's ``torch.bernoulli`` with that mask, which
   makes the comparison exact; only PEFT's RNG is replaced, never fastmerge.
2. Top-k ties: fastmerge keeps the lowest flat index among equal magnitudes; ``torch.topk``
   keeps an unspecified one. This only shows with low-precision inputs (many equal
   magnitudes); kept counts are always identical.
3. Precision: PEFT computes in ``result_type(tasks, weights)``; fastmerge in fp32, rounding once
   to that same output dtype.
4. DARE with density 0 and rescale: PEFT divides 0 by 0 (NaN everywhere); fastmerge returns 0.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from peft.utils import merge_utils as P

import fastmerge.peft as F
from conftest import BACKENDS, DTYPES, assert_close_frac, make_tasks, make_tie_free_tasks, philox_mask

SHAPES = [(37, 53), (101,), (1,), (3, 5, 7)]
KS = [1, 2, 3, 5, 8]
TIGHT = dict(atol=1e-6, rtol=1e-5)


def _weights(K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(500 + seed)
    w = torch.rand(K, generator=g) * 2.4 - 0.9
    return w.to(dtype)


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*a, **kw)


def _close(ours, theirs, msg="", **tol):
    assert ours.dtype == theirs.dtype, (msg, ours.dtype, theirs.dtype)
    assert ours.shape == theirs.shape, msg
    tol = tol or TIGHT
    scale = max(1.0, float(theirs.abs().max())) if theirs.numel() else 1.0
    torch.testing.assert_close(ours, theirs, atol=tol["atol"] * scale, rtol=tol["rtol"],
                               msg=lambda m: f"{msg}\n{m}" if msg else m)


class _PhiloxBernoulli:
    """Replacement for ``torch.bernoulli`` while PEFT runs: call i hands out fastmerge's mask for
    stream ``streams[i]`` with keep probability ``fp32(density)``; it checks that PEFT asked for
    a ``full_like(task, density)`` tensor, as documented."""

    def __init__(self, seed, density, streams):
        self.seed, self.density, self.streams = seed, density, list(streams)

    def __call__(self, input, *args, **kwargs):
        assert not args and not kwargs
        assert self.streams, "more torch.bernoulli calls than tasks"
        expected = torch.tensor(self.density, dtype=input.dtype)
        assert torch.all(input == expected), "PEFT should pass full_like(task, density)"
        k = self.streams.pop(0)
        return philox_mask(tuple(input.shape), self.seed, k, self.density).to(input.dtype)


def _peft_with_philox(monkeypatch, seed, density, streams, fn, *args):
    fake = _PhiloxBernoulli(seed, density, streams)
    with monkeypatch.context() as mp:
        mp.setattr(torch, "bernoulli", fake)
        out = _quiet(fn, *args)
    assert not fake.streams, "fewer torch.bernoulli calls than tasks"
    return out


# ---- deterministic merges, fp32 ----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_task_arithmetic(shape, backend):
    for K in KS:
        tasks, w = make_tasks(shape, K, seed=K), _weights(K, seed=K)
        _close(F.task_arithmetic(tasks, w, backend=backend), P.task_arithmetic(tasks, w),
               msg=f"K={K}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 1e-3, 0.3, 0.7, 0.999])
def test_magnitude_prune(density, shape, backend):
    for K in KS:
        tasks, w = make_tasks(shape, K, seed=10 + K), _weights(K, seed=K)
        _close(F.magnitude_prune(tasks, w, density, backend=backend),
               P.magnitude_prune(tasks, w, density), msg=f"K={K}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 1e-3, 0.2, 0.5, 0.999])
def test_ties(density, shape, method, backend):
    """PEFT's TIES elects the sign on the UNWEIGHTED pruned tasks and divides by the number of
    agreeing tasks (not their weights)."""
    for K in KS:
        tasks, w = make_tasks(shape, K, seed=20 + K), _weights(K, seed=K)
        _close(F.ties(tasks, w, density, method, backend=backend), P.ties(tasks, w, density, method),
               msg=f"K={K}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_default_sign_method_is_total(backend):
    tasks, w = make_tasks((37, 53), 4, seed=30), _weights(4, seed=30)
    ours = F.ties(tasks, w, 0.4, backend=backend)
    _close(ours, P.ties(tasks, w, 0.4, "total"))
    # and it is not the frequency rule on this data (so the default is actually exercised)
    assert not torch.equal(ours, P.ties(tasks, w, 0.4, "frequency"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [1.0, 1.5])
@pytest.mark.parametrize("fn", ["magnitude_prune", "ties", "dare_linear", "dare_ties"])
def test_density_at_least_one_warns_and_keeps_all(fn, density, backend):
    """PEFT's prune: density >= 1 warns ('no pruning') and keeps the tasks whole."""
    tasks, w = make_tasks((37, 53), 3, seed=31), _weights(3, seed=31)
    with pytest.warns(UserWarning, match="no pruning"):
        theirs = getattr(P, fn)(tasks, w, density)
    with pytest.warns(UserWarning, match="no pruning"):
        ours = getattr(F, fn)(tasks, w, density, backend=backend)
    _close(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["magnitude_prune", "ties", "dare_linear", "dare_ties"])
def test_negative_density_raises_in_both(fn, backend):
    tasks, w = make_tasks((5, 7), 2, seed=32), _weights(2, seed=32)
    with pytest.raises(ValueError, match="[Dd]ensity"):
        getattr(P, fn)(tasks, w, -0.1)
    with pytest.raises(ValueError, match="[Dd]ensity"):
        getattr(F, fn)(tasks, w, -0.1, backend=backend)


# ---- output dtype and low precision -------------------------------------------------------



LOWP = [
    # (task dtype, weights dtype) -> PEFT's result dtype is their promotion
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.bfloat16),
    (torch.float32, torch.bfloat16),
]
TOL = {dt: (atol, rtol) for dt, atol, rtol in DTYPES}
CONSENSUS = ("ties", "ties_frequency", "dare_ties")


def _tol(*dtypes):
    """The loosest (atol, rtol) among the dtypes PEFT computes or rounds in."""
    return max((TOL[d] for d in dtypes), key=lambda t: t[1])


def _peft_dtype(fn, tdtype, wdtype):
    """PEFT's result dtype: ``result_type(tasks, weights)``; ties/dare_ties also promote with
    torch's default float dtype, because their disjoint merge divides by
    ``clamp(bool_mask.sum(0), min=1.0)``."""
    out = torch.promote_types(tdtype, wdtype)
    if fn in CONSENSUS:
        out = torch.promote_types(out, torch.get_default_dtype())
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tdtype,wdtype", LOWP, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("fn", ["task_arithmetic", "magnitude_prune", "ties", "ties_frequency"])
def test_low_precision_tie_free(fn, tdtype, wdtype, backend):
    """Output dtype is ``result_type(task, weights)`` as in PEFT; with unique top-k sets values
    agree within about an ulp of that dtype (PEFT rounds intermediate products and sums)."""
    shape, K = (23, 41), 4
    tasks = make_tie_free_tasks(shape, K, tdtype, seed=33)
    w = torch.tensor([1.0, 0.5, -0.25, 0.75]).to(wdtype)
    if fn == "task_arithmetic":
        ours, theirs = F.task_arithmetic(tasks, w, backend=backend), P.task_arithmetic(tasks, w)
    elif fn == "magnitude_prune":
        ours, theirs = F.magnitude_prune(tasks, w, 0.3, backend=backend), P.magnitude_prune(tasks, w, 0.3)
    else:
        m = "frequency" if fn == "ties_frequency" else "total"
        ours, theirs = F.ties(tasks, w, 0.3, m, backend=backend), P.ties(tasks, w, 0.3, m)
    out_dtype = _peft_dtype(fn, tdtype, wdtype)
    assert theirs.dtype == out_dtype and ours.dtype == out_dtype
    atol, rtol = _tol(tdtype, wdtype, out_dtype)
    assert_close_frac(ours, theirs, atol=atol / 8, rtol=rtol, max_frac=0.0, msg=fn)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.8])
def test_low_precision_magnitude_ties_at_threshold(density, dtype, backend):
    """Random bf16/fp16 tasks have many equal magnitudes. The kept count is int(density*n) in
    both; the kept sets may differ only among elements whose magnitude equals the k-th largest
    (by-design difference 2)."""
    t = make_tasks((37, 53), 1, dtype, seed=34)[0]
    n = t.numel()
    k = int(density * n)
    ours = F.magnitude_based_pruning(t, density, backend=backend)
    theirs = P.magnitude_based_pruning(t, density)
    assert ours.dtype == theirs.dtype == dtype
    assert int((ours != 0).sum()) == int((theirs != 0).sum()) == k
    thr = t.float().abs().reshape(-1).sort(descending=True).values[k - 1]
    differ = ours != theirs
    assert torch.all(t.float().abs()[differ] == thr)
    # and where the tie is broken, fastmerge keeps the lowest flat indices
    tied = (t.float().abs() == thr).reshape(-1).nonzero().reshape(-1)
    kept_tied = (ours.reshape(-1)[tied] != 0)
    assert torch.all(kept_tied[:-1].int() >= kept_tied[1:].int()), "ties not kept by lowest index"


# ---- DARE with PEFT's Bernoulli replaced by our Philox mask -------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [1e-3, 0.1, 0.5, 0.999])
@pytest.mark.parametrize("fn", ["dare_linear", "dare_ties", "dare_ties_frequency"])
def test_dare_same_mask(fn, density, shape, backend, monkeypatch):
    """PEFT's DARE: drop with probability 1-density, rescale by 1/density, then (dare_ties)
    elect the sign on the unweighted rescaled tasks and divide by the agreeing count."""
    for K in KS:
        tasks, w = make_tasks(shape, K, seed=40 + K), _weights(K, seed=40 + K)
        seed = 2**40 + 17 * K
        extra = ("frequency",) if fn == "dare_ties_frequency" else ()
        name = fn.replace("_frequency", "")
        ours = getattr(F, name)(tasks, w, density, *extra, seed=seed, backend=backend)
        theirs = _peft_with_philox(monkeypatch, seed, density, range(K), getattr(P, name),
                                   tasks, w, density, *extra)
        _close(ours, theirs, msg=f"K={K}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
                         ids=["bf16-fp32w", "fp16-fp16w"])
@pytest.mark.parametrize("fn", ["dare_linear", "dare_ties"])
def test_dare_low_precision_same_mask(fn, dtype, wdtype, backend, monkeypatch):
    """bf16 tasks: PEFT's full_like(task, density) rounds density to bf16 (0.5 and 0.75 are
    exact); the mask we hand back keeps with fp32(density)."""
    tasks = make_tie_free_tasks((23, 41), 3, dtype, seed=41)
    w = torch.tensor([1.0, 0.5, -0.25]).to(wdtype)
    for density in (0.5, 0.75):
        ours = getattr(F, fn)(tasks, w, density, seed=7, backend=backend)
        theirs = _peft_with_philox(monkeypatch, 7, density, range(3), getattr(P, fn), tasks, w, density)
        assert ours.dtype == theirs.dtype == _peft_dtype(fn, dtype, wdtype)
        # PEFT rounds t * mask / density to the task dtype before weighting
        atol, rtol = _tol(dtype, wdtype)
        assert_close_frac(ours, theirs, atol=atol, rtol=rtol, max_frac=0.0, msg=fn)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["dare_linear", "dare_ties"])
def test_dare_density_zero(fn, backend, monkeypatch):
    """By-design difference 4: PEFT computes 0/0 = NaN; fastmerge drops everything -> 0."""
    tasks, w = make_tasks((37, 53), 3, seed=42), _weights(3, seed=42)
    ours = getattr(F, fn)(tasks, w, 0.0, seed=1, backend=backend)
    assert torch.equal(ours, torch.zeros_like(ours))
    theirs = _peft_with_philox(monkeypatch, 1, 0.0, range(3), getattr(P, fn), tasks, w, 0.0)
    assert torch.isnan(theirs).all()


# ---- single-tensor helpers -----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 1e-3, 0.25, 0.6, 0.999, 1.0])
def test_magnitude_based_pruning(density, shape, backend):
    t = make_tasks(shape, 1, seed=50)[0]
    ours = F.magnitude_based_pruning(t, density, backend=backend)
    theirs = P.magnitude_based_pruning(t, density)
    assert torch.equal(ours, theirs)
    assert int((ours != 0).sum()) == int(density * t.numel())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [1e-3, 0.25, 0.6, 0.999])
def test_random_pruning_same_mask(density, shape, rescale, backend, monkeypatch):
    """Single tensor: fastmerge uses stream 0."""
    t = make_tasks(shape, 1, seed=51)[0]
    ours = F.random_pruning(t, density, rescale, seed=12345, backend=backend)
    theirs = _peft_with_philox(monkeypatch, 12345, density, [0], P.random_pruning, t, density, rescale)
    _close(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.999, 1.0, 2.0])
def test_prune(density, method, rescale, backend, monkeypatch):
    t = make_tasks((37, 53), 1, seed=52)[0]
    if density >= 1:
        with pytest.warns(UserWarning, match="no pruning"):
            theirs = P.prune(t, density, method, rescale)
        with pytest.warns(UserWarning, match="no pruning"):
            ours = F.prune(t, density, method, rescale, seed=3, backend=backend)
        assert torch.equal(ours, theirs)
        return
    ours = F.prune(t, density, method, rescale, seed=3, backend=backend)
    if method == "random" and density == 0.0 and rescale:
        assert torch.equal(ours, torch.zeros_like(t))  # PEFT: NaN (by-design difference 4)
        return
    streams = [0] if method == "random" else []
    theirs = _peft_with_philox(monkeypatch, 3, density, streams, P.prune, t, density, method, rescale)
    _close(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prune_errors_match(backend):
    t = make_tasks((5, 7), 1, seed=53)[0]
    for fn, kw in ((P.prune, {}), (F.prune, {"backend": backend})):
        with pytest.raises(ValueError, match="Density should be >= 0"):
            fn(t, -0.5, "magnitude", **kw)
        with pytest.raises(ValueError, match="Unknown method"):
            fn(t, 0.5, "bogus", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_calculate_majority_sign_mask(shape, method, backend):
    for K in KS:
        tasks = make_tasks(shape, K, seed=60 + K)
        # exact zeros (pruned entries) never agree with the majority sign
        tasks = [torch.where(t.abs() < 0.02, torch.zeros_like(t), t) for t in tasks]
        T = torch.stack(tasks)
        ours = F.calculate_majority_sign_mask(T, method, backend=backend)
        theirs = P.calculate_majority_sign_mask(T, method)
        assert ours.dtype == theirs.dtype == torch.bool
        assert torch.equal(ours, theirs), f"K={K}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_calculate_majority_sign_mask_all_zero_column_is_positive(backend):
    """A sum of exactly 0 elects +1 (``>= 0``) in both; then only positive entries agree."""
    T = torch.tensor([[0.5, 0.0, -1.0], [-0.5, 0.0, 1.0], [0.0, 0.0, 0.0]])
    for m in ("total", "frequency"):
        assert torch.equal(F.calculate_majority_sign_mask(T, m, backend=backend),
                           P.calculate_majority_sign_mask(T, m))


@pytest.mark.parametrize("mask_kind", ["peft", "float"])
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_disjoint_merge(shape, K, mask_kind):
    tasks = make_tasks(shape, K, seed=70 + K)
    T = torch.stack(tasks) * _weights(K, seed=K).reshape((K,) + (1,) * len(shape))
    mask = P.calculate_majority_sign_mask(torch.stack(tasks), "total")
    if mask_kind == "float":
        mask = mask.float()
    _close(F.disjoint_merge(T, mask), P.disjoint_merge(T, mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["task_arithmetic", "magnitude_prune", "ties"])
def test_scalar_weight_tensor_like_peft(fn, backend):
    """PEFT's reshape_weight_task_tensors broadcasts a 0-d weights tensor over all tasks."""
    tasks = make_tasks((5, 7), 3, seed=80)
    w = torch.tensor(0.5)
    args = (tasks, w) if fn == "task_arithmetic" else (tasks, w, 0.4)
    _close(getattr(F, fn)(*args, backend=backend), getattr(P, fn)(*args))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["task_arithmetic", "magnitude_prune", "ties"])
@pytest.mark.parametrize("tdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_float64_weights_give_float64_like_peft(tdtype, fn, backend):
    """float64 weights make PEFT's result float64; fastmerge computes in fp32 (weights rounded
    to fp32) and casts. Tie-free tasks: bf16 magnitudes would otherwise tie at the cut."""
    tasks = make_tie_free_tasks((23, 41), 3, tdtype, seed=82)
    w = _weights(3, torch.float64, seed=82)
    args = (tasks, w) if fn == "task_arithmetic" else (tasks, w, 0.4)
    ours, theirs = getattr(F, fn)(*args, backend=backend), getattr(P, fn)(*args)
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_output_dtype_like_peft_same_dtype_weights(dtype, fn, backend):
    """Low-precision tasks with same-dtype weights: PEFT's ties/dare_ties return float32
    (their disjoint merge divides by ``clamp(mask.sum(0), min=1.0)``, a float32 tensor); the
    linear ones keep the task dtype."""
    tasks = make_tasks((5, 7), 2, dtype, seed=81)
    w = torch.tensor([1.0, 0.5], dtype=dtype)
    args = (tasks, w) if fn == "task_arithmetic" else (tasks, w, 1.0)  # density 1: no RNG
    theirs = _quiet(getattr(P, fn), *args)
    ours = _quiet(getattr(F, fn), *args, backend=backend)
    assert theirs.dtype == _peft_dtype(fn, dtype, dtype)
    assert ours.dtype == theirs.dtype
