"""Recordings (``aviary.metrics.recording``): the provider answering as Prometheus would have at
the simulated time, the file round trip and its refusals; the queries a policy plans
(``planned_queries``); ``aviary record``'s fetching with prometheus-api-client mocked (no socket);
and the times ``--from``/``--to``/``--start`` take."""

from __future__ import annotations

import gzip
import itertools
import json
import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect

from aviary.cli import _joined_relative_times, build_parser
from aviary.flags import parse_time
from aviary.metrics.kinds import RoundContext, checks_of
from aviary.metrics.planned_queries import look_back, planned_queries
from aviary.metrics.recorder import CHUNK_POINTS, RecordError, RecordRequest, record
from aviary.metrics.recording import (
    FORMAT,
    Provenance,
    RecordedProvider,
    RecordedSeries,
    Recording,
    RecordingError,
    RecordingMismatch,
)
from aviary.metrics.templates import Side
from aviary.policy.rollout_machine import guard_analysis
from tests.unit.synthetic_recordings import T0, parse, policy_doc

QUERY = "sum(rate(requests[30s]))"


def provenance(start: float = 10.0, end: float = 20.0, step: float = 1.0) -> Provenance:
    return Provenance("http://127.0.0.1:9090", start, end, step, "shop", "v2", "v1", "shop.yaml", 30.0, "test", start)


def small_recording() -> Recording:
    """Points at 10, 11, 12 and 15 (13 and 14: no data), a NaN at 11."""
    series = RecordedSeries(QUERY, (10.0, 11.0, 12.0, 15.0), (1.0, math.nan, 3.0, 4.0), ("check rate (canary)",))
    return Recording(provenance(), {QUERY: series})


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---- RecordedProvider --------------------------------------------------------------------------


@pytest.mark.parametrize(("at", "expected"), [
    (10.0, 1.0),
    (10.5, 1.0),  # the last point at or before t
    (12.0, 3.0),  # a point exactly at t
    (12.0 + 1e-9, 3.0),  # float noise of the simulated clock
    (12.9, 3.0),
    (13.0, None),  # one step old: Prometheus' look-back would not reach it at this resolution
    (14.0, None),  # a gap: no data
    (9.5, None),  # before the first point
    (15.5, 4.0),
])
async def test_an_instant_query_gets_the_last_point_within_one_step(at: float, expected: float | None) -> None:
    provider = RecordedProvider(small_recording(), Clock(at))
    assert await provider.query_scalar(QUERY, 1.0) == expected


async def test_nan_is_answered_as_nan_not_as_no_data() -> None:
    value = await RecordedProvider(small_recording(), Clock(11.2)).query_scalar(QUERY, 1.0)
    assert value is not None and math.isnan(value)


async def test_a_range_query_takes_points_from_t_minus_window_by_step_leaving_out_no_data() -> None:
    provider = RecordedProvider(small_recording(), Clock(15.0))
    # points 11, 12, 13, 14, 15: NaN, 3, (none), (none), 4
    values = await provider.query_series(QUERY, 4.0, 1.0, 1.0)
    assert len(values) == 3 and math.isnan(values[0]) and values[1:] == (3.0, 4.0)
    # points 11, 13, 15 at a 2 s step
    assert len(await provider.query_series(QUERY, 4.0, 2.0, 1.0)) == 2
    assert provider.gaps == {}


async def test_a_range_reaching_before_the_recording_is_noted_once() -> None:
    provider = RecordedProvider(small_recording(), Clock(12.0))
    values = await provider.query_series(QUERY, 5.0, 1.0, 1.0)
    assert values[0] == 1.0 and values[-1] == 3.0
    assert list(provider.gaps) == [QUERY]
    assert "the recording starts at 1970-01-01T00:00:10Z" in provider.gaps[QUERY]


async def test_a_query_not_recorded_raises_recording_mismatch_naming_it() -> None:
    provider = RecordedProvider(small_recording(), Clock(12.0))
    with pytest.raises(RecordingMismatch, match=r"sum\(rate\(other\[30s\]\)\)"):
        await provider.query_scalar("sum(rate(other[30s]))", 1.0)
    with pytest.raises(RecordingMismatch):
        await provider.query_series("sum(rate(other[30s]))", 10.0, 1.0, 1.0)
    assert provider.missing([QUERY, "x", "y"]) == ["x", "y"]


# ---- the file ----------------------------------------------------------------------------------


def test_save_and_load_round_trip_keeps_nan_and_infinities(tmp_path: Path) -> None:
    series = RecordedSeries(QUERY, (10.0, 11.5, 12.25), (math.nan, math.inf, -math.inf), ("a", "b"))
    plain = RecordedSeries("up", (10.0, 20.0), (0.0, 1.5))
    original = Recording(provenance(), {QUERY: series, "up": plain})
    path = tmp_path / "rec.json.gz"
    original.save(path)
    body = json.loads(gzip.decompress(path.read_bytes()))
    assert body["format"] == FORMAT
    assert body["series"][0]["values"] == ["NaN", "+Inf", "-Inf"]  # as Prometheus writes them
    loaded = Recording.load(path)
    assert loaded.provenance == original.provenance
    assert list(loaded.series) == [QUERY, "up"]
    again = loaded.series[QUERY]
    assert (again.query, again.times, again.uses) == (QUERY, series.times, series.uses)
    assert math.isnan(again.values[0]) and again.values[1:] == (math.inf, -math.inf)
    assert loaded.series["up"] == plain


def _body() -> dict[str, Any]:
    return {"format": FORMAT, "provenance": {
        "prometheus": "http://p", "start": 10.0, "end": 20.0, "step": 1.0, "rollout": "shop", "canary": "v2",
        "stable": "v1", "policy": "shop.yaml", "recorded_at": 30.0, "aviary_version": "t", "simulate_from": 10.0},
        "series": [{"query": QUERY, "uses": [], "times": [10, 11], "values": [1, "NaN"]}]}


def _changed(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    body = _body()
    node: Any = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


@pytest.mark.parametrize(("data", "reason"), [
    (None, "cannot be read: No such file"),
    (b"not gzip", "cannot be read"),
    (gzip.compress(b"\xff\xfe"), "not a recording"),
    (gzip.compress(b"{"), "not a recording"),
    (gzip.compress(b"[]"), "format 'list'"),
    (gzip.compress(b'{"format": "aviary-recording/2"}'), "format 'aviary-recording/2'"),
    (gzip.compress(json.dumps({"format": FORMAT}).encode()), "malformed recording"),
    (_changed(("provenance", "extra"), 1), "malformed recording"),
    (_changed(("provenance", "start"), "10"), "provenance start '10' is not a number"),
    (_changed(("provenance", "end"), True), "provenance end True is not a number"),
    (_changed(("provenance", "step"), 0), "step 0 must be positive"),
    (_changed(("provenance", "end"), 5.0), "start 10.0 not after end 5.0"),
    (_changed(("provenance", "canary"), 2), "provenance canary 2 is not a text"),
    (_changed(("series",), {"q": 1}), "malformed recording"),
    (_changed(("series", 0, "times"), [10]), "times and values do not match"),
    (_changed(("series", 0, "times"), [11, 10]), "times and values do not match"),
    (_changed(("series", 0, "values"), [1, "many"]), "malformed recording"),
    (_changed(("series", 0, "values"), [1, True]), "value True is not a number"),
    (_changed(("series", 0, "values"), [1, None]), "value None is not a number"),
], ids=lambda item: None if isinstance(item, str) else "")
def test_a_malformed_file_is_a_recording_error_naming_it(tmp_path: Path, data: Any, reason: str) -> None:
    path = tmp_path / "bad.json.gz"
    if isinstance(data, dict):
        data = gzip.compress(json.dumps(data).encode())
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(RecordingError) as refused:
        Recording.load(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and reason in message, message
    assert "\n" not in message


def test_the_valid_body_of_those_cases_loads(tmp_path: Path) -> None:
    path = tmp_path / "good.json.gz"
    path.write_bytes(gzip.compress(json.dumps(_body()).encode()))
    assert Recording.load(path).series[QUERY].times == (10.0, 11.0)


# ---- planned queries ---------------------------------------------------------------------------


def test_request_rate_per_weight_is_planned_at_every_weight_of_the_strategy() -> None:
    rate = {"name": "rate", "template": "request-rate-per-weight", "min": 1}
    rollout = parse(policy_doc(steps=[10, 50], metrics=[rate]))
    queries = [p.query for p in planned_queries("shop", rollout.spec, "v2", "v1") if p.uses == ("threshold check rate "
                                                                                                 "(canary)",)]
    assert [query.rsplit(" / ", 1)[1] for query in queries] == ["10", "50", "100"]
    assert all('envoy_cluster_name="shop_v2"' in query for query in queries)


def test_the_after_promotion_guard_checks_are_planned() -> None:
    """A comparison with stable cannot render at 100 % (stable at 0 %): only the guard, which drops
    ``maxDecreaseFromStable``, asks the canary's rate at 100 %."""
    rate = {"name": "rate", "template": "request-rate-per-weight", "min": 1, "maxDecreaseFromStable": 10}
    doc = policy_doc(steps=[10, 50], metrics=[rate])
    without = planned_queries("shop", parse(doc).spec, "v2", "v1")
    doc["spec"]["strategy"]["afterPromotion"] = {"keep": "5m"}
    spec = parse(doc).spec
    planned = planned_queries("shop", spec, "v2", "v1")
    guard = guard_analysis(spec.analysis)
    assert guard is not None
    context = RoundContext(guard, Side("shop_v2", "v2", 100), Side("shop_v1", "v1", 0))
    guarded = {ask.query for check in checks_of(guard) for ask in check.plan(context)}
    assert guarded and guarded <= {p.query for p in planned}
    assert not guarded <= {p.query for p in without}
    assert len(planned) == len(without) + 1


def test_the_judge_is_planned_at_its_step_and_reaches_back_its_first_rounds() -> None:
    judge = {"metrics": [{"name": "errors", "template": "error-rate-5xx", "direction": "increase"}],
             "step": "5s", "maxWindow": "5m"}
    spec = parse(policy_doc(metrics=[], judge=judge)).spec
    uses = {p.uses[0]: p.query for p in planned_queries("shop", spec, "v2", "v1")}
    assert "[5s]" in uses["judge metric errors (canary)"] and 'shop_v2' in uses["judge metric errors (canary)"]
    assert "[5s]" in uses["judge metric errors (stable)"] and 'shop_v1' in uses["judge metric errors (stable)"]
    assert look_back(spec) == 5 * 20  # minSamples steps: what a round asks while the canary's start is unknown
    assert look_back(parse(policy_doc(metrics=[], judge={**judge, "maxWindow": "30s"})).spec) == 30
    assert look_back(parse(policy_doc()).spec) == 0


# ---- aviary record, prometheus-api-client mocked -----------------------------------------------


class FakeRange:
    """``custom_query_range`` answering every step from start to end (values from ``value``); set
    on the class, an instance is not bound, so it is called without the client."""

    def __init__(self, value: Any = lambda query, at: "1", empty: tuple[str, ...] = (),
                 error: Exception | None = None) -> None:
        self.value = value
        self.empty = empty
        self.error = error
        self.asked: list[tuple[str, float, float, float]] = []

    def __call__(self, query: str, start_time: datetime, end_time: datetime, step: str, params: Any = None,
                 timeout: Any = None) -> list[dict[str, Any]]:
        start, end, seconds = start_time.timestamp(), end_time.timestamp(), float(step)
        self.asked.append((query, start, end, seconds))
        if self.error is not None:
            raise self.error
        if any(part in query for part in self.empty):
            return []
        count = int((end - start) // seconds) + 1
        values = [[start + i * seconds, self.value(query, start + i * seconds)] for i in range(count)]
        return [{"metric": {}, "values": values}]


def request(seconds: float, **changes: Any) -> RecordRequest:
    fields: dict[str, Any] = {"prometheus": "http://127.0.0.1:9", "rollout": parse(policy_doc()),
                              "policy_file": "shop.yaml", "canary": "v2", "stable": "v1", "start": T0,
                              "end": T0 + seconds, "step": 1.0, "aviary_version": "test", **changes}
    return RecordRequest(**fields)


def test_record_fetches_every_planned_query_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRange(lambda query, at: "NaN" if at == T0 + 5 else f"{at - T0:g}")
    monkeypatch.setattr(PrometheusConnect, "custom_query_range", fake)
    span = 2.5 * CHUNK_POINTS
    recording, empty = record(request(span))
    assert empty == []
    planned = {p.query for p in planned_queries("shop", parse(policy_doc()).spec, "v2", "v1")}
    assert set(recording.series) == planned
    for query in planned:
        chunks = sorted((start, end) for asked, start, end, _ in fake.asked if asked == query)
        assert len(chunks) == 3
        assert chunks[0][0] == T0 and chunks[-1][1] == T0 + span
        assert all(round((end - start) / 1.0) + 1 <= CHUNK_POINTS for start, end in chunks)
        assert all(later[0] == earlier[1] + 1.0 for earlier, later in itertools.pairwise(chunks))
        series = recording.series[query]
        assert len(series.times) == span + 1 and series.times == tuple(sorted(set(series.times)))
        assert series.values[4] == 4.0 and math.isnan(series.values[5])
    prov = recording.provenance
    assert (prov.start, prov.end, prov.step, prov.simulate_from) == (T0, T0 + span, 1.0, T0)
    assert (prov.rollout, prov.canary, prov.stable, prov.policy) == ("shop", "v2", "v1", "shop.yaml")


def test_record_starts_early_by_the_look_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PrometheusConnect, "custom_query_range", FakeRange())
    judge = {"metrics": [{"name": "errors", "template": "error-rate-5xx", "direction": "increase"}],
             "step": "6s", "minSamples": 20, "maxWindow": "1h"}
    recording, _ = record(request(60, rollout=parse(policy_doc(metrics=[], judge=judge))))
    assert (recording.provenance.start, recording.provenance.simulate_from) == (T0 - 120, T0)
    assert all(series.times[0] == T0 - 120 for series in recording.series.values())


def test_record_reports_queries_without_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PrometheusConnect, "custom_query_range", FakeRange(empty=('code_class="5"',)))
    recording, empty = record(request(60))
    assert len(empty) == 1
    assert empty[0].startswith("no data for threshold check success (canary) from 2026-01-01T00:00:00Z to "
                               "2026-01-01T00:01:00Z: ")
    assert sum(1 for series in recording.series.values() if not series.times) == 1


@pytest.mark.parametrize(("error", "reason"), [
    (PrometheusApiClientException('HTTP Status Code 400 (b\'{"status":"error","errorType":"bad_data",'
                                  '"error":"parse error"}\')'), "parse error"),
    (ConnectionError("refused"), "could not be queried: refused"),
    (KeyError("data"), "malformed answer"),
])
def test_a_prometheus_error_becomes_record_error(monkeypatch: pytest.MonkeyPatch, error: Exception,
                                                 reason: str) -> None:
    monkeypatch.setattr(PrometheusConnect, "custom_query_range", FakeRange(error=error))
    with pytest.raises(RecordError) as refused:
        record(request(60))
    assert "http://127.0.0.1:9" in str(refused.value) and reason in str(refused.value)


def test_more_than_one_series_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def two(client: Any, query: str, **kwargs: Any) -> list[dict[str, Any]]:
        return [{"metric": {"a": "1"}, "values": []}, {"metric": {"a": "2"}, "values": []}]

    monkeypatch.setattr(PrometheusConnect, "custom_query_range", two)
    with pytest.raises(RecordError, match="returned 2 series, expected one"):
        record(request(60))


def test_aviary_record_exits_1_on_a_prometheus_error_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from aviary.cli import main
    from tests.unit.synthetic_recordings import write

    policy, _ = write(tmp_path, policy_doc())
    monkeypatch.setattr(PrometheusConnect, "custom_query_range", FakeRange(error=ConnectionError("refused")))
    out = tmp_path / "out.json.gz"
    argv = ["record", "--prometheus", "http://127.0.0.1:9", "--policy", str(policy), "--from", "-2m", "--stable",
            "v1", "-o", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("aviary record: Prometheus http://127.0.0.1:9 could not be")
    assert not out.exists()
    monkeypatch.setattr(PrometheusConnect, "custom_query_range", FakeRange())
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("recorded 2 queries (")
    assert Recording.load(out).provenance.stable == "v1"


# ---- times -------------------------------------------------------------------------------------

NOW = 1_800_000_000.0
TEN = datetime(2026, 12, 1, 10, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("text", "seconds"), [
    ("2026-12-01T10:00:00Z", TEN),
    ("2026-12-01T11:30:00+01:30", TEN),
    ("2026-12-01T05:00:00-05:00", TEN),
    ("2026-12-01T10:00:00.250Z", TEN + 0.25),
    ("1796119200", 1796119200.0),
    ("1796119200.5", 1796119200.5),
    ("-15m", NOW - 900),
    ("-1h30m", NOW - 5400),
    ("-90", NOW - 90),
    ("now", NOW),
    (" NOW ", NOW),
])
def test_parse_time_takes_rfc3339_unix_seconds_and_durations_before_now(text: str, seconds: float) -> None:
    assert parse_time(text, NOW) == pytest.approx(seconds)


def test_the_offsets_agree_with_datetime() -> None:
    moment = datetime(2026, 12, 1, 11, 30, tzinfo=timezone(timedelta(hours=1, minutes=30)))
    assert parse_time(moment.isoformat(), NOW) == moment.timestamp() == TEN


@pytest.mark.parametrize(("text", "reason"), [
    ("2026-12-01T10:00:00", "give a time zone"),
    ("yesterday", "expected RFC 3339"),
    ("", "expected RFC 3339"),
    ("-", "invalid duration ''"),
    ("-soon", "invalid duration 'soon'"),
    ("-0s", "greater than zero"),
    ("nan", "positive number"),
    ("inf", "positive number"),
])
def test_parse_time_refuses(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_time(text, NOW)


@pytest.mark.parametrize(("argv", "joined"), [
    (["simulate", "p", "--from", "-15m", "--to", "-5m"], ["simulate", "p", "--from=-15m", "--to=-5m"]),
    (["simulate", "p", "--start", "-30s", "--ack-delay", "1s"], ["simulate", "p", "--start=-30s", "--ack-delay", "1s"]),
    (["record", "--from", "1796119200", "--to", "now"], ["record", "--from", "1796119200", "--to", "now"]),
    (["simulate", "p", "--from", "--metrics", "m"], ["simulate", "p", "--from", "--metrics", "m"]),  # a flag stays one
    (["serve", "--log-level", "-1"], ["serve", "--log-level", "-1"]),  # only the time flags
])
def test_relative_times_are_joined_to_their_flag(argv: list[str], joined: list[str]) -> None:
    assert _joined_relative_times(argv) == joined


def test_from_minus_15m_parses_as_a_time_before_now() -> None:
    args = build_parser().parse_args(_joined_relative_times(["simulate", "p", "--metrics", "m", "--from", "-15m"]))
    now = datetime.now(UTC).timestamp()
    assert now - 960 < args.span_from < now - 840
    assert now - 60 < args.span_to <= now + 1
