"""The Prometheus provider's HTTP client (``aviary.metrics.http_client``) against scripted servers."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from aviary.metrics import http_client
from aviary.metrics.http_client import KeepAliveClient, ProtocolError

Reply = tuple[bytes, bool]  # what to send, and whether to close the connection after it


def ok(body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


@dataclass
class Scripted:
    """A server that answers each request head with ``reply(head, connection number)``."""

    reply: Callable[[bytes, int], Reply]
    heads: list[bytes] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.heads.append(head)
                data, close = self.reply(head, number)
                writer.write(data)
                await writer.drain()
                if close:
                    return
        finally:
            self.open_now -= 1
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Callable[[bytes, int], Reply]], asyncio.Future[Scripted]]]:
    servers: list[asyncio.Server] = []

    async def start(reply: Callable[[bytes, int], Reply]) -> Scripted:
        scripted = Scripted(reply)
        server = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
        scripted.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return scripted

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()


async def test_a_connection_is_kept_for_the_next_request(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(lambda head, n: (ok(b'{"n": 1}'), False))
    client = KeepAliveClient(f"http://127.0.0.1:{server.port}/prefix/")
    for _ in range(3):
        response = await client.get("/api/v1/query", {"query": 'sum(x{a="b c"})'})
        assert (response.status, response.body) == (200, b'{"n": 1}')
    assert server.connections == 1
    assert server.heads[0].startswith(b"GET /prefix/api/v1/query?query=sum%28x%7Ba%3D%22b%20c%22%7D%29 HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:" in server.heads[0]
    client.close()


async def test_a_chunked_answer_is_joined(serve) -> None:  # type: ignore[no-untyped-def]
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nTrailer: x\r\n\r\n")
    server = await serve(lambda head, n: (chunked, False))
    client = KeepAliveClient(f"http://127.0.0.1:{server.port}")
    assert (await client.get("/q", {})).body == b"abcdefg"
    assert (await client.get("/q", {})).body == b"abcdefg"
    assert server.connections == 1
    client.close()


async def test_an_answer_without_length_ends_with_the_connection(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(lambda head, n: (b"HTTP/1.0 200 OK\r\n\r\nall of it", True))
    client = KeepAliveClient(f"http://127.0.0.1:{server.port}")
    assert (await client.get("/q", {})).body == b"all of it"
    assert (await client.get("/q", {})).body == b"all of it"
    assert server.connections == 2  # not reused: the end of the body was the end of the connection
    client.close()


async def test_connection_close_is_honoured(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(lambda head, n: (ok(b"x", "Connection: close"), True))
    client = KeepAliveClient(f"http://127.0.0.1:{server.port}")
    for _ in range(2):
        assert (await client.get("/q", {})).body == b"x"
    assert server.connections == 2
    client.close()


async def test_a_pooled_connection_closed_by_the_server_is_replaced(serve) -> None:  # type: ignore[no-untyped-def]
    # The server closes each connection after its answer without saying so: the next request finds
    # the pooled connection dead before any byte of answer, and is sent again on a new one.
    server = await serve(lambda head, n: (ok(f"conn {n}".encode()), True))
    client = KeepAliveClient(f"http://127.0.0.1:{server.port}")
    assert (await client.get("/q", {})).body == b"conn 1"
    await asyncio.sleep(0.05)  # the close reaches the client (or not: both paths must work)
    assert (await client.get("/q", {})).body == b"conn 2"
    client.close()


async def test_a_half_answer_is_an_error_not_a_retry(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(lambda head, n: (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", True))
    client = KeepAliveClient(f"http://127.0.0.1:{server.port}")
    with pytest.raises(EOFError):
        await client.get("/q", {})
    assert len(server.heads) == 1
    client.close()


@pytest.mark.parametrize("answer", [
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n",
])
async def test_what_is_not_http_is_a_protocol_error(serve, answer: bytes,  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_client, "MAX_BODY", 1000)
    server = await serve(lambda head, n: (answer, True))
    client = KeepAliveClient(f"http://127.0.0.1:{server.port}")
    with pytest.raises(ProtocolError):
        await client.get("/q", {})
    client.close()


async def test_basic_auth_comes_from_the_url(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(lambda head, n: (ok(b""), False))
    client = KeepAliveClient(f"http://me:s%40cret@127.0.0.1:{server.port}")
    await client.get("/q", {})
    token = base64.b64encode(b"me:s@cret").decode()
    assert f"\r\nAuthorization: Basic {token}\r\n".encode() in server.heads[0]
    assert f"\r\nHost: 127.0.0.1:{server.port}\r\n".encode() in server.heads[0]
    client.close()


async def test_connections_are_bounded(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(lambda head, n: (ok(b"done"), False))
    client = KeepAliveClient(f"http://127.0.0.1:{server.port}", connections=2)
    answers = await asyncio.gather(*(client.get("/q", {"i": str(i)}) for i in range(20)))
    assert [a.body for a in answers] == [b"done"] * 20
    assert server.connections <= 2 and server.most_open <= 2
    client.close()


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        KeepAliveClient("ftp://127.0.0.1:21")
