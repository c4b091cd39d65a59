"""The TIES family's one-pass merge (csrc/select_merge.cpp) against the two passes it replaces
(the exact top-k select, then the fused merge) and the ``torch`` reference.

The one-pass merge decides every element's masks from a sampled bracket of each threshold and
merges again, exactly, only the elements whose keys fell inside a bracket. It must equal the
two-pass merge bit for bit: every dtype, K = 1..8, densities at their edges, split ties at the
threshold, non-finite inputs and overflow, and a sample that misses (then the two passes run).
"""
from __future__ import annotations

import json

import pytest
import torch

import fastmerge
import fastmerge.backends.cpu as cpu_backend
from conftest import BACKENDS, assert_match, models_for

pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BIG = (1024, 1031)  # past select_merge's 2^20 elements, not a multiple of 8 or of a block

CASES = [
    ("ties", dict(density=0.2)),
    ("ties", dict(density=[0.0, 1.0, 0.35, 0.6, 0.1, 0.9, 0.5, 0.25], weights=[1.0, -0.5, 0.7, 0.2, 1.3, 0.4, 0.9, 2.0])),
    ("ties", dict(density=0.5, normalize=False, lam=0.6)),
    ("breadcrumbs_ties", dict(density=0.3, gamma=0.05)),
    ("breadcrumbs", dict(density=0.6, gamma=0.2)),
    ("breadcrumbs", dict(density=0.9, gamma=0.0, lam=1.5)),
]


def _bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _two_pass(monkeypatch, fn):
    """``fn()`` with select_merge switched off: the exact select and the fused merge."""
    with monkeypatch.context() as m:
        m.setattr(cpu_backend, "_ONE_PASS_MIN", 1 << 62)
        return fn()


def _kwargs(kw, K):
    kw = dict(kw)
    for key in ("density", "weights"):
        if isinstance(kw.get(key), list):
            kw[key] = kw[key][:K]
    return kw


def _status(base, models, out, k_stop, k_start, weights, consensus=1):
    """select_merge called directly: its status (0 merged, 1 the bracket missed)."""
    lib = cpu_backend._lib()
    dt = cpu_backend._DT(models[0].dtype)
    res = lib.select_merge(base.data_ptr(), [m.data_ptr() for m in models], dt, out.data_ptr(),
                           cpu_backend._DT(out.dtype), out.numel(), k_stop, k_start, weights, consensus,
                           True, 1, 1.0, True, 1.0, 2)
    return res[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("K", [1, 2, 5, 8])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_one_pass_equals_two_passes(monkeypatch, dtype, K, case):
    method, kw = CASES[case]
    kw = _kwargs(kw, K)
    base, ms = models_for(BIG, K, dtype, seed=K)

    def run():
        return fastmerge.merge(method, base, ms, backend="cpu", **kw)

    one = run()
    two = _two_pass(monkeypatch, run)
    assert torch.equal(_bits(one), _bits(two)), f"{method} {dtype} K={K}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_one_pass_against_reference(dtype):
    base, ms = models_for((3, 517, 701), 3, dtype)
    for method, kw in CASES:
        ref = fastmerge.merge(method, base, ms, backend="torch", **_kwargs(kw, 3))
        out = fastmerge.merge(method, base, ms, backend="cpu", **_kwargs(kw, 3))
        assert_match(out, ref, method)


@pytest.mark.parametrize("levels", [3, 40])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.93])
def test_split_ties_at_the_threshold(monkeypatch, levels, density):
    """Few distinct magnitudes: the k-th key is tied by a large share of the elements, so the
    lowest-index tie cut falls inside a block and the bracket holds only ties."""
    n = (1 << 20) + 13
    g = torch.Generator().manual_seed(levels)
    base = torch.zeros(n)
    ms = [torch.randint(-levels, levels + 1, (n,), generator=g).float() / levels for _ in range(3)]
    for method in ("ties", "breadcrumbs_ties"):
        def run():
            return fastmerge.merge(method, base, ms, density=density, gamma=0.1, backend="cpu")

        one = run()
        assert torch.equal(_bits(one), _bits(_two_pass(monkeypatch, run))), method
        assert_match(one, fastmerge.merge(method, base, ms, density=density, gamma=0.1, backend="torch"), method)


def test_the_one_pass_runs_and_a_missed_bracket_falls_back(monkeypatch):
    n = 1 << 21
    base = torch.zeros(n)
    g = torch.Generator().manual_seed(0)
    ms = [torch.randn(n, generator=g) for _ in range(2)]
    out = torch.empty(n)
    assert _status(base, ms, out, [n // 5, n // 3], [0, 0], [1.0, 1.0]) == 0
    # large values hidden where the sample does not look (its layout: sample_brackets in
    # csrc/magnitude_select.cpp, clamp(n >> 10, 1024, 8192) runs of 16, evenly spaced)
    runs, run = min(8192, max(1024, n >> 10)), 16
    hidden = (torch.arange(n) % (n // runs)) >= run
    ms[0] = torch.full((n,), 1e-3)
    ms[0][hidden] = 1.0 + torch.rand(int(hidden.sum()), generator=g)
    assert _status(base, ms, out, [n // 2, n // 3], [0, 0], [1.0, 1.0]) == 1
    merged = fastmerge.merge("ties", base, ms, density=[0.5, 1 / 3], backend="cpu")
    assert torch.equal(merged, _two_pass(monkeypatch, lambda: fastmerge.merge(
        "ties", base, ms, density=[0.5, 1 / 3], backend="cpu")))
    assert_match(merged, fastmerge.merge("ties", base, ms, density=[0.5, 1 / 3], backend="torch"), "fallback")


def test_non_contiguous_and_out_dtype(monkeypatch):
    base, ms = models_for((1031, 2048), 3, torch.float32)
    base, ms = base[:, ::2], [m[:, ::2] for m in ms]
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        def run():
            return fastmerge.merge("ties", base, ms, density=0.3, out_dtype=out_dtype, backend="cpu")

        one = run()
        assert one.dtype == out_dtype
        assert torch.equal(_bits(one), _bits(_two_pass(monkeypatch, run)))


@pytest.mark.parametrize("where", ["base", "models[1]"])
def test_nonfinite_input_is_named(where):
    base, ms = models_for(BIG, 3, torch.float32)
    (base if where == "base" else ms[1]).view(-1)[777_777] = float("nan")
    with pytest.raises(fastmerge.NonFiniteError, match=where.replace("[", r"\[").replace("]", r"\]")):
        fastmerge.merge("ties", base, ms, density=0.3, backend="cpu")


def test_overflow_of_the_merge_is_reported():
    n = 1 << 20
    base = torch.zeros(n)
    ms = [torch.full((n,), 3e38), torch.full((n,), 3e38)]
    ms[0][5] = 0.0  # not all keys equal
    with pytest.raises(fastmerge.NonFiniteError, match="overflow"):
        fastmerge.merge("ties", base, ms, density=0.9, weights=[1.0, 1.0], normalize=False, backend="cpu")


def test_bench_compares_both_variants_in_one_run(tmp_path):
    """bench/select_merge.py: both variants timed in the run that measured the copy bandwidth,
    the shares and the speedup are those medians' ratios, and the one-pass threshold is restored."""
    from fastmerge.bench import select_merge as bench

    path = tmp_path / "sm.json"
    before = cpu_backend._ONE_PASS_MIN
    bench.main(["--shape", "1024x1025", "--k", "2", "--reps", "1", "--dtypes", "float32,bfloat16",
                "--json", str(path)])
    assert cpu_backend._ONE_PASS_MIN == before
    data = json.loads(path.read_text())
    copy = data["meta"]["copy_gbps"]
    assert {r["op"] for r in data["rows"]} == set(bench.METHODS) and len(data["rows"]) == 2 * len(bench.METHODS)
    for r in data["rows"]:
        for v in ("one_pass", "two_pass"):
            assert r[f"{v}_pct_of_copy_bw"] == pytest.approx(100 * r["bytes"] / r[f"{v}_ms"] / 1e6 / copy, rel=1e-6)
        assert r["speedup"] == pytest.approx(r["two_pass_ms"] / r["one_pass_ms"], rel=1e-9)
