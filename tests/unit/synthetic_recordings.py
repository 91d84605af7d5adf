"""Synthetic recordings for the unit tests of ``aviary simulate``: a policy, and a value for every
query it plans at every second, written as ``aviary record`` would have written them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from aviary.metrics.planned_queries import planned_queries
from aviary.metrics.recording import Provenance, RecordedSeries, Recording
from aviary.policy.loader import parse_policy_text
from aviary.policy.schema import Rollout
from tests.rig.policies import rollout_doc

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: where the canary's policy arrives
COUNT = "the canary's request count (minRequests)"
Value = Callable[[str, float], float | None]
"""(what asks the query, e.g. ``threshold check success (canary)``, simulated time) -> value; None: no data."""


def policy_doc(steps: list[Any] | None = None, interval: str = "30s", **analysis: Any) -> dict[str, Any]:
    """The ``shop`` rollout of v2 with a success-rate check (min 99) every 5 s over 30 s, unless
    ``analysis`` says otherwise."""
    doc = rollout_doc("shop", "v2")
    doc["spec"]["strategy"] = {"steps": steps or [10, 50], "interval": interval}
    doc["spec"]["analysis"] = {"prometheus": "http://127.0.0.1:9090", "checkEvery": "5s", "window": "30s",
                               "metrics": [{"name": "success", "template": "request-success-rate", "min": 99}],
                               **analysis}
    return doc


def parse(doc: dict[str, Any]) -> Rollout:
    rollout, errors = parse_policy_text(yaml.safe_dump(doc), "shop.yaml")
    assert rollout is not None, errors
    return rollout


def healthy(use: str, at: float) -> float | None:
    return 500.0 if use == COUNT else 100.0


def failing_after(seconds: float) -> Value:
    """Success rate 100 until ``seconds`` after T0, 80 from then on."""

    def value(use: str, at: float) -> float | None:
        if use == COUNT:
            return 500.0
        return 100.0 if at < T0 + seconds else 80.0

    return value


def recording(rollout: Rollout, value: Value = healthy, *, seconds: float = 400.0, before: float = 10.0,
              step: float = 1.0, name: str | None = None) -> Recording:
    """Every query ``rollout`` plans for canary v2 against stable v1, one point per ``step`` from
    ``before`` seconds before T0 to ``seconds`` after it; points where ``value`` is None are absent."""
    series = {}
    count = round((seconds + before) / step) + 1
    moments = [T0 - before + index * step for index in range(count)]
    for planned in planned_queries(rollout.name, rollout.spec, "v2", "v1"):
        points = [(at, value(planned.uses[0], at)) for at in moments]
        kept = [(at, v) for at, v in points if v is not None]
        series[planned.query] = RecordedSeries(planned.query, tuple(at for at, _ in kept),
                                               tuple(v for _, v in kept), planned.uses)
    provenance = Provenance("http://127.0.0.1:9090", moments[0], moments[-1], step, name or rollout.name, "v2", "v1",
                            "shop.yaml", T0 + seconds + 60, "test", T0)
    return Recording(provenance, series)


def write(tmp_path: Path, doc: dict[str, Any], value: Value = healthy, *, recorded_doc: dict[str, Any] | None = None,
          **options: Any) -> tuple[Path, Path]:
    """The policy file of ``doc`` and a recording (of ``recorded_doc``, default the same policy)."""
    policy = tmp_path / "shop.yaml"
    policy.write_text(yaml.safe_dump(doc, sort_keys=False))
    metrics = tmp_path / "shop.rec.json.gz"
    recording(parse(recorded_doc or doc), value, **options).save(metrics)
    return policy, metrics
