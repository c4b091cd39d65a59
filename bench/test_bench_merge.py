"""pytest-benchmark suite: the cases of ``fastmerge bench`` at one moderate shape, for regression
tracking (``--benchmark-autosave`` / ``--benchmark-compare``).

    python -m pytest bench -q --benchmark-only
    python -m pytest bench -q --benchmark-only --benchmark-autosave      # store in .benchmarks/
    python -m pytest bench -q --benchmark-only --benchmark-compare       # against the last one

Not part of the test run (``pytest tests``). Every fastmerge backend available here is timed
(the torch reference included), next to PEFT's and mergekit's own implementations; each
benchmark group holds one op with its reference, so pytest-benchmark's table compares them.

Environment knobs:
    FASTMERGE_BENCH_SHAPE=2048x2048   shape (default 1024x1024)
    FASTMERGE_BENCH_DTYPE=bfloat16    dtype (default float32)
    FASTMERGE_BENCH_K=3               number of models (default 3)
    FASTMERGE_BENCH_BACKENDS=cpu      fastmerge backends (default: every available one)
    FASTMERGE_BENCH_REFS=0            skip PEFT and mergekit
"""
import os

import pytest
import torch

try:
    from . import suite
except ImportError:  # collected outside the package (e.g. --import-mode=importlib, no rootdir)
    try:
        from fastmerge.bench import suite
    except ModuleNotFoundError:
        from bench import suite

SHAPE = tuple(int(d) for d in os.environ.get("FASTMERGE_BENCH_SHAPE", "1024x1024").lower().split("x"))
DTYPE = suite.DTYPES[os.environ.get("FASTMERGE_BENCH_DTYPE", "float32").lower()]
K = int(os.environ.get("FASTMERGE_BENCH_K", str(suite.DEFAULT_K)))
DENSITY = suite.DEFAULT_DENSITY
_env_backends = os.environ.get("FASTMERGE_BENCH_BACKENDS")
BACKENDS = [b.strip() for b in _env_backends.split(",") if b.strip()] if _env_backends else None
REFS = os.environ.get("FASTMERGE_BENCH_REFS", "1") not in ("0", "false", "no", "")

KEYS = suite.case_keys(backends=BACKENDS, refs=REFS)
SHAPE_STR = "x".join(map(str, SHAPE))
DTYPE_STR = str(DTYPE).replace("torch.", "")

pytestmark = pytest.mark.benchmark(min_rounds=5, max_time=1.0, warmup=True, warmup_iterations=1)


@pytest.fixture(scope="module")
def cases():
    built, numel = suite.make_cases(shape=SHAPE, dtype=DTYPE, k=K, density=DENSITY,
                                    backends=BACKENDS, refs=REFS)
    yield {(c.op, c.api, c.backend): c for c in built}, numel
    del built


@pytest.mark.parametrize("op,api,backend", KEYS, ids=[f"{a}-{o}-{b}" for o, a, b in KEYS])
def test_merge(benchmark, cases, op, api, backend):
    by_key, numel = cases
    case = by_key[(op, api, backend)]
    benchmark.group = f"{api}.{op} {SHAPE_STR} {DTYPE_STR} K={K}"
    if case.slow:
        # PEFT, mergekit and the torch reference take up to ~1 s per call at 1024x1024 on two
        # cores; a few rounds are enough to track them.
        out = benchmark.pedantic(case.fn, rounds=3, iterations=1, warmup_rounds=1)
    else:
        out = benchmark(case.fn)
    assert isinstance(out, torch.Tensor) and out.shape == SHAPE
    other = op in suite.OTHER_METHODS  # mergekit's other methods run at their own K
    k = suite.other_methods.k_of(op) if other else K
    nbytes = suite.bytes_moved(op, api, numel, k, DTYPE, out.dtype)
    benchmark.extra_info.update(op=op, api=api, backend=backend, shape=list(SHAPE), dtype=DTYPE_STR,
                                k=k, density=None if other or op in suite.NO_DENSITY else DENSITY,
                                bytes=nbytes)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = nbytes / stats.stats.median / 1e9
