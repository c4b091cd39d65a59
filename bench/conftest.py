"""Keep the benchmarks out of a plain ``pytest`` run from the repository root: they run only when
bench/ (or a file in it) is named on the command line, or with ``--benchmark-only``."""
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _names_bench(config) -> bool:
    for arg in config.args:
        path = os.path.abspath(str(arg).split("::")[0])
        if path == HERE or path.startswith(HERE + os.sep):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    try:
        only = config.getoption("benchmark_only")
    except ValueError:  # pytest-benchmark not installed
        only = False
    if only or _names_bench(config):
        return
    skip = pytest.mark.skip(reason="benchmark: run `python -m pytest bench --benchmark-only`")
    for item in items:
        if os.path.abspath(str(item.fspath)).startswith(HERE + os.sep):
            item.add_marker(skip)
