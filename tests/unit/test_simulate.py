"""``aviary simulate`` in process on synthetic recordings (tests/unit/synthetic_recordings.py):
every exit status, every invalid input as one line on stderr, the judge on simulated series,
``--ack-delay``, and ``-o json`` against the table. No socket: the recording answers the checks."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aviary.cli import main
from aviary.simulation.replay import Outcome, simulate
from tests.unit.synthetic_recordings import (
    COUNT,
    T0,
    Value,
    failing_after,
    healthy,
    parse,
    policy_doc,
    recording,
    write,
)


@pytest.fixture(autouse=True)
def _log_levels() -> Iterator[None]:
    """``aviary simulate`` quietens the engine's loggers for its table: put them back for other tests."""
    loggers = [logging.getLogger(name) for name in ("aviary.engine", "aviary.director")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def simulate_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["simulate", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status: int, out: str, err: str) -> str:
    assert status == 2, err
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("aviary simulate: ")
    return lines[0]


# ---- exit statuses -----------------------------------------------------------------------------


@pytest.mark.parametrize(("doc", "value", "status", "summary"), [
    (policy_doc(), healthy, 0, "promoted after 1m"),
    (policy_doc(), failing_after(45), 3, "rolled back after 45s (step 2: canary v2 at 50%)"),
    (policy_doc(interval="10m"), healthy, 4,
     "still running at the end of the recording, Progressing after 6m40s (step 1: canary v2 at 10%)"),
    (policy_doc(steps=[10, {"pause": {}}, 50]), healthy, 4,
     "still running at the end of the recording, Paused after 6m40s (step 2: canary v2 at 10%)"),
], ids=["promoted", "rolled-back", "running", "paused"])
def test_exit_status_says_how_the_rollout_ended(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 doc: dict[str, Any], value: Value, status: int, summary: str) -> None:
    policy, metrics = write(tmp_path, doc, value)
    got, out, err = simulate_cli(capsys, str(policy), "--metrics", str(metrics))
    assert got == status, out + err
    assert "Traceback" not in err
    last = out.strip().splitlines()[-1]
    assert last.startswith(summary), last
    assert last.endswith(f"(exit status {status})")


def test_the_table_is_not_repeated_by_log_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy, metrics = write(tmp_path, policy_doc(), failing_after(45))
    status, _, err = simulate_cli(capsys, str(policy), "--metrics", str(metrics))
    assert (status, err) == (3, "")


def test_plot_writes_a_png_and_keeps_the_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy, metrics = write(tmp_path, policy_doc(), failing_after(45))
    status, out, _ = simulate_cli(capsys, str(policy), "--metrics", str(metrics), "--plot", str(tmp_path / "run.png"))
    assert status == 3 and "rolled back after 45s" in out
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")
    status, out, err = simulate_cli(capsys, str(policy), "--metrics", str(metrics), "--plot",
                                    str(tmp_path / "no" / "run.png"))
    assert status == 2 and "--plot" in err and "cannot be written" in err


def test_the_rollback_row_shows_the_failing_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy, metrics = write(tmp_path, policy_doc(), failing_after(45))
    _, out, _ = simulate_cli(capsys, str(policy), "--metrics", str(metrics))
    rows = out.splitlines()
    failing = next(row for row in rows if "success=80 fail" in row)
    assert "+45s" in failing and "00:00:45.000" in failing and "50%" in failing
    assert any("-> RolledBack, 0%: rolled back v2: failed (1) > failureLimit (0)" in row for row in rows)


def test_a_sweep_exits_0_with_one_line_per_combination(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy, metrics = write(tmp_path, policy_doc(), failing_after(45))
    status, out, _ = simulate_cli(capsys, str(policy), "--metrics", str(metrics), "--sweep",
                                  "analysis.failureLimit=0,3", "--sweep", "strategy.interval=30s,10s")
    assert status == 0
    lines = out.strip().splitlines()
    assert [line.split("  ")[0].strip() for line in lines] == [
        "analysis.failureLimit=0 strategy.interval=30s", "analysis.failureLimit=0 strategy.interval=10s",
        "analysis.failureLimit=3 strategy.interval=30s", "analysis.failureLimit=3 strategy.interval=10s"]
    assert "rolled back after 45s" in lines[0]
    assert "promoted after 20s" in lines[1]  # two 10 s steps, both over before the canary fails
    assert "rolled back after 1m" in lines[2]  # the fourth failed round: 45, 50, 55, 60 s


# ---- invalid input: exit 2, one line on stderr ------------------------------------------------

Argv = Callable[[Path, Path, Path], list[str]]


def _policy_file(tmp_path: Path, name: str, doc: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _text_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _renamed() -> dict[str, Any]:
    doc = policy_doc()
    doc["metadata"]["name"] = "cart"
    return doc


def _gzip(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(gzip.compress(data))
    return str(path)


INVALID: dict[str, tuple[Argv, tuple[str, ...]]] = {
    "policy-missing": (lambda d, p, m: [str(d / "nope.yaml"), "--metrics", str(m)],
                       ("POLICY", "nope.yaml", "cannot be read")),
    "policy-unreadable": (lambda d, p, m: [str(d), "--metrics", str(m)], ("POLICY", "cannot be read")),
    "policy-invalid": (lambda d, p, m: [_policy_file(d, "strict.yaml", policy_doc(failureLimit=-1)), "--metrics",
                                        str(m)], ("strict.yaml", "spec.analysis.failureLimit")),
    "policy-not-yaml": (lambda d, p, m: [_text_file(d, "broken.yaml", "spec: [\n"), "--metrics", str(m)],
                        ("broken.yaml", "invalid YAML at line 2")),
    "recording-missing": (lambda d, p, m: [str(p), "--metrics", str(d / "nope.gz")], ("nope.gz", "cannot be read")),
    "recording-not-gzip": (lambda d, p, m: [str(p), "--metrics", str(p)], ("shop.yaml", "cannot be read")),
    "recording-not-json": (lambda d, p, m: [str(p), "--metrics", _gzip(d, "text.gz", b"hello")],
                           ("text.gz", "not a recording")),
    "recording-other-format": (lambda d, p, m: [str(p), "--metrics", _gzip(d, "other.gz", b'{"format": "x/2"}')],
                               ("other.gz", "format 'x/2'", "aviary-recording/1")),
    "recording-bad-provenance": (
        lambda d, p, m: [str(p), "--metrics", _gzip(d, "prov.gz", _with_provenance(m, start="yesterday"))],
        ("prov.gz", "provenance start 'yesterday'")),
    "other-window": (lambda d, p, m: [_policy_file(d, "window.yaml", policy_doc(window="1m")), "--metrics", str(m)],
                     ("holds no series", "threshold check success (canary)", "[1m]", "record again")),
    "other-rollout": (lambda d, p, m: [_policy_file(d, "cart.yaml", _renamed()), "--metrics", str(m)],
                      ("'cart'", "'shop'")),
    "start-outside": (lambda d, p, m: [str(p), "--metrics", str(m), "--start", "2025-06-01T00:00:00Z"],
                      ("start 2025-06-01T00:00:00Z is outside the recording",)),
    "sweep-syntax": (lambda d, p, m: [str(p), "--metrics", str(m), "--sweep", "analysis.failureLimit"],
                     ("--sweep 'analysis.failureLimit'", "PATH=VALUE")),
    "sweep-yaml": (lambda d, p, m: [str(p), "--metrics", str(m), "--sweep", "analysis.failureLimit=[1"],
                   ("not valid YAML",)),
    "sweep-no-such-item": (lambda d, p, m: [str(p), "--metrics", str(m), "--sweep", "analysis.metrics.3.min=1"],
                           ("spec.analysis.metrics.3", "no item 3")),
    "sweep-not-a-block": (lambda d, p, m: [str(p), "--metrics", str(m), "--sweep", "listener.port.x=1"],
                          ("spec.listener.port.x", "not a block")),
    "sweep-refused": (lambda d, p, m: [str(p), "--metrics", str(m), "--sweep", "analysis.failureLimit=0,-1"],
                      ("analysis.failureLimit=-1", "spec.analysis.failureLimit", "greater than or equal to 0")),
    "plot-with-sweep": (lambda d, p, m: [str(p), "--metrics", str(m), "--sweep", "analysis.failureLimit=0,1",
                                         "--plot", str(d / "run.png")], ("--plot", "--sweep")),
    "no-metrics": (lambda d, p, m: [str(p)], ("--metrics FILE", "--prometheus URL")),
    "both-sources": (lambda d, p, m: [str(p), "--metrics", str(m), "--prometheus", "http://127.0.0.1:9"],
                     ("--metrics FILE", "--prometheus URL")),
    "prometheus-without-from": (lambda d, p, m: [str(p), "--prometheus", "http://127.0.0.1:9"], ("--from",)),
    "prometheus-without-stable": (lambda d, p, m: [str(p), "--prometheus", "http://127.0.0.1:9", "--from", "-5m"],
                                  ("--stable",)),
}


def _with_provenance(metrics: Path, **fields: Any) -> bytes:
    body = json.loads(gzip.decompress(metrics.read_bytes()))
    body["provenance"].update(fields)
    return json.dumps(body).encode()


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    policy, metrics = write(tmp_path, policy_doc())
    argv, fragments = INVALID[case]
    line = assert_one_line_error(*simulate_cli(capsys, *argv(tmp_path, policy, metrics)))
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / "run.png").exists()


@pytest.mark.parametrize("argv", [["--start", "2026-01-01T00:00:00"], ["--start", "tomorrow"],
                                  ["--ack-delay", "soon"], ["-o", "yaml"]])
def test_bad_flag_values_are_refused_by_the_parser(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   argv: list[str]) -> None:
    policy, metrics = write(tmp_path, policy_doc())
    with pytest.raises(SystemExit) as exited:
        main(["simulate", str(policy), "--metrics", str(metrics), *argv])
    captured = capsys.readouterr()
    assert exited.value.code == 2
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert argv[0] in captured.err


def test_a_policy_without_analysis_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = policy_doc()
    del doc["spec"]["analysis"]
    policy, metrics = write(tmp_path, doc, recorded_doc=policy_doc())
    line = assert_one_line_error(*simulate_cli(capsys, str(policy), "--metrics", str(metrics)))
    assert "spec.analysis is missing" in line


# ---- the judge on simulated series -------------------------------------------------------------

JUDGE = {"metrics": [{"name": "errors", "template": "error-rate-5xx", "direction": "increase"}],
         "minSamples": 10, "step": "5s", "maxWindow": "5m"}


def noisy_errors(canary_mean: float, seed: int = 7) -> Value:
    """Error rates around 1 % on stable and ``canary_mean`` on the canary, new noise every second."""
    rng = random.Random(seed)

    def value(use: str, at: float) -> float | None:
        if use == COUNT:
            return 500.0
        mean = canary_mean if use.endswith("(canary)") else 1.0
        return max(0.0, rng.gauss(mean, 0.3))

    return value


@pytest.mark.parametrize(("canary_mean", "outcome"), [(5.0, Outcome.ROLLED_BACK), (1.0, Outcome.PROMOTED)],
                         ids=["worse", "equal"])
def test_the_judge_decides_on_recorded_samples(canary_mean: float, outcome: Outcome) -> None:
    rollout = parse(policy_doc(steps=[50], interval="2m", metrics=[], judge=JUDGE, minRequests=0))
    result = asyncio.run(simulate(rollout, "shop.yaml", recording(rollout, noisy_errors(canary_mean), seconds=600,
                                                                  before=300)))
    assert result.outcome is outcome
    last = result.rounds[-1]
    verdict = next(check for check in last.checks if check.name == "judge")
    errors = next(check for check in last.checks if check.name == "errors")
    assert verdict.outcome.value == ("fail" if outcome is Outcome.ROLLED_BACK else "pass"), verdict.reason
    assert errors.canary_samples is not None and errors.canary_samples >= 10  # range queries answered
    assert errors.value == pytest.approx(canary_mean, abs=0.5)
    assert errors.stable_value == pytest.approx(1.0, abs=0.5)
    if outcome is Outcome.ROLLED_BACK:  # no decision before minSamples samples per side
        assert result.end - result.start >= 9 * 5


# ---- --ack-delay -------------------------------------------------------------------------------


def _started(body: dict[str, Any]) -> list[float]:
    return [t["offset_seconds"] for t in body["transitions"] if "ACKed by every proxy" in t["reason"]]


def test_ack_delay_starts_each_step_that_much_later(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy, metrics = write(tmp_path, policy_doc())
    runs = {}
    for delay in ("0s", "3s"):
        status, out, _ = simulate_cli(capsys, str(policy), "--metrics", str(metrics), "--ack-delay", delay,
                                      "-o", "json")
        assert status == 0
        runs[delay] = json.loads(out)
    assert _started(runs["0s"]) == [0, 30, 60]  # step 1, step 2, the promotion
    assert _started(runs["3s"]) == [3, 36, 69]  # each ACK 3 s after its publish, each step 30 s after its ACK
    assert runs["3s"]["ack_delay_seconds"] == 3
    assert runs["3s"]["decided_after_seconds"] == 69


# ---- -o json against the table -----------------------------------------------------------------

_ROUND_ROW = re.compile(r"^\s*\+\S+\s+\d\d:\d\d:\d\d\.\d{3}\s+(\d+)\s+(\d+)%\s+(\w+)\s+(.*)$")
_TRANSITION_ROW = re.compile(r"^\s*\+\S+\s+\d\d:\d\d:\d\d\.\d{3}\s+-> (.*)$")


def _number(value: float | str | None) -> str:
    if value is None:
        return "n/a"
    return "NaN" if value == "NaN" else f"{value:.4g}"


def test_json_carries_everything_the_table_shows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def value(use: str, at: float) -> float | None:
        if use == COUNT:
            return 500.0
        return math.nan if T0 + 12 <= at < T0 + 17 else failing_after(45)(use, at)

    policy, metrics = write(tmp_path, policy_doc(failureLimit=0, inconclusiveLimit=3), value)
    text_status, text, _ = simulate_cli(capsys, str(policy), "--metrics", str(metrics))
    json_status, out, _ = simulate_cli(capsys, str(policy), "--metrics", str(metrics), "-o", "json")
    body = json.loads(out)
    assert text_status == json_status == body["exit_status"] == 3
    assert body["outcome"] == "rolled back" and body["phase"] == "RolledBack"
    assert body["decided_after_seconds"] == 45
    assert text.strip().splitlines()[-1] == f"{body['summary']} (exit status 3)"
    assert (body["canary"], body["stable"], body["rollout"]) == ("v2", "v1", "shop")

    rows = [m.groups() for line in text.splitlines() if (m := _ROUND_ROW.match(line))]
    assert len(rows) == len(body["rounds"]) == 9
    for (step, weight, outcome, checks), round_ in zip(rows, body["rounds"], strict=True):
        assert (int(step), int(weight), outcome) == (round_["step"], round_["weight"], round_["outcome"].lower())
        for check in round_["checks"]:
            assert f"{check['name']}={_number(check['value'])}" in checks
            assert check["outcome"].lower() in checks
    assert any(check["value"] == "NaN" for r in body["rounds"] for check in r["checks"])  # NaN kept, as text

    transitions = [m.group(1) for line in text.splitlines() if (m := _TRANSITION_ROW.match(line))]
    assert transitions == [f"{t['to']}, {t['weight']}%: {t['reason']}" for t in body["transitions"]]
    assert body["transitions"][-1]["to"] == "RolledBack"


def test_json_of_a_sweep_is_one_object_per_combination(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy, metrics = write(tmp_path, policy_doc(), failing_after(45))
    status, out, _ = simulate_cli(capsys, str(policy), "--metrics", str(metrics), "--sweep",
                                  "analysis.failureLimit=0,3", "-o", "json")
    assert status == 0
    bodies = json.loads(out)
    assert [(b["sweep"], b["exit_status"], b["decided_after_seconds"]) for b in bodies] == [
        ("analysis.failureLimit=0", 3, 45), ("analysis.failureLimit=3", 3, 60)]
