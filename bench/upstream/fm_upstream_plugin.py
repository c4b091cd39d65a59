"""pytest plugin of ``bench/upstream_suites.py``: runs an upstream library's own test suite
(mergekit's or PEFT's, from their sdists) with fastmerge's drop-in patch applied or not, and
records what happened.

Configured by the environment (the driver sets it):

* ``FM_UPSTREAM_LIB``: ``mergekit`` or ``peft`` (which integration to patch);
* ``FM_UPSTREAM_MODE``: ``unpatched``, ``patched`` (default rng, Philox) or ``torch``
  (``patch(rng="torch")``);
* ``FM_UPSTREAM_OUT``: the JSON file written at the end of the session.

Before any test module is imported it applies the patch, and it counts the calls fastmerge's
backends receive (every backend function a merge plan, a method or a primitive ends in, per
backend), by wrapping those functions in place -- the wrappers call the originals, so nothing is
mocked. The JSON holds the outcome counts (passed, failed, skipped, error, xfailed, xpassed), the
failing test ids and the call counts.
"""
from __future__ import annotations

import collections
import functools
import json
import os

_CALLS = collections.Counter()
_FAILED = []
# the functions of a backend module a merge can end in (fastmerge.backends.Backend)
_BACKEND_FUNCTIONS = ("run_plan", "run_plan_quantized", "elect_sign", "disjoint_merge",
                      "magnitude_threshold", "random_drop", "quantize")


def _count(owner, name, label):
    original = getattr(owner, name, None)
    if original is None or getattr(original, "__fm_counted__", False):
        return

    @functools.wraps(original)
    def counted(*args, **kwargs):
        _CALLS[label] += 1
        return original(*args, **kwargs)

    counted.__fm_counted__ = True
    setattr(owner, name, counted)


def _install_counters():
    from fastmerge import backends

    for backend in ("cpu", "triton", "cuda", "torch"):
        try:
            module = backends.module(backend)
        except Exception as exc:  # noqa: BLE001 -- a backend that cannot import is not counted
            _CALLS[f"{backend}.unavailable ({type(exc).__name__})"] = 0
            continue
        for fn in _BACKEND_FUNCTIONS:
            _count(module, fn, f"{backend}.{fn}")
    original = backends.method_ops

    @functools.wraps(original)
    def method_ops(name):  # the fused plans of fastmerge.methods get one backend's kernels
        _CALLS[f"{name}.methods"] += 1
        return original(name)

    if not getattr(original, "__fm_counted__", False):
        method_ops.__fm_counted__ = True
        backends.method_ops = method_ops


def pytest_configure(config):
    lib = os.environ.get("FM_UPSTREAM_LIB", "")
    mode = os.environ.get("FM_UPSTREAM_MODE", "unpatched")
    if mode not in ("unpatched", "patched", "torch"):
        raise ValueError(f"FM_UPSTREAM_MODE must be unpatched, patched or torch, got {mode!r}")
    _install_counters()
    if mode != "unpatched":
        if lib == "mergekit":
            from fastmerge.integrations import mergekit as integration
        elif lib == "peft":
            from fastmerge.integrations import peft as integration
        else:
            raise ValueError(f"FM_UPSTREAM_LIB must be mergekit or peft, got {lib!r}")
        integration.patch(rng="torch" if mode == "torch" else "philox")


def pytest_runtest_logreport(report):
    if report.failed:
        _FAILED.append(f"{report.nodeid} ({report.when})")


def pytest_collectreport(report):
    if report.failed:
        _FAILED.append(f"{report.nodeid} (collection)")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    stats = terminalreporter.stats
    counts = {k: len(stats.get(k, [])) for k in ("passed", "failed", "skipped", "error", "xfailed", "xpassed")}
    fused = sum(v for k, v in _CALLS.items() if not k.startswith("torch."))
    out = os.environ.get("FM_UPSTREAM_OUT")
    if out:
        with open(out, "w") as f:
            json.dump({"lib": os.environ.get("FM_UPSTREAM_LIB"), "mode": os.environ.get("FM_UPSTREAM_MODE"),
                       "exitstatus": int(exitstatus), "counts": counts, "failed": _FAILED,
                       "fastmerge_calls": dict(_CALLS), "fastmerge_fused_calls": fused}, f, indent=1)
    terminalreporter.write_line(f"fastmerge upstream plugin: counts {counts}, fused backend calls {fused}")
