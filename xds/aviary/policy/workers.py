"""Parse and validate policies in worker processes, so large inputs cannot starve the control loop.

YAML parsing and pydantic validation hold the GIL: three 3.7 MB texts checked on the event loop
held it about 3.5 s each, and a weight change took 6.8 s to reach Envoy. A thread does not help
enough: loading six 800 kB files in one stalled the loop up to 290 ms (pydantic validates a whole
host list without releasing the GIL). So the work goes to child processes (``python -m
aviary.policy.workers``), started on first use and kept for the next call.

``PolicyWorkers.validate`` (the admin API's Validate) is bounded three ways:

- size: texts over ``max_bytes`` (``MAX_POLICY_BYTES``) are refused before any worker sees them;
- time: a check that uses more than ``cpu_limit`` seconds of CPU is stopped in the worker
  (``ITIMER_PROF``: CPU time, so a busy machine does not fail legitimate checks) and raises
  ``ValidationTimedOut``; one that has not answered after ``wall_limit`` seconds (stuck where the
  timer cannot interrupt it) has its worker killed, and a new one is started for the next call;
- concurrency: at most ``workers`` checks run at once and ``max_pending`` are admitted in all
  (running and waiting); more raise ``ValidationBusy`` at once instead of queueing without bound.

``load_directory`` and ``parse_texts`` (the policy sources) have no limits of their own: the files
are the operator's, and the loader bounds each one (size, YAML depth and aliases).

Workers lower their own priority (``nice``), so the control plane and the proxies win the CPU.
They read requests on stdin and answer on stdout, and exit when stdin closes (the parent is gone).
Exec'd rather than forked: they inherit neither the event loop, grpc's threads, nor the state
file's lock.

Wire format, each frame a 4-byte big-endian length and that many bytes: the worker first sends
``ready``; then each request is one pickled ``(kind, args, cpu_limit)`` frame and each answer one
pickled ``(outcome, result or message)`` frame, outcome ``ok``, ``cpu`` (limit reached) or
``error``. Pickle is safe here: both ends are this program.

Exceptions::

    WorkRefused             the work was not done; the message says why
    ├── TextTooLarge        over ``max_bytes``
    ├── ValidationBusy      ``max_pending`` validations already running or waiting
    ├── ValidationTimedOut  over ``cpu_limit`` (stopped) or ``wall_limit`` (worker killed)
    └── WorkerFailed        the worker died, failed, or could not be started
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import struct
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from aviary.child_process import PIPE, ChildProcess, spawn
from aviary.policy.loader import MAX_POLICY_BYTES, LoadResult, load_directory, parse_policy_text
from aviary.policy.schema import PolicyError, Rollout
from aviary.policy.server_rules import needs_prometheus

__all__ = [
    "PolicyWorkers",
    "TextTooLarge",
    "ValidationBusy",
    "ValidationTimedOut",
    "WorkRefused",
    "WorkerFailed",
]

log = logging.getLogger("aviary.policy")

CPU_LIMIT_SECONDS = 5.0  # a 1 MiB text takes about 1.5 s of CPU on the dev machine
WALL_LIMIT_SECONDS = 60.0  # at nice 10 on a loaded 2-core machine, a 1 MiB check took up to 10 s
WORKERS = 2
MAX_PENDING = 8
START_TIMEOUT_SECONDS = 30.0  # a worker's imports, on a busy machine
WORKER_NICE = 10

_LENGTH = struct.Struct(">I")
_READY = b"ready"

Parsed = tuple[Rollout | None, list[PolicyError]]


class WorkRefused(Exception):
    """The work was not done."""


class TextTooLarge(WorkRefused):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"policy text is {size:,} bytes; the limit is {limit:,} bytes ({limit / 2**20:g} MiB)")
        self.size = size
        self.limit = limit


class ValidationBusy(WorkRefused):
    pass


class ValidationTimedOut(WorkRefused):
    pass


class WorkerFailed(WorkRefused):
    pass


class _Worker:
    """One child process; ``ask`` is used by one caller at a time (the pool guarantees it)."""

    def __init__(self, process: ChildProcess) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self._stdin = process.stdin
        self._stdout = process.stdout

    @classmethod
    async def start(cls) -> _Worker:
        try:
            process = await spawn((sys.executable, "-m", "aviary.policy.workers"), stdin=PIPE, stdout=PIPE)
        except OSError as exc:
            raise WorkerFailed(f"cannot start a policy worker ({sys.executable}): {exc.strerror or exc}") from None
        worker = cls(process)
        try:
            ready = await asyncio.wait_for(worker._read_frame(), START_TIMEOUT_SECONDS)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            await worker.kill()
            raise WorkerFailed(
                f"the policy worker did not start: {type(exc).__name__} (exit code {worker.process.returncode})"
            ) from None
        except BaseException:  # the caller went away while it started: it must not outlive that
            await asyncio.shield(worker.kill())
            raise
        if ready != _READY:
            await worker.kill()
            raise WorkerFailed(f"the policy worker did not start: it said {ready[:80]!r}")
        return worker

    async def _read_frame(self) -> bytes:
        (size,) = _LENGTH.unpack(await self._stdout.readexactly(_LENGTH.size))
        return await self._stdout.readexactly(size)

    async def ask(self, kind: str, args: tuple[Any, ...], cpu_limit: float | None) -> tuple[str, Any]:
        request = pickle.dumps((kind, args, cpu_limit), protocol=pickle.HIGHEST_PROTOCOL)
        self._stdin.write(_LENGTH.pack(len(request)))
        self._stdin.write(request)
        await self._stdin.drain()
        outcome, result = pickle.loads(await self._read_frame())
        return outcome, result

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        await self.process.wait()


class PolicyWorkers:
    """Policy parsing in worker processes, for one event loop (see the module docstring)."""

    def __init__(
        self,
        workers: int = WORKERS,
        cpu_limit: float = CPU_LIMIT_SECONDS,
        wall_limit: float = WALL_LIMIT_SECONDS,
        max_pending: int = MAX_PENDING,
        max_bytes: int = MAX_POLICY_BYTES,
    ) -> None:
        self.cpu_limit = cpu_limit
        self.wall_limit = wall_limit
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self._slots = asyncio.Semaphore(workers)
        self._idle: list[_Worker] = []
        self._validations = 0  # admitted: running or waiting for a slot
        self._closed = False
        self.timeouts = 0  # validations stopped for taking too long

    async def validate(self, text: str, file: str, default_prometheus: str | None = None) -> list[PolicyError]:
        """Every problem of ``text`` (empty when valid), as ``parse_policy_text`` finds them, and as a
        server with ``--prometheus-url default_prometheus`` would see them (aviary.policy.server_rules)."""
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_bytes:
            raise TextTooLarge(size, self.max_bytes)
        if self._validations >= self.max_pending:
            raise ValidationBusy(f"{self._validations} validations are running or waiting; try again later")
        self._validations += 1
        try:
            outcome, result = await self._call(
                "validate", (text, file, default_prometheus), self.cpu_limit, self.wall_limit
            )
        finally:
            self._validations -= 1
        if outcome == "cpu":
            self.timeouts += 1
            raise ValidationTimedOut(
                f"validation used more than {self.cpu_limit:g} s of CPU and was stopped; the text was not checked"
            )
        errors: list[PolicyError] = self._result(outcome, result)
        return errors

    @staticmethod
    def _result(outcome: str, result: Any) -> Any:
        if outcome != "ok":
            raise WorkerFailed(f"the policy worker failed: {result}")
        return result

    async def parse_texts(self, texts: Mapping[str, str]) -> dict[str, Parsed]:
        """``parse_policy_text`` of each (file -> text), in a worker."""
        parsed: dict[str, Parsed] = self._result(*await self._call("parse", (dict(texts),), None, None))
        return parsed

    async def load_directory(self, path: Path) -> LoadResult:
        """``loader.load_directory(path)``, in a worker."""
        result: LoadResult = self._result(*await self._call("load", (str(path),), None, None))
        return result

    async def _call(
        self, kind: str, args: tuple[Any, ...], cpu_limit: float | None, wall_limit: float | None
    ) -> tuple[str, Any]:
        async with self._slots:
            if self._closed:
                raise WorkerFailed("the control plane is shutting down")
            worker = self._idle.pop() if self._idle else await _Worker.start()
            try:
                answer = await asyncio.wait_for(worker.ask(kind, args, cpu_limit), wall_limit)
            except TimeoutError:
                self.timeouts += 1
                await worker.kill()
                log.warning("policy %s took over %g s; its worker was killed", kind, wall_limit)
                raise ValidationTimedOut(
                    f"validation took longer than {wall_limit:g} s and was stopped; the text was not checked"
                ) from None
            except (OSError, asyncio.IncompleteReadError, pickle.UnpicklingError, EOFError) as exc:
                await worker.kill()
                raise WorkerFailed(
                    f"the policy worker died (exit code {worker.process.returncode}): {type(exc).__name__}"
                ) from None
            except BaseException:  # the caller went away (cancelled): the worker may be mid-answer
                await asyncio.shield(worker.kill())
                raise
            if self._closed:
                await worker.kill()
            else:
                self._idle.append(worker)
            return answer

    def reopen(self) -> None:
        """Take work again after ``close`` (a policy source whose task was restarted)."""
        self._closed = False

    async def close(self) -> None:
        """Stop the idle workers; a running call's worker stops when the call ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for worker in idle:
            await worker.kill()


# ---------------------------------------------------------------------------------- worker side


def _validate(text: str, file: str, default_prometheus: str | None) -> list[PolicyError]:
    rollout, errors = parse_policy_text(text, file)
    if rollout is not None and (error := needs_prometheus(rollout, file, default_prometheus)) is not None:
        errors.append(error)
    return errors


def _parse(texts: dict[str, str]) -> dict[str, Parsed]:
    return {file: parse_policy_text(text, file) for file, text in texts.items()}


def _load(path: str) -> LoadResult:
    return load_directory(Path(path))


_KINDS: dict[str, Callable[..., Any]] = {"validate": _validate, "parse": _parse, "load": _load}


class _CpuLimitReached(BaseException):  # not Exception: no `except Exception` in the loader may swallow it
    pass


_armed = False


def _on_cpu_limit(signum: int, frame: object) -> None:
    if _armed:  # not once the work is done and the timer being disarmed
        raise _CpuLimitReached


def _answer(kind: str, args: tuple[Any, ...], cpu_limit: float | None) -> tuple[str, Any]:
    global _armed
    try:
        if cpu_limit:
            _armed = True
            signal.setitimer(signal.ITIMER_PROF, cpu_limit)  # counts this process's CPU time
        return "ok", _KINDS[kind](*args)
    except _CpuLimitReached:
        return "cpu", cpu_limit
    except Exception as exc:  # the loader means never to raise; say so rather than die
        return "error", f"{kind}: {type(exc).__name__}: {exc}"[:1000]
    finally:
        _armed = False
        signal.setitimer(signal.ITIMER_PROF, 0)


def _read_frame(stream: BinaryIO) -> bytes | None:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(header)
    payload = stream.read(size)
    return payload if len(payload) == size else None


def _write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(_LENGTH.pack(len(payload)) + payload)
    stream.flush()


def worker_main() -> None:
    """Answer requests on stdin until it closes."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)
    signal.signal(signal.SIGPROF, _on_cpu_limit)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the frames
    _write_frame(stdout, _READY)
    while (request := _read_frame(stdin)) is not None:
        _write_frame(stdout, pickle.dumps(_answer(*pickle.loads(request)), protocol=pickle.HIGHEST_PROTOCOL))


if __name__ == "__main__":
    worker_main()
