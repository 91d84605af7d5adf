"""Domain values -> admin API messages. Pure functions; the only place that knows both sides.

The engine's times are on the runner's clock (injectable, e.g. monotonic in tests); ``WallClock``
turns them into wall-clock timestamps for the wire. Proxy connect and NACK times are wall-clock.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from aviary.admin.v1 import admin_pb2 as pb
from aviary.discovery.proxy_status import ProxyView
from aviary.discovery.worker_protocol import worker_of
from aviary.metrics.envoy_reports import ProxyReport
from aviary.policy.analysis import CheckResult
from aviary.policy.rollout_machine import guard_left, step_weight, traffic_plan
from aviary.policy.rollout_state import CheckRound, Hold, Phase, RolloutStatus, TransitionEvent
from aviary.policy.schema import PolicyError, RolloutSpec
from aviary.policy.source import PolicyState
from aviary.runner import EngineHealth
from aviary.traffic import TrafficPlan

__all__ = [
    "RECENT_EVENTS",
    "WallClock",
    "check_message",
    "event_message",
    "health_message",
    "proxy_message",
    "rollout_message",
    "validate_errors",
]

RECENT_EVENTS = 20


@dataclass(frozen=True, slots=True)
class WallClock:
    """A reading of the engine's clock (``monotonic``) and the wall clock taken at the same moment."""

    monotonic: float
    wall: float

    @classmethod
    def now(cls, monotonic: float) -> WallClock:
        return cls(monotonic, time.time())

    def timestamp(self, at: float) -> Timestamp:
        stamp = Timestamp()
        stamp.FromNanoseconds(int((self.wall - (self.monotonic - at)) * 1e9))
        return stamp


def _wall_timestamp(at: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(at * 1e9))
    return stamp


def check_message(result: CheckResult) -> pb.CheckResult:
    message = pb.CheckResult(name=result.name, outcome=result.outcome.name.title(), reason=result.reason,
                             kind=result.kind, queries=list(result.queries), compare_by=result.thresholds.by or "",
                             rule=result.rule or "", shown_only=not result.counted)
    for field, value in (
        ("value", result.value),
        ("stable_value", result.stable_value),
        ("min", result.thresholds.min),
        ("max", result.thresholds.max),
        ("max_decrease_from_stable", result.thresholds.max_decrease_from_stable),
        ("canary_samples", result.canary_samples),
        ("stable_samples", result.stable_samples),
        ("effect", result.effect),
        ("effect_low", result.effect_interval[0] if result.effect_interval is not None else None),
        ("effect_high", result.effect_interval[1] if result.effect_interval is not None else None),
    ):
        if value is not None:
            setattr(message, field, value)
    return message


def event_message(event: TransitionEvent, clock: WallClock) -> pb.RolloutEvent:
    return pb.RolloutEvent(
        rollout=event.rollout,
        time=clock.timestamp(event.at),
        from_phase=event.from_phase.value if event.from_phase else "",
        to_phase=event.to_phase.value,
        weight=event.weight,
        stable_version=event.stable_version,
        canary_version=event.canary_version or "",
        step=event.step_index + 1 if event.canary_version else None,  # 1-based, as status shows it
        reason=event.reason,
        checks=[check_message(check) for check in event.checks],
        cohorts=list(event.cohorts),
        mirror=event.mirror,
    )


def round_message(round_: CheckRound, clock: WallClock) -> pb.CheckRound:
    return pb.CheckRound(time=clock.timestamp(round_.at), canary_version=round_.canary_version,
                         step=round_.step_index + 1, weight=round_.weight, outcome=round_.outcome.name.title(),
                         checks=[check_message(check) for check in round_.checks],
                         transitions=list(round_.transitions))


def explanation_message(name: str, rounds: Sequence[CheckRound], history: Sequence[TransitionEvent],
                        clock: WallClock) -> pb.Explanation:
    return pb.Explanation(name=name, rounds=[round_message(r, clock) for r in rounds],
                          events=[event_message(event, clock) for event in history])


def _overrides(status: RolloutStatus) -> list[pb.Override]:
    if status.hold is Hold.ADMIN:
        return [pb.Override(kind="pause", detail=status.paused_reason or "paused until Resume")]
    if status.hold is Hold.MANUAL_WEIGHT:
        return [pb.Override(kind="set-weight", detail=status.paused_reason or f"{status.manual_weight}%")]
    return []


def rollout_message(
    status: RolloutStatus,
    spec: RolloutSpec | None,
    history: Sequence[TransitionEvent],
    clock: WallClock,
    git_commit: str | None = None,
    orphaned: bool = False,
    engine_error: str | None = None,
    state_error: str | None = None,
    envoy_rejected: str | None = None,
    envoy_weights: Mapping[str, int] | None = None,
    plan: TrafficPlan | None = None,
    stage: str | None = None,
) -> pb.Rollout:
    """``envoy_weights`` (version -> weight the proxies ACKed) sets ``acked_weight`` for a rollback
    still in flight: the failed canary's weight at Envoy, until the proxies ACK the rollback."""
    steps = len(spec.strategy.steps) if spec is not None and spec.strategy is not None else 0
    guarding = status.phase is Phase.GUARDING
    guard = spec.strategy.after_promotion if guarding and spec is not None and spec.strategy is not None else None
    started = status.step_started_at
    acked = status.acked_weight
    if status.canary is None and status.failed_version and envoy_weights is not None:
        acked = envoy_weights.get(status.failed_version, 0)
    return pb.Rollout(
        name=status.rollout,
        phase=status.phase.value,
        stable_version=status.stable.version,
        canary_version=status.canary.version if status.canary else "",
        weight=status.weight,
        step=min(status.step_index + 1, steps) if status.canary is not None and steps else None,  # 1-based
        steps=steps,
        seconds_in_step=max(0.0, clock.monotonic - started) if started is not None else 0.0,
        checks=[check_message(check) for check in status.last_checks],
        events=[event_message(event, clock) for event in history[-RECENT_EVENTS:]],
        git_commit=git_commit or "",
        overrides=_overrides(status),
        reason=status.reason,
        failed_version=status.failed_version or "",
        orphaned=orphaned,
        acked_weight=acked,  # None: absent, not known yet
        engine_error=engine_error or "",
        state_error=state_error or "",
        envoy_rejected=envoy_rejected or "",
        step_weight=step_weight(spec, status.step_index) if spec is not None and status.canary is not None else None,
        cohorts=list(status.cohorts),
        acked_cohorts=list(status.acked_cohorts) if status.canary is not None else [],
        stickiness=_stickiness(status, spec),
        kept_version=status.stable.version if guarding else "",
        keep_seconds_left=guard_left(spec, status, clock.monotonic) if spec is not None else None,
        keep_seconds=guard.keep if guard is not None else 0.0,
        plan=plan.digest if plan is not None else "",
        stage=stage or "",
        mirror=status.mirror,
        # Known exactly when the weight is: both come from the same ACK of one plan.
        acked_mirror=status.acked_mirror if status.canary is not None and status.acked_weight is not None else None,
    )


def _stickiness(status: RolloutStatus, spec: RolloutSpec | None) -> str:
    """As the plan says (only while a canary runs: one cluster needs no hash), so status shows what
    the proxies are told."""
    sticky = traffic_plan(spec, status).stickiness if spec is not None else None
    return sticky.describe() if sticky is not None else ""


def health_message(health: EngineHealth) -> pb.ControlPlaneHealth:
    return pb.ControlPlaneHealth(
        serving=health.serving, state_error=health.state_error or "", problems=list(health.problems)
    )


def proxy_message(proxy: ProxyView, reported: ProxyReport | None = None) -> pb.Proxy:
    """``reported``: what the proxy sent to the report services (``aviary.metrics.envoy_reports``), if anything."""
    message = pb.Proxy(
        node_id=proxy.node_id,
        node_cluster=proxy.node_cluster,
        peer=proxy.peer,
        connected_since=_wall_timestamp(proxy.connected_at),
        acked=[pb.AckedVersion(type_url=t, version=v) for t, v in sorted(proxy.acked_versions.items())],
        xds_worker=worker_of(proxy.stream_id),
    )
    nack = proxy.last_nack
    if nack is not None:
        message.last_nack.CopyFrom(
            pb.Nack(type_url=nack.type_url, version=nack.version, message=nack.message, time=_wall_timestamp(nack.at))
        )
    if reported is not None and reported.metrics_at is not None:
        message.metrics_reported.CopyFrom(_wall_timestamp(reported.metrics_at))
    if reported is not None and reported.samples_at is not None:
        message.access_log_reported.CopyFrom(_wall_timestamp(reported.samples_at))
    return message


def validate_errors(errors: Iterable[PolicyError]) -> pb.ValidateResponse:
    return pb.ValidateResponse(
        errors=[pb.ValidateError(file=e.file, field=e.field, reason=e.reason) for e in errors]
    )


def policy_message(state: PolicyState) -> pb.PolicySource:
    return pb.PolicySource(
        source=state.source,
        applied_commit=state.applied_commit or "",
        rejected_commit=state.rejected_commit or "",
        errors=[pb.ValidateError(file=e.file, field=e.field, reason=e.reason) for e in state.errors],
        fetch_error=fetch_error_text(state.fetch_error, state.fetch_failing_since),
    )


def fetch_error_text(error: str | None, since: float | None) -> str:
    """``PolicySource.fetch_error``: ``since 2026-12-01T16:02:11Z: <one-line error>``, "" when fetching
    works. The start is in the text (UTC) because the field is a string; ``render`` shows it in
    local time."""
    if not error:
        return ""
    if since is None:
        return error
    return f"since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since))}: {error}"
