"""What ``aviary simulate`` prints: the decisions as a table, one line per sweep combination, JSON.

Times are shown from the simulation's start (``+1m05s``) with the UTC time beside, so a line can be
matched with the recording (and with the live rollout it was recorded from).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from aviary.metrics.recording import Recording, utc_text
from aviary.policy.analysis import CheckResult
from aviary.policy.duration import format_duration
from aviary.policy.rollout_state import CheckRound, TransitionEvent, traffic_text
from aviary.simulation.replay import Outcome, SimulationResult

__all__ = ["as_dict", "outcome_text", "sweep_table", "table"]

_OUTCOMES = {Outcome.PROMOTED: "promoted", Outcome.ROLLED_BACK: "rolled back",
             Outcome.RUNNING: "still running at the end of the recording"}


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "NaN" if math.isnan(value) else f"{value:.4g}"


def _offset(result: SimulationResult, at: float) -> str:
    return "+" + format_duration(at - result.start) if at > result.start else "+0s"


def outcome_text(result: SimulationResult) -> str:
    """``rolled back after 45s (at 50%)``; ``promoted after 2m``; ``still running ... (Paused, 20%)``."""
    what = _OUTCOMES[result.outcome]
    ran = format_duration(round(result.end - result.start, 1)) if result.end > result.start else "0s"
    last = next((t for t in reversed(result.transitions) if t.canary_version is not None), None)
    where = ""
    if last is not None:
        traffic = traffic_text(last.canary_version, last.weight, last.stable_version, last.cohorts, last.mirror)
        where = f" (step {last.step_index + 1}: {traffic})"
    if result.outcome is Outcome.RUNNING:
        return f"{what}, {result.phase.value} after {ran}{where}"
    return f"{what} after {ran}{where if result.outcome is Outcome.ROLLED_BACK else ''}"


def _check(result: CheckResult) -> str:
    samples = f" n={result.canary_samples}/{result.stable_samples}" if result.canary_samples is not None else ""
    stable = f" vs {_number(result.stable_value)}" if result.stable_value is not None else ""
    return f"{result.name}={_number(result.value)}{stable}{samples} {result.outcome.value.lower()}"


def table(result: SimulationResult, recording: Recording, policy: str, ack_delay: float) -> str:
    """The whole run: header, one line per check round and per transition, the outcome."""
    prov = recording.provenance
    acks = "at once" if ack_delay <= 0 else f"after {format_duration(ack_delay)}"
    lines = [
        f"rollout {result.rollout} ({policy}): canary {result.canary} against stable {result.stable}",
        f"recording: Prometheus {prov.prometheus}, {recording.covers()} (from {prov.policy})",
        f"start {utc_text(result.start)}; proxies ACK {acks}",
        "",
        f"{'TIME':>9}  {'UTC':<12}  {'STEP':>4}  {'WEIGHT':>6}  {'ROUND':<12}  CHECKS",
    ]
    for at, row in _rows(result):
        clock = datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S.%f")[:12]
        stamp = f"{_offset(result, at):>9}  {clock:<12}"
        if isinstance(row, CheckRound):
            checks = "  ".join(_check(check) for check in row.checks)
            lines.append(f"{stamp}  {row.step_index + 1:>4}  {row.weight:>5}%  {row.outcome.value.lower():<12}  "
                         f"{checks}")
        else:
            lines.append(f"{stamp}  -> {row.to_phase.value}, {row.weight}%: {row.reason}")
    lines += [""] + [f"note: {note}" for note in result.notes]
    lines.append(f"{outcome_text(result)} (exit status {result.outcome.value})")
    return "\n".join(lines)


def _rows(result: SimulationResult) -> list[tuple[float, CheckRound | TransitionEvent]]:
    rows: list[tuple[float, int, CheckRound | TransitionEvent]] = [(r.at, 0, r) for r in result.rounds]
    rows += [(t.at, 1, t) for t in _transitions(result)]
    return [(at, row) for at, _, row in sorted(rows, key=lambda item: (item[0], item[1]))]


def _transitions(result: SimulationResult) -> list[TransitionEvent]:
    """The rollout's transitions from the canary's arrival on (the stable version's setup left out)."""
    return [t for t in result.transitions if t.from_phase is not None]


def _result_dict(check: CheckResult) -> dict[str, Any]:
    return {"name": check.name, "kind": check.kind, "outcome": check.outcome.value, "value": _json(check.value),
            "stable_value": _json(check.stable_value), "reason": check.reason, "queries": list(check.queries),
            "canary_samples": check.canary_samples, "stable_samples": check.stable_samples,
            "effect": _json(check.effect), "rule": check.rule, "counted": check.counted}


def _json(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def as_dict(result: SimulationResult, recording: Recording, policy: str, ack_delay: float,
            label: str | None = None) -> dict[str, Any]:
    """Everything the table shows, and the recording's provenance."""
    prov = recording.provenance
    body: dict[str, Any] = {
        "rollout": result.rollout, "policy": policy, "canary": result.canary, "stable": result.stable,
        "recording": {"prometheus": prov.prometheus, "start": utc_text(prov.start), "end": utc_text(prov.end),
                      "step_seconds": prov.step, "policy": prov.policy, "recorded_at": utc_text(prov.recorded_at)},
        "start": utc_text(result.start), "end": utc_text(result.end), "ack_delay_seconds": ack_delay,
        "outcome": _OUTCOMES[result.outcome], "exit_status": result.outcome.value, "phase": result.phase.value,
        "weight": result.weight, "decided_after_seconds": result.decided_after, "summary": outcome_text(result),
        "rounds": [{"time": utc_text(r.at), "offset_seconds": round(r.at - result.start, 3), "step": r.step_index + 1,
                    "weight": r.weight, "canary_version": r.canary_version, "outcome": r.outcome.value,
                    "checks": [_result_dict(check) for check in r.checks], "transitions": list(r.transitions)}
                   for r in result.rounds],
        "transitions": [{"time": utc_text(t.at), "offset_seconds": round(t.at - result.start, 3),
                         "from": t.from_phase.value if t.from_phase else None, "to": t.to_phase.value,
                         "weight": t.weight, "step": t.step_index + 1, "reason": t.reason}
                        for t in _transitions(result)],
        "notes": list(result.notes),
    }
    if label is not None:
        body["sweep"] = label
    return body


def sweep_table(lines: Sequence[tuple[str, SimulationResult]]) -> str:
    width = max((len(label) for label, _ in lines), default=0)
    return "\n".join(f"{label:<{width}}  {outcome_text(result)}" for label, result in lines)
