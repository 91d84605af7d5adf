"""Failure detection, Prometheus provider against Envoy provider, side by side (part of `make bench`).

One real Envoy reports both ways at once: Prometheus scrapes its admin every second, and its
metrics service sink flushes to Aviary every 0.5 s. A canary answering 500 to 30 % of its
requests (~32 requests per second at its 20 % step) is rolled back ``RUNS`` times with each
provider, alternating, so both see the same machine load: from the first 500 a client saw to
the canary's weight 0 in Envoy's route. Each at its fastest documented settings: Prometheus
``checkEvery: 1s`` (its scrape interval), the Envoy provider ``checkEvery: 500ms`` (the flush);
both over a 5 s window with ``minRequests: 5``.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.reaction import Rig, rollback_run

RUNS = 5
SUCCESS = [{"name": "success", "template": "request-success-rate", "min": 99}]


def _summary(values: list[float]) -> dict[str, Any]:
    return {"runs": len(values), "p50": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "all": [round(v, 2) for v in values]}


def bench_detection(runs: int = RUNS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aviary-bench-detect-") as base, Rig(Path(base), reports=True) as rig:
        envoy = {"provider": "envoy", "checkEvery": "500ms", "window": "5s", "minRequests": 5, "failureLimit": 0,
                 "inconclusiveLimit": 10, "metrics": SUCCESS}
        prometheus_s, envoy_s = [], []
        for run in range(runs):
            prometheus_s.append(rollback_run(rig, run, rig.analysis(), name="prom"))
            envoy_s.append(rollback_run(rig, run, envoy, name="envoy"))
    return {
        "first_5xx_to_envoy_0_s": {"prometheus": _summary(prometheus_s), "envoy": _summary(envoy_s)},
        "setup": "one real Envoy: Prometheus scrape 1 s + checkEvery 1s, against the metrics service sink "
                 "(flush 0.5 s) + checkEvery 500ms; window 5s, 30 % errors at ~32 req/s to the canary",
    }


if __name__ == "__main__":
    import json

    print(json.dumps(bench_detection(), indent=2))
