"""fastmerge benchmark suites, installed as ``fastmerge.bench``.

* :mod:`fastmerge.bench.suite` - the engine behind ``fastmerge bench`` (table, JSON, plots).
* ``bench/test_bench_merge.py`` - the same cases as a pytest-benchmark suite for regression
  tracking (``python -m pytest bench -q --benchmark-only``); it is not part of ``pytest tests``.
"""
