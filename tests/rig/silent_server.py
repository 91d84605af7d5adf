"""A TCP server on 127.0.0.1 that accepts connections and never answers: a hung Prometheus.

Unlike a closed port (refused at once) or a slow ``FakePrometheus`` answer (a sleeping handler
thread per request), it reads and drops what the client sends and holds every connection open
without a byte of answer, until the client gives up or :meth:`stop`. ``accepted`` counts the
connections made, ``open`` those the client has not closed yet (what abandoned queries pile up).
"""

from __future__ import annotations

import selectors
import socket
import threading
from typing import Self


class SilentServer:
    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="silent-server", daemon=True)
        self.accepted = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    @property
    def open(self) -> int:
        with self._lock:
            return len(self._connections)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.05):
                if key.fileobj is self._listener:
                    try:
                        connection, _ = self._listener.accept()
                    except BlockingIOError:
                        continue
                    with self._lock:
                        self._connections.add(connection)
                        self.accepted += 1
                    # Watched only to notice the client closing it; what it sends is read and dropped.
                    self._selector.register(connection, selectors.EVENT_READ)
                else:
                    client = key.fileobj
                    assert isinstance(client, socket.socket)
                    try:
                        closed = client.recv(65536) == b""
                    except OSError:
                        closed = True
                    if closed:
                        self._drop(client)

    def _drop(self, connection: socket.socket) -> None:
        self._selector.unregister(connection)
        connection.close()
        with self._lock:
            self._connections.discard(connection)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._selector.close()
        self._listener.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
