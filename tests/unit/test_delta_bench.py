"""tests/bench/delta_bytes.py at a tiny size: it keeps working, and its bytes say what delta is for."""

from __future__ import annotations

from tests.bench.delta_bytes import run, table


def test_delta_sends_the_changed_resources_only() -> None:
    results = run(rollouts=5, streams=3)
    changes = results["changes"]
    # A weight change is the one route configuration either way (delta wraps it with name and version).
    weight = changes["weight"]
    assert weight["sotw"]["bytes_per_stream"] <= weight["delta"]["bytes_per_stream"] < 1.2 * weight["sotw"][
        "bytes_per_stream"
    ]
    # A new cluster: SotW resends every cluster and every assignment; delta only the new and the gone.
    for name in ("new canary", "promotion"):
        assert changes[name]["delta"]["bytes_per_stream"] < changes[name]["sotw"]["bytes_per_stream"], name
    assert "new canary" in table(results)
