"""The admin API servicer: reads from the rollout runner and proxy status, commands into the runner.

Errors leave as gRPC status codes with a message a person can act on:

- INVALID_ARGUMENT: an empty rollout name, a weight outside 0..100;
- NOT_FOUND: no rollout of that name;
- FAILED_PRECONDITION: the engine refused the command as the rollout is now (its reason, e.g.
  ``shop: no canary: rollout is Stable``);
- UNAVAILABLE: a command that moves away from stable (promote, a higher weight, resume, retry)
  while the state file cannot be written: ``state file X cannot be written: <OS error>; the
  command was not applied``. Abort and lower weights still apply (``Rollout.state_error`` says
  the save is pending);
- RESOURCE_EXHAUSTED: a WatchRollouts client that fell ``WATCH_BUFFER`` events behind; a
  Validate while ``MAX_PENDING`` others run or wait;
- INVALID_ARGUMENT also for a Validate text over ``MAX_POLICY_BYTES``; DEADLINE_EXCEEDED for one
  whose check ran over its time limit (its worker is killed); UNAVAILABLE when a worker died.

Everything runs on the control plane's event loop, so runner calls need no locking; Validate's
parsing alone runs in worker processes (``aviary.policy.workers``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from aviary.admin import convert
from aviary.admin.v1 import admin_pb2 as pb
from aviary.admin.v1 import admin_pb2_grpc
from aviary.discovery.proxy_status import ProxyStatus
from aviary.policy.rollout_state import (
    Abort,
    AdminCommand,
    PauseRollout,
    Promote,
    Resume,
    Retry,
    RolloutStatus,
    SetWeight,
    TransitionEvent,
)
from aviary.policy.source import PolicyState
from aviary.policy.workers import PolicyWorkers, TextTooLarge, ValidationBusy, ValidationTimedOut, WorkerFailed
from aviary.runner import CommandRefused, EngineHealth, NotSaved, RolloutRunner

__all__ = ["SERVICE_NAME", "WATCH_BUFFER", "AdminService"]

log = logging.getLogger("aviary.admin")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name
WATCH_BUFFER = 1000
SERVER_REFUSED = "aviary-refused"  # trailing metadata on an UNAVAILABLE the server chose to send
Context = Any  # grpc.aio.ServicerContext; grpc ships no type information


@dataclass(frozen=True, slots=True)
class _End:
    """Put in a watch queue: end that stream with this status."""

    code: grpc.StatusCode
    reason: str


def _shown(name: str, limit: int = 80) -> str:
    """A requested name for a status message: clipped, as a huge one would not fit in the trailers
    (the client would get RESOURCE_EXHAUSTED instead of the status meant for it)."""
    if len(name) <= limit:
        return repr(name)
    return f"{name[:limit]!r}... ({len(name)} characters)"


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover


class AdminService:
    """Implements ``aviary.admin.v1.Admin``; register with :meth:`add_to_server`."""

    def __init__(
        self,
        runner: RolloutRunner,
        proxies: ProxyStatus,
        policy_state: Callable[[], PolicyState] | None = None,
        validation: PolicyWorkers | None = None,
        health: Callable[[], EngineHealth] | None = None,
        default_prometheus: str | None = None,
    ) -> None:
        self._runner = runner
        self._default_prometheus = default_prometheus  # `aviary serve --prometheus-url`, for Validate
        self._health = health if health is not None else runner.health
        self._proxies = proxies
        self._policy_state = policy_state
        self._watches: set[asyncio.Queue[TransitionEvent | _End]] = set()
        self._validation = validation if validation is not None else PolicyWorkers()

    def close(self) -> None:
        """End every open watch with UNAVAILABLE (the server is stopping)."""
        for queue in self._watches:
            queue.put_nowait(_End(grpc.StatusCode.UNAVAILABLE, "the control plane is shutting down"))

    async def stop_workers(self) -> None:
        """Stop the validation worker processes (after the server stopped taking calls)."""
        await self._validation.close()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        admin_pb2_grpc.add_AdminServicer_to_server(self, server)  # type: ignore[no-untyped-call]  # generated

    # ---- helpers -------------------------------------------------------------------------

    def _clock(self) -> convert.WallClock:
        return convert.WallClock.now(self._runner.now())

    def _message(self, status: RolloutStatus, clock: convert.WallClock | None = None) -> pb.Rollout:
        name = status.rollout
        rollout = self._runner.rollout(name)
        return convert.rollout_message(
            status,
            rollout.spec if rollout is not None else None,
            self._runner.history(name),
            clock or self._clock(),
            git_commit=self._runner.applied_revision(status.rollout),
            orphaned=self._runner.orphaned(name),
            engine_error=self._runner.engine_error(name),
            state_error=self._runner.state_error(name),
            envoy_rejected=self._runner.blocked(name),
            envoy_weights=self._runner.envoy_weights(name),
            plan=self._runner.plan(name),
            stage=self._runner.stage(name),
        )

    async def _known(self, name: str, context: Context) -> RolloutStatus:
        if not name:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "a rollout name is required")
        status = self._runner.status(name)
        if status is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, self._not_found(name))
        return status

    def _not_found(self, name: str) -> str:
        known = ", ".join(sorted(self._runner.statuses())) or "none"
        return f"no rollout named {_shown(name)} (known: {known})"

    async def _command(self, name: str, command: AdminCommand, context: Context) -> pb.Rollout:
        await self._known(name, context)
        log.info("admin command %s on %s from %s", type(command).__name__, _shown(name), context.peer())
        try:
            status = self._runner.command(name, command)
        except KeyError:
            await _abort(context, grpc.StatusCode.NOT_FOUND, self._not_found(name))
        except CommandRefused as refused:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(refused))
        except NotSaved as not_saved:
            context.set_trailing_metadata(((SERVER_REFUSED, "state-not-writable"),))  # not a lost connection
            await _abort(context, grpc.StatusCode.UNAVAILABLE, f"{not_saved.error}; the command was not applied")
        return self._message(status)

    # ---- reads ---------------------------------------------------------------------------

    async def ListRollouts(self, request: pb.ListRolloutsRequest, context: Context) -> pb.ListRolloutsResponse:
        clock = self._clock()
        statuses = self._runner.statuses()
        response = pb.ListRolloutsResponse(rollouts=[self._message(statuses[n], clock) for n in sorted(statuses)])
        if self._policy_state is not None:
            response.policy.CopyFrom(convert.policy_message(self._policy_state()))
        response.health.CopyFrom(convert.health_message(self._health()))
        return response

    async def GetRollout(self, request: pb.GetRolloutRequest, context: Context) -> pb.Rollout:
        return self._message(await self._known(request.name, context))

    async def Explain(self, request: pb.GetRolloutRequest, context: Context) -> pb.Explanation:
        await self._known(request.name, context)
        return convert.explanation_message(request.name, self._runner.rounds(request.name),
                                           self._runner.history(request.name), self._clock())

    async def ListProxies(self, request: pb.ListProxiesRequest, context: Context) -> pb.ListProxiesResponse:
        proxies = sorted(self._proxies, key=lambda p: (p.node_id, p.stream_id))
        reports = self._runner.envoy_reports
        return pb.ListProxiesResponse(proxies=[convert.proxy_message(p, reports.proxy(p.node_id)) for p in proxies])

    async def Validate(self, request: pb.ValidateRequest, context: Context) -> pb.ValidateResponse:
        """Checked in a worker process (``PolicyWorkers``): a large text never holds the event loop.
        Against this server's flags too: analysis needs this server's --prometheus-url or its own."""
        try:
            errors = await self._validation.validate(
                request.text, request.file or "<request>", self._default_prometheus
            )
        except TextTooLarge as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ValidationBusy as exc:
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValidationTimedOut as exc:
            await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except WorkerFailed as exc:
            context.set_trailing_metadata(((SERVER_REFUSED, "validation-worker"),))  # not a lost connection
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        return convert.validate_errors(errors)

    async def WatchRollouts(self, request: pb.WatchRolloutsRequest, context: Context) -> AsyncIterator[pb.RolloutEvent]:
        """Every transition from now on (of one rollout, if named), until the client goes away."""
        name = request.name
        if name and self._runner.status(name) is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, self._not_found(name))
        queue: asyncio.Queue[TransitionEvent | _End] = asyncio.Queue()
        overflowed = False

        def listener(event: TransitionEvent) -> None:
            nonlocal overflowed
            if overflowed or (name and event.rollout != name):
                return
            if queue.qsize() >= WATCH_BUFFER:
                overflowed = True
                reason = f"watcher fell {WATCH_BUFFER} events behind; watch again"
                queue.put_nowait(_End(grpc.StatusCode.RESOURCE_EXHAUSTED, reason))
                return
            queue.put_nowait(event)

        self._runner.on_transition(listener)
        self._watches.add(queue)
        log.info("watch of %s opened by %s", name or "all rollouts", context.peer())
        try:
            await context.send_initial_metadata(())  # tells the client: subscribed, nothing missed from here
            while not isinstance(item := await queue.get(), _End):
                yield convert.event_message(item, self._clock())
            await _abort(context, item.code, item.reason)
        finally:
            self._watches.discard(queue)
            self._runner.off_transition(listener)
            log.info("watch of %s closed by %s", name or "all rollouts", context.peer())

    # ---- commands ------------------------------------------------------------------------

    async def Pause(self, request: pb.RolloutRequest, context: Context) -> pb.Rollout:
        return await self._command(request.name, PauseRollout(), context)

    async def Resume(self, request: pb.RolloutRequest, context: Context) -> pb.Rollout:
        return await self._command(request.name, Resume(), context)

    async def Promote(self, request: pb.RolloutRequest, context: Context) -> pb.Rollout:
        return await self._command(request.name, Promote(), context)

    async def Abort(self, request: pb.RolloutRequest, context: Context) -> pb.Rollout:
        return await self._command(request.name, Abort(), context)

    async def Retry(self, request: pb.RolloutRequest, context: Context) -> pb.Rollout:
        return await self._command(request.name, Retry(), context)

    async def SetWeight(self, request: pb.SetWeightRequest, context: Context) -> pb.Rollout:
        if not 0 <= request.weight <= 100:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"weight must be within 0..100, got {request.weight}"
            )
        return await self._command(request.name, SetWeight(request.weight), context)

