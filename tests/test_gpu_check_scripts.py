"""bench/gpu_check.sh and bench/gpu_check_cuda.sh, the prepared device runs of issues 21 and 22:
they parse (``bash -n``), list their stages, reject unknown options and stages, and write
``summary.json`` for every way a stage ends (ok, failed, killed at its limit, skipped for want
of budget), within the device tool's limits on what comes back from ``$OUT``. The stages
themselves are rehearsed with ``--dry-run`` (bench/README.md); here only the cheap ``report``
stage runs, with ``PYTHON`` swapped for stand-ins that fail or hang."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["bench/gpu_check.sh", "bench/gpu_check_cuda.sh"]
STAGES = {
    "bench/gpu_check.sh": ["env", "install", "tests", "tests_quant", "bench_accept", "l2_check", "bench_quick",
                           "bench_quant", "bench_lowrank", "review", "report"],
    "bench/gpu_check_cuda.sh": ["env", "install", "build_cuda", "tests_cuda", "bench_accept", "l2_check",
                                "bench_quick", "review", "report"],
}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run(script, *args, env=None, timeout=60):
    return subprocess.run(["bash", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def summary(out_dir):
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


def check_out_dir(out_dir):
    """What the device tool brings back: at most 8 plain files, named in letters, digits . _ -"""
    names = os.listdir(out_dir)
    assert len(names) <= 8, names
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name), name
        assert os.path.isfile(os.path.join(out_dir, name)), name


@pytest.mark.parametrize("script", SCRIPTS + ["bench/gpu_check_lib.sh"])
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_list_and_bad_arguments(script, tmp_path):
    r = run(script, "--list", env={"OUT": str(tmp_path / "out")})
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == STAGES[script]
    assert not (tmp_path / "out").exists()  # --list writes nothing
    for bad in (["--bogus"], ["--stages", "env,nope"], ["--budget", "soon"]):
        r = run(script, *bad, env={"OUT": str(tmp_path / "out")})
        assert r.returncode == 2, (bad, r.stdout, r.stderr)


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_writes_the_summary(script, tmp_path):
    out = tmp_path / "out"
    r = run(script, "--dry-run", "--stages", "report", env={"OUT": str(out), "WORK": str(tmp_path / "work")})
    assert r.returncode == 0, r.stdout + r.stderr
    s = summary(out)
    assert s["script"] == script and s["mode"] == "dry-run" and s["complete"] and s["ok"]
    assert [st["name"] for st in s["stages"]] == STAGES[script]
    by = {st["name"]: st for st in s["stages"]}
    assert by["report"]["status"] == "ok" and by["report"]["rc"] == 0
    assert all(by[n]["status"] == "skipped" for n in STAGES[script][:-1])
    assert s["report"]["script"] == script  # report.json embedded
    assert "---- " + script + " report ----" in r.stdout
    check_out_dir(out)


def test_failed_and_killed_stages_are_recorded(tmp_path):
    """A stage that fails, one killed at its time limit and one left no budget all leave their
    status, exit code and duration in summary.json, and the script's exit code says so."""
    fail, hang = tmp_path / "fail", tmp_path / "hang"
    fail.write_text("#!/bin/sh\necho partial output; exit 3\n")
    hang.write_text("#!/bin/sh\necho partial output; exec sleep 60\n")
    for p in (fail, hang):
        p.chmod(0o755)
    script = SCRIPTS[0]
    cases = [(fail, "99", "failed", 3), (hang, "7", "timeout", 124), (fail, "3", "no_time", None)]
    for i, (python, budget, status, rc) in enumerate(cases):
        out = tmp_path / f"out{i}"
        r = run(script, "--dry-run", "--stages", "report", "--budget", budget,
                env={"OUT": str(out), "WORK": str(tmp_path / f"work{i}"), "PYTHON": str(python)})
        assert r.returncode != 0, (status, r.stdout)
        s = summary(out)
        st = {x["name"]: x for x in s["stages"]}["report"]
        assert (st["status"], st["rc"]) == (status, rc), st
        assert s["complete"] and not s["ok"]
        if status != "no_time":  # the partial log came back
            assert "partial output" in (out / "gpu_check.log").read_text()
        if status == "timeout":
            assert st["seconds"] <= 7 + 12 and st["limit_s"] <= 7 and "limit" in st["note"]
        check_out_dir(out)


def test_dry_run_review_stage(tmp_path):
    """Issue 23's review checks rehearsed on the CPU: every check runs and lands in the report."""
    out, work = tmp_path / "out", tmp_path / "work"
    r = run("bench/gpu_check.sh", "--dry-run", "--stages", "review,report",
            env={"OUT": str(out), "WORK": str(work), "PYTHON": sys.executable}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    by = {st["name"]: st for st in summary(out)["stages"]}
    assert by["review"]["status"] == "ok", by["review"]
    rows = json.loads((work / "review.json").read_text())["rows"]
    checks = {row.get("check") or row.get("merge") for row in rows}
    assert {"ties", "dare_ties", "della", "non_default_stream", "K=64 ties",
            "n > 2**31 ties keeps k"} <= checks, checks
    assert all(row["ok"] is not False for row in rows), rows
    assert "review ok" in r.stdout
    check_out_dir(out)
