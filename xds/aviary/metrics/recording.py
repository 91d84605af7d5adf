"""Recorded metrics: what ``aviary record`` fetched from Prometheus, and a provider that answers from it.

A recording holds, for every query a policy's checks would run, the query's value over a span of
time at one resolution (a Prometheus range query at the scrape interval), with its provenance:
where and when it was recorded, for which rollout and versions. ``aviary simulate`` runs the real
engine over it on a simulated clock, with ``RecordedProvider`` in place of Prometheus.

The provider answers as Prometheus would have at the simulated time ``t``, from the past only:

- an instant query gets the value at the last recorded point at or before ``t`` (None where
  Prometheus had no data there, NaN where it answered NaN);
- a range query over ``window`` at ``step`` gets, for each point Prometheus would evaluate
  (``t - window``, then every ``step`` up to ``t``), the recorded value at or before that point;
  points without data are left out, as Prometheus leaves them out.

So the checks, the judge and the engine decide exactly as they would live, no data included. A
query the recording does not hold is not guessed: ``RecordingMismatch`` names it, and the caller
stops (a policy edited since the recording queries something else; record again). The file is
gzip-compressed JSON (``FORMAT``), NaN and infinities written as Prometheus writes them.
"""

from __future__ import annotations

import bisect
import gzip
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aviary.metrics.provider import MetricProviderError

__all__ = [
    "FORMAT",
    "Provenance",
    "RecordedProvider",
    "RecordedSeries",
    "Recording",
    "RecordingError",
    "RecordingMismatch",
    "utc_text",
]

FORMAT = "aviary-recording/1"
_EPSILON = 1e-6  # seconds: float noise between a simulated time and a recorded point


class RecordingError(ValueError):
    """A recording file that cannot be read: missing, not gzip JSON, another format, malformed."""


class RecordingMismatch(MetricProviderError):
    """The recording does not hold a query the policy asks: what was asked and what is recorded."""


def utc_text(seconds: float) -> str:
    """RFC 3339 in UTC, to the second (milliseconds when there are any): how times are shown."""
    moment = datetime.fromtimestamp(seconds, UTC)
    text = moment.isoformat(timespec="milliseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where a recording comes from: enough to record it again, and to know what it can answer."""

    prometheus: str
    start: float
    """Unix seconds of the first recorded point (the span asked for, less the look-back of range
    queries: the judge's samples reach back before the first simulated round)."""
    end: float
    step: float
    """Seconds between recorded points (the scrape interval)."""
    rollout: str
    canary: str
    stable: str
    policy: str
    """The policy file the queries were derived from."""
    recorded_at: float
    aviary_version: str
    simulate_from: float
    """Unix seconds: where the span asked for began (``--from``); ``aviary simulate`` starts there."""


@dataclass(frozen=True, slots=True)
class RecordedSeries:
    """One query's values at recorded times (ascending); times where Prometheus had no data are absent."""

    query: str
    times: tuple[float, ...]
    values: tuple[float, ...]
    uses: tuple[str, ...] = ()
    """What asks it, for messages: ``check error-rate (canary)``."""

    def at(self, moment: float, step: float) -> float | None:
        """The value of the last recorded point in (``moment - step``, ``moment``]; None: no data there."""
        index = bisect.bisect_right(self.times, moment + _EPSILON) - 1
        if index < 0 or self.times[index] <= moment - step + _EPSILON:
            return None
        return self.values[index]


@dataclass(frozen=True, slots=True)
class Recording:
    provenance: Provenance
    series: Mapping[str, RecordedSeries] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        body = {"format": FORMAT, "provenance": asdict(self.provenance),
                "series": [{"query": s.query, "uses": list(s.uses), "times": [round(t, 3) for t in s.times],
                            "values": [_encode(v) for v in s.values]} for s in self.series.values()]}
        data = json.dumps(body, separators=(",", ":")).encode()
        path.write_bytes(gzip.compress(data, mtime=0))

    @classmethod
    def load(cls, path: Path) -> Recording:
        """Read a recording; RecordingError with the file and the reason when it cannot be."""
        try:
            body = json.loads(gzip.decompress(path.read_bytes()))
        except OSError as exc:  # missing, unreadable, or not gzip (gzip.BadGzipFile is an OSError)
            raise RecordingError(f"{path}: cannot be read: {exc.strerror or exc}") from None
        except (ValueError, EOFError) as exc:
            raise RecordingError(f"{path}: not a recording (gzip-compressed JSON expected): {exc}") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            found = body.get("format") if isinstance(body, dict) else type(body).__name__
            raise RecordingError(f"{path}: format {found!r}, expected {FORMAT!r} (made by aviary record)")
        try:
            provenance = _provenance(body["provenance"])
            series = {}
            for entry in body["series"]:
                times = tuple(float(t) for t in entry["times"])
                values = tuple(_decode(v) for v in entry["values"])
                if len(times) != len(values) or list(times) != sorted(times):
                    raise ValueError(f"series {entry['query']!r}: times and values do not match")
                series[entry["query"]] = RecordedSeries(entry["query"], times, values, tuple(entry.get("uses", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordingError(f"{path}: malformed recording: {exc}") from None
        return cls(provenance, series)

    def covers(self) -> str:
        prov = self.provenance
        return f"{utc_text(prov.start)} to {utc_text(prov.end)} every {prov.step:g}s"


_TIMES = ("start", "end", "step", "recorded_at", "simulate_from")
_TEXTS = ("prometheus", "rollout", "canary", "stable", "policy", "aviary_version")


def _provenance(fields: Any) -> Provenance:
    """The provenance block, its fields' types checked: a text time or a zero step would fail (or
    answer nothing) only later, in the middle of a simulation."""
    provenance = Provenance(**fields)
    for name in _TEXTS:
        if not isinstance(getattr(provenance, name), str):
            raise ValueError(f"provenance {name} {getattr(provenance, name)!r} is not a text")
    for name in _TIMES:
        value = getattr(provenance, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"provenance {name} {value!r} is not a number")
    if provenance.step <= 0 or provenance.start > provenance.end:
        raise ValueError(f"provenance: step {provenance.step!r} must be positive and start {provenance.start!r} "
                         f"not after end {provenance.end!r}")
    return provenance


def _encode(value: float) -> float | str:
    return value if math.isfinite(value) else ("NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf"))


def _decode(value: Any) -> float:
    if isinstance(value, str):  # "NaN", "+Inf", "-Inf": float() reads them as written
        return float(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"value {value!r} is not a number")


class RecordedProvider:
    """``MetricProvider`` answering from a recording at the time ``clock`` says (the simulated one).

    ``notes`` names, once per query, where the recording could not answer as Prometheus would have
    (a range reaching before its first point: the answer then holds what was recorded) and where
    it had no data (Prometheus had none then either: the round is inconclusive, as it was live).
    """

    def __init__(self, recording: Recording, clock: Callable[[], float]) -> None:
        self._recording = recording
        self._clock = clock
        self.gaps: dict[str, str] = {}
        self._empty: dict[str, tuple[float, float, int]] = {}  # query -> first, last time without data, count

    @property
    def notes(self) -> list[str]:
        """Where the recording could not answer as Prometheus would have, and where it had no data
        (a round then is inconclusive, as it was live), one line per query."""
        lines = list(self.gaps.values())
        for query, (first, last, count) in self._empty.items():
            series = self._recording.series[query]
            held = (f"its points run from {utc_text(series.times[0])} to {utc_text(series.times[-1])}"
                    if series.times else "it has no point at all")
            span = utc_text(first) if first == last else f"{utc_text(first)} to {utc_text(last)}"
            lines.append(f"no data for {', '.join(series.uses) or query} in {count} round(s), {span} ({held}): "
                         f"{query}")
        return lines

    def _no_data(self, query: str, moment: float) -> None:
        first, _, count = self._empty.get(query, (moment, moment, 0))
        self._empty[query] = (first, moment, count + 1)

    def __repr__(self) -> str:
        return f"recording of {self._recording.provenance.prometheus}"

    def _series(self, query: str) -> RecordedSeries:
        series = self._recording.series.get(query)
        if series is None:
            raise RecordingMismatch(f"the recording holds no series for {query!r}")
        return series

    async def query_scalar(self, query: str, timeout: float) -> float | None:
        now = self._clock()
        value = self._series(query).at(now, self._recording.provenance.step)
        if value is None:
            self._no_data(query, now)
        return value

    async def query_series(self, query: str, window: float, step: float, timeout: float) -> tuple[float, ...]:
        series = self._series(query)
        now = self._clock()
        first = now - window
        start = self._recording.provenance.start
        if first < start - _EPSILON and query not in self.gaps:
            self.gaps[query] = (f"samples of {query!r} from {utc_text(first)} were asked for; the recording "
                                f"starts at {utc_text(start)}")
        points = (first + index * step for index in range(int((window + _EPSILON) // step) + 1))
        values = (series.at(point, self._recording.provenance.step) for point in points)
        found = tuple(value for value in values if value is not None)
        if not found:
            self._no_data(query, now)
        return found

    def missing(self, queries: Iterable[str]) -> list[str]:
        """Those of ``queries`` the recording does not hold."""
        return [query for query in queries if query not in self._recording.series]
