"""`make bench QUICK=1` still runs end to end (small N, no Prometheus), so the benchmark keeps working.

Only completion and the shape of its output are checked: timings vary with the machine and its load,
and are never pass/fail.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


def test_quick_bench_writes_json_table_and_plots(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    result = subprocess.run(
        ["make", "--no-print-directory", "bench", "QUICK=1", f"BENCH_ARGS=--output {output}"],
        cwd=REPO, env={**os.environ, "CI": "true"}, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(output.read_text())
    (fanout,) = results["fanout"]
    for server in ("aviary", "bare_1", f"bare_{fanout['workers']}"):
        assert fanout[server]["clients_served"] == fanout["streams"], fanout[server]
    assert set(fanout["ratio_to_bare_1"]) >= {"change_p50", "server_cpu_per_change", "rss_per_stream"}
    assert [run["envoys"] for run in results["envoy_push_ack"]] == [1, 2]
    assert results["engine"]["victim_phase_after"] == "RolledBack"
    assert "| aviary ÷ bare_1 |" in result.stdout  # the markdown table is printed
    out = REPO / "tests" / "bench" / "out"
    assert (out / "results-quick.markdown").read_text().startswith("Load average")
    assert (out / "quick-fanout_time.png").stat().st_size > 0
