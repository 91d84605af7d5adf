"""Load generator worker (run with sys.executable; see loadgen.py).

Clients are threads: even-numbered ones keep one HTTP/1.1 keep-alive connection, odd-numbered
ones open a new connection per request. A request fails on a non-200 status, a connection error
or a timeout. Stops on SIGTERM/SIGINT or (with --stop-on-stdin-eof) when stdin closes, then
prints one JSON line with the totals (also written to --result-file). --progress-file gets a
snapshot every 0.1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

MAX_FAILURES_KEPT = 20


class Totals:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started_at = time.time()
        self.total = 0
        self.failed = 0
        self.by_version: dict[str, int] = {}
        self.by_status: dict[str, int] = {}
        self.failures: list[str] = []
        self.first_failure_at: float | None = None
        self.last_failure_at: float | None = None
        self.first_status_5xx_at: float | None = None
        self.last_status_5xx_at: float | None = None
        self.per_second: dict[int, dict[str, int]] = {}  # second since start -> {version|"failed": n}

    def _bucket(self, now: float, key: str) -> None:
        b = self.per_second.setdefault(int(now - self.started_at), {})
        b[key] = b.get(key, 0) + 1

    def ok(self, version: str) -> None:
        now = time.time()
        with self.lock:
            self.total += 1
            self.by_version[version] = self.by_version.get(version, 0) + 1
            self.by_status["200"] = self.by_status.get("200", 0) + 1
            self._bucket(now, version)

    def fail(self, client: int, mode: str, what: str, status: int | None) -> None:
        now = time.time()
        with self.lock:
            self.total += 1
            self.failed += 1
            key = str(status) if status is not None else "error"
            self.by_status[key] = self.by_status.get(key, 0) + 1
            self._bucket(now, "failed")
            if self.first_failure_at is None:
                self.first_failure_at = now
            self.last_failure_at = now
            if status is not None and status >= 500:
                if self.first_status_5xx_at is None:
                    self.first_status_5xx_at = now
                self.last_status_5xx_at = now
            if len(self.failures) < MAX_FAILURES_KEPT:
                self.failures.append(
                    f"[+{now - self.started_at:.3f}s at {now:.3f}] client {client} ({mode}): {what}"
                )

    def snapshot(self, done: bool) -> dict[str, Any]:
        with self.lock:
            return {
                "done": done,
                "started_at": self.started_at,
                "duration_s": time.time() - self.started_at,
                "total": self.total,
                "failed": self.failed,
                "by_version": dict(self.by_version),
                "by_status": dict(self.by_status),
                "failures": list(self.failures),
                "first_failure_at": self.first_failure_at,
                "last_failure_at": self.last_failure_at,
                "first_status_5xx_at": self.first_status_5xx_at,
                "last_status_5xx_at": self.last_status_5xx_at,
                "per_second": {str(k): dict(v) for k, v in sorted(self.per_second.items())},
            }


def run_client(idx: int, args: argparse.Namespace, totals: Totals, stop: threading.Event) -> None:
    keep_alive = idx % 2 == 0
    mode = "keep-alive" if keep_alive else "fresh"
    host, port_s = args.target.rsplit(":", 1)
    headers = {"Host": args.host_header}
    if not keep_alive:
        headers["Connection"] = "close"
    conn: http.client.HTTPConnection | None = None
    gap = 1.0 / args.rate if args.rate > 0 else 0.0
    next_at = time.monotonic()
    while not stop.is_set():
        if gap:
            delay = next_at - time.monotonic()
            if delay > 0 and stop.wait(delay):  # pacing, not synchronisation
                break
            next_at = max(next_at + gap, time.monotonic() - gap)
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, int(port_s), timeout=args.timeout)
            conn.request("GET", args.path, headers=headers)
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", errors="replace")
            if resp.status == 200:
                totals.ok(body)
            else:
                totals.fail(idx, mode, f"HTTP {resp.status}: {body[:100]!r}", resp.status)
            if not keep_alive or resp.will_close:
                conn.close()
                conn = None
        except Exception as exc:  # connection refused/reset, timeout, protocol error
            totals.fail(idx, mode, f"{type(exc).__name__}: {exc}", None)
            if conn is not None:
                conn.close()
                conn = None
    if conn is not None:
        conn.close()


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True, help="host:port")
    ap.add_argument("--host-header", required=True)
    ap.add_argument("--path", default="/")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0.0, help="max requests/s per client; 0 = no limit")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--result-file", type=Path, required=True)
    ap.add_argument("--progress-file", type=Path, required=True)
    ap.add_argument("--stop-on-stdin-eof", action="store_true", help="stop when stdin closes (parent died)")
    args = ap.parse_args()

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def watch_stdin() -> None:
        # Raw fd reads: a daemon thread blocked in sys.stdin's buffered reader holds its lock
        # and delays interpreter shutdown by a second.
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        stop.set()

    if args.stop_on_stdin_eof:
        threading.Thread(target=watch_stdin, daemon=True).start()

    totals = Totals()
    threads = [
        threading.Thread(target=run_client, args=(i, args, totals, stop), daemon=True)
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    write_atomic(args.progress_file, totals.snapshot(done=False))
    while not stop.wait(0.1):
        write_atomic(args.progress_file, totals.snapshot(done=False))
    deadline = time.monotonic() + args.timeout + 1.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    result = totals.snapshot(done=True)
    write_atomic(args.result_file, result)
    write_atomic(args.progress_file, result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
