"""benchmarks/export_cluster.py on the smallest cluster: its rows, stamps and table."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import export_cluster  # noqa: E402


def test_export_cluster_writes_timed_rows_with_the_command(tmp_path):
    out = tmp_path / "ec"
    export_cluster.main(["--sizes", "1", "2", "--channels", "4", "--warmup", "0", "--repeats", "2", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    assert [r["atoms"] for r in rows] == [3, 24] and [r["pairs"] for r in rows] == [6, 552]
    for r in rows:
        assert r["median_ms"] > 0 and r["eager_ms"] > 0
        assert abs(r["ratio"] - r["median_ms"] / r["eager_ms"]) <= 0.01 * r["ratio"] + 0.01
    meta = data["meta"]
    assert meta["command"].endswith("--out " + str(out)) and meta["kind"] == "multipole" and "git_commit" in meta
    md = out.with_suffix(".md").read_text()
    assert "| atoms | pairs | exported (ms) |" in md and "| 24 | 552 |" in md
