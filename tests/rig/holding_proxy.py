"""A fake ADS proxy that subscribes like Envoy but withholds one ACK: the route that drops a cluster.

``HoldingProxy(xds_port, hold_until_route_drops="shop_v1", route="route-127.0.0.1-10000")`` runs
tests/rig/ads_client.AdsClient on its own asyncio loop thread. It subscribes to wildcard CDS, to
EDS for every cluster it is sent and to RDS for ``route``; it ACKs every CDS and EDS response and
every RDS response whose route configuration still names the held cluster. The first route that
no longer names it is never ACKed (nor any later one), so a control plane doing make-before-break
keeps that cluster published while this proxy is connected.

When its stream ends (the control plane died) it reconnects every ``retry_interval`` seconds, as
a proxy would, and keeps holding. Everything a test reads is guarded by one lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2

from aviary.discovery import typeurls
from tests.rig.ads_client import AdsClient


def route_clusters(response: discovery_pb2.DiscoveryResponse) -> set[str]:
    """Every cluster the RouteConfigurations in an RDS response send traffic to."""
    names: set[str] = set()
    for resource in response.resources:
        config = route_pb2.RouteConfiguration.FromString(resource.value)
        for vhost in config.virtual_hosts:
            for route in vhost.routes:
                action = route.route
                if action.cluster:
                    names.add(action.cluster)
                names.update(c.name for c in action.weighted_clusters.clusters)
    return names


@dataclass
class HoldingStats:
    sessions: int = 0  # streams opened that got at least one response
    acks: dict[str, int] = field(default_factory=dict)  # short type name -> ACKs sent
    held_routes: int = 0  # RDS responses received and not ACKed
    held_at: float | None = None  # time.time() of the first one
    last_route_clusters: set[str] = field(default_factory=set)
    last_error: str | None = None


class HoldingProxy:
    def __init__(
        self,
        xds_port: int,
        hold_until_route_drops: str,
        route: str,
        node_id: str = "fake-proxy",
        node_cluster: str = "edge",
        retry_interval: float = 0.2,
    ) -> None:
        self.xds_port = xds_port
        self.held_cluster = hold_until_route_drops
        self.route = route
        self.node_id = node_id
        self.node_cluster = node_cluster
        self.retry_interval = retry_interval
        self._lock = threading.Lock()
        self._stats = HoldingStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: AdsClient | None = None  # the current session's stream

    # ---- reads (any thread) -----------------------------------------------------------------
    def stats(self) -> HoldingStats:
        with self._lock:
            s = self._stats
            return HoldingStats(
                s.sessions, dict(s.acks), s.held_routes, s.held_at, set(s.last_route_clusters), s.last_error
            )

    def holding(self) -> bool:
        """A route without the held cluster has arrived and was not ACKed."""
        return self.stats().held_routes > 0

    def describe(self) -> str:
        return f"holding proxy {self.node_id} xds=127.0.0.1:{self.xds_port} holds {self.held_cluster}: {self.stats()}"

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> HoldingProxy:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=f"holding-proxy-{self.node_id}", daemon=True)
        self._thread.start()

        async def spawn() -> asyncio.Task[None]:
            return asyncio.create_task(self._run(), name=f"holding-proxy-{self.node_id}")

        self._task = asyncio.run_coroutine_threadsafe(spawn(), loop).result(10)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread, task = self._loop, self._thread, self._task
        self._loop = self._thread = self._task = None
        if loop is None or thread is None:
            return
        if task is not None:

            async def cancel() -> None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(cancel(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()

    def __enter__(self) -> HoldingProxy:
        return self.start() if self._loop is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the proxy ----------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # the stream died: reconnect, like a proxy would
                with self._lock:
                    self._stats.last_error = repr(exc)
            await asyncio.sleep(self.retry_interval)

    def _count_ack(self, type_url: str) -> None:
        with self._lock:
            short = typeurls.short_name(type_url)
            self._stats.acks[short] = self._stats.acks.get(short, 0) + 1

    async def _session(self) -> None:
        client = AdsClient(self.xds_port, self.node_id, self.node_cluster)
        self._client = client
        try:
            client.send(typeurls.CLUSTER)  # wildcard CDS, with the node
            eds_names: list[str] = []
            eds_nonce = eds_version = ""
            asked_route = False
            first = True
            while True:
                response = await client.receive(timeout=3600)
                if first:
                    first = False
                    with self._lock:
                        self._stats.sessions += 1
                if response.type_url == typeurls.CLUSTER:
                    names = sorted(cluster_pb2.Cluster.FromString(r.value).name for r in response.resources)
                    client.ack(response)
                    self._count_ack(response.type_url)
                    if names != eds_names:
                        eds_names = names
                        client.send(typeurls.ENDPOINT, eds_names, nonce=eds_nonce, version=eds_version)
                    if not asked_route:
                        asked_route = True
                        client.send(typeurls.ROUTE, [self.route])
                elif response.type_url == typeurls.ENDPOINT:
                    eds_nonce, eds_version = response.nonce, response.version_info
                    client.ack(response, eds_names)
                    self._count_ack(response.type_url)
                elif response.type_url == typeurls.ROUTE:
                    self._on_route(client, response)
        finally:
            self._client = None
            with contextlib.suppress(BaseException):
                await client.close()

    def _hold(self, response: discovery_pb2.DiscoveryResponse, clusters: set[str]) -> bool:
        """Whether to withhold the ACK of this route response (here: once it no longer names the held
        cluster, and from then on); subclasses decide otherwise."""
        return self._stats.held_routes > 0 or self.held_cluster not in clusters

    def _on_route(self, client: AdsClient, response: discovery_pb2.DiscoveryResponse) -> None:
        clusters = route_clusters(response)
        with self._lock:
            self._stats.last_route_clusters = clusters
            held = self._hold(response, clusters)
            if held:
                self._stats.held_routes += 1
                if self._stats.held_at is None:
                    self._stats.held_at = time.time()
        if held:
            self._held_response(response)
        else:
            client.ack(response, [self.route])
            self._count_ack(response.type_url)

    def _held_response(self, response: discovery_pb2.DiscoveryResponse) -> None:
        """A response whose ACK is withheld (kept by subclasses that release it later)."""
