"""``aviary record`` and ``aviary simulate`` on real traffic: a failing and a healthy canary run live
(threshold checks), and one judged by the statistical judge on sample series
(real Envoy, real Prometheus, the engine of ``aviary serve``), are recorded from that Prometheus,
and replayed by ``aviary simulate``, both run as the user runs them (``python -m aviary``).

The replay starts when the live canary arrived and its proxies ACK after the live ACK latency, so
its check rounds fall where the live ones did, and the recording's points fall on them too (it
starts a whole number of seconds before the arrival). It must take the same transitions, each
within one round of the live one (``checkEvery`` plus the live loop's latency): a recorded point
is Prometheus' answer a few milliseconds before the live round asked, so a scrape landing in
between can move a verdict by one round, never change the story. Then the recordings answer
what a user would try: a stricter threshold rolls back the healthy canary, and a sweep finds the
settings that roll back the failing canary and promote the healthy one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aviary.policy.rollout_state import Phase, TransitionEvent
from tests.e2e.test_rollouts import SUCCESS_RATE, Canary, Rig, analysis, canary_factory  # noqa: F401
from tests.rig.stage import running_rig, write_results
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

CHECK_EVERY = 2.0
LATENCY = {"name": "latency", "template": "request-duration-p99", "max": 500}
STRATEGY = {"steps": [20, 50], "interval": "4s"}
JUDGE = {"metrics": [{"name": "errors", "template": "error-rate-5xx", "direction": "increase"}],
         "step": "2s", "minSamples": 5, "horizon": 10, "maxWindow": "1m"}
LOOP_LATENCY = 0.25
"""Seconds a live round may start after its simulated twin: each round is due ``checkEvery`` after
the previous one started, and the live loop starts it a few milliseconds late."""
SWEEP = ["--sweep", "analysis.failureLimit=0,5", "--sweep", "analysis.metrics.1.max=0.1,500"]
TIMINGS: dict[str, Any] = {}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with running_rig(tmp_path_factory.mktemp("simulate"), Rig) as rig:
        yield rig
    write_results("simulate", TIMINGS)


@dataclass
class LiveRun:
    name: str
    policy: Path
    recording: Path
    arrived: TransitionEvent
    ack_delay: float
    transitions: list[TransitionEvent]
    record_flags: list[str]


def aviary(*args: str, expect: int | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "aviary", *args], capture_output=True, text=True, timeout=120,
                          check=False)
    if expect is not None:
        command = " ".join(args)
        assert done.returncode == expect, f"aviary {command}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def simulate(run: LiveRun, *extra: str, expect: int | None = None) -> Any:
    done = aviary("simulate", str(run.policy), "--metrics", str(run.recording), "--start", f"{run.arrived.at:.3f}",
                  "--ack-delay", f"{run.ack_delay:.3f}", "-o", "json", *extra, expect=expect)
    assert done.returncode in (0, 3, 4), f"exit {done.returncode}\n{done.stderr}"
    return json.loads(done.stdout)


def run_live(rig: Rig, canary: Canary, workdir: Path, judged: bool) -> LiveRun:
    """Run the canary live to its decision, copy its policy, record it from Prometheus."""
    checks = analysis(rig, [SUCCESS_RATE, LATENCY], checkEvery=f"{CHECK_EVERY:g}s", window="5s")
    if judged:  # the judge alone: canary and stable sample series (range queries), sample by sample
        del checks["metrics"]
        checks["judge"] = JUDGE
    canary.start(STRATEGY if not judged else {**STRATEGY, "interval": "20s"}, checks)
    policy = workdir / f"{canary.name}.yaml"
    policy.write_text((rig.policies / f"{canary.name}.yaml").read_text())
    canary.wait_until_settled(60)
    events = [e for e in rig.history(canary.name) if e.at >= canary.written_at and e.from_phase is not None]
    arrived = next(e for e in events if e.reason.startswith("new version v2"))
    acked = next(e for e in events if "ACKed by every proxy" in e.reason)
    decided = events[-1]
    assert decided.to_phase in (Phase.ROLLED_BACK, Phase.STABLE), rig.story(canary.name)
    # Prometheus must have scraped past the decision before the span is recorded.
    wait_until(lambda: (rig.prometheus.query_value("max(timestamp(up))") or 0) > decided.at + 2, 15,
               what="a scrape after the decision")
    recording = workdir / f"{canary.name}.json.gz"
    flags = ["--prometheus", rig.prometheus.url, "--from", f"{arrived.at - 1:.3f}", "--to", f"{decided.at + 2:.3f}",
             "--stable", "v1"]
    aviary("record", "--policy", str(policy), *flags, "-o", str(recording), expect=0)
    return LiveRun(canary.name, policy, recording, arrived, acked.at - arrived.at, events, flags)


def assert_same_story(run: LiveRun, simulated: Any) -> list[dict[str, Any]]:
    """Same transitions in the same order, each within one checkEvery of the live one."""
    live = [(e.to_phase.value, e.weight, round(e.at - run.arrived.at, 3)) for e in run.transitions]
    replayed = [(t["to"], t["weight"], t["offset_seconds"]) for t in simulated["transitions"]]
    story = "\n".join(f"  live {a}   simulated {b}" for a, b in zip(live, replayed + [None] * len(live), strict=False))
    assert [(to, w) for to, w, _ in live] == [(to, w) for to, w, _ in replayed], story
    for (_, _, live_at), (_, _, simulated_at) in zip(live, replayed, strict=True):
        assert abs(live_at - simulated_at) <= CHECK_EVERY + LOOP_LATENCY, story
    return [{"to": to, "weight": w, "live_s": live_at, "simulated_s": sim_at}
            for (to, w, live_at), (_, _, sim_at) in zip(live, replayed, strict=True)]


@pytest.fixture(scope="module")
def runs() -> dict[str, LiveRun]:
    return {}


@pytest.fixture
def live(rig: Rig, canary_factory: Callable[..., Canary], runs: dict[str, LiveRun],  # noqa: F811
         tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], LiveRun]:
    """``live("failing")``: that canary run live and recorded, once per module."""

    def make(kind: str) -> LiveRun:
        if kind not in runs:
            canary = canary_factory(f"sim-{kind}")
            if kind in ("failing", "judged"):
                canary.backends.set_behaviour("v2", error_rate=0.3 if kind == "failing" else 0.5)
            runs[kind] = run_live(rig, canary, tmp_path_factory.mktemp(kind), judged=kind == "judged")
        return runs[kind]

    return make


@pytest.mark.parametrize(("kind", "outcome"), [("failing", "rolled back"), ("healthy", "promoted"), ("judged", None)])
def test_simulation_takes_the_live_decisions(live: Callable[[str], LiveRun], kind: str, outcome: str | None) -> None:
    """``judged``: whatever the judge decided live (a 50 % error canary against 0 %), the replay decides."""
    run = live(kind)
    lived = "rolled back" if run.transitions[-1].to_phase is Phase.ROLLED_BACK else "promoted"
    assert outcome in (None, lived)
    started = time.monotonic()
    simulated = simulate(run, expect=3 if lived == "rolled back" else 0)
    took = time.monotonic() - started
    assert simulated["outcome"] == lived
    side_by_side = assert_same_story(run, simulated)
    TIMINGS[kind] = {"transitions": side_by_side, "simulate_wall_s": round(took, 2),
                     "ack_delay_s": round(run.ack_delay, 3)}
    print(f"[timing] {kind}: simulate took {took:.2f}s; " + "; ".join(
        f"{t['to']} {t['weight']}%: live {t['live_s']:.2f}s, simulated {t['simulated_s']:.2f}s" for t in side_by_side))


def test_a_stricter_threshold_rolls_back_the_healthy_recording(live: Callable[[str], LiveRun]) -> None:
    run = live("healthy")
    simulated = simulate(run, "--sweep", "analysis.metrics.1.max=0.1", expect=0)
    (only,) = simulated
    assert only["outcome"] == "rolled back", only["summary"]
    failed = [check for r in only["rounds"] for check in r["checks"] if check["outcome"] == "fail"]
    assert failed and {check["name"] for check in failed} == {"latency"}


def test_the_sweep_finds_the_settings_that_tell_the_two_recordings_apart(live: Callable[[str], LiveRun]) -> None:
    outcomes = {kind: {entry["sweep"]: entry["outcome"] for entry in simulate(live(kind), *SWEEP, expect=0)}
                for kind in ("failing", "healthy")}
    right = {label for label in outcomes["healthy"]
             if outcomes["healthy"][label] == "promoted" and outcomes["failing"][label] == "rolled back"}
    # failureLimit 5 would let the failing canary run on (its recording ends 2 s after the live
    # rollback: 2 failed rounds); a p99 bound of 0.1 ms fails the healthy one.
    assert right == {"analysis.failureLimit=0 analysis.metrics.1.max=500"}, outcomes
    assert outcomes["failing"]["analysis.failureLimit=5 analysis.metrics.1.max=500"] != "rolled back", outcomes


def test_the_text_table_and_the_plot(live: Callable[[str], LiveRun], tmp_path: Path) -> None:
    run = live("failing")
    plot = tmp_path / "run.png"
    done = aviary("simulate", str(run.policy), "--metrics", str(run.recording), "--start", f"{run.arrived.at:.3f}",
                  "--plot", str(plot), expect=3)
    assert "-> RolledBack, 0%: rolled back v2" in done.stdout, done.stdout
    assert "success=" in done.stdout and "rolled back after" in done.stdout, done.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_can_read_prometheus_itself(live: Callable[[str], LiveRun]) -> None:
    """``--prometheus URL --from --to`` records in memory first: the same replay as from the file."""
    run = live("failing")
    start = ["--start", f"{run.arrived.at:.3f}", "--ack-delay", f"{run.ack_delay:.3f}", "-o", "json"]
    direct = json.loads(aviary("simulate", str(run.policy), *run.record_flags, *start, expect=3).stdout)
    from_file = simulate(run, expect=3)
    assert direct["transitions"] == from_file["transitions"]
    assert direct["rounds"] == from_file["rounds"]
