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
from collections.abc import Callable
from typing import Self
from urllib.parse import parse_qs, urlsplit

from tests.rig.canned_http import Answer, CannedHttpServer

SAMPLE_TIME = 1767225600.5  # the timestamp of every sample vector_body() writes


def vector_body(*values: str) -> bytes:
    """A successful instant-query answer: a vector with one label-less sample per value."""
    result = [{"metric": {}, "value": [SAMPLE_TIME, value]} for value in values]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()


class FakePrometheus(CannedHttpServer):
    """Serves on a kernel-picked port of 127.0.0.1 from :meth:`start` (or ``with``) to :meth:`stop`."""

    name = "fake-prometheus"

    def __init__(self, default: Answer | None = None, respond: Callable[[str], Answer] | None = None) -> None:
        super().__init__()
        self.answers: dict[str, Answer] = {}
        self.default = default if default is not None else Answer(body=vector_body())
        self.respond = respond if respond is not None else self.stored_answer
        self.queries: list[str] = []
        self.ranges: list[dict[str, str]] = []  # parameters of every query_range asked

    def stored_answer(self, query: str) -> Answer:
        return self.answers.get(query, self.default)

    def answer_for(self, path: str) -> Answer | None:
        parts = urlsplit(path)
        if parts.path not in ("/api/v1/query", "/api/v1/query_range"):
            return None
        params = parse_qs(parts.query)
        query = params.get("query", [""])[0]
        self.queries.append(query)
        if parts.path.endswith("_range"):
            self.ranges.append({name: values[0] for name, values in params.items()})
        return self.respond(query)


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
