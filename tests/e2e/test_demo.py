"""`make demo` and `make demo-rollback` as a new user runs them, without a terminal (smoke tests).

Each starts its own backends, Prometheus, Envoy and `aviary serve` on free ports and stops them.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


def run_make(target: str) -> str:
    result = subprocess.run(
        ["make", "--no-print-directory", target, "DEMO_ARGS=--free-ports"],
        cwd=REPO, env={**os.environ, "CI": "true"}, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    print(output)
    return output


def test_make_demo_promotes_v2_through_envoy() -> None:
    output = run_make("demo")
    assert "[demo] result: shop: Stable, stable v2" in output
    for weight in (0, 10, 30, 60):  # a cohort step first: only the internal requests reach v2
        assert len(re.findall(rf"canary at +{weight}% and cohorts internal: +\d+\.\d s", output)) == 1, output
    assert re.search(r"canary at +0% and cohorts internal and mirror 100%: +\d+\.\d s", output), output
    assert "check success: Pass" in output, output  # the values that let it through
    sent, failed = map(int, re.search(r"requests sent (\d+), failed (\d+)", output).groups())  # type: ignore[union-attr]
    assert sent > 100 and failed == 0, output
    copies = int(re.search(r"mirrored copies answered by v2: (\d+)", output).group(1))  # type: ignore[union-attr]
    assert copies > 50, output  # 5 s of three quarters of 50 requests/s, each copied
    assert "users moved back from v2 to v1 while the canary ran: 0 " in output, output
    assert re.search(r"v1 kept warm in Envoy for \d+\.\d s \(afterPromotion\), then retired", output), output
    # Scene 2: v3 answers every request but converts worse; the orders check against stable (the
    # backends' orders_completed_total by versionLabel) rolls it back.
    scene = output[output.index("[demo] scene 2:"):]
    assert "check orders: Pass" in output[: -len(scene)], output  # v2 converted as well as v1
    assert "[demo] result: shop: RolledBack, stable v2: rolled back v3" in scene, output
    number = r"[\d.e-]+"
    fail = rf"check orders: Fail \(value {number}\) canary {number} / stable {number} = {number} < min \(0\.5\)"
    assert re.search(fail, scene), output
    assert "check success: Pass" in scene, output  # a success rate alone would have promoted v3
    sent, failed = map(int, re.search(r"requests sent (\d+), failed (\d+): only the orders check", scene).groups())  # type: ignore[union-attr]
    assert sent > 20 and failed == 0, output
    # Scene 3: scene 2 recorded from Prometheus and replayed by aviary simulate, then swept.
    replay = output[output.index("[demo] scene 3:"):output.index("[demo] scene 4:")]
    simulated = r"simulated: rolled back after [\d.]+m?s \(step \d+: .*\) \(exit status 3\); live: rolled back"
    assert re.search(simulated, replay), output
    assert "compare.min=0.5  rolled back after" in replay, output
    # Scene 4: v4 failing 30 % is rolled back from Envoy's own reports (analysis.provider: envoy).
    reports = output[output.index("[demo] scene 4:"):]
    assert "[demo] result: shop: RolledBack, stable v2: rolled back v4" in reports, output
    assert re.search(r"first failed request -> canary out of Envoy's route, from Envoy's reports: \d+\.\d\d s",
                     reports), output


def test_make_demo_rollback_rolls_back_and_times_it() -> None:
    output = run_make("demo-rollback")
    assert "scene 2" not in output, output
    assert "[demo] result: shop: RolledBack, stable v1" in output
    assert "check success: Fail" in output
    out_of_route = r"first failed request -> canary out of Envoy's route \(0 %, no cohort route\): \d+\.\d\d s"
    assert re.search(out_of_route, output), output
