"""An in-process Aviary control plane that keeps running while a sync test blocks on rig calls.

``aviary.app.ControlPlane`` runs on its own asyncio loop in a background thread, so a test can
sit in ``send_requests()`` or poll Envoy's admin API while the plane answers Envoy's ADS stream.
Everything the test does to the plane goes through :meth:`RunningControlPlane.call`, which runs
on the plane's loop.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import yaml

from aviary.app import ControlPlane, ServeConfig

T = TypeVar("T")

# A hook runs between load() and serve(); it may be a plain function or a coroutine function.
Hook = Callable[[ControlPlane], Any]


class RunningControlPlane:
    """``cp = RunningControlPlane(policies_dir).start(); cp.call(lambda p: p.director...)``."""

    def __init__(self, policies_dir: Path, xds_port: int = 0, poll_interval: float = 0.2) -> None:
        self.policies_dir = Path(policies_dir)
        self.xds_port = xds_port
        self.poll_interval = poll_interval
        self.plane: ControlPlane | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- the loop thread -------------------------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is not None:
            return self._loop
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            # Whatever is left (e.g. grpc internals) gets a chance to finish before the loop closes.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        thread = threading.Thread(target=run, name="aviary-control-plane", daemon=True)
        thread.start()
        if not ready.wait(10):
            raise RuntimeError("control plane loop thread did not start")
        self._loop, self._thread = loop, thread
        return loop

    def _run(self, coro_fn: Callable[[], Any], timeout: float) -> Any:
        loop = self._ensure_loop()
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro_fn(), loop)
        return future.result(timeout)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, hook: Hook | None = None, timeout: float = 15.0) -> RunningControlPlane:
        """A new ControlPlane: ``load()``, then ``hook(plane)``, then ``serve()`` on ``xds_port``."""
        if self.plane is not None:
            raise RuntimeError("control plane already running")

        async def boot() -> ControlPlane:
            config = ServeConfig(
                self.policies_dir, xds_address=f"127.0.0.1:{self.xds_port}", poll_interval=self.poll_interval
            )
            plane = ControlPlane(config)
            await plane.load()
            if hook is not None:
                result = hook(plane)
                if inspect.isawaitable(result):
                    await result
            await plane.serve()
            return plane

        self.plane = self._run(boot, timeout)
        self.xds_port = self.plane.xds_port  # a restart binds the same port
        return self

    def stop_plane(self, grace: float = 0.5, timeout: float = 15.0) -> None:
        """Stop the ControlPlane (its server and watcher) but keep the loop thread for a restart."""
        plane, self.plane = self.plane, None
        if plane is not None and self._loop is not None:

            async def down() -> None:
                await plane.stop(grace)

            self._run(down, timeout)

    def restart(self, hook: Hook | None = None, grace: float = 0.5) -> RunningControlPlane:
        """Stop, then a new ControlPlane on the same port; ``hook`` runs between load() and serve()."""
        self.stop_plane(grace)
        return self.start(hook)

    def stop(self, grace: float = 0.5) -> None:
        """Stop the plane and the loop thread. Idempotent."""
        try:
            self.stop_plane(grace)
        finally:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            if loop is not None and thread is not None:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(15)
                if thread.is_alive():
                    raise RuntimeError("control plane loop thread did not stop")

    # ---- talking to it ---------------------------------------------------------------------
    def call(self, fn: Callable[[ControlPlane], T], timeout: float = 10.0) -> T:
        """Run ``fn(plane)`` on the plane's loop and return its result (awaited if awaitable)."""
        plane = self.plane
        if plane is None:
            raise RuntimeError("control plane not running")

        async def invoke() -> Any:
            result = fn(plane)
            if inspect.isawaitable(result):
                result = await result
            return result

        value: T = self._run(invoke, timeout)
        return value

    def proxy_nodes(self) -> list[str]:
        """node ids of the connected streams."""
        return self.call(lambda p: sorted(proxy.node_id for proxy in p.proxies))

    def describe(self) -> str:
        state = "running" if self.plane is not None else "stopped"
        return f"aviary control plane ({state}) xds=127.0.0.1:{self.xds_port} policies={self.policies_dir}"

    def __enter__(self) -> RunningControlPlane:
        if self.plane is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_policy(
    directory: Path,
    name: str,
    *,
    port: int,
    version: str,
    endpoints: list[str],
    hosts: tuple[str, ...] = ("*",),
    address: str = "127.0.0.1",
    file_name: str | None = None,
    strategy: dict[str, Any] | None = None,
    analysis: dict[str, Any] | None = None,
    proxy_cluster: str | None = None,
) -> Path:
    """Write ``<directory>/<name>.yaml``: one Rollout in the schema of policies/checkout.yaml, with
    ``strategy``, ``analysis`` and ``proxyCluster`` when given.

    Written to a temporary name and renamed, so the watcher never reads half a file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {
        "listener": {"address": address, "port": port},
        "hosts": list(hosts),
        "version": version,
        "endpoints": list(endpoints),
    }
    if strategy is not None:
        spec["strategy"] = strategy
    if analysis is not None:
        spec["analysis"] = analysis
    if proxy_cluster is not None:
        spec["proxyCluster"] = proxy_cluster
    doc = {"apiVersion": "aviary.dev/v1", "kind": "Rollout", "metadata": {"name": name}, "spec": spec}
    path = directory / (file_name or f"{name}.yaml")
    tmp = directory / f".{path.name}.tmp"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)
    return path
