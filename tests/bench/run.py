"""`make bench`: how Aviary scales, side by side with bare baselines, plus real-Envoy and engine figures.

    python -m tests.bench.run [--quick] [--streams 1000,5000] [--delta-streams 1000] [--changes 20] [--workers 2]
                              [--profile N]

Not a pass/fail test: timings are reported, never asserted. Writes tests/bench/results.json, and
tests/bench/out/ (ignored by git): results.markdown (the table, also printed) and PNG plots.
  - snapshot build: 200 rollouts on one listener, cold and after one weight change (median of 20);
  - fan-out (tests/bench/fanout.py): per N, `aviary serve` against a bare single-process ADS server and
    a bare server with W SO_REUSEPORT processes, same clients, same resources: clients served, time
    to first route for all, weight change p50/p99/max, server CPU per change, RSS per stream, and
    Aviary's ratios to both baselines; client CPU shows the clients are not the bottleneck;
  - SotW against delta (tests/bench/fanout_delta.py): per N, two `aviary serve` side by side, N SotW
    streams on one and N delta streams on the other, the same weight changes and new canaries
    interleaved: time per change, bytes per stream, server and client CPU (N up to 5,000 unless
    ``--delta-streams`` says otherwise);
  - real Envoy RDS push -> ACK with 1 and 8 Envoys (tests/bench/envoy_acks.py);
  - the engine with many rollouts under analysis against a stub Prometheus (tests/bench/engine.py);
  - rollback reaction through real Envoy and Prometheus (tests/bench/reaction.py; not with --quick);
  - the envoy provider (not with --quick): the control plane's CPU and memory with 1,000 fake proxies
    flushing their stats every second (tests/bench/envoy_reports.py), and the first failed request ->
    0 % at Envoy, Prometheus provider against Envoy provider over 5 runs each (tests/bench/envoy_detection.py);
  - with ``--profile N``: py-spy samples Aviary during the changes at N; the top costs are reported
    (``--profile-engine``: during the engine part's window).
``--quick`` (`make bench QUICK=1`, run by tests/e2e/test_bench_quick.py) does all but the reaction at
small sizes, so that the benchmark keeps working.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aviary.discovery.resources import PublishedRollout, build_snapshot, clear_built, cluster_name
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend
from tests.bench.engine import bench_engine
from tests.bench.envoy_acks import bench_envoy_acks
from tests.bench.envoy_detection import bench_detection
from tests.bench.envoy_reports import bench_envoy_reports
from tests.bench.fanout import aviary_has_workers, bench_fanout
from tests.bench.fanout_client import raise_fd_limit
from tests.bench.fanout_delta import bench_protocols
from tests.bench.procstat import load_average
from tests.bench.reaction import bench_reaction
from tests.bench.report import markdown, plots

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "bench" / "out"
LISTENER = ListenerSpec(address="0.0.0.0", port=10000)
V1 = Backend("v1", (Endpoint.model_validate("10.0.0.1:8080"),))
V2 = Backend("v2", (Endpoint.model_validate("10.0.0.2:8080"),))


def bench_snapshot_build() -> dict[str, float]:
    rollouts = [
        PublishedRollout.of(f"svc-{i}", LISTENER, (f"svc-{i}.example.com",), ((V1, 90), (V2, 10)), (V1, V2))
        for i in range(200)
    ]
    cold, weight_change = [], []
    for i in range(20):
        clear_built()
        start = time.perf_counter()
        snapshot = build_snapshot(rollouts)
        cold.append(time.perf_counter() - start)
        # One rollout's weight moves: only its route configurations are encoded again.
        changed = [
            *rollouts[:-1],
            replace(
                rollouts[-1],
                route=(
                    (cluster_name(rollouts[-1].name, "v1"), 80 - i),
                    (cluster_name(rollouts[-1].name, "v2"), 20 + i),
                ),
            ),
        ]
        start = time.perf_counter()
        build_snapshot(changed)
        weight_change.append(time.perf_counter() - start)
    route = snapshot.items("type.googleapis.com/envoy.config.route.v3.RouteConfiguration")["route-0.0.0.0-10000"]
    return {
        "rollouts": 200,
        "cold_median_ms": round(statistics.median(cold) * 1000, 2),
        "weight_change_median_ms": round(statistics.median(weight_change) * 1000, 2),
        "route_config_bytes": len(route.any_bytes),
    }


def merged(before: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """``now`` over ``before``: parts measured now win; fan-out runs are kept per N."""
    out = {**before, **{key: value for key, value in now.items() if value}}
    runs = {run["streams"]: run for run in before.get("fanout", [])}
    runs.update({run["streams"]: run for run in now.get("fanout", [])})
    out["fanout"] = [runs[n] for n in sorted(runs)]
    runs = {run["streams"]: run for run in before.get("fanout_delta", [])}
    runs.update({run["streams"]: run for run in now.get("fanout_delta", [])})
    out["fanout_delta"] = [runs[n] for n in sorted(runs)]
    out["environment"] = now["environment"]
    out["environment"]["earlier_runs"] = [*before["environment"].pop("earlier_runs", []), before["environment"]]
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no Prometheus: keeps the bench working")
    parser.add_argument("--streams", help="comma-separated N (default 1000,5000,10000; quick: 50)")
    parser.add_argument(
        "--delta-streams", help="comma-separated N for SotW against delta (default: those of --streams up to 5000)"
    )
    parser.add_argument("--changes", type=int, help="weight changes per N (default 20; quick: 3)")
    parser.add_argument("--workers", type=int, default=2, help="processes of Aviary and of the bare_W baseline")
    parser.add_argument("--profile", type=int, default=0, help="py-spy Aviary's changes at this N")
    parser.add_argument("--profile-engine", action="store_true", help="py-spy the engine part's window")
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON to write (default tests/bench/results.json; quick: tests/bench/out/results-quick.json)",
    )
    parser.add_argument(
        "--add",
        action="store_true",
        help="keep what the output JSON has for parts not run "
        "now (and fan-out at other N): to measure N = 10,000 separately",
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated parts to leave out: fanout,delta,envoy,engine,reaction,reports"
    )
    parser.add_argument("--report", action="store_true", help="measure nothing: table and plots from the output JSON")
    args = parser.parse_args()
    if args.report:
        stored = json.loads((args.output or REPO / "tests" / "bench" / "results.json").read_text())
        table = markdown(stored)
        (OUT / "results.markdown").write_text(table)
        print(table, "wrote", *(str(p) for p in plots(stored, OUT)), flush=True)
        return
    quick = args.quick
    streams = [int(n) for n in (args.streams or ("50" if quick else "1000,5000,10000")).split(",")]
    changes = args.changes or (3 if quick else 20)
    # two servers and 2N streams at once: 10,000 each takes long on 2 cores, so only when asked
    delta_streams = [int(n) for n in args.delta_streams.split(",")] if args.delta_streams else [
        n for n in streams if n <= 5000
    ]
    skip = set(filter(None, args.skip.split(",")))
    fd_limit = raise_fd_limit()
    results: dict[str, Any] = {
        "environment": {
            "cores": os.cpu_count(), "load_average_start": [round(x, 2) for x in load_average()],
            "fd_limit": fd_limit, "quick": quick, "changes": changes, "workers": args.workers,
            "aviary_mode": (f"--xds-workers {args.workers}" if aviary_has_workers()
                            else "single process (this aviary serve has no --xds-workers)"),
        },
    }  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    target = args.output or (OUT / "results-quick.json" if quick else REPO / "tests" / "bench" / "results.json")
    before = json.loads(target.read_text()) if args.add and target.exists() else None

    def save() -> dict[str, Any]:
        """Write what is measured so far (a later part failing keeps the earlier ones)."""
        results["environment"]["load_average_end"] = [round(x, 2) for x in load_average()]
        final = merged(before, results) if before is not None else results
        target.write_text(json.dumps(final, indent=2) + "\n")
        return final

    results["snapshot_build"] = bench_snapshot_build()
    print("snapshot build:", results["snapshot_build"], flush=True)
    results["fanout"] = []
    if "fanout" not in skip:
        for n in streams:
            profile = OUT / f"profile-aviary-{n}.txt" if args.profile == n else None
            run = await bench_fanout(n, changes, args.workers, profile)
            run["load_average_after"] = [round(x, 2) for x in load_average()]
            results["fanout"].append(run)
            save()
            if "profile_top" in run:
                print(f"profile of aviary at N={n}:", json.dumps(run["profile_top"], indent=1), flush=True)
    results["fanout_delta"] = []
    if "delta" not in skip:
        for n in delta_streams:
            run = await bench_protocols(n, changes, args.workers)
            run["load_average_after"] = [round(x, 2) for x in load_average()]
            results["fanout_delta"].append(run)
            save()
            print(f"SotW against delta at N={n}:", json.dumps(run), flush=True)
    results["envoy_push_ack"] = []
    if "envoy" not in skip:
        for envoys in (1, 2) if quick else (1, 8):
            run = await bench_envoy_acks(envoys, 10 if quick else 200)
            results["envoy_push_ack"].append(run)
            save()
            print("RDS push -> ACK, real Envoy:", run, flush=True)
    if "engine" not in skip:
        engine_profile = OUT / "profile-engine.txt" if args.profile_engine else None
        # The goal's figure at a check interval a real Prometheus can serve for 1,000 rollouts (10 s:
        # 200 queries/s), then every second (2,000 queries/s): how far one engine goes.
        results["engine"] = await bench_engine(20 if quick else 1000, 3.0 if quick else 20.0, engine_profile,
                                               check_every=1 if quick else 10)
        print("engine:", results["engine"], flush=True)
        if not quick:
            results["engine_every_second"] = await bench_engine(1000, 10.0, check_every=1)
            print("engine, every rollout checked every second:", results["engine_every_second"], flush=True)
        save()
    if not quick and "reaction" not in skip:
        results["reaction"] = await asyncio.to_thread(bench_reaction)
        print("reaction through real Envoy and Prometheus:", results["reaction"], flush=True)
    if not quick and "reports" not in skip:
        results["envoy_reports"] = await asyncio.to_thread(bench_envoy_reports)
        print("the envoy provider's reports, 1,000 proxies:", results["envoy_reports"], flush=True)
        save()
        results["detection"] = await asyncio.to_thread(bench_detection)
        print("detection, Prometheus against Envoy provider:", results["detection"], flush=True)
    results = save()
    table = markdown(results)
    (OUT / ("results-quick.markdown" if quick else "results.markdown")).write_text(table)
    written = plots(results, OUT, "quick-" if quick else "")  # a quick run leaves the full plots alone
    print(table, flush=True)
    print("wrote", target, *(str(p) for p in written), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
