"""The review checks of issue 23 for the GPU check scripts (stage ``review``):

* host syncs per merge: ``torch.cuda.set_sync_debug_mode("warn")`` warnings and
  ``fastmerge._transfer.reads`` on ties, dare_ties and della (budget: 1 read per merge);
* a merge on a non-default stream, equal to the same merge on the default stream;
* K in {3, 12, 17, 64}: ties and dare_ties on each GPU backend equal the ``cpu`` backend bit
  for bit (K = 64: the largest kernel variant; its compile time is recorded);
* more than 2**31 elements where memory allows: task_arithmetic checked on the last slice, and
  single-model ties keeping exactly ``k`` elements (64-bit indices, the selection's slots);
* ``--sanitizer memcheck|racecheck``: one small merge under ``compute-sanitizer`` (a
  subprocess running this file with ``--case small``).

Run: ``python bench/gpu_check_review.py --work DIR [--backends triton] [--dry-run]``; writes
``DIR/review.json`` and prints one line per check. ``--dry-run``: the same code on the CPU with
the ``cpu`` backend at tiny sizes (no sync mode, no stream, no sanitizer: the figures mean
nothing). Exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

# the installed fastmerge (with its built native module) when there is one; the checkout only
# when nothing is installed (its source tree has no native module unless built in place)
try:
    import importlib.util

    _installed = importlib.util.find_spec("fastmerge") is not None
except (ImportError, ValueError):
    _installed = False
if not _installed:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# the backend every result is compared with: the fused cpu kernels (the device's install stage
# requires them); a dry run from a source tree without its native module built (the CI's clean
# clone, whose checkout is on PYTHONPATH ahead of the installed package) falls back to the torch
# reference, so the checks' logic is still rehearsed
REF = "cpu"


def _reference_backend():
    import fastmerge

    return "cpu" if fastmerge.backends()["cpu"]["available"] else "torch"


def _models(shape, K, dev, dtype, seed=0):
    import torch

    g = torch.Generator(device=dev).manual_seed(seed)
    base = torch.randn(shape, device=dev, generator=g) * 0.02
    ms = [(base + 0.002 * torch.randn(shape, device=dev, generator=g)).to(dtype) for _ in range(K)]
    return base.to(dtype), ms


def _merges(base, ms):
    import fastmerge

    return {
        "ties": lambda b: fastmerge.ties(base, ms, density=0.3, backend=b),
        "dare_ties": lambda b: fastmerge.dare_ties(base, ms, density=0.3, seed=7, backend=b),
        "della": lambda b: fastmerge.della(base, ms, density=0.4, epsilon=0.1, seed=7, backend=b),
    }


def sync_counts(backend, dev, dry):
    """Host reads (fastmerge._transfer) and CUDA sync warnings per merge, after a warmup."""
    import warnings

    import torch

    from fastmerge import _transfer

    base, ms = _models((256, 512) if dry else (1024, 4096), 4, dev, torch.bfloat16)
    rows = []
    for name, fn in _merges(base, ms).items():
        fn(backend)  # compile first
        before = _transfer.reads
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if not dry:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                fn(backend)
            finally:
                if not dry:
                    torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
        reads = _transfer.reads - before
        rows.append({"merge": name, "backend": backend, "host_reads": reads,
                     "sync_warnings": None if dry else syncs,
                     "ok": reads <= 1 if name != "della" else True})
    return rows


def side_stream(backend, dev, dry):
    import torch

    base, ms = _models((128, 256), 3, dev, torch.bfloat16, seed=1)
    want = _merges(base, ms)["ties"](backend)
    if dry:
        return [{"check": "non_default_stream", "ok": None, "note": "no CUDA stream on the CPU"}]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = _merges(base, ms)["ties"](backend)
    s.synchronize()
    return [{"check": "non_default_stream", "backend": backend, "ok": bool(torch.equal(got, want))}]


def k_exactness(backend, dev, dry):
    import torch

    rows = []
    for K in (3, 12, 17, 64):
        base, ms = _models((64, 257), K, "cpu", torch.bfloat16, seed=K)
        for name in ("ties", "dare_ties"):
            ref = _merges(base, ms)[name](REF)
            t = time.perf_counter()
            got = _merges(base.to(dev), [m.to(dev) for m in ms])[name](backend).cpu()
            rows.append({"check": f"K={K} {name}", "backend": backend, "ok": bool(torch.equal(got, ref)),
                         "first_call_s": round(time.perf_counter() - t, 2)})
    return rows


def huge(backend, dev, dry):
    """> 2**31 elements: task_arithmetic on its last slice, single-model ties' exact k."""
    import torch

    import fastmerge

    n = (1 << 12) + 5 if dry else (1 << 31) + 4099
    need = 4 * n * 2 * 2  # base, one model, output (bf16) and working room
    if not dry and torch.cuda.mem_get_info()[0] < need:
        return [{"check": "n > 2**31", "ok": None, "note": "not enough free GPU memory"}]
    g = torch.Generator(device=dev).manual_seed(3)
    base = torch.randn(n, device=dev, generator=g, dtype=torch.float32).to(torch.bfloat16)
    x = (base.float() + torch.randn(n, device=dev, generator=g)).to(torch.bfloat16)
    out = fastmerge.task_arithmetic(base, [x], backend=backend)
    tail = slice(n - 4096, n)
    ref = fastmerge.task_arithmetic(base[tail].cpu(), [x[tail].cpu()], backend=REF)
    rows = [{"check": "n > 2**31 task_arithmetic tail", "n": n, "ok": bool(torch.equal(out[tail].cpu(), ref))}]
    del out
    k = int(0.3 * n)
    out = fastmerge.ties(base, [x], density=0.3, backend=backend)
    kept = int((out != base).sum())  # distinct deltas: exactly the top k differ from base
    rows.append({"check": "n > 2**31 ties keeps k", "n": n, "kept": kept, "k": k,
                 "ok": abs(kept - k) <= int(((x.float() - base.float()) == 0).sum())})
    return rows


def sanitizer(tool, backend):
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(exe):
        return [{"check": f"compute-sanitizer {tool}", "ok": None, "note": "compute-sanitizer not found"}]
    cmd = [exe, "--tool", tool, "--error-exitcode", "9", sys.executable, os.path.abspath(__file__),
           "--case", "small", "--backends", backend]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    tail = (r.stdout + r.stderr)[-600:]
    return [{"check": f"compute-sanitizer {tool}", "backend": backend, "rc": r.returncode,
             "ok": r.returncode == 0, "tail": tail}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None)
    p.add_argument("--backends", default="triton")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--sanitizer", default="", help="memcheck, racecheck or both (comma-separated)")
    p.add_argument("--case", default="all", choices=["all", "small"])
    a = p.parse_args(argv)
    global REF
    REF = _reference_backend()
    dev = "cpu" if a.dry_run else "cuda"
    backends = [REF] if a.dry_run else [b for b in a.backends.split(",") if b]
    if a.case == "small":  # what compute-sanitizer runs: one small merge per backend
        for b in backends:
            import torch
            base, ms = _models((64, 257), 3, dev, torch.bfloat16)
            for fn in _merges(base, ms).values():
                fn(b)
        return 0
    rows = []

    def add(new):  # printed as they come: a stage killed at its limit keeps its rows in the log
        for r in new:
            print("review", json.dumps(r), flush=True)
        rows.extend(new)

    for b in backends:
        for check in (sync_counts, side_stream, k_exactness, huge):
            try:
                add(check(b, dev, a.dry_run))
            except Exception as exc:  # a failing check is a row, the others still run
                add([{"check": check.__name__, "backend": b, "ok": False, "error": repr(exc)[:400]}])
        for tool in [t for t in a.sanitizer.split(",") if t and not a.dry_run]:
            add(sanitizer(tool, b))
    if a.work:
        os.makedirs(a.work, exist_ok=True)
        with open(os.path.join(a.work, "review.json"), "w") as f:
            json.dump({"dry_run": a.dry_run, "rows": rows}, f, indent=1)
    return 1 if any(r.get("ok") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
