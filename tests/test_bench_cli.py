"""``fastmerge bench``: the rows it saves carry every field the benchmark contract names, the
speedups are the measured ratios, and the plots are written."""
from __future__ import annotations

import json

import pytest
import torch

from fastmerge.cli import main as cli

FIELDS = {"op", "backend", "device", "shape", "dtype", "k", "median_ms", "bytes", "gbps",
          "pct_of_copy_bw", "speedup_vs", "commit", "versions", "date"}


def test_bench_json_rows_and_plots(tmp_path, capsys):
    pytest.importorskip("mergekit")
    pytest.importorskip("peft")
    path = tmp_path / "r.json"
    args = ["bench", "--quick", "--shapes", "96x80", "--methods", "ties,dare_ties", "--json", str(path)]
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    assert cli(args + ["--plot", str(plots)]) == 0
    table = capsys.readouterr().out
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert rows and {"commit", "versions", "date", "copy_gbps"} <= set(data["meta"])
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["shape"] == [96, 80] and r["k"] == 3 and r["median_ms"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / r["median_ms"] / 1e6, rel=1e-6)
        assert r["pct_of_copy_bw"] == pytest.approx(100 * r["gbps"] / data["meta"]["copy_gbps"], rel=1e-6)
        assert r["op"] in table
    ours = [r for r in rows if r["backend"] not in ("peft", "mergekit")]
    refs = {(r["op"], r["backend"]): r["median_ms"] for r in rows if r["backend"] in ("peft", "mergekit")}
    assert ours and {r["backend"] for r in rows} >= {"peft", "mergekit"}
    assert any(s is not None for r in ours for s in r["speedup_vs"].values())
    for r in ours:
        for lib, s in r["speedup_vs"].items():
            if s is not None:  # the ratio of the two medians of this run
                assert s == pytest.approx(refs[(r["op"], lib)] / r["median_ms"], rel=1e-6)
    assert (plots / "gbps.png").stat().st_size > 1000 and (plots / "speedup.png").stat().st_size > 1000


def test_bench_other_methods_rows(tmp_path):
    """mergekit's other methods in ``fastmerge bench``: each method's row at its own K, next to
    mergekit's in the same run, bytes as bench/methods.py counts them, the fused/reference path."""
    pytest.importorskip("mergekit")
    from fastmerge import backends
    from fastmerge.bench import methods as M

    if not backends.module("cpu").status()["available"]:
        pytest.skip("native CPU module not built: no cpu rows")

    names = ["slerp", "karcher", "sce", "passthrough"]
    path = tmp_path / "m.json"
    assert cli(["bench", "--quick", "--shapes", "64x48", "--methods", ",".join(names),
                "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert {r["op"] for r in rows} == set(names)
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["k"] == M.k_of(r["op"]) and r["shape"] == [64, 48]
        assert r["bytes"] == (M.bytes_in(r["op"]) + 1) * 64 * 48 * 4
        assert r["pct_of_copy_bw"] == pytest.approx(100 * r["gbps"] / data["meta"]["copy_gbps"], rel=1e-6)
    ref = {r["op"]: r["median_ms"] for r in rows if r["backend"] == "mergekit"}
    ours = [r for r in rows if r["backend"] == "cpu"]
    assert set(ref) == set(names) and {r["op"] for r in ours} == set(names)
    for r in ours:
        assert r["speedup_vs"]["mergekit"] == pytest.approx(ref[r["op"]] / r["median_ms"], rel=1e-6)
        assert r["path"] == M.path(r["op"], "cpu")
    assert {r["op"]: r["path"] for r in ours}["slerp"] == "fused"


def test_bare_io_pass_moves_the_merge_bytes(tmp_path):
    """bench.integrations' I/O floor: it reads every tensor of every input (by name, in each
    model's own headers) and writes one output of the base's size."""
    pytest.importorskip("transformers")
    import subprocess
    import sys

    from safetensors import safe_open

    from fastmerge.bench import integrations as bi

    paths = bi.build_llamas(str(tmp_path / "llamas"), "tiny")
    out = tmp_path / "io.out"
    subprocess.run([sys.executable, "-c", bi._BARE_IO, str(out)] + paths, check=True)
    names, blobs = [], {}
    for d in paths:
        for f in sorted(p for p in (tmp_path / "llamas").glob(f"{d.split('/')[-1]}/*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                for key in fh.keys():
                    t = fh.get_tensor(key)
                    if d == paths[0]:
                        names.append(key)
                    blobs[(d, key)] = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    data = out.read_bytes()
    assert len(data) == sum(len(blobs[(paths[0], k)]) for k in names)
    # the buffer last held the last model's tensor, written at the base tensor's place
    assert data == b"".join(blobs[(paths[-1], k)] for k in names)
    wall, rss = bi.bench_bare_io(paths, str(out))
    assert wall > 0 and rss > 0 and not out.exists()
