"""A tiny HTTP server on 127.0.0.1 (kernel-picked port) that answers what a test put in it.

`CannedHttpServer` runs the server thread and writes an `Answer`; a subclass says which answer a
GET gets (`answer_for`): `FakePrometheus` by query, `JsonServer` by path. Started by ``with`` (or
`start`) and stopped, thread joined, at exit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    delay: float = 0.0  # seconds to wait before answering
    content_type: str = "application/json"


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops connections when many requests arrive at once
    daemon_threads = True
    block_on_close = False


class CannedHttpServer:
    name = "canned-http"

    def __init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def answer_for(self, path: str) -> Answer | None:
        """The answer to ``GET path`` (with its query string); None: 404."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Self:
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                answer = canned.answer_for(self.path)
                if answer is None:
                    self.send_error(404)
                    return
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

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name=self.name, daemon=True)  # fmt: skip
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
