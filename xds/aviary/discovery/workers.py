"""xDS streams served by N worker processes (`aviary serve --xds-workers N`, N > 1; the default is one
per usable core, `usable_cores`).

What runs where::

    engine process (aviary serve)                       worker processes (N, exec'd, not forked)
    policies, engine, director, state, admin, metrics   python -m aviary.discovery.worker_main
    SnapshotCache: each resource encoded once   --sync-->  SnapshotCache copy (same bytes)
    ProxyStatus <-- events (connect, ACK, NACK,  <------  AggregatedDiscoveryService + SotwStream,
                    subscription, sent, gone)             listening on the xDS port, SO_REUSEPORT

One Unix socket pair per worker carries both directions (``worker_protocol`` has the format). The
engine sends a worker only the groups that changed and the resources it does not hold yet. Events
come back as the values the single process would emit, with stream ids unique across workers, and
go to `ProxyStatus.apply`: the director's gates, the admin API's ListProxies and the metrics read
one status, whichever worker holds a proxy.

Single instance: the engine process holds the xDS port for life, twice. A socket bound to the port
without SO_REUSEPORT (and not listening) reserves it: a plain server cannot bind it, port 0 becomes
one concrete port the workers share, and the workers (SO_REUSEPORT) may still bind beside it. And a
Unix socket in the abstract namespace named after the address is a lock the kernel frees when the
engine dies: a second ``aviary serve --xds-workers`` on the same address is refused even if it
starts in the same instant. (``aviary serve`` refuses a port that is already listened on before
that, ``aviary.listen.check_can_listen``.)

A worker that dies is restarted: its streams are reported gone (``ProxyDisconnected``), its proxies
reconnect to the other workers at once, and the new process gets the current snapshots before it
listens, so no proxy is ever served an older configuration than it ACKed. Restarts back off while
a worker keeps dying (`restart_delay`). Workers exit when the engine closes their socket, so they
never outlive it, even when it is killed.

A worker that hangs (alive, but its event loop stuck: a deadlock, a blocking call, SIGSTOP) would
hold its proxies' streams open and serve them nothing, and an ACK-gated rollout would wait on them.
So the supervisor pings each worker every `HEARTBEAT_SECONDS`; the worker answers from its event
loop, and any frame from it counts as an answer. After `HUNG_AFTER` heartbeats in a row without a
word (`Silence`) the worker is killed, and replaced like one that died: its proxies' connections
close with it, and they reconnect. Heartbeats are counted, not timed, so an engine whose own loop
was held up (a long publish) does not blame a worker for its own delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import math
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aviary.child_process import DEVNULL, ChildProcess, spawn
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.proxy_events import ProxyConnected, ProxyDisconnected, ProxyEvent
from aviary.discovery.worker_main import read_frame
from aviary.discovery.worker_protocol import (
    Barrier,
    Pong,
    ProtocolError,
    Ready,
    Reports,
    SentState,
    barrier_message,
    decode_from_worker,
    next_failures,
    ping_message,
    restart_delay,
    stop_message,
    sync_message,
    worker_of,
)
from aviary.listen import ListenError, split_address
from aviary.logs import JsonFormatter
from aviary.reports.ingest import ReportSink
from aviary.tls import ServerTls

__all__ = ["Silence", "XdsWorkers", "reserve_address", "usable_cores"]

log = logging.getLogger("aviary.xds")

READY_SECONDS = 30.0  # a worker that has not listened by then is killed and started again
HEARTBEAT_SECONDS = 1.0  # how often the supervisor pings each worker
HUNG_AFTER = 10  # heartbeats in a row without a word from a worker: it is hung, killed and replaced
WORKER_COMMAND = (sys.executable, "-m", "aviary.discovery.worker_main")

# Why a worker was replaced: the `reason` label of aviary_xds_worker_restarts_total.
EXITED, HUNG, NOT_LISTENING = "exited", "hung", "not_listening"


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The default number of xDS workers: the CPUs this process may run on (its affinity: taskset, a
    cpuset), fewer under a cgroup v2 CPU quota (a container's CPU limit, rounded up); at least 1.

    A container sees every core of its node in its affinity; without the quota a pod limited to one
    CPU on a 64-core node would start 64 workers.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit(cgroup_root, proc_cgroup)
    return max(1, min(cores, limit) if limit is not None else cores)


def _cgroup_cpu_limit(root: Path, proc_cgroup: Path) -> int | None:
    """The smallest ``cpu.max`` quota (in CPUs, rounded up) of this process's cgroup v2 and its
    parents; None without one (cgroup v1, no limit, not Linux)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None
    limits = []
    directory = root / path.lstrip("/")
    while True:
        try:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            if quota != "max":
                limits.append(math.ceil(int(quota) / int(period)))
        except (OSError, ValueError, ZeroDivisionError):
            pass
        if directory == root or root not in directory.parents:
            break
        directory = directory.parent
    return min(limits) if limits else None


@dataclass(slots=True)
class Silence:
    """Counts the heartbeats a worker lets pass without a word (any frame from it is one)."""

    limit: int
    heard: int = 0  # frames received from the worker at the last heartbeat
    quiet: int = 0  # heartbeats in a row since the last one

    def tick(self, heard: int) -> bool:
        """A heartbeat: the worker has sent `heard` frames in all so far. True: it is hung."""
        if heard != self.heard:
            self.heard, self.quiet = heard, 0
        else:
            self.quiet += 1
        return self.quiet >= self.limit


@dataclass(slots=True)
class _Worker:
    """One running worker process."""

    slot: int
    number: int  # unique per process, restarts too: the high bits of its stream ids
    process: ChildProcess
    writer: asyncio.StreamWriter
    reader: asyncio.StreamReader
    sent: SentState = field(default_factory=SentState)
    streams: set[int] = field(default_factory=set)
    ready: asyncio.Future[int] | None = None
    reading: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.monotonic)
    heard: int = 0  # frames received from it: its heartbeat
    ended_by: str = EXITED  # why it is replaced when it ends: EXITED, or HUNG / NOT_LISTENING (we killed it)


@dataclass(frozen=True, slots=True)
class Reservation:
    """The engine's hold on the xDS address (see the module docstring)."""

    port: int
    probe: socket.socket
    lock: socket.socket

    def release(self) -> None:
        self.probe.close()
        self.lock.close()


def reserve_address(address: str) -> Reservation:
    """Take the address for this instance's workers, or raise ``ListenError``."""
    try:
        host, port = split_address(address)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (ValueError, socket.gaierror) as exc:
        raise ListenError("xds", address, str(exc)) from None
    family, kind, proto, _, sockaddr = infos[0]
    probe = socket.socket(family, kind, proto)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(sockaddr)
    except OSError as exc:
        probe.close()
        raise ListenError("xds", address, (exc.strerror or str(exc)).lower()) from None
    bound = probe.getsockname()[1]
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0aviary-xds:{sockaddr[0]}:{bound}")
    except OSError as exc:
        probe.close()
        lock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc)).lower()
        raise ListenError("xds", address, reason) from None
    return Reservation(bound, probe, lock)


def _kill(process: ChildProcess) -> None:
    """SIGKILL, leaving the reaping to asyncio's child watcher. (``Process.kill`` polls first, and
    that poll can reap a worker that just died: the watcher then reports status 255, not -9.) The
    pid stays this worker's until the watcher reaps it, and ``returncode`` is set right after."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)


def _log_settings() -> tuple[str, str]:
    root = logging.getLogger()
    level = logging.getLevelName(root.getEffectiveLevel()).lower()
    json_format = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return level, "json" if json_format else "text"


class XdsWorkers:
    def __init__(
        self,
        cache: SnapshotCache,
        emit: Callable[[ProxyEvent], None],
        address: str,
        count: int,
        tls: ServerTls | None = None,
        *,
        heartbeat: float = HEARTBEAT_SECONDS,
        hung_after: int = HUNG_AFTER,
        command: Sequence[str] = WORKER_COMMAND,
        reports: ReportSink | None = None,
    ) -> None:
        self._cache = cache
        self._reports = reports  # where the proxies' own reports go (None: dropped)
        self._emit = emit
        self._address = address
        self._count = count
        self._tls = tls
        self._heartbeat = heartbeat
        self._hung_after = hung_after
        self._command = tuple(command)  # tests start a fake worker
        self._numbers = itertools.count(1)
        self._workers: dict[int, _Worker] = {}  # slot -> the live process
        self._supervisors: list[asyncio.Task[None]] = []
        self._reservation: Reservation | None = None
        self._stopping = False
        self._push_scheduled = False
        # reason -> workers replaced; every reason from 0, so each series exists before the first restart
        self.restarts: Counter[str] = Counter(dict.fromkeys((EXITED, HUNG, NOT_LISTENING), 0))
        self.port = 0
        self._listen = address  # HOST:PORT the workers bind: the reserved port once started
        cache.subscribe(self._schedule_push)

    # ---- reads --------------------------------------------------------------------------------

    def streams(self) -> dict[int, int]:
        """Worker number -> streams it holds."""
        return {w.number: len(w.streams) for w in self._workers.values()}

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> int:
        """Reserve the address, start every worker and wait until each listens; returns the port."""
        self._reservation = reserve_address(self._address)
        self.port = self._reservation.port
        host = split_address(self._address)[0]
        self._listen = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        try:
            first = [await self._spawn(slot) for slot in range(self._count)]
            for worker in first:
                await self._until_ready(worker)
        except BaseException:
            await self.stop(0)
            raise
        self._supervisors = [
            asyncio.create_task(self._supervise(w), name=f"xds-worker-{w.slot}") for w in first
        ]
        return self.port

    def closing(self) -> None:
        """The control plane is stopping: a worker that exits now is not restarted (a SIGTERM sent to
        every process of a service, e.g. by systemd, reaches the workers too)."""
        self._stopping = True

    async def stop(self, grace: float) -> None:
        """Stop every worker (streams end with status OK), killing any still alive after `grace` + 2 s."""
        self._stopping = True
        for task in self._supervisors:  # first: none may start a worker while they are stopped
            task.cancel()
        for task in self._supervisors:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._supervisors.clear()
        workers = list(self._workers.values())
        for worker in workers:
            with contextlib.suppress(Exception):
                worker.writer.write(stop_message())
                worker.writer.write_eof()
        deadline = time.monotonic() + grace + 2.0
        for worker in workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.process.wait(), max(0.1, deadline - time.monotonic()))
            if worker.process.returncode is None:
                log.warning("xDS worker %d (pid %d) did not stop; killing it", worker.number, worker.process.pid)
                _kill(worker.process)
                await worker.process.wait()
            if worker.reading is not None:
                with contextlib.suppress(Exception):
                    await worker.reading
            self._gone(worker)
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

    async def _spawn(self, slot: int) -> _Worker:
        number = next(self._numbers)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        level, fmt = _log_settings()
        args = [
            *self._command,
            "--fd", str(child.fileno()), "--worker", str(number), "--address", self._listen,
            "--log-level", level, "--log-format", fmt,
        ]  # fmt: skip
        if self._tls is not None:
            args += ["--tls-cert", str(self._tls.cert), "--tls-key", str(self._tls.key)]
            if self._tls.client_ca is not None:
                args += ["--tls-client-ca", str(self._tls.client_ca)]
        try:
            process = await spawn(  # own session: a Ctrl-C is the engine's to handle
                args, stdin=DEVNULL, pass_fds=(child.fileno(),), start_new_session=True
            )
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        worker = _Worker(slot, number, process, writer, reader)
        worker.ready = asyncio.get_running_loop().create_future()
        self._workers[slot] = worker
        first = sync_message(worker.sent, self._cache.snapshots)  # always a frame: nothing was sent yet
        assert first is not None
        writer.write(first)
        worker.reading = asyncio.create_task(self._read(worker), name=f"xds-worker-{number}-events")
        log.info("xDS worker %d started (pid %d)", number, process.pid)
        return worker

    async def _until_ready(self, worker: _Worker) -> None:
        assert worker.ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), READY_SECONDS)
        except TimeoutError:
            worker.ended_by = NOT_LISTENING
            _kill(worker.process)
            raise ListenError("xds", self._listen, f"xDS worker {worker.number} did not start listening") from None

    async def _supervise(self, worker: _Worker) -> None:
        """Wait for this slot's worker to die (or hang: `_watch`); then start another (the first sync
        before it listens)."""
        failures = 0
        while True:
            code = await self._watch(worker)
            if worker.reading is not None:
                with contextlib.suppress(Exception):
                    await worker.reading
            self._gone(worker)
            if self._stopping:
                return
            failures = next_failures(failures, time.monotonic() - worker.started)
            delay = restart_delay(failures)
            self.restarts[worker.ended_by] += 1
            log.error("xDS worker %d (pid %d) exited with status %s; its proxies reconnect to the others; "
                      "starting a new worker in %.1fs", worker.number, worker.process.pid, code, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                worker = await self._spawn(worker.slot)
                await self._until_ready(worker)
            except (OSError, ListenError) as exc:
                log.error("xDS worker for slot %d could not start: %s", worker.slot, exc)
            else:
                log.info("xDS worker %d listening", worker.number)

    async def _watch(self, worker: _Worker) -> int:
        """Ping the worker every heartbeat until it exits; kill it if it stays silent (`Silence`).
        Returns its exit status."""
        exited = asyncio.ensure_future(worker.process.wait())
        silence = Silence(self._hung_after, worker.heard)
        try:
            while not (await asyncio.wait({exited}, timeout=self._heartbeat))[0]:
                if silence.tick(worker.heard):
                    worker.ended_by = HUNG
                    log.error("xDS worker %d (pid %d) has not answered for %d heartbeats (%gs); killing it",
                              worker.number, worker.process.pid, silence.quiet, silence.quiet * self._heartbeat)
                    _kill(worker.process)
                    break
                if not worker.writer.is_closing():
                    worker.writer.write(ping_message())
            return await exited
        finally:
            exited.cancel()

    def _gone(self, worker: _Worker) -> None:
        """The worker's streams are closed: tell the status, so no gate waits on a proxy that left."""
        if self._workers.get(worker.slot) is worker:
            del self._workers[worker.slot]
        for stream_id in sorted(worker.streams):
            self._emit(ProxyDisconnected(stream_id))
        worker.streams.clear()
        with contextlib.suppress(Exception):
            worker.writer.close()
        if worker.ready is not None and not worker.ready.done():
            worker.ready.set_exception(ListenError("xds", self._listen, f"xDS worker {worker.number} exited"))
            worker.ready.exception()  # retrieved: no "never retrieved" warning when nobody waits

    async def _read(self, worker: _Worker) -> None:
        """Apply the worker's events until its socket closes (it exited, or broke the protocol)."""
        try:
            while (payload := await read_frame(worker.reader)) is not None:
                worker.heard += 1
                message = decode_from_worker(payload)
                if isinstance(message, Pong):
                    continue
                if isinstance(message, Ready):
                    if worker.ready is not None and not worker.ready.done():
                        worker.ready.set_result(message.port)
                    continue
                if isinstance(message, Reports):
                    self._apply_reports(message)
                    continue
                if isinstance(message, Barrier):  # the current snapshots first, then the answer
                    update = sync_message(worker.sent, self._cache.snapshots)
                    if update is not None:
                        worker.writer.write(update)
                    worker.writer.write(barrier_message(message.number))
                    continue
                for event in message:
                    self._apply(worker, event)
        except (ProtocolError, OSError) as exc:
            log.error("xDS worker %d: %s; stopping it", worker.number, exc)
        finally:
            if worker.ready is not None and not worker.ready.done():  # died before it listened
                worker.ready.set_exception(ListenError("xds", self._listen, f"xDS worker {worker.number} exited"))
                worker.ready.exception()  # retrieved: no "never retrieved" warning when nobody waits
            if worker.process.returncode is None:
                _kill(worker.process)

    def _apply_reports(self, reports: Reports) -> None:
        if self._reports is None:
            return
        counters, samples = reports.batch
        for node_id, node_cluster, counts in counters:
            self._reports.add_counters(node_id, node_cluster, counts)
        for node_id, node_cluster, items in samples:
            self._reports.add_samples(node_id, node_cluster, items)

    def _apply(self, worker: _Worker, event: ProxyEvent) -> None:
        if worker_of(event.stream_id) != worker.number:
            log.error("xDS worker %d reported stream %d of another worker; ignored", worker.number, event.stream_id)
            return
        if isinstance(event, ProxyConnected):
            worker.streams.add(event.stream_id)
        elif isinstance(event, ProxyDisconnected):
            if event.stream_id not in worker.streams:
                return
            worker.streams.discard(event.stream_id)
        elif event.stream_id not in worker.streams:
            return  # before its ProxyConnected: the single process ignores those too (ProxyStatus)
        self._emit(event)

    # ---- snapshots out ------------------------------------------------------------------------

    def _schedule_push(self) -> None:
        """After a publish: one push per turn of the loop, however many publishes it had."""
        if self._push_scheduled:
            return
        self._push_scheduled = True
        asyncio.get_running_loop().call_soon(self._push)

    def _push(self) -> None:
        self._push_scheduled = False
        snapshots = self._cache.snapshots
        for worker in list(self._workers.values()):
            if worker.writer.is_closing():
                continue
            message = sync_message(worker.sent, snapshots)
            if message is not None:
                worker.writer.write(message)

