import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListRolloutsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRolloutsResponse(_message.Message):
    __slots__ = ("rollouts", "policy", "health")
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[Rollout]
    policy: PolicySource
    health: ControlPlaneHealth
    def __init__(self, rollouts: _Optional[_Iterable[_Union[Rollout, _Mapping]]] = ..., policy: _Optional[_Union[PolicySource, _Mapping]] = ..., health: _Optional[_Union[ControlPlaneHealth, _Mapping]] = ...) -> None: ...

class ControlPlaneHealth(_message.Message):
    __slots__ = ("serving", "state_error", "problems")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    STATE_ERROR_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    state_error: str
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, serving: _Optional[bool] = ..., state_error: _Optional[str] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...

class PolicySource(_message.Message):
    __slots__ = ("source", "applied_commit", "rejected_commit", "errors", "fetch_error")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_COMMIT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_COMMIT_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    FETCH_ERROR_FIELD_NUMBER: _ClassVar[int]
    source: str
    applied_commit: str
    rejected_commit: str
    errors: _containers.RepeatedCompositeFieldContainer[ValidateError]
    fetch_error: str
    def __init__(self, source: _Optional[str] = ..., applied_commit: _Optional[str] = ..., rejected_commit: _Optional[str] = ..., errors: _Optional[_Iterable[_Union[ValidateError, _Mapping]]] = ..., fetch_error: _Optional[str] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RolloutRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SetWeightRequest(_message.Message):
    __slots__ = ("name", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: int
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class WatchRolloutsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CheckResult(_message.Message):
    __slots__ = ("name", "outcome", "value", "stable_value", "min", "max", "max_decrease_from_stable", "reason", "kind", "queries", "canary_samples", "stable_samples", "compare_by", "effect", "effect_low", "effect_high", "rule", "shown_only")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STABLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MAX_DECREASE_FROM_STABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    CANARY_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STABLE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    COMPARE_BY_FIELD_NUMBER: _ClassVar[int]
    EFFECT_FIELD_NUMBER: _ClassVar[int]
    EFFECT_LOW_FIELD_NUMBER: _ClassVar[int]
    EFFECT_HIGH_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    SHOWN_ONLY_FIELD_NUMBER: _ClassVar[int]
    name: str
    outcome: str
    value: float
    stable_value: float
    min: float
    max: float
    max_decrease_from_stable: float
    reason: str
    kind: str
    queries: _containers.RepeatedScalarFieldContainer[str]
    canary_samples: int
    stable_samples: int
    compare_by: str
    effect: float
    effect_low: float
    effect_high: float
    rule: str
    shown_only: bool
    def __init__(self, name: _Optional[str] = ..., outcome: _Optional[str] = ..., value: _Optional[float] = ..., stable_value: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., max_decrease_from_stable: _Optional[float] = ..., reason: _Optional[str] = ..., kind: _Optional[str] = ..., queries: _Optional[_Iterable[str]] = ..., canary_samples: _Optional[int] = ..., stable_samples: _Optional[int] = ..., compare_by: _Optional[str] = ..., effect: _Optional[float] = ..., effect_low: _Optional[float] = ..., effect_high: _Optional[float] = ..., rule: _Optional[str] = ..., shown_only: _Optional[bool] = ...) -> None: ...

class RolloutEvent(_message.Message):
    __slots__ = ("rollout", "time", "from_phase", "to_phase", "weight", "stable_version", "canary_version", "step", "reason", "checks", "cohorts", "mirror")
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    FROM_PHASE_FIELD_NUMBER: _ClassVar[int]
    TO_PHASE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    COHORTS_FIELD_NUMBER: _ClassVar[int]
    MIRROR_FIELD_NUMBER: _ClassVar[int]
    rollout: str
    time: _timestamp_pb2.Timestamp
    from_phase: str
    to_phase: str
    weight: int
    stable_version: str
    canary_version: str
    step: int
    reason: str
    checks: _containers.RepeatedCompositeFieldContainer[CheckResult]
    cohorts: _containers.RepeatedScalarFieldContainer[str]
    mirror: int
    def __init__(self, rollout: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., from_phase: _Optional[str] = ..., to_phase: _Optional[str] = ..., weight: _Optional[int] = ..., stable_version: _Optional[str] = ..., canary_version: _Optional[str] = ..., step: _Optional[int] = ..., reason: _Optional[str] = ..., checks: _Optional[_Iterable[_Union[CheckResult, _Mapping]]] = ..., cohorts: _Optional[_Iterable[str]] = ..., mirror: _Optional[int] = ...) -> None: ...

class Override(_message.Message):
    __slots__ = ("kind", "detail")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    detail: str
    def __init__(self, kind: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("name", "phase", "stable_version", "canary_version", "weight", "step", "steps", "seconds_in_step", "checks", "events", "git_commit", "overrides", "reason", "failed_version", "orphaned", "acked_weight", "envoy_rejected", "engine_error", "state_error", "step_weight", "cohorts", "acked_cohorts", "stickiness", "kept_version", "keep_seconds_left", "keep_seconds", "mirror", "acked_mirror", "plan", "stage")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_IN_STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    GIT_COMMIT_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FAILED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ORPHANED_FIELD_NUMBER: _ClassVar[int]
    ACKED_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ENVOY_REJECTED_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ERROR_FIELD_NUMBER: _ClassVar[int]
    STATE_ERROR_FIELD_NUMBER: _ClassVar[int]
    STEP_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    COHORTS_FIELD_NUMBER: _ClassVar[int]
    ACKED_COHORTS_FIELD_NUMBER: _ClassVar[int]
    STICKINESS_FIELD_NUMBER: _ClassVar[int]
    KEPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEEP_SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    KEEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIRROR_FIELD_NUMBER: _ClassVar[int]
    ACKED_MIRROR_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    phase: str
    stable_version: str
    canary_version: str
    weight: int
    step: int
    steps: int
    seconds_in_step: float
    checks: _containers.RepeatedCompositeFieldContainer[CheckResult]
    events: _containers.RepeatedCompositeFieldContainer[RolloutEvent]
    git_commit: str
    overrides: _containers.RepeatedCompositeFieldContainer[Override]
    reason: str
    failed_version: str
    orphaned: bool
    acked_weight: int
    envoy_rejected: str
    engine_error: str
    state_error: str
    step_weight: int
    cohorts: _containers.RepeatedScalarFieldContainer[str]
    acked_cohorts: _containers.RepeatedScalarFieldContainer[str]
    stickiness: str
    kept_version: str
    keep_seconds_left: float
    keep_seconds: float
    mirror: int
    acked_mirror: int
    plan: str
    stage: str
    def __init__(self, name: _Optional[str] = ..., phase: _Optional[str] = ..., stable_version: _Optional[str] = ..., canary_version: _Optional[str] = ..., weight: _Optional[int] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., seconds_in_step: _Optional[float] = ..., checks: _Optional[_Iterable[_Union[CheckResult, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[RolloutEvent, _Mapping]]] = ..., git_commit: _Optional[str] = ..., overrides: _Optional[_Iterable[_Union[Override, _Mapping]]] = ..., reason: _Optional[str] = ..., failed_version: _Optional[str] = ..., orphaned: _Optional[bool] = ..., acked_weight: _Optional[int] = ..., envoy_rejected: _Optional[str] = ..., engine_error: _Optional[str] = ..., state_error: _Optional[str] = ..., step_weight: _Optional[int] = ..., cohorts: _Optional[_Iterable[str]] = ..., acked_cohorts: _Optional[_Iterable[str]] = ..., stickiness: _Optional[str] = ..., kept_version: _Optional[str] = ..., keep_seconds_left: _Optional[float] = ..., keep_seconds: _Optional[float] = ..., mirror: _Optional[int] = ..., acked_mirror: _Optional[int] = ..., plan: _Optional[str] = ..., stage: _Optional[str] = ...) -> None: ...

class ListProxiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListProxiesResponse(_message.Message):
    __slots__ = ("proxies",)
    PROXIES_FIELD_NUMBER: _ClassVar[int]
    proxies: _containers.RepeatedCompositeFieldContainer[Proxy]
    def __init__(self, proxies: _Optional[_Iterable[_Union[Proxy, _Mapping]]] = ...) -> None: ...

class AckedVersion(_message.Message):
    __slots__ = ("type_url", "version")
    TYPE_URL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    type_url: str
    version: str
    def __init__(self, type_url: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Nack(_message.Message):
    __slots__ = ("type_url", "version", "message", "time")
    TYPE_URL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    type_url: str
    version: str
    message: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, type_url: _Optional[str] = ..., version: _Optional[str] = ..., message: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Proxy(_message.Message):
    __slots__ = ("node_id", "node_cluster", "peer", "connected_since", "acked", "last_nack", "xds_worker", "metrics_reported", "access_log_reported")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_SINCE_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_FIELD_NUMBER: _ClassVar[int]
    XDS_WORKER_FIELD_NUMBER: _ClassVar[int]
    METRICS_REPORTED_FIELD_NUMBER: _ClassVar[int]
    ACCESS_LOG_REPORTED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_cluster: str
    peer: str
    connected_since: _timestamp_pb2.Timestamp
    acked: _containers.RepeatedCompositeFieldContainer[AckedVersion]
    last_nack: Nack
    xds_worker: int
    metrics_reported: _timestamp_pb2.Timestamp
    access_log_reported: _timestamp_pb2.Timestamp
    def __init__(self, node_id: _Optional[str] = ..., node_cluster: _Optional[str] = ..., peer: _Optional[str] = ..., connected_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., acked: _Optional[_Iterable[_Union[AckedVersion, _Mapping]]] = ..., last_nack: _Optional[_Union[Nack, _Mapping]] = ..., xds_worker: _Optional[int] = ..., metrics_reported: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., access_log_reported: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ValidateRequest(_message.Message):
    __slots__ = ("text", "file")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    text: str
    file: str
    def __init__(self, text: _Optional[str] = ..., file: _Optional[str] = ...) -> None: ...

class ValidateError(_message.Message):
    __slots__ = ("file", "field", "reason")
    FILE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    file: str
    field: str
    reason: str
    def __init__(self, file: _Optional[str] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ValidateResponse(_message.Message):
    __slots__ = ("errors",)
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    errors: _containers.RepeatedCompositeFieldContainer[ValidateError]
    def __init__(self, errors: _Optional[_Iterable[_Union[ValidateError, _Mapping]]] = ...) -> None: ...

class CheckRound(_message.Message):
    __slots__ = ("time", "canary_version", "step", "weight", "outcome", "checks", "transitions")
    TIME_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    canary_version: str
    step: int
    weight: int
    outcome: str
    checks: _containers.RepeatedCompositeFieldContainer[CheckResult]
    transitions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., canary_version: _Optional[str] = ..., step: _Optional[int] = ..., weight: _Optional[int] = ..., outcome: _Optional[str] = ..., checks: _Optional[_Iterable[_Union[CheckResult, _Mapping]]] = ..., transitions: _Optional[_Iterable[str]] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("name", "rounds", "events")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    rounds: _containers.RepeatedCompositeFieldContainer[CheckRound]
    events: _containers.RepeatedCompositeFieldContainer[RolloutEvent]
    def __init__(self, name: _Optional[str] = ..., rounds: _Optional[_Iterable[_Union[CheckRound, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[RolloutEvent, _Mapping]]] = ...) -> None: ...
