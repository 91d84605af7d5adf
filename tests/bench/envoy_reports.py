"""What the ``envoy`` provider's reports cost the control plane (part of `make bench`).

``aviary serve`` (a real subprocess, with ``--xds-workers 1`` and with 2) receives the metrics
service streams of ``PROXIES`` fake proxies, each flushing once a second
(``tests/bench/report_senders.py``, in ``SENDERS`` processes of their own). Over ``SECONDS``
after a warm-up: the control plane's CPU (its process tree, from /proc) per second of wall time,
its resident memory, the reports it took in per second (its own ``aviary_envoy_reports_total``),
and the senders' CPU, which shows they are not the bottleneck.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.bench.procstat import cpu_seconds, descendants, load_average, rss_bytes
from tests.rig.ports import free_port, port_open
from tests.rig.waiting import wait_until

PROXIES = 1000
SENDERS = 2
WARMUP = 8.0
SECONDS = 30.0
BIN = Path(sys.executable).parent


def _received(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
        text: str = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('aviary_envoy_reports_total{kind="metrics"}'))


def one_run(workdir: Path, workers: int, proxies: int, seconds: float) -> dict[str, Any]:
    policies = workdir / "policies"
    policies.mkdir(parents=True)
    xds, metrics = free_port(), free_port()
    args = [str(BIN / "aviary"), "--log-level", "warning", "serve", "--policies", str(policies),
            "--xds-address", f"127.0.0.1:{xds}", "--metrics-address", f"127.0.0.1:{metrics}",
            "--state", str(workdir / "state.db"), "--xds-workers", str(workers)]
    with (workdir / "aviary.log").open("ab") as log:
        serve = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    senders: list[subprocess.Popen[bytes]] = []
    try:
        wait_until(lambda: port_open(xds) and port_open(metrics), 30, what="aviary serve to listen")
        idle_rss = rss_bytes(descendants(serve.pid))
        share = proxies // SENDERS
        for k in range(SENDERS):
            senders.append(subprocess.Popen(
                [sys.executable, "-m", "tests.bench.report_senders", "--address", f"127.0.0.1:{xds}",
                 "--proxies", str(share), "--first", str(k * share), "--seconds", str(WARMUP + seconds + 2)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        time.sleep(WARMUP)  # pacing: every stream open and flushing before the window starts
        pids = descendants(serve.pid)
        cpu0, received0, started = cpu_seconds(pids), _received(metrics), time.monotonic()
        sender_cpu0 = cpu_seconds([s.pid for s in senders])
        time.sleep(seconds)  # the measured window
        pids = descendants(serve.pid)
        cpu1, received1, took = cpu_seconds(pids), _received(metrics), time.monotonic() - started
        sender_cpu1 = cpu_seconds([s.pid for s in senders])
        rss = rss_bytes(pids)
        outputs = [json.loads((s.communicate(timeout=60)[0] or b"{}").decode().strip() or "{}") for s in senders]
        return {
            "xds_workers": workers, "proxies": proxies, "window_s": round(took, 1),
            "control_plane_cores": round((cpu1 - cpu0) / took, 3),
            "control_plane_rss_mb": round(rss / 2**20, 1),
            "control_plane_rss_idle_mb": round(idle_rss / 2**20, 1),  # before the first sender connected
            "reports_per_s": round((received1 - received0) / took, 1),
            "senders_cores": round((sender_cpu1 - sender_cpu0) / took, 3),
            "bytes_per_message": outputs[0].get("bytes_per_message"),
            "failed_streams": sum(int(o.get("failed_streams", 0)) for o in outputs),
            "load_average": [round(x, 2) for x in load_average()],
        }
    finally:
        for sender in senders:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
        serve.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            serve.wait(15)
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def bench_envoy_reports(proxies: int = PROXIES, seconds: float = SECONDS) -> dict[str, Any]:
    runs = []
    for workers in (1, 2):
        with tempfile.TemporaryDirectory(prefix="aviary-bench-reports-") as base:
            runs.append(one_run(Path(base), workers, proxies, seconds))
    return {"runs": runs, "setup": f"{proxies} fake proxies, one MetricsService message per second each, "
                                   f"{SENDERS} sender processes"}


if __name__ == "__main__":
    print(json.dumps(bench_envoy_reports(), indent=2))
