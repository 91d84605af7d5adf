"""A tiny local HTTP server that answers like Prometheus's ``GET /api/v1/query`` (and ``query_range``).

What it answers is up to the test: by default the :class:`Answer` stored for the exact query in
``answers`` (else ``default``, an empty vector), or whatever a ``respond(query)`` function returns.
Every query asked is recorded in ``queries``; any other path gets 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

SAMPLE_TIME = 1767225600.5  # the timestamp of every sample vector_body() writes


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    delay: float = 0.0  # seconds to wait before answering
    content_type: str = "application/json"


def vector_body(*values: str) -> bytes:
    """A successful instant-query answer: a vector with one label-less sample per value."""
    result = [{"metric": {}, "value": [SAMPLE_TIME, value]} for value in values]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops connections when many queries arrive at once


class FakePrometheus:
    """Serves on a kernel-picked port of 127.0.0.1 from :meth:`start` (or ``with``) to :meth:`stop`."""

    def __init__(self, default: Answer | None = None, respond: Callable[[str], Answer] | None = None) -> None:
        self.answers: dict[str, Answer] = {}
        self.default = default if default is not None else Answer(body=vector_body())
        self.respond = respond if respond is not None else self.stored_answer
        self.queries: list[str] = []
        self.ranges: list[dict[str, str]] = []  # parameters of every query_range asked
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def stored_answer(self, query: str) -> Answer:
        return self.answers.get(query, self.default)

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Self:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path not in ("/api/v1/query", "/api/v1/query_range"):
                    self.send_error(404)
                    return
                params = parse_qs(parts.query)
                query = params.get("query", [""])[0]
                fake.queries.append(query)
                if parts.path.endswith("_range"):
                    fake.ranges.append({name: values[0] for name, values in params.items()})
                answer = fake.respond(query)
                time.sleep(answer.delay)
                try:
                    self.send_response(answer.status)
                    self.send_header("Content-Type", answer.content_type)
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = _Server(("127.0.0.1", 0), Handler)
        server.block_on_close = False
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-prometheus", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LoopFakePrometheus:
    """The same answers as :class:`FakePrometheus` (``respond``, ``queries``), from an asyncio server
    on a thread of its own, with keep-alive connections: thousands of queries a second for a few
    per cent of a core, where the thread-per-connection server needs a core per ~700. For the
    benchmark of many rollouts under analysis; ``delay`` is not supported."""

    def __init__(self, respond: Callable[[str], Answer]) -> None:
        self.respond = respond
        self.queries: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._port}"

    def _answer(self, head: bytes) -> bytes:
        target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
        parts = urlsplit(target)
        if parts.path != "/api/v1/query":
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        query = parse_qs(parts.query).get("query", [""])[0]
        self.queries.append(query)
        answer = self.respond(query)
        return (f"HTTP/1.1 {answer.status} -\r\nContent-Type: {answer.content_type}\r\n"
                f"Content-Length: {len(answer.body)}\r\n\r\n").encode() + answer.body

    def start(self) -> Self:
        fake = self
        started = threading.Event()

        class Protocol(asyncio.Protocol):
            def __init__(self) -> None:
                self.buffer = b""
                self.transport: asyncio.Transport | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                self.buffer += data
                while b"\r\n\r\n" in self.buffer:
                    head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
                    assert self.transport is not None
                    self.transport.write(fake._answer(head))

        async def serve() -> None:
            self._server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", 0, backlog=512)
            self._port = self._server.sockets[0].getsockname()[1]
            started.set()
            await self._server.serve_forever()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            self._task = loop.create_task(serve())
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._task)
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-prometheus-loop", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the fake Prometheus did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
