"""2,000 ADS streams connecting and disconnecting in a loop: nothing leaks in the server, and the
server fails none of them.

The churning client is a separate process (tests/rig/ads_churn.py) so that the server's memory
and asyncio tasks are measured alone. Duration: AVIARY_CHURN_SECONDS (default 60).

Which side failed (measured, 2 cores, grpcio 1.85), before the fix: the server. grpc core queues
a new call until the aio server picks it up and, past ``grpc.server.max_pending_requests`` (default
1,000; hard limit 3,000), rejects new ones: with 2,000 streams starting at once, 3-5 % of starts
got RST_STREAM(NO_ERROR) after a CANCELLED status from the server (its trace shows the stream's
HEADERS, then the cancel; its handler never ran), and grpcio's client raised INTERNAL "Internal
error from Core" or CANCELLED on the first write. Not HTTP/2 MAX_CONCURRENT_STREAMS: the rate was
the same on 1, 8 or 64 client channels, 100 or 1,000 concurrent starts never failed, and raising
only the pending limits took it to 0 (0 of 72,000). The client still retries a failed start, and
counts it: the test asserts 0 start retries, 0 failed streams and 0 streams broken or refused.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
from pathlib import Path

from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.server import AggregatedDiscoveryService, start_xds_server
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, TrafficPlan
from tests.rig.waiting import async_wait_until

REPO = Path(__file__).resolve().parents[2]
STREAMS = 2000
SECONDS = float(os.environ.get("AVIARY_CHURN_SECONDS", "60"))
RSS_GROWTH_LIMIT_MB = 40.0  # generous: catches a per-stream leak (2,000 x rounds), not allocator noise


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _churn(port: int, seconds: float) -> dict[str, object]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.rig.ads_churn", str(port), "--streams", str(STREAMS), "--seconds", str(seconds),
        cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(process.communicate(), seconds + 120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, f"churn client exited {process.returncode}"
    result: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def test_stream_churn_returns_to_baseline(tmp_path: Path) -> None:
    cache, proxies = SnapshotCache(), ProxyStatus()
    director = TrafficDirector(cache, proxies)
    backend = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
    director.set_rollout("checkout", Placement(ListenerSpec(address="127.0.0.1", port=10000), ("*",)),
                         TrafficPlan(backend))
    service = AggregatedDiscoveryService(cache, proxies.apply)
    server, port = await start_xds_server("127.0.0.1:0", service)

    def idle() -> bool:
        return service.open_streams == 0 and len(proxies) == 0 and cache.watch_count == 0

    try:
        warmup = await _churn(port, 0)  # one round: grpc's own buffers and caches get allocated
        await async_wait_until(idle, 30, what="streams closed after warm-up")
        gc.collect()
        baseline_rss, baseline_tasks = _rss_mb(), len(asyncio.all_tasks())

        result = await _churn(port, SECONDS)
        await async_wait_until(idle, 30, what="streams closed after churn")
        gc.collect()
        after_rss, after_tasks = _rss_mb(), len(asyncio.all_tasks())
    finally:
        await server.stop(0)

    report = {
        "warmup": warmup, "churn": result, "server_broken_streams": service.broken_streams,
        "server_refused_streams": service.refused_streams,
        "rss_mb": {"baseline": round(baseline_rss, 1), "after": round(after_rss, 1)},
        "asyncio_tasks": {"baseline": baseline_tasks, "after": after_tasks},
    }  # fmt: skip
    print(json.dumps(report))
    results = REPO / "tests" / "e2e" / ".results"
    results.mkdir(exist_ok=True)
    (results / "churn.json").write_text(json.dumps(report, indent=2))
    ok, failed, failures, retries = (result[k] for k in ("streams_ok", "streams_failed", "failures", "start_retries"))
    assert isinstance(ok, int) and isinstance(failed, int) and isinstance(retries, int), result
    assert isinstance(failures, dict), result
    total = ok + failed
    print(
        f"[churn] {total} streams in {result['seconds']} s: server broke {service.broken_streams}, refused "
        f"{service.refused_streams}; failed streams {failed} {failures}; client start retries {retries} "
        f"({100 * retries / max(1, total):.2f} % of streams; {result['start_retry_reasons']})"
    )
    assert service.broken_streams == 0 and service.refused_streams == 0, report
    assert failed == 0 and failures == {}, report
    assert retries == 0, report  # a failed start is the server's pending-call limit again
    assert after_tasks == baseline_tasks
    assert after_rss - baseline_rss < RSS_GROWTH_LIMIT_MB
