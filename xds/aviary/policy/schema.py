"""The Rollout policy file format (docs/CONTRACTS.md), as frozen pydantic models.

Models are frozen so a parsed policy can be shared between the watcher, the engine and the xDS
snapshot builder without anyone mutating what the others see, and compared with ``==`` to tell
whether anything changed. YAML uses camelCase names; Python code may use either the snake_case
field names or the aliases. The loader validates YAML with aliases only, so a YAML file cannot
sneak in a snake_case spelling.

Validators raise ``FieldIssue`` when the problem is in one element of a list (a duplicate host, a
step that does not increase): it carries the element's sub-path so the loader can report
``spec.hosts[1]`` rather than just ``spec.hosts``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    StrictInt,
    field_validator,
    model_validator,
)

from aviary.matching import (
    CONDITION_KINDS,
    QUERY_CONDITION_KINDS,
    CohortRule,
    Condition,
    Match,
    cookie_regex_problem,
    re2_problem,
)
from aviary.metrics.jsonpath import JsonPathError
from aviary.metrics.jsonpath import parse as parse_json_path
from aviary.policy.duration import parse_duration

__all__ = [
    "API_VERSION",
    "ENVOY_HORIZON",
    "ENVOY_TEMPLATES",
    "KIND",
    "PROVIDERS",
    "TEMPLATES",
    "VERSION_TEMPLATES",
    "AfterPromotion",
    "Analysis",
    "CohortStep",
    "Compare",
    "Duration",
    "Endpoint",
    "FieldIssue",
    "JudgeMetricSpec",
    "JudgeSpec",
    "ListenerSpec",
    "Metadata",
    "MetricCheck",
    "MirrorStep",
    "Pause",
    "PolicyError",
    "PolicySet",
    "Rollout",
    "RolloutSpec",
    "Step",
    "StickinessSpec",
    "StickyCookie",
    "Strategy",
    "WebSource",
    "planned_seconds",
]

API_VERSION = "aviary.dev/v1"
KIND = "Rollout"

_CONFIG = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True)


class FieldIssue(ValueError):
    """A validation problem located below the field being validated (``path`` is relative to it)."""

    def __init__(self, reason: str, *path: str | int) -> None:
        super().__init__(reason)
        self.path: tuple[str | int, ...] = path


def _positive_duration(value: Any) -> float:
    return parse_duration(value)


Duration = Annotated[float, PlainValidator(_positive_duration)]
"""Seconds; YAML writes "500ms", "5s", "2m", "1h" or "1m30s". Always > 0."""


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


Number = Annotated[float, Field(strict=True), AfterValidator(_finite)]
Count = Annotated[StrictInt, Field(ge=0)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$", re.IGNORECASE)
_ROLLOUT_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
_VERSION = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _is_dns_name(text: str) -> bool:
    """True for a syntactically valid DNS name; an all-numeric name must be a real IPv4 address."""
    if len(text) > 253 or not _DNS_NAME.match(text):
        return False
    return not text.rsplit(".", 1)[-1].isdigit()


def _check_host(host: str) -> str:
    if host == "*":
        return host
    name = host[2:] if host.startswith("*.") else host
    if _is_dns_name(name):
        return host
    if "*" in host:
        raise ValueError(f"invalid host {host!r}: a wildcard is only allowed as '*' or a leading '*.'")
    raise ValueError(f"invalid host {host!r}: expected a domain name such as 'shop.example.com', or '*'")


Host = Annotated[str, Field(strict=True), AfterValidator(_check_host)]


# --------------------------------------------------------------------------------------------- spec


def _endpoint_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _is_dns_name(host):
        raise ValueError(f"invalid endpoint host {host!r}: expected an IP address or a DNS name")
    return host


class Endpoint(BaseModel):
    """One backend address. YAML writes ``"host:port"``; IPv6 needs brackets: ``"[::1]:8080"``."""

    model_config = _CONFIG

    host: str
    port: Port

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if not isinstance(data, str):
            if isinstance(data, Mapping):
                return data
            raise ValueError(f"expected 'host:port', got {data!r}")
        text = data.strip()
        scheme, found, rest = text.partition("://")
        if found:
            raise ValueError(f"invalid endpoint {data!r}: drop the scheme '{scheme}://', write {rest.rstrip('/')!r}")
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if ":" not in host:
                raise ValueError(f"invalid endpoint {data!r}: brackets are only for IPv6 addresses")
        else:
            host, sep, port = text.rpartition(":")
            if ":" in host:
                raise ValueError(f"invalid endpoint {data!r}: IPv6 needs brackets, e.g. '[::1]:8080'")
        if not sep or not host:
            raise ValueError(f"invalid endpoint {data!r}: expected 'host:port'")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"invalid endpoint {data!r}: port must be a number from 1 to 65535")
        return {"host": _endpoint_host(host), "port": int(port)}

    @field_validator("host")
    @classmethod
    def _valid_host(cls, host: str) -> str:
        return _endpoint_host(host)

    @property
    def is_ip(self) -> bool:
        """Envoy wants STATIC clusters for IPs and STRICT_DNS for names; this picks between them."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class ListenerSpec(BaseModel):
    """Where Envoy listens; rollouts with the same ``key`` share one Envoy Listener."""

    model_config = _CONFIG

    address: str = "0.0.0.0"
    port: Port

    @field_validator("address", mode="before")
    @classmethod
    def _ip_only(cls, address: Any) -> str:
        # Normalised ("0:0::0" -> "::") so that two spellings of one address give one listener key.
        try:
            return str(ipaddress.ip_address(address.strip("[]") if isinstance(address, str) else address))
        except ValueError:
            raise ValueError(f"must be an IP address such as 0.0.0.0, got {address!r}") from None

    @property
    def key(self) -> str:
        return f"{self.address}:{self.port}"


class Pause(BaseModel):
    """A pause step: with a duration it waits that long, without one it waits for a manual promote."""

    model_config = _CONFIG

    duration: Duration | None = None


@dataclass(frozen=True, slots=True)
class CohortStep:
    """A step that opens these cohorts (by name); opened cohorts stay open until promotion or rollback."""

    cohorts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MirrorStep:
    """A step that copies ``percent`` of the weighted split's requests to the canary (users get the
    answer of the cluster the split chose). Mirroring lasts this step only: see README "Mirroring"."""

    percent: int


def _parse_mirror(value: Any) -> MirrorStep:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise FieldIssue(f"expected a whole percent between 1 and 100, got {value!r}", "mirror")
    return MirrorStep(value)


def _parse_step(value: Any) -> int | Pause | CohortStep | MirrorStep:
    if isinstance(value, Pause | CohortStep | MirrorStep):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value == 100:
            raise ValueError("100 is not a step: promotion to 100 % follows the last step, so remove it")
        if not 1 <= value <= 99:
            raise ValueError(f"a weight step must be between 1 and 99 percent, got {value}")
        return value
    if isinstance(value, Mapping) and set(value) == {"cohorts"}:
        names = value["cohorts"]
        if not isinstance(names, list | tuple) or not names:
            raise FieldIssue("expected a list of cohort names, e.g. [internal]", "cohorts")
        for index, name in enumerate(names):
            if not isinstance(name, str):
                raise FieldIssue(f"expected a cohort name, got {name!r}", "cohorts", index)
        return CohortStep(tuple(names))
    if isinstance(value, Mapping) and set(value) == {"mirror"}:
        return _parse_mirror(value["mirror"])
    if isinstance(value, Mapping) and set(value) == {"pause"}:
        body = value["pause"]
        if body is None:
            return Pause()
        if not isinstance(body, Mapping):
            raise FieldIssue("expected {} or {duration: 5m}", "pause")
        unknown = sorted(str(k) for k in body if k != "duration")
        if unknown:
            raise FieldIssue(f"unknown field {unknown[0]!r} (only 'duration')", "pause", unknown[0])
        if body.get("duration") is None:
            return Pause()
        try:
            return Pause(duration=parse_duration(body["duration"]))
        except ValueError as exc:
            raise FieldIssue(str(exc), "pause", "duration") from None
    expected = "a weight 1..99, {pause: {}}, {pause: {duration: 5m}}, {cohorts: [NAME, ...]} or {mirror: 1..100}"
    raise ValueError(f"expected {expected}, got {value!r}")


def _dump_step(step: int | Pause | CohortStep | MirrorStep) -> Any:
    """The YAML spelling back (the store saves the policy as JSON and parses it again on restart)."""
    if isinstance(step, Pause):
        return {"pause": {} if step.duration is None else {"duration": f"{step.duration}s"}}
    if isinstance(step, CohortStep):
        return {"cohorts": list(step.cohorts)}
    if isinstance(step, MirrorStep):
        return {"mirror": step.percent}
    return step


Step = Annotated[int | Pause | CohortStep | MirrorStep, PlainValidator(_parse_step), PlainSerializer(_dump_step)]

_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
# Query parameter names as they appear unencoded in a URL: RFC 3986 unreserved characters and brackets.
_QUERY_NAME = re.compile(r"^[A-Za-z0-9._~\[\]-]+$")
# The three sections of a cohort entry: their singular (for messages) and the condition kinds each takes.
_SECTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "headers": ("header", CONDITION_KINDS),
    "cookies": ("cookie", CONDITION_KINDS),
    "query": ("query parameter", QUERY_CONDITION_KINDS),
}


def _parse_condition(value: Any, section: str, *path: str | int) -> Condition:
    kinds = _SECTIONS[section][1]
    if not isinstance(value, Mapping) or len(value) != 1:
        raise FieldIssue(f"expected exactly one of {', '.join(kinds)}, e.g. {{exact: qa}}", *path)
    ((kind, body),) = value.items()
    if kind not in kinds:
        if section == "query" and kind in CONDITION_KINDS:
            raise FieldIssue(f"a query parameter cannot be tested for {kind!r}: Envoy's query matcher has no "
                             f"inversion (one of {', '.join(kinds)})", *path, str(kind))
        raise FieldIssue(f"unknown condition {kind!r} (one of {', '.join(kinds)})", *path, str(kind))
    if kind in ("present", "absent"):
        if body is not True:
            raise FieldIssue(f"must be true ({kind}: true), got {body!r}", *path, kind)
        return Condition(kind)
    if isinstance(body, bool) or not isinstance(body, str | int | float):
        raise FieldIssue(f"expected a string, got {body!r}", *path, kind)
    text = str(body)
    if kind != "exact" and not text:
        raise FieldIssue("must not be empty", *path, kind)
    if kind == "regex":
        problem = cookie_regex_problem(text) if section == "cookies" else re2_problem(text)
        if problem:
            raise FieldIssue(problem, *path, kind)
    elif section == "cookies" and ";" in text:
        raise FieldIssue("a cookie value never contains ';'", *path, kind)
    elif section == "query" and ("&" in text or "#" in text):
        raise FieldIssue("a query parameter value never contains '&' or '#'", *path, kind)
    return Condition(kind, text)


def _parse_conditions(value: Any, section: str, *path: str | int) -> tuple[tuple[str, Condition], ...]:
    singular = _SECTIONS[section][0]
    if not isinstance(value, Mapping) or not value:
        raise FieldIssue(f"expected a map of {singular} name to condition", *path, section)
    names = _QUERY_NAME if section == "query" else _TOKEN
    pairs: dict[str, Condition] = {}
    for name, condition in value.items():
        if not isinstance(name, str) or not names.match(name):
            raise FieldIssue(f"invalid {singular} name {name!r}", *path, section, str(name))
        key = name.lower() if section == "headers" else name
        if key in pairs:
            raise FieldIssue(f"{singular} {name!r} given twice", *path, section, name)
        pairs[key] = _parse_condition(condition, section, *path, section, name)
    return tuple(pairs.items())


def _parse_cohort(value: Any) -> CohortRule:
    if isinstance(value, CohortRule):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"expected {{name: NAME, match: [...]}}, got {value!r}")
    unknown = sorted(str(k) for k in value if k not in ("name", "match"))
    if unknown:
        raise FieldIssue(f"unknown field {unknown[0]!r} (name, match)", unknown[0])
    name = value.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name):
        raise FieldIssue(f"required: a name of lower-case letters, digits and '-', got {name!r}", "name")
    entries = value.get("match")
    if not isinstance(entries, list | tuple) or not entries:
        raise FieldIssue("required: a list of entries, e.g. [{headers: {x-team: {exact: qa}}}]", "match")
    matches: list[Match] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not entry:
            raise FieldIssue("expected {headers: {...}}, {cookies: {...}} and/or {query: {...}}", "match", index)
        extra = sorted(str(k) for k in entry if k not in _SECTIONS)
        if extra:
            raise FieldIssue(f"unknown field {extra[0]!r} (headers, cookies, query)", "match", index, extra[0])
        headers, cookies, query = (
            _parse_conditions(entry[section], section, "match", index) if section in entry else ()
            for section in _SECTIONS
        )
        matches.append(Match(headers, cookies, query))
    return CohortRule(name, tuple(matches))


def _dump_cohort(cohort: CohortRule) -> Any:
    def conditions(pairs: tuple[tuple[str, Condition], ...]) -> dict[str, Any]:
        return {n: {c.kind: True if c.kind in ("present", "absent") else c.value} for n, c in pairs}

    entries = []
    for match in cohort.match:
        entry: dict[str, Any] = {}
        for section, pairs in (("headers", match.headers), ("cookies", match.cookies), ("query", match.query)):
            if pairs:
                entry[section] = conditions(pairs)
        entries.append(entry)
    return {"name": cohort.name, "match": entries}


Cohort = Annotated[CohortRule, PlainValidator(_parse_cohort), PlainSerializer(_dump_cohort)]


def _sticky_header(name: str) -> str:
    if not _TOKEN.match(name):
        raise ValueError(f"invalid header name {name!r}: letters, digits and !#$%&'*+.^_`|~- only, e.g. x-user-id")
    return name.lower()


# Narrower than a cookie token: the name goes into an Envoy header format string, where '%' is special.
_COOKIE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _sticky_cookie_name(name: str) -> str:
    if not _COOKIE_NAME.match(name):
        raise ValueError(f"invalid cookie name {name!r}: letters, digits, '_', '.' and '-' only, e.g. session")
    return name


def _whole_seconds(ttl: float | None) -> float | None:
    # Set-Cookie's Max-Age counts whole seconds; a fraction would be cut without a word.
    if ttl is not None and (ttl < 1 or ttl != int(ttl)):
        raise ValueError(f"must be whole seconds, at least 1s (e.g. 24h), got {ttl:g}s")
    return ttl


class StickyCookie(BaseModel):
    """The cookie that keeps a user on one version. With ``ttl``, a request without it gets one
    (``Set-Cookie`` with that ``Max-Age``), so anonymous users stick too; without, the application
    sets it and requests without it follow the plain weight."""

    model_config = _CONFIG

    name: Annotated[str, Field(strict=True), AfterValidator(_sticky_cookie_name)]
    ttl: Annotated[Duration | None, AfterValidator(_whole_seconds)] = None


class StickinessSpec(BaseModel):
    """``{header: x-user-id}`` or ``{cookie: {name: session, ttl: 24h}}``: what the canary split hashes,
    so a user's version depends only on that key and the weight."""

    model_config = _CONFIG

    header: Annotated[str, Field(strict=True), AfterValidator(_sticky_header)] | None = None
    cookie: StickyCookie | None = None

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data: Any) -> Any:
        if not isinstance(data, Mapping | StickinessSpec):
            raise ValueError(f"expected {{header: x-user-id}} or {{cookie: {{name: session, ttl: 24h}}}}, got {data!r}")
        return data

    @model_validator(mode="after")
    def _one_key(self) -> StickinessSpec:
        if (self.header is None) == (self.cookie is None):
            raise ValueError("give exactly one of header ({header: x-user-id}) "
                             "or cookie ({cookie: {name: session, ttl: 24h}})")
        return self
class AfterPromotion(BaseModel):
    """The guard window after promotion: the previous version stays warm for ``keep``.

    Its own block (rather than a bare duration) so that the window can gain settings later without
    changing the spelling of the ones written today.
    """

    model_config = _CONFIG

    keep: Duration

    @model_validator(mode="before")
    @classmethod
    def _a_block(cls, data: Any) -> Any:
        if isinstance(data, Mapping | AfterPromotion):
            return data
        raise ValueError(f"expected {{keep: 15m}}, got {data!r}")


class Strategy(BaseModel):
    """How the canary weight moves: explicit ``steps`` or ``stepWeight`` up to ``maxWeight``;
    ``afterPromotion`` keeps the previous version warm (and the checks running) for a while after."""

    model_config = _CONFIG

    steps: tuple[Step, ...]
    interval: Duration = 30.0
    cohorts: tuple[Cohort, ...] = ()
    stickiness: StickinessSpec | None = None
    after_promotion: AfterPromotion | None = Field(default=None, alias="afterPromotion")

    @model_validator(mode="before")
    @classmethod
    def _expand_step_weight(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        if "stepWeight" not in data and "maxWeight" not in data:
            if "steps" not in data:
                raise FieldIssue("required: give steps, or stepWeight and maxWeight", "steps")
            return data
        if "steps" in data:
            raise ValueError("use either steps or stepWeight+maxWeight, not both")
        rest = {k: v for k, v in data.items() if k not in ("stepWeight", "maxWeight")}
        step, top = data.get("stepWeight"), data.get("maxWeight")
        for name, value in (("stepWeight", step), ("maxWeight", top)):
            if value is None:
                raise FieldIssue("stepWeight and maxWeight must be given together", name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 99:
                raise FieldIssue(f"must be a whole percent between 1 and 99, got {value!r}", name)
        assert isinstance(step, int) and isinstance(top, int)
        if step > top:
            raise FieldIssue(f"stepWeight ({step}) must not exceed maxWeight ({top})", "stepWeight")
        weights = list(range(step, top + 1, step))
        if weights[-1] != top:
            weights.append(top)
        return {**rest, "steps": weights}

    @field_validator("steps")
    @classmethod
    def _increasing(
        cls, steps: tuple[int | Pause | CohortStep | MirrorStep, ...]
    ) -> tuple[int | Pause | CohortStep | MirrorStep, ...]:
        previous: int | None = None
        for index, step in enumerate(steps):
            if not isinstance(step, int):
                continue
            if previous is not None and step <= previous:
                raise FieldIssue(f"weight {step} must exceed the previous weight ({previous})", index)
            previous = step
        if previous is None and not any(isinstance(step, CohortStep | MirrorStep) for step in steps):
            raise ValueError("needs at least one weight step (1..99), cohorts step or mirror step")
        return steps

    @model_validator(mode="after")
    def _known_cohorts(self) -> Strategy:
        """Cohort names are unique, and a step opens only cohorts defined here, each once."""
        defined: dict[str, int] = {}
        for index, cohort in enumerate(self.cohorts):
            if cohort.name in defined:
                raise FieldIssue(f"duplicate cohort {cohort.name!r} (also cohorts[{defined[cohort.name]}])",
                                 "cohorts", index, "name")
            defined[cohort.name] = index
        opened: dict[str, int] = {}
        for index, step in enumerate(self.steps):
            if not isinstance(step, CohortStep):
                continue
            for position, name in enumerate(step.cohorts):
                if name not in defined:
                    known = ", ".join(defined) or "none defined in strategy.cohorts"
                    raise FieldIssue(f"unknown cohort {name!r} (known: {known})", "steps", index, "cohorts", position)
                if name in opened:
                    raise FieldIssue(f"cohort {name!r} is already open since steps[{opened[name]}]",
                                     "steps", index, "cohorts", position)
                opened[name] = index
        return self

    def cohort(self, name: str) -> CohortRule:
        return next(cohort for cohort in self.cohorts if cohort.name == name)

    @property
    def weights(self) -> tuple[int, ...]:
        return tuple(step for step in self.steps if isinstance(step, int))


ENVOY_TEMPLATES = (
    "request-success-rate", "error-rate-5xx", "error-rate-4xx",
    "request-duration-p50", "request-duration-p95", "request-duration-p99",
    "request-rate", "request-rate-per-weight",
)
"""Built-in templates over Envoy's own cluster statistics (``aviary.metrics.templates``)."""
VERSION_TEMPLATES = (
    "version-rate", "version-rate-per-request",
    "version-cpu", "version-cpu-per-request", "version-memory", "version-gc-pause",
)
"""Built-in templates over the application's own metrics, selected by ``analysis.versionLabel``."""
TEMPLATES = ENVOY_TEMPLATES + VERSION_TEMPLATES
PROVIDERS = ("prometheus", "envoy")
"""``analysis.provider``: where the checks' numbers come from (``envoy``: the proxies' own reports)."""
ENVOY_HORIZON = 900.0
"""Seconds of reports the ``envoy`` provider keeps (``aviary.metrics.envoy_reports``): its longest window."""
METRIC_TEMPLATES = {"version-rate": True, "version-rate-per-request": True, "version-gc-pause": False}
"""Templates that take ``metric`` (True: required, False: optional with a default)."""
_METRIC_NAME = re.compile(r"^[A-Za-z_:][A-Za-z0-9_:]*$")
_SIDE_PLACEHOLDER = re.compile(r"\{\{\s*(canary|stable|canary_version|stable_version)\s*\}\}")


def _template(name: str) -> str:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r} (one of {', '.join(TEMPLATES)})")
    return name


def _metric_name(name: str) -> str:
    if not _METRIC_NAME.match(name):
        raise ValueError(f"invalid Prometheus metric name {name!r}: letters, digits, '_' and ':' only")
    return name


class WebSource(BaseModel):
    """``web: {url, jsonPath}``: an HTTP GET of JSON; the JSONPath picks the number (or numbers).

    The URL may use the placeholders of custom queries (``{{ canary_version }}``...); for the stable
    side of a ``compare`` check they are swapped (see ``aviary.metrics.templates``).
    """

    model_config = _CONFIG

    url: Annotated[str, Field(strict=True), AfterValidator(lambda url: _http_url(url, placeholders=True))]
    json_path: str = Field(alias="jsonPath", strict=True, min_length=1)

    @field_validator("json_path")
    @classmethod
    def _json_path(cls, path: str) -> str:
        try:
            parse_json_path(path)
        except JsonPathError as exc:
            raise ValueError(str(exc)) from None
        return path


class Compare(BaseModel):
    """``compare: {by: ratio, max: 1.2}``: canary against stable on the same query and window.

    ``ratio`` bounds canary / stable, ``difference`` bounds canary - stable (in the metric's unit).
    """

    model_config = _CONFIG

    by: Literal["ratio", "difference"]
    min: Number | None = None
    max: Number | None = None

    @model_validator(mode="after")
    def _a_bound(self) -> Compare:
        if self.min is None and self.max is None:
            raise ValueError("needs a bound: min, max or both (e.g. {by: ratio, max: 1.2})")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise FieldIssue(f"min ({self.min:g}) is greater than max ({self.max:g})", "min")
        return self


class MetricCheck(BaseModel):
    """One check: a source (built-in template, custom PromQL query or web JSON) and its kind.

    The kind follows from the fields: ``compare: {...}`` makes a ``compare`` check (canary vs
    stable), ``min``/``max``/``maxDecreaseFromStable`` a ``threshold`` check (today's checks).
    """

    model_config = _CONFIG

    name: str = Field(strict=True, min_length=1, max_length=63, pattern=_IDENTIFIER.pattern)
    template: Annotated[str, Field(strict=True), AfterValidator(_template)] | None = None
    metric: Annotated[str, Field(strict=True), AfterValidator(_metric_name)] | None = None
    query: str | None = Field(default=None, strict=True, min_length=1)
    web: WebSource | None = None
    min: Number | None = None
    max: Number | None = None
    max_decrease_from_stable: Number | None = Field(default=None, alias="maxDecreaseFromStable", ge=0)
    compare: Compare | None = None

    @model_validator(mode="after")
    def _coherent(self) -> MetricCheck:
        if sum(source is not None for source in (self.template, self.query, self.web)) != 1:
            raise ValueError("give exactly one of template or query" if self.web is None
                             else "give exactly one of template, query or web")
        thresholds = self.min is not None or self.max is not None or self.max_decrease_from_stable is not None
        if self.compare is not None and thresholds:
            field = "min" if self.min is not None else "max" if self.max is not None else "maxDecreaseFromStable"
            raise FieldIssue("a compare check keeps its bounds inside compare: {by, min, max}", field)
        if self.compare is None and not thresholds:
            raise ValueError("needs a threshold: min, max or maxDecreaseFromStable (or compare: {by, min, max})")
        if self.max_decrease_from_stable is not None and self.template is None:
            raise FieldIssue("only works with a template (a custom query has no stable counterpart; "
                             "use compare: {by: difference, min: -N})", "maxDecreaseFromStable")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise FieldIssue(f"min ({self.min:g}) is greater than max ({self.max:g})", "min")
        if self.compare is not None and self.template is None:
            text, where = (self.query, ("query",)) if self.query is not None else (
                self.web.url if self.web is not None else "", ("web", "url"))
            if not _SIDE_PLACEHOLDER.search(text or ""):
                raise FieldIssue("a compare check runs this for canary and stable: select the version with "
                                 "{{ canary }} or {{ canary_version }} (swapped for the stable side)", *where)
        _metric_fits_template(self.template, self.metric)
        return self

    @property
    def kind(self) -> str:
        """``compare`` or ``threshold``: which check kind judges it (``aviary.metrics.kinds``)."""
        return "compare" if self.compare is not None else "threshold"


def _allowed(value: Any) -> str | float:
    """``10%`` (of the stable median) or a number in the metric's unit, >= 0."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a percentage such as 10% or a number, got {value!r}")
    try:
        number = float(value.strip()[:-1]) if isinstance(value, str) and value.strip().endswith("%") else float(value)
    except ValueError:
        raise ValueError(f"expected a percentage such as 10% or a number, got {value!r}") from None
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"must be >= 0, got {value!r}")
    return value if isinstance(value, str) else float(value)


JUDGE_VERDICT = "judge"
"""The name of the result that carries the judge's verdict for a round (no metric may take it)."""


class JudgeMetricSpec(BaseModel):
    """One metric of ``analysis.judge.metrics``: a template or a custom PromQL query, evaluated for
    canary and stable at every ``judge.step`` since the canary started (``aviary.metrics.kinds``)."""

    model_config = _CONFIG

    name: str = Field(strict=True, min_length=1, max_length=63, pattern=_IDENTIFIER.pattern)
    template: Annotated[str, Field(strict=True), AfterValidator(_template)] | None = None
    metric: Annotated[str, Field(strict=True), AfterValidator(_metric_name)] | None = None
    query: str | None = Field(default=None, strict=True, min_length=1)
    direction: Literal["increase", "decrease", "either"] = "increase"
    allowed: Annotated[Any, PlainValidator(_allowed)] = 0.0
    critical: bool = Field(default=False, strict=True)
    must_have_data: bool = Field(default=False, strict=True, alias="mustHaveData")
    weight: Number = Field(default=1.0, gt=0)
    min_samples: Annotated[StrictInt, Field(ge=2)] | None = Field(default=None, alias="minSamples")

    @property
    def web(self) -> None:
        """Judge metrics come from Prometheus only (series need a range query)."""
        return None

    @model_validator(mode="after")
    def _coherent(self) -> JudgeMetricSpec:
        if (self.template is None) == (self.query is None):
            raise ValueError("give exactly one of template or query")
        if self.template in ("request-rate-per-weight",):
            raise FieldIssue("the judge compares canary and stable samples; per-weight rates are for "
                             "threshold checks", "template")
        if self.query is not None and not _SIDE_PLACEHOLDER.search(self.query):
            raise FieldIssue("the judge runs this for canary and stable: select the version with "
                             "{{ canary }} or {{ canary_version }} (swapped for the stable side)", "query")
        _metric_fits_template(self.template, self.metric)
        return self


class JudgeSpec(BaseModel):
    """``analysis.judge``: canary and stable samples compared by a sequential rank test
    (``aviary.policy.judge``), scored over its metrics.

    ``step`` is both the spacing of the samples and the sub-window each one measures (templates
    and ``{{ window }}`` render it), so samples cover disjoint spans; it must be at least twice
    Prometheus' scrape interval. ``maxWindow`` caps how far back the samples reach.

    ``horizon`` (samples per side) is where the judge's test is planned to end (see
    ``aviary.policy.judge``); left out, ``JudgeCheck`` derives it from the strategy's step durations
    (``planned_seconds``, filled in by ``RolloutSpec``).
    """

    model_config = _CONFIG

    metrics: tuple[JudgeMetricSpec, ...] = Field(min_length=1)
    pass_score: Number = Field(default=95.0, alias="pass", ge=0, le=100)
    marginal: Number = Field(default=75.0, ge=0, le=100)
    alpha: Number = Field(default=0.05, gt=0, lt=1)
    min_samples: Annotated[StrictInt, Field(ge=2)] = Field(default=20, alias="minSamples")
    step: Duration = 5.0
    max_window: Duration = Field(default=3600.0, alias="maxWindow")
    horizon: Annotated[StrictInt, Field(ge=2)] | None = None
    _planned_seconds: float | None = PrivateAttr(default=None)

    @property
    def planned_seconds(self) -> float | None:
        """How long the strategy's steps last in all (None: no strategy known)."""
        return self._planned_seconds

    @field_validator("metrics")
    @classmethod
    def _unique_names(cls, metrics: tuple[JudgeMetricSpec, ...]) -> tuple[JudgeMetricSpec, ...]:
        for index, metric in enumerate(metrics):
            if metric.name == JUDGE_VERDICT:
                raise FieldIssue(f"{JUDGE_VERDICT!r} names the judge's verdict; choose another name", index, "name")
        return _unique_names(metrics)

    @model_validator(mode="after")
    def _bands(self) -> JudgeSpec:
        if self.marginal > self.pass_score:
            raise FieldIssue(f"marginal ({self.marginal:g}) is greater than pass ({self.pass_score:g})", "marginal")
        if self.max_window < self.step * 2:
            raise FieldIssue(f"maxWindow must hold at least two steps ({self.step:g}s each)", "maxWindow")
        least = max([self.min_samples, *(m.min_samples for m in self.metrics if m.min_samples is not None)])
        if self.horizon is not None and self.horizon < least:
            raise FieldIssue(f"horizon ({self.horizon} samples per side) must be at least minSamples ({least})",
                             "horizon")
        return self


def _metric_fits_template(template: str | None, metric: str | None) -> None:
    """``metric`` is given exactly when ``template`` reads an application metric (``version-rate``...)."""
    takes = METRIC_TEMPLATES.get(template or "")
    if metric is not None and takes is None:
        raise FieldIssue(f"only for the templates {', '.join(METRIC_TEMPLATES)}", "metric")
    if takes and metric is None:
        raise FieldIssue(f"template {template} needs metric: the name of the application's metric, "
                         "e.g. orders_completed_total", "metric")


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_NamedT = TypeVar("_NamedT", bound=_Named)


def _unique_names(metrics: tuple[_NamedT, ...]) -> tuple[_NamedT, ...]:
    """``metrics`` unless two share a name: the second is refused, naming the first."""
    seen: dict[str, int] = {}
    for index, metric in enumerate(metrics):
        if metric.name in seen:
            raise FieldIssue(f"duplicate metric name {metric.name!r} (also metrics[{seen[metric.name]}])",
                             index, "name")
        seen[metric.name] = index
    return metrics


def _http_url(url: str, placeholders: bool = False) -> str:
    # A web check's URL may carry placeholders ("{{ canary_version }}"): checked with a stand-in.
    parts = urlsplit(re.sub(r"\{\{[^}]*\}\}", "x", url) if placeholders else url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL such as http://127.0.0.1:9090, got {url!r}")
    return url


_LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _label_name(name: str) -> str:
    if not _LABEL_NAME.match(name) or name.startswith("__"):
        raise ValueError(f"invalid Prometheus label name {name!r}: letters, digits and '_', e.g. version")
    return name


class Analysis(BaseModel):
    """Metric checks run while the canary takes traffic, and what their outcomes may add up to."""

    model_config = _CONFIG

    provider: Literal["prometheus", "envoy"] = "prometheus"
    # provider envoy: access-log samples kept per second per cluster (the rest are dropped on arrival)
    samples_per_second: Annotated[StrictInt, Field(ge=1, le=10_000)] = Field(default=100, alias="samplesPerSecond")
    prometheus: Annotated[str, Field(strict=True), AfterValidator(_http_url)] | None = None
    check_every: Duration = Field(default=5.0, alias="checkEvery")
    window: Duration = 30.0
    min_requests: Count = Field(default=20, alias="minRequests")
    failure_limit: Count = Field(default=0, alias="failureLimit")
    inconclusive_limit: Count = Field(default=3, alias="inconclusiveLimit")
    on_inconclusive: Literal["rollback", "pause"] = Field(default="rollback", alias="onInconclusive")
    version_label: Annotated[str, Field(strict=True), AfterValidator(_label_name)] | None = Field(
        default=None, alias="versionLabel")
    metrics: tuple[MetricCheck, ...] = ()
    judge: JudgeSpec | None = None

    @field_validator("metrics")
    @classmethod
    def _unique_names(cls, metrics: tuple[MetricCheck, ...]) -> tuple[MetricCheck, ...]:
        return _unique_names(metrics)

    @model_validator(mode="after")
    def _version_label_given(self) -> Analysis:
        if not self.metrics and self.judge is None:
            raise FieldIssue("needs checks: at least 1 in metrics, or a judge", "metrics")
        if self.version_label is None:
            for index, metric in enumerate(self.metrics):
                if metric.template in VERSION_TEMPLATES:
                    raise FieldIssue(f"template {metric.template} selects the version by a label: set "
                                     "analysis.versionLabel (e.g. versionLabel: version)", "metrics", index, "template")
            for index, judged in enumerate(self.judge.metrics if self.judge else ()):
                if judged.template in VERSION_TEMPLATES:
                    raise FieldIssue(f"template {judged.template} selects the version by a label: set "
                                     "analysis.versionLabel (e.g. versionLabel: version)",
                                     "judge", "metrics", index, "template")
        names = {metric.name: index for index, metric in enumerate(self.metrics)}
        for index, judged in enumerate(self.judge.metrics if self.judge else ()):
            if judged.name in names:
                raise FieldIssue(f"metric name {judged.name!r} is also metrics[{names[judged.name]}]",
                                 "judge", "metrics", index, "name")
        if JUDGE_VERDICT in names and self.judge is not None:
            raise FieldIssue(f"{JUDGE_VERDICT!r} names the judge's verdict; choose another name",
                             "metrics", names[JUDGE_VERDICT], "name")
        if self.provider == "envoy":
            self._envoy_can_answer()
        return self

    def _envoy_can_answer(self) -> None:
        """The ``envoy`` provider knows only what proxies report: the Envoy templates, within its horizon."""
        answers = ", ".join(ENVOY_TEMPLATES)
        if self.window > ENVOY_HORIZON:
            raise FieldIssue(f"the envoy provider keeps {ENVOY_HORIZON:g}s of reports: window must not be longer",
                             "window")
        checks: list[tuple[tuple[str | int, ...], MetricCheck | JudgeMetricSpec]] = [
            (("metrics", index), metric) for index, metric in enumerate(self.metrics)]
        checks += [(("judge", "metrics", index), judged)
                   for index, judged in enumerate(self.judge.metrics if self.judge else ())]
        for where, check in checks:
            if check.query is not None:
                raise FieldIssue(f"provider envoy answers the built-in templates only ({answers}); a custom "
                                 "PromQL query needs provider: prometheus", *where, "query")
            if check.template is not None and check.template not in ENVOY_TEMPLATES:
                raise FieldIssue(f"provider envoy answers the built-in Envoy templates only ({answers}); "
                                 f"{check.template} reads the application's metrics from Prometheus",
                                 *where, "template")


def _version(value: str) -> str:
    if len(value) > 40 or not _VERSION.match(value):
        raise ValueError(
            f"invalid version {value!r}: lowercase letters, digits, '.' and '-', starting with a letter "
            "or digit, at most 40 characters"
        )
    return value


def _identifier(value: str) -> str:
    if not _IDENTIFIER.match(value):
        raise ValueError(f"invalid name {value!r}: letters, digits, '_', '.' and '-' only")
    return value


def planned_seconds(strategy: Strategy) -> float:
    """Seconds the strategy's steps last if every one ends on time: ``interval`` for a weight, cohorts
    or mirror step, its duration for a timed pause, nothing for a manual pause (it has no end)."""
    return sum(strategy.interval if not isinstance(step, Pause) else (step.duration or 0.0)
               for step in strategy.steps)


class RolloutSpec(BaseModel):
    model_config = _CONFIG

    listener: ListenerSpec
    hosts: tuple[Host, ...] = Field(min_length=1)
    version: Annotated[str, Field(strict=True), AfterValidator(_version)]
    endpoints: tuple[Endpoint, ...] = Field(min_length=1)
    proxy_cluster: Annotated[str, Field(strict=True), AfterValidator(_identifier)] | None = Field(
        default=None, alias="proxyCluster"
    )
    strategy: Strategy | None = None
    analysis: Analysis | None = None

    @model_validator(mode="after")
    def _judge_plan(self) -> RolloutSpec:
        """The judge's horizon is derived from how long the strategy's steps last."""
        if self.strategy is not None and self.analysis is not None and self.analysis.judge is not None:
            self.analysis.judge._planned_seconds = planned_seconds(self.strategy)
        return self

    @field_validator("hosts")
    @classmethod
    def _unique_hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        # Envoy rejects a RouteConfiguration whose virtual hosts repeat a domain, case-insensitively.
        seen: dict[str, int] = {}
        for index, host in enumerate(hosts):
            if host.casefold() in seen:
                raise FieldIssue(f"duplicate host {host!r} (also hosts[{seen[host.casefold()]}])", index)
            seen[host.casefold()] = index
        return hosts

    @field_validator("endpoints")
    @classmethod
    def _unique_endpoints(cls, endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        seen: dict[Endpoint, int] = {}
        for index, endpoint in enumerate(endpoints):
            if endpoint in seen:
                raise FieldIssue(f"duplicate endpoint '{endpoint}' (also endpoints[{seen[endpoint]}])", index)
            seen[endpoint] = index
        return endpoints


class Metadata(BaseModel):
    model_config = _CONFIG

    name: str = Field(strict=True)

    @field_validator("name")
    @classmethod
    def _dns_label(cls, name: str) -> str:
        # The name ends up in Envoy cluster and listener names, so it must be safe in all of them.
        if len(name) > 40 or not _ROLLOUT_NAME.match(name):
            raise ValueError(
                f"invalid name {name!r}: lowercase letters, digits and '-', starting and ending with a "
                "letter or digit, at most 40 characters"
            )
        return name


class Rollout(BaseModel):
    """One policy file: a service's stable version, its backends and how a canary may replace it."""

    model_config = _CONFIG

    api_version: Literal["aviary.dev/v1"] = Field(alias="apiVersion")
    kind: Literal["Rollout"]
    metadata: Metadata
    spec: RolloutSpec

    @property
    def name(self) -> str:
        return self.metadata.name


# ------------------------------------------------------------------------------------ loader output


@dataclass(frozen=True)
class PolicyError:
    """Why (part of) a policy file was rejected; ``field`` is a YAML path or "-" for the whole file."""

    file: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.reason}"


@dataclass(frozen=True)
class PolicySet:
    """The rollouts that should be running, keyed by rollout name, and the file each came from."""

    rollouts: Mapping[str, Rollout] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    revision: str | None = None

