"""A tiny local JSON service (127.0.0.1, kernel-picked port) for the ``web`` metric provider.

Pages are set by path (with query string) while it runs; unknown paths get 404. Every path asked is
recorded in ``asked``. Started by ``with JsonServer() as server`` and stopped (thread joined) at exit.
"""

from __future__ import annotations

import json
from typing import Any

from tests.rig.canned_http import Answer, CannedHttpServer

Page = Answer  # what a path answers (JSON unless said otherwise)


class JsonServer(CannedHttpServer):
    name = "json-server"

    def __init__(self) -> None:
        super().__init__()
        self.pages: dict[str, Page] = {}
        self.asked: list[str] = []

    def answer_for(self, path: str) -> Answer:
        self.asked.append(path)
        return self.pages.get(path, Page(status=404, body=b"no such page", content_type="text/plain"))

    def json(self, path: str, document: Any, **kwargs: Any) -> None:
        """Answer ``path`` with ``document`` as JSON (``status``, ``delay`` as for Page)."""
        self.pages[path] = Page(body=json.dumps(document).encode(), **kwargs)
