"""A small async client for the admin API: one channel, the bearer token on every call, and gRPC
errors translated into ``AdminError`` with a one-line reason for people.

Exceptions::

    AdminError            the server refused the call or could not be reached (``code``, ``detail``)
    AuthConfigError       the token file cannot be read (from aviary.admin.auth)
    TlsConfigError        a certificate, key or CA file cannot be read (from aviary.tls)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from aviary.admin.auth import read_token
from aviary.admin.server import DEFAULT_ADMIN_ADDRESS
from aviary.admin.v1 import admin_pb2 as pb
from aviary.admin.v1 import admin_pb2_grpc
from aviary.tls import ClientTls, client_credentials

__all__ = ["COMMANDS", "AdminClient", "AdminError", "ClientConfig"]

# CLI verb -> RPC method name, for the commands that take only a rollout name.
COMMANDS = {"pause": "Pause", "resume": "Resume", "promote": "Promote", "abort": "Abort", "retry": "Retry"}

_WHAT = {
    grpc.StatusCode.UNAUTHENTICATED: "authentication failed",
    grpc.StatusCode.PERMISSION_DENIED: "permission denied",
    grpc.StatusCode.NOT_FOUND: "not found",
    grpc.StatusCode.FAILED_PRECONDITION: "refused",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid argument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timed out",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "too slow",
}


class AdminError(Exception):
    """A refused or failed admin call. ``str()`` reads e.g. ``not found: no rollout named 'x'``."""

    def __init__(self, code: grpc.StatusCode, detail: str, address: str, refused: bool = False) -> None:
        super().__init__(code, detail, address)
        self.code = code
        self.detail = detail
        self.address = address
        self.refused = refused  # the server answered (e.g. UNAVAILABLE: its state cannot be written)

    def __str__(self) -> str:
        if self.code is grpc.StatusCode.UNAVAILABLE and not self.refused:
            return f"cannot reach the admin API at {self.address}: {self.detail}"
        what = _WHAT.get(self.code, self.code.name.lower().replace("_", " "))
        return f"{what}: {self.detail}"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    address: str = DEFAULT_ADMIN_ADDRESS
    token_file: Path | None = None
    tls: ClientTls | None = None
    timeout: float = 10.0


class AdminClient:
    """``async with AdminClient(ClientConfig(...)) as client: await client.list_rollouts()``."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        token = read_token(config.token_file) if config.token_file is not None else None
        self._metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        if config.tls is None:
            self._channel = grpc.aio.insecure_channel(config.address)
        else:
            self._channel = grpc.aio.secure_channel(config.address, client_credentials(config.tls))
        self._stub: Any = admin_pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _error(self, exc: grpc.aio.AioRpcError) -> AdminError:
        refused = any(key == "aviary-refused" for key, _ in exc.trailing_metadata() or ())
        return AdminError(exc.code(), exc.details() or "", self.config.address, refused)

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request, metadata=self._metadata, timeout=self.config.timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    # ---- the API ---------------------------------------------------------------------------

    async def list_rollouts(self) -> list[pb.Rollout]:
        return list((await self.overview()).rollouts)

    async def overview(self) -> pb.ListRolloutsResponse:
        """Every rollout, plus the policy source: applied commit and anything refused."""
        response: pb.ListRolloutsResponse = await self._call("ListRollouts", pb.ListRolloutsRequest())
        return response

    async def get_rollout(self, name: str) -> pb.Rollout:
        rollout: pb.Rollout = await self._call("GetRollout", pb.GetRolloutRequest(name=name))
        return rollout

    async def explain(self, name: str) -> pb.Explanation:
        explanation: pb.Explanation = await self._call("Explain", pb.GetRolloutRequest(name=name))
        return explanation

    async def command(self, verb: str, name: str) -> pb.Rollout:
        """``verb`` is a key of COMMANDS (pause, resume, promote, abort, retry)."""
        rollout: pb.Rollout = await self._call(COMMANDS[verb], pb.RolloutRequest(name=name))
        return rollout

    async def set_weight(self, name: str, weight: int) -> pb.Rollout:
        rollout: pb.Rollout = await self._call("SetWeight", pb.SetWeightRequest(name=name, weight=weight))
        return rollout

    async def list_proxies(self) -> list[pb.Proxy]:
        response: pb.ListProxiesResponse = await self._call("ListProxies", pb.ListProxiesRequest())
        return list(response.proxies)

    async def validate(self, text: str, file: str = "") -> list[pb.ValidateError]:
        response: pb.ValidateResponse = await self._call("Validate", pb.ValidateRequest(text=text, file=file))
        return list(response.errors)

    async def watch(self, name: str = "") -> AsyncGenerator[pb.RolloutEvent | None, None]:
        """Transition events from the moment the server subscribed, until the server ends the stream.

        The first item is None: it arrives once the server has subscribed, so anything that happens
        after it is in the stream (read the current state then, and apply events on top).
        """
        call = self._stub.WatchRollouts(pb.WatchRolloutsRequest(name=name), metadata=self._metadata)
        try:
            await call.initial_metadata()
            # Ended before subscribing: refused (authentication, unknown rollout).
            if call.done() and (code := await call.code()) is not grpc.StatusCode.OK:
                raise AdminError(code, await call.details() or "", self.config.address)
            yield None
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        finally:
            call.cancel()
