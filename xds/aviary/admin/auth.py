"""Bearer-token authentication for the admin server, as a grpc.aio server interceptor.

Clients send ``authorization: Bearer <token>``. A missing, malformed or wrong token ends the call
with UNAUTHENTICATED before any handler runs, and is logged with the peer. The token is compared
in constant time. Health checks (``grpc.health.v1.Health``) stay open so that probes need no
secret; everything else, reflection included, needs the token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

__all__ = ["OPEN_METHOD_PREFIXES", "AuthConfigError", "TokenAuth", "read_token"]

log = logging.getLogger("aviary.admin")

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
_SCHEME = "bearer "


class AuthConfigError(ValueError):
    """A token file that cannot be used."""


def read_token(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped); it must not be empty."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"admin token file {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not token:
        raise AuthConfigError(f"admin token file {path} is empty")
    if any(ch.isspace() for ch in token):
        raise AuthConfigError(f"admin token file {path}: the token must be one word without spaces")
    return token


def _refusal_reason(metadata: Any, expected: bytes) -> str | None:
    """None when ``metadata`` carries the expected bearer token, else why not."""
    values = [value for key, value in (metadata or ()) if key == "authorization"]
    if not values:
        return "missing token: send metadata 'authorization: Bearer <token>'"
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if len(values) > 1 or not value.lower().startswith(_SCHEME):
        return "malformed authorization metadata: expected one 'Bearer <token>'"
    if not hmac.compare_digest(value[len(_SCHEME) :].strip().encode(), expected):
        return "invalid token"
    return None


def _refuse(handler: Any, method: str, reason: str) -> Any:
    """A handler of the same shape as ``handler`` that ends the call with UNAUTHENTICATED."""

    async def deny(request: object, context: Any) -> None:
        log.warning("admin call %s from %s refused: %s", method, context.peer(), reason)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    if handler is None:  # unknown method: refuse it as well, rather than reveal what exists
        return grpc.unary_unary_rpc_method_handler(deny)
    kinds: dict[tuple[bool, bool], Callable[..., Any]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    def __init__(self, token: str, open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES) -> None:
        self._expected = token.encode()
        self._open = open_prefixes

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        method: str = handler_call_details.method
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        reason = _refusal_reason(handler_call_details.invocation_metadata, self._expected)
        if reason is None:
            return await continuation(handler_call_details)
        return _refuse(await continuation(handler_call_details), method, reason)
