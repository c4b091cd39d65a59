"""The Python steps of ``bench/gpu_check.sh`` and ``bench/gpu_check_cuda.sh``.

    python bench/gpu_check_steps.py combine OUT.json PART.json ...   # bench.gpu parts -> one file
    python bench/gpu_check_steps.py l2 --work DIR [--backends triton] [--dry-run]
    python bench/gpu_check_steps.py report --out DIR --work DIR --script NAME

* ``combine``: the ``{meta, rows}`` files of several ``python -m bench.gpu`` runs (the acceptance
  rows, the quick plan) as one, the file to commit as ``bench/results/gpu_<gpu>.json``. ``meta``
  is the first part's, plus ``parts`` (each run's mode, command, copy bandwidth, errors, wall
  time) and ``gpu_check`` (commit and source hash from the script: a checkout that travels
  without ``.git`` has ``commit: null`` in the bench's own meta). Missing parts are left out.
* ``l2``: a second opinion on the acceptance figures with the L2 cache flushed before every
  call, as the device notes advise (``triton.testing.do_bench``: CUDA events per call, a 256 MB
  buffer zeroed between calls, median). ``bench.gpu`` itself times batches of back-to-back calls
  with no flush; at bf16 4096x14336, K=4 the working set (6 x 117 MB) is 12x the H200's 60 MB L2,
  so the two should agree, and this step says whether they do. ``--dry-run``: the same code on
  tiny CPU tensors with a wall-clock median (no GPU, no L2 flush), so the step cannot crash on
  the device for a typo.
* ``report``: the short table that ends the script's output (the device tool returns its
  tail): stages' pytest summaries, copy bandwidth, the acceptance figures against their targets,
  the quantizers' % of copy bandwidth, lowrank's error columns, the L2 check, and the name to
  commit the results under. Also saved as ``$WORK/report.json``, which ``summary.json`` embeds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run as a script from the checkout
    sys.path.insert(0, os.path.dirname(HERE))

COPY_GBPS_SEEN = 4300.0  # KINDS.md: device-to-device copy on an H200 here, read + write counted
QUANT_TARGET_PCT = 80.0  # issue 21: quantizers >= 80% of the copy bandwidth
PYTEST_SUMMARY = re.compile(r"^=*\s*(\d+ (passed|failed|skipped|deselected|error|errors|xfailed)\b.*?)\s*=*$")


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _dump(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- combine


def combine(out: str, parts: list) -> int:
    loaded = [(p, d) for p, d in ((p, _load(p)) for p in parts) if d and "rows" in d]
    if not loaded:
        print(f"combine: none of {', '.join(map(os.path.basename, parts))} exists yet; {out} not written")
        return 0
    meta = dict(loaded[0][1].get("meta", {}))
    meta["parts"] = [{k: d.get("meta", {}).get(k) for k in ("mode", "config", "copy_gbps", "errors", "wall_s", "date")}
                     for _, d in loaded]
    meta["errors"] = [e for _, d in loaded for e in (d.get("meta", {}).get("errors") or [])]
    meta["gpu_check"] = {"commit": os.environ.get("GC_COMMIT"), "dirty": os.environ.get("GC_DIRTY"),
                         "source_sha256_16": os.environ.get("GC_SRC_SHA"),
                         "script": os.environ.get("GC_SCRIPT"), "dry_run": os.environ.get("DRY_RUN") == "1"}
    rows = [r for _, d in loaded for r in d["rows"]]
    _dump({"meta": meta, "rows": rows}, out)
    print(f"combine: {len(rows)} rows from {', '.join(os.path.basename(p) for p, _ in loaded)} -> {out}")
    return 0


# ----------------------------------------------------------------------------- l2


def _timer(dry: bool):
    if dry:
        def wall_median(fn):
            fn()
            times = []
            for _ in range(5):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times) * 1e3
        return wall_median
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def l2_check(work: str, backends: list, dry: bool) -> int:
    import torch

    import fastmerge
    from bench import gpu as bench_gpu

    dev = "cpu" if dry else "cuda"
    shape = (96, 160) if dry else tuple(bench_gpu.ACCEPT["shape"])
    k, dtype = bench_gpu.ACCEPT["k"], torch.bfloat16
    timer = _timer(dry)
    g = torch.Generator(device=dev).manual_seed(0)
    base32 = torch.randn(shape, device=dev, generator=g) * 0.02
    models = [(base32 + 0.002 * torch.randn(shape, device=dev, generator=g)).to(dtype) for _ in range(k + 1)]
    base = base32.to(dtype)
    del base32
    n = base.numel()
    nbytes = (k + 2) * n * base.element_size()
    src = torch.ones((256 << 20) // 4 if not dry else 1 << 16, device=dev)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda s=src, d=dst: d.copy_(s))  # bound now: the names are deleted below
    copy_gbps = 2 * src.numel() * 4 / copy_ms / 1e6
    del src, dst
    rows = [{"op": "copy", "backend": "torch", "median_ms": copy_ms, "gbps": copy_gbps, "pct_of_copy_bw": 100.0}]
    run_on = ["cpu"] if dry else backends
    for b in run_on:
        cases = [("ties", lambda b=b: fastmerge.ties(base, models[:k], weights=[1.0 / k] * k, density=0.2, backend=b))]
        if not dry:  # the fused pass alone, thresholds given: bench.gpu's kernel-level row
            cases += [(c.op, c.fn) for c, _ in bench_gpu.kernel_cases(shape, dev, dtype, (base, models, None), k, [b])
                      if c.op == "ties_merge_pass"]
        for op, fn in cases:
            ms = timer(fn)
            gbps = nbytes / ms / 1e6
            rows.append({"op": op, "backend": b, "median_ms": ms, "gbps": gbps, "pct_of_copy_bw": 100 * gbps / copy_gbps})
    result = {"timer": "wall-clock median of 5 on a shared CPU, no L2 flush (dry run: checks the code, "
                       "the figures mean nothing)" if dry else
              "triton.testing.do_bench: CUDA events per call, L2 flushed (256 MB zeroed) before each, median",
              "shape": list(shape), "dtype": "bfloat16", "k": k, "device": str(dev), "rows": rows}
    _dump(result, os.path.join(work, "l2.json"))
    for r in rows:
        print(f"l2 {r['op']:<16} {r['backend']:<7} {r['median_ms']:9.3f} ms {r['gbps']:9.1f} GB/s "
              f"{r['pct_of_copy_bw']:6.1f}% of copy")
    return 0


# ----------------------------------------------------------------------------- report


def _pytest_summaries(path: str) -> list:
    """Every pytest summary line of a log, with the stage it ran in (the '=== name: start' lines)."""
    out, stage = [], None
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.rstrip()
                m = re.match(r"^=== (\S+): start", line)
                if m:
                    stage = m.group(1)
                    continue
                m = PYTEST_SUMMARY.match(line)
                if m and " in " in line:
                    out.append({"stage": stage, "summary": m.group(1)})
    except OSError:
        pass
    return out


def _slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", name.lower().replace("nvidia", "")).strip("_")
    return s or "unknown"


def _section(report: dict, key: str, fn):
    try:
        report[key] = fn()
    except Exception as exc:  # the report must come out whatever one part of the run left behind
        report[key] = {"error": f"{type(exc).__name__}: {exc}"}


def _acceptance(bench, log):
    if bench is None:
        return None
    from bench import gpu as bench_gpu

    return bench_gpu.acceptance(bench["rows"], log=log)


def _quant(q):
    if q is None:
        return None
    # the quantizer launches alone ("triton kernel (...)" rows, on a GPU) are the figure held
    # against the copy bandwidth; without them (the CPU dry run) the fast backend's calls
    quant = [r for r in q["rows"] if str(r.get("op", "")).startswith("quantize_")]
    fast = ([r for r in quant if str(r.get("backend")).startswith("triton kernel")]
            or [r for r in quant if not str(r.get("backend")).startswith("torch")])
    pcts = [r["pct_of_copy_bw"] for r in fast if isinstance(r.get("pct_of_copy_bw"), (int, float))]
    worst = min(fast, key=lambda r: r["pct_of_copy_bw"]) if fast else None
    return {"rows": len(q["rows"]), "quantizer_rows": len(fast), "copy_gbps": q.get("meta", {}).get("copy_gbps"),
            "min_pct_of_copy_bw": min(pcts) if pcts else None, "max_pct_of_copy_bw": max(pcts) if pcts else None,
            "worst": worst and {k: worst.get(k) for k in ("op", "backend", "shape", "pct_of_copy_bw")},
            "target_pct": QUANT_TARGET_PCT,
            "verdict": None if not pcts else ("ok" if min(pcts) >= QUANT_TARGET_PCT else "BELOW TARGET")}


def _lowrank(lr):
    if lr is None:
        return None
    err = {}
    for r in lr["rows"]:
        for key in ("error_ratio", "rel_err_vs_exact"):
            if isinstance(r.get(key), (int, float)):
                err[key] = max(err.get(key, 0.0), r[key])
    return {"rows": len(lr["rows"]), "max_error_ratio": err.get("error_ratio"),
            "max_rel_err_vs_exact": err.get("rel_err_vs_exact")}


def report(out: str, work: str, script: str) -> int:
    lines = []
    log = lines.append
    bench = _load(os.path.join(out, "bench.json"))
    rep = {"script": script}
    cuda_script = "cuda" in os.path.basename(script)
    rep["tests"] = _pytest_summaries(os.path.join(out, "tests.log"))
    meta = (bench or {}).get("meta", {})
    rep["device"] = meta.get("device")
    rep["copy_gbps"] = meta.get("copy_gbps")
    rep["bench_rows"] = len(bench["rows"]) if bench else 0
    rep["bench_errors"] = meta.get("errors")
    _section(rep, "acceptance", lambda: _acceptance(bench, log))
    if not cuda_script:
        _section(rep, "quant", lambda: _quant(_load(os.path.join(out, "quant.json"))))
        _section(rep, "lowrank", lambda: _lowrank(_load(os.path.join(out, "lowrank.json"))))
    rep["l2"] = _load(os.path.join(work, "l2.json"))
    rep["review"] = _load(os.path.join(work, "review.json"))
    gpu = rep["device"] if rep["device"] and os.environ.get("DRY_RUN") != "1" else None
    rep["results_file"] = (f"bench/results/gpu_{_slug(gpu)}{'_cuda' if cuda_script else ''}.json" if gpu
                           else "(dry run: nothing to commit)")
    _dump(rep, os.path.join(work, "report.json"))

    print(f"---- {script} report ----")
    for t in rep["tests"]:
        print(f"tests  {t['stage'] or '?':<14} {t['summary']}")
    if not rep["tests"]:
        print("tests  no pytest summary in tests.log (the stage did not finish)")
    if rep["copy_gbps"]:
        seen = "" if os.environ.get("DRY_RUN") == "1" else f" (KINDS.md saw ~{COPY_GBPS_SEEN:.0f} on an H200 here)"
        print(f"copy bandwidth {rep['copy_gbps']:.1f} GB/s on {rep['device']}{seen}")
    print(f"bench rows {rep['bench_rows']}, errors {len(rep['bench_errors'] or [])}")
    for line in lines:
        print(line)
    for key in ("quant", "lowrank"):
        if rep.get(key):
            print(f"{key:<7} {json.dumps(rep[key])}")
    for r in (rep["l2"] or {}).get("rows", []):
        print(f"l2     {r['op']:<16} {r['backend']:<7} {r['gbps']:9.1f} GB/s {r['pct_of_copy_bw']:6.1f}% of copy")
    for r in (rep["review"] or {}).get("rows", []):
        print(f"review {'ok  ' if r.get('ok') else 'n/a ' if r.get('ok') is None else 'FAIL'} "
              f"{json.dumps({k: v for k, v in r.items() if k not in ('ok', 'tail')})}")
    print(f"commit the bench JSON ($OUT/bench.json) as {rep['results_file']}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("combine")
    c.add_argument("out")
    c.add_argument("parts", nargs="+")
    l2 = sub.add_parser("l2")
    l2.add_argument("--work", required=True)
    l2.add_argument("--backends", default="triton")
    l2.add_argument("--dry-run", action="store_true")
    r = sub.add_parser("report")
    r.add_argument("--out", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--script", required=True)
    a = p.parse_args(argv)
    if a.cmd == "combine":
        return combine(a.out, a.parts)
    if a.cmd == "l2":
        return l2_check(a.work, [b for b in a.backends.split(",") if b], a.dry_run)
    return report(a.out, a.work, a.script)


if __name__ == "__main__":
    sys.exit(main())
