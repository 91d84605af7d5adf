"""Fan-out at N streams: Aviary (`aviary serve`, a real subprocess) against two bare baselines.

The three servers get the same client harness (tests/bench/fanout_client.py, N streams spread over
several processes, one TCP connection per stream) and the same resources (one listener, ``ROLLOUTS``
rollouts, each v1/v2), one after the other in the same run:
  - ``aviary``: `aviary serve` on a policy directory, with ``--xds-workers W`` when the installed
    CLI has it (else single-process, and the result says so); a change is the admin API's SetWeight;
  - ``bare_1``: tests/bench/bare_server.py, one process that only writes pre-serialized responses;
  - ``bare_W``: the same, W processes sharing the port with SO_REUSEPORT.

A change is timed from just before it is triggered to the moment the last stream received the new
route version, as the clients' own wall clocks say (same machine, same clock). Server CPU and RSS are
read from /proc for the server's process tree (tests/bench/procstat.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aviary.admin.client import AdminClient, ClientConfig
from tests.bench.bare_server import rollout_name
from tests.bench.procstat import cpu_seconds, descendants, rss_bytes
from tests.rig.ports import free_ports

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROLLOUTS = 100
STREAMS_PER_CLIENT = 1000  # per client process; at least 2 processes


def aviary_has_workers() -> bool:
    """The installed `aviary serve` takes ``--xds-workers`` (the stream-workers branch has merged)."""
    done = subprocess.run([str(BIN / "aviary"), "serve", "--help"], capture_output=True, text=True, check=False)
    return "--xds-workers" in done.stdout


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


class LineProcess:
    """A child process driven by lines on stdin, answering by lines on stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name

    @classmethod
    async def spawn(cls, name: str, *args: str, log: Path, env: dict[str, str] | None = None) -> LineProcess:
        with log.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                *args, cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err, env=env,
            )  # fmt: skip
        return cls(proc, name)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    async def expect(self, word: str, timeout: float) -> list[str]:
        """The next stdout line, which must start with ``word``; its other fields."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        fields = line.decode().split()
        if not fields or fields[0] != word:
            raise RuntimeError(f"{self.name}: expected {word!r}, got {line!r} (exit {self.proc.returncode})")
        return fields[1:]

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(OSError):
                self.send("quit")
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@dataclass
class Server:
    """A server under test: how to start it, trigger change k and list its processes."""

    label: str
    processes: int
    port: int
    pids: Callable[[], list[int]]
    change: Callable[[int], Awaitable[None]]
    settle: Callable[[], Awaitable[None]]
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def bare_server(workers: int, changes: int, workdir: Path) -> AsyncIterator[Server]:
    (port,) = free_ports(1)
    procs: list[LineProcess] = []
    try:
        for i in range(workers):
            procs.append(await LineProcess.spawn(
                f"bare-{i}", sys.executable, "-m", "tests.bench.bare_server", str(port),
                "--rollouts", str(ROLLOUTS), "--changes", str(changes), log=workdir / f"bare-{i}.log",
            ))  # fmt: skip
        for proc in procs:
            await proc.expect("listening", 60)

        async def change(k: int) -> None:
            for proc in procs:
                proc.send(f"push {k}")

        async def settle() -> None:
            return

        yield Server(f"bare_{workers}", workers, port, lambda: [p.proc.pid for p in procs], change, settle)
    finally:
        for proc in procs:
            await proc.stop()


def _policy(name: str, version: str, analysis: dict[str, Any] | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "aviary.dev/v1", "kind": "Rollout", "metadata": {"name": name},
        "spec": {
            "listener": {"address": "127.0.0.1", "port": 10000}, "hosts": [f"{name}.example.com"],
            "version": version, "endpoints": ["127.0.0.1:8081" if version == "v1" else "127.0.0.1:8082"],
            "strategy": {"steps": [10, 50], "interval": "1h"},
        },
    }  # fmt: skip
    if analysis is not None:
        doc["spec"]["analysis"] = analysis
    return doc


def write_policies(
    policies: Path, rollouts: int | range, version: str, analysis: dict[str, Any] | None = None
) -> None:
    """One file per rollout (``rollouts``: how many, or which), each written atomically (the server
    polls the directory)."""
    for i in range(rollouts) if isinstance(rollouts, int) else rollouts:
        name = rollout_name(i)
        tmp = policies / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump(_policy(name, version, analysis), sort_keys=False))
        tmp.replace(policies / f"{name}.yaml")


async def poll(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Ask ``condition`` every 0.1 s (pacing, not synchronisation) until it holds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def aviary_server(
    workers: int,
    workdir: Path,
    rollouts: int = ROLLOUTS,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    analysis: dict[str, Any] | None = None,
    stable_left: int = 0,
) -> AsyncIterator[Server]:
    """`aviary serve` on ``rollouts`` policies (v1); ``settle`` moves them to a v2 canary at 10 %, all
    but the last ``stable_left`` (left at v1 without a canary, for new canaries later)."""
    policies = workdir / "policies"
    policies.mkdir(parents=True, exist_ok=True)
    write_policies(policies, rollouts, "v1")
    xds, admin_port, metrics = free_ports(3)
    has_flag = aviary_has_workers()
    with_workers = workers > 1 and has_flag
    args = [
        str(BIN / "aviary"), "--log-level", "warning", "serve", "--policies", str(policies),
        "--xds-address", f"127.0.0.1:{xds}", "--admin-address", f"127.0.0.1:{admin_port}",
        "--metrics-address", f"127.0.0.1:{metrics}", "--state", str(workdir / "state.db"),
        "--reconnect-grace", "0", *extra_args,
    ]  # fmt: skip
    if has_flag:  # 1 too: the default is one per core
        args += ["--xds-workers", str(workers)]
    log = workdir / "aviary.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 (a Popen handle: stopped from a thread below)
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    client = AdminClient(ClientConfig(address=f"127.0.0.1:{admin_port}", timeout=30))
    try:

        async def serving() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"aviary serve exited {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(Exception):
                return len(await client.list_rollouts()) == rollouts
            return False

        await poll(serving, 60, "aviary serve to apply every policy")

        async def change(k: int) -> None:
            await client.set_weight(rollout_name(0), 10 + k)

        async def settle() -> None:
            write_policies(policies, range(rollouts - stable_left), "v2", analysis)
            canaries = {rollout_name(i) for i in range(rollouts - stable_left)}

            async def canaries_acked() -> bool:
                listed = await client.list_rollouts()
                return all(r.phase == "Progressing" and r.HasField("acked_weight") and r.acked_weight == 10
                           for r in listed if r.name in canaries)  # fmt: skip

            await poll(canaries_acked, 300, "every rollout's canary at 10 %, ACKed")

        note = "" if with_workers or workers == 1 else "single process: this aviary serve has no --xds-workers"
        yield Server("aviary", workers if with_workers else 1, xds, lambda: descendants(proc.pid), change, settle,
                     note, {"admin": client, "pid": proc.pid, "policies": policies})  # fmt: skip
    finally:
        await client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def client_processes(streams: int) -> int:
    return max(2, -(-streams // STREAMS_PER_CLIENT))


@contextlib.asynccontextmanager
async def clients(
    port: int, streams: int, workdir: Path, client_args: tuple[str, ...] = ()
) -> AsyncIterator[list[LineProcess]]:
    count = client_processes(streams)
    shares = [streams // count + (1 if i < streams % count else 0) for i in range(count)]
    procs: list[LineProcess] = []
    try:
        first = 0
        for i, share in enumerate(shares):
            procs.append(await LineProcess.spawn(
                f"client-{i}", sys.executable, "-m", "tests.bench.fanout_client", str(port), "--streams", str(share),
                "--first-index", str(first), *client_args, log=workdir / f"client-{i}.log",
            ))  # fmt: skip
            first += share
        for proc in procs:
            await proc.expect("loaded", 60)
        yield procs
    finally:
        for proc in procs:
            await proc.stop()


async def measure(
    server: Server,
    streams: int,
    changes: int,
    workdir: Path,
    on_changes: Callable[[bool], None] | None = None,
    client_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Connect ``streams`` clients to ``server``, then time ``changes`` weight changes."""
    pids = server.pids()
    rss_before = rss_bytes(pids)
    async with clients(server.port, streams, workdir, client_args) as procs:
        start = time.time()
        for proc in procs:
            proc.send("connect")
        ready = [await proc.expect("ready", 600) for proc in procs]
        served = sum(int(r[0]) for r in ready)
        first_route_all = max(float(r[1]) for r in ready) - start
        ended: dict[str, int] = {}  # streams the server ended before the changes, by status
        for r in ready:
            for code, count in json.loads(r[3]).items():
                ended[code] = ended.get(code, 0) + count
        retries = sum(int(r[4]) for r in ready)
        rss_after = rss_bytes(server.pids())
        await server.settle()
        times, server_cpu, client_cpu, client_busy = [], [], [], []
        per_process: list[list[float]] = []  # CPU of each server process per change, the root first
        if on_changes is not None:
            on_changes(True)
        try:
            for k in range(1, changes + 1):
                for proc in procs:
                    proc.send("mark")
                for proc in procs:
                    await proc.expect("marked", 60)
                pids = server.pids()
                cpu0 = [cpu_seconds([pid]) for pid in pids]
                t0 = time.time()
                await server.change(k)
                done = [await proc.expect("changed", 300) for proc in procs]
                if sum(int(d[0]) for d in done) < served:
                    raise RuntimeError(f"{server.label}: change {k} reached {sum(int(d[0]) for d in done)}/{served}")
                elapsed = max(float(d[1]) for d in done) - t0
                times.append(elapsed)
                spent = [cpu_seconds([pid]) - before for pid, before in zip(pids, cpu0, strict=True)]
                server_cpu.append(sum(spent))
                per_process.append(spent)
                client_cpu.append(sum(float(d[3]) for d in done))
                client_busy.append(max(float(d[3]) for d in done) / max(elapsed, 1e-6))
        finally:
            if on_changes is not None:
                on_changes(False)
    rss_per_stream = (rss_after - rss_before) / max(served, 1)
    ms = [t * 1000 for t in times]
    return {
        "server": server.label, "processes": server.processes, "note": server.note,
        "streams": streams, "clients_served": served, "client_processes": len(procs),
        "time_to_first_route_all_s": round(first_route_all, 3),
        "streams_ended": dict(sorted(ended.items())), "stream_retries": retries,
        "change_ms": {"p50": round(statistics.median(ms), 1), "p99": round(percentile(ms, 99), 1),
                      "max": round(max(ms), 1), "changes": len(ms)},
        # the mean: /proc counts CPU in 10 ms ticks, finer than one change of the bare servers
        "server_cpu_ms_per_change": round(sum(server_cpu) / len(server_cpu) * 1000, 1),
        # Aviary with workers: the engine process first, then each worker (a restart mid-run: fewer)
        "server_cpu_ms_per_change_by_process": [
            round(sum(column) / len(column) * 1000, 1) for column in zip(*per_process, strict=False)
        ],
        "rss_kb_per_stream": round(rss_per_stream / 1024, 1),
        "server_rss_mb": round(rss_after / 2**20, 1),
        "client_cpu_ms_per_change": round(statistics.median(client_cpu) * 1000, 1),
        "client_busiest_process_cpu_share": round(max(client_busy), 2),
    }  # fmt: skip


def ratios(aviary: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """aviary / baseline for each metric (None where the baseline is 0)."""

    def r(a: float, b: float) -> float | None:
        return round(a / b, 2) if b else None

    return {
        "clients_served": r(aviary["clients_served"], base["clients_served"]),
        "time_to_first_route_all": r(aviary["time_to_first_route_all_s"], base["time_to_first_route_all_s"]),
        "change_p50": r(aviary["change_ms"]["p50"], base["change_ms"]["p50"]),
        "change_p99": r(aviary["change_ms"]["p99"], base["change_ms"]["p99"]),
        "change_max": r(aviary["change_ms"]["max"], base["change_ms"]["max"]),
        "server_cpu_per_change": r(aviary["server_cpu_ms_per_change"], base["server_cpu_ms_per_change"]),
        "rss_per_stream": r(aviary["rss_kb_per_stream"], base["rss_kb_per_stream"]),
    }


async def bench_fanout(streams: int, changes: int, workers: int, profile_to: Path | None = None) -> dict[str, Any]:
    """Aviary, bare_1 and bare_W at ``streams``; with ``profile_to``, py-spy samples Aviary's changes."""
    out: dict[str, Any] = {"streams": streams}
    with tempfile.TemporaryDirectory(prefix=f"aviary-fanout-{streams}-") as tmp:
        base = Path(tmp)
        async with aviary_server(workers, base / "aviary") as server:
            profiler = Profiler(server.extra["pid"], profile_to) if profile_to is not None else None
            out["aviary"] = await measure(server, streams, changes, base / "aviary",
                                          profiler.toggle if profiler is not None else None)  # fmt: skip
            if profiler is not None:
                out["profile_top"] = profiler.top()
        print(f"  aviary  N={streams}: {out['aviary']}", flush=True)
        for count in sorted({1, workers}):
            (base / f"bare{count}").mkdir()
            async with bare_server(count, changes, base / f"bare{count}") as server:
                out[f"bare_{count}"] = await measure(server, streams, changes, base / f"bare{count}")
            print(f"  bare_{count}  N={streams}: {out[f'bare_{count}']}", flush=True)
    out["workers"] = workers
    out["ratio_to_bare_1"] = ratios(out["aviary"], out["bare_1"])
    out[f"ratio_to_bare_{workers}"] = ratios(out["aviary"], out[f"bare_{workers}"])
    return out


class Profiler:
    """py-spy sampling the Aviary process tree while the changes run (collapsed stacks to a file)."""

    def __init__(self, pid: int, output: Path) -> None:
        self.pid = pid
        self.output = output
        self.proc: subprocess.Popen[bytes] | None = None

    def toggle(self, on: bool) -> None:
        if on:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.proc = subprocess.Popen(
                [str(BIN / "py-spy"), "record", "--pid", str(self.pid), "--subprocesses", "--format", "raw",
                 "--rate", "200", "--output", str(self.output), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        elif self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def top(self, limit: int = 15) -> dict[str, Any]:
        """Self time (leaf frames) and inclusive time by function, as shares of all samples, over the
        whole tree and per process (the engine and each xDS worker: "pid command")."""
        if not self.output.exists():
            return {"error": "py-spy wrote no profile"}
        tables: dict[str, _Shares] = {}
        whole = _Shares()
        for line in self.output.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            frames = stack.split(";")
            # --subprocesses: a worker's stack starts with the engine's "process" frame, then its own
            processes = [i for i, f in enumerate(frames) if f.startswith("process ")]
            process = frames[processes[-1]] if processes else "process ?"
            frames = frames[processes[-1] + 1:] if processes else frames
            # "func (file.py:LINE)" -> "func (file.py)": one entry per function, not per line
            frames = [re.sub(r":\d+\)$", ")", f) for f in frames if f and not f.startswith("thread ")]
            if not frames:
                continue
            pid, _, command = process.removeprefix("process ").partition(":")
            label = f"{pid} {command.strip(chr(34))[:120]}"
            whole.add(frames, int(count_text))
            tables.setdefault(label, _Shares()).add(frames, int(count_text))
        return {**whole.top(limit), "file": str(self.output),
                "by_process": {label: table.top(limit) for label, table in sorted(tables.items())}}


class _Shares:
    """Samples per function: as the leaf (self) and anywhere in the stack (inclusive)."""

    def __init__(self) -> None:
        self.leaf: dict[str, int] = {}
        self.inclusive: dict[str, int] = {}
        self.total = 0

    def add(self, frames: list[str], count: int) -> None:
        self.total += count
        self.leaf[frames[-1]] = self.leaf.get(frames[-1], 0) + count
        for frame in set(frames):
            self.inclusive[frame] = self.inclusive.get(frame, 0) + count

    def top(self, limit: int) -> dict[str, Any]:
        def share(table: dict[str, int]) -> list[tuple[str, float]]:
            ranked = sorted(table.items(), key=lambda kv: -kv[1])[:limit]
            return [(name, round(100 * n / self.total, 1)) for name, n in ranked]

        return {"samples": self.total, "self_pct": share(self.leaf), "inclusive_pct": share(self.inclusive)}
