"""``fastmerge bench``: the rows it saves carry every field the benchmark contract names, the
speedups are the measured ratios, and the plots are written."""
from __future__ import annotations

import json

import pytest

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
