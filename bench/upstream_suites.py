"""Run mergekit's and PEFT's own test suites, from their sdists, unpatched and patched.

The acceptance check of issue 17's drop-in: mergekit 0.1.5's test suite passes with
``fastmerge.integrations.mergekit.patch()`` exactly as it does unpatched (and fastmerge's
kernels are called), and PEFT 0.21.2's ``tests/test_custom_models.py -k weighted`` passes with
``fastmerge.integrations.peft.patch(rng="torch")`` as it does unpatched.

    python bench/upstream_suites.py                       # both suites, every mode
    python bench/upstream_suites.py --suites mergekit --modes unpatched,patched
    python bench/upstream_suites.py --json bench/results/upstream_suites.json

Each run is one ``python -m pytest`` subprocess in the extracted sdist, with the plugin
``bench/upstream/fm_upstream_plugin.py`` (``-p fm_upstream_plugin``), which applies the patch
before any test module is imported and counts the calls fastmerge's backends receive. Modes:
``unpatched``; ``patched`` (``patch()``: DARE/DELLA masks from fastmerge's Philox stream);
``torch`` (``patch(rng="torch")``: the library's own ``torch.bernoulli`` draws). The sdists
are fetched with ``pip download --no-deps --no-binary :all:`` into ``--workdir`` once. The
tests import the sdist's own package (pytest runs in its root), which must be the installed
release the integration accepts.

Output: a table of pass/fail/skip/error counts, wall time and fused-backend call counts per
run, and with ``--json`` the same rows (plus failing test ids) with the commit and versions.
Slow on a small machine (mergekit's suite merges small models end to end): minutes per run.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import time

HERE = pathlib.Path(__file__).resolve().parent
SUITES = {
    # name: (distribution, version, pytest arguments inside the sdist)
    # the sdist ships no tests/common.py: 6 modules cannot be collected (patched or not), the
    # other modules still run (--continue-on-collection-errors)
    "mergekit": ("mergekit", "0.1.5", ["tests", "--continue-on-collection-errors"]),
    "peft": ("peft", "0.21.2", ["tests/test_custom_models.py", "-k", "weighted"]),
}
MODES = ("unpatched", "patched", "torch")


def sdist(dist: str, version: str, workdir: pathlib.Path) -> pathlib.Path:
    """The extracted sdist of ``dist==version`` under ``workdir`` (downloaded once)."""
    root = workdir / f"{dist}-{version}"
    if not root.is_dir():
        _extract(dist, version, workdir)
    # PEFT's sdist drops the (empty) tests/__init__.py its tests' relative imports need
    init = root / "tests" / "__init__.py"
    if dist == "peft" and not init.exists():
        init.write_text("")
    return root


def _extract(dist: str, version: str, workdir: pathlib.Path) -> None:
    archive = workdir / f"{dist}-{version}.tar.gz"
    if not archive.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"{dist}=={version}", "-d", str(workdir)], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")


def run_one(suite: str, mode: str, workdir: pathlib.Path, extra: list, common=None) -> dict:
    dist, version, args = SUITES[suite]
    root = sdist(dist, version, workdir)
    if suite == "mergekit" and common is not None:
        # the sdist's missing test helpers, from a file the user supplies (mergekit's git)
        (root / "tests" / "common.py").write_text(pathlib.Path(common).read_text())
        (root / "tests" / "__init__.py").touch()
    out = workdir / f"result_{suite}_{mode}.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, FM_UPSTREAM_LIB=suite, FM_UPSTREAM_MODE=mode, FM_UPSTREAM_OUT=str(out),
               PYTHONPATH=os.pathsep.join([str(HERE / "upstream"), os.environ.get("PYTHONPATH", "")]))
    # addopts="": PEFT's pyproject asks for pytest-cov; -p no:cacheprovider: the sdist stays as extracted
    cmd = [sys.executable, "-m", "pytest", *args, "-q", "-p", "fm_upstream_plugin", "-p", "no:cacheprovider",
           "-o", "addopts=", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = workdir / f"log_{suite}_{mode}.txt"
    log.write_text(proc.stdout + proc.stderr)
    row = {"suite": suite, "mode": mode, "command": " ".join(cmd), "cwd": str(root),
           "wall_s": round(wall, 1), "returncode": proc.returncode, "log": str(log)}
    if out.exists():
        row.update(json.loads(out.read_text()))
    else:
        row["error"] = "the plugin wrote no result (see the log)"
    return row


def _meta() -> dict:
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=HERE, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    return {"commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "versions": {d: version(d) for d in ("torch", "mergekit", "peft", "transformers", "fastmerge")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default="mergekit,peft", help="comma list of: " + ", ".join(SUITES))
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of: " + ", ".join(MODES))
    ap.add_argument("--workdir", default="/tmp/fastmerge-upstream", help="sdists, logs and per-run results")
    ap.add_argument("--json", default=None, help="write the rows and metadata here")
    ap.add_argument("--mergekit-common", default=None, metavar="PATH",
                    help="a tests/common.py for mergekit's suite (its sdist lacks the file, so 6 of "
                         "its test modules cannot be collected without one); use a --workdir of "
                         "its own, the file is written into the extracted sdist")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    a = ap.parse_args(argv)
    suites, modes = a.suites.split(","), a.modes.split(",")
    for name, allowed, what in ((suites, SUITES, "--suites"), (modes, MODES, "--modes")):
        bad = [x for x in name if x not in allowed]
        if bad:
            ap.error(f"{what}: unknown {bad[0]!r}; choose from {', '.join(allowed)}")
    workdir = pathlib.Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows, meta = [], _meta()  # the commit and versions under test, read before the first run
    for suite in suites:
        for mode in modes:
            row = run_one(suite, mode, workdir, a.pytest_args, a.mergekit_common)
            row["mergekit_common"] = a.mergekit_common if suite == "mergekit" else None
            rows.append(row)
            c = row.get("counts", {})
            print(f"{suite:9s} {mode:9s} passed {c.get('passed', '?'):>4} failed {c.get('failed', '?'):>3} "
                  f"skipped {c.get('skipped', '?'):>3} error {c.get('error', '?'):>3}  "
                  f"fused calls {row.get('fastmerge_fused_calls', '?'):>6}  {row['wall_s']:7.1f} s", flush=True)
            if a.json:  # after every run: a long session that ends early keeps what it measured
                pathlib.Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
