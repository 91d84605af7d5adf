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
    (delta,) = results["fanout_delta"]  # SotW and delta streams through real gRPC, the same changes
    for protocol in ("sotw", "delta"):
        assert delta[protocol]["clients_served"] == delta["streams"], delta[protocol]
        for kind in ("weight", "new canary"):
            assert delta[protocol][kind]["changes"] >= 1
            assert delta[protocol][kind]["bytes_per_stream"] > 0
    assert delta["delta"]["new canary"]["bytes_per_stream"] < delta["sotw"]["new canary"]["bytes_per_stream"]
    assert [run["envoys"] for run in results["envoy_push_ack"]] == [1, 2]
    assert results["engine"]["victim_phase_after"] == "RolledBack"
    assert "| aviary ÷ bare_1 |" in result.stdout  # the markdown table is printed
    assert "| delta ÷ sotw |" in result.stdout
    out = REPO / "tests" / "bench" / "out"
    assert (out / "results-quick.markdown").read_text().startswith("Load average")
    assert (out / "quick-fanout_time.png").stat().st_size > 0
