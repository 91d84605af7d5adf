"""A tiny local JSON service (127.0.0.1, kernel-picked port) for the ``web`` metric provider.

Pages are set by path (with query string) while it runs; unknown paths get 404. Every path asked is
recorded in ``asked``. Started by ``with JsonServer() as server`` and stopped (thread joined) at exit.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass
class Page:
    status: int = 200
    body: bytes = b"{}"
    delay: float = 0.0  # seconds before answering
    content_type: str = "application/json"


@dataclass
class JsonServer:
    pages: dict[str, Page] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def json(self, path: str, document: Any, **kwargs: Any) -> None:
        """Answer ``path`` with ``document`` as JSON (``status``, ``delay`` as for Page)."""
        self.pages[path] = Page(body=json.dumps(document).encode(), **kwargs)

    def start(self) -> Self:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.asked.append(self.path)
                page = fake.pages.get(self.path, Page(status=404, body=b"no such page", content_type="text/plain"))
                time.sleep(page.delay)
                try:
                    self.send_response(page.status)
                    self.send_header("Content-Type", page.content_type)
                    self.send_header("Content-Length", str(len(page.body)))
                    self.end_headers()
                    self.wfile.write(page.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="json-server", daemon=True)
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
