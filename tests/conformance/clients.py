"""One client interface over both ADS protocols, so each protocol rule is one test run against both.

`XdsClient` speaks State-of-the-World (`SotwClient`, over tests/rig/ads_client.py) or incremental
(`DeltaClient`, over tests/rig/delta_client.py) and turns what arrives into `Update` values with
per-resource versions: for SotW the digest of each resource's bytes, which is what Aviary sends as
a delta resource's version (`snapshot.Resource.version`), so both protocols read the same. Each
client also keeps what it holds per type, as the protocol says a client must (SotW LDS/CDS: the
response replaces everything; SotW RDS/EDS: named resources are added or replaced; delta: added,
replaced, and removed by `removed_resources`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from aviary.discovery import typeurls
from aviary.discovery.server import PER_TYPE_SERVICES
from aviary.discovery.snapshot import digest
from tests.rig.ads_client import AdsClient
from tests.rig.delta_client import DeltaAdsClient

SOTW, DELTA = "sotw", "delta"
PROTOCOLS = (SOTW, DELTA)
_WHOLE_STATE = frozenset({typeurls.LISTENER, typeurls.CLUSTER})  # SotW: a response is the whole type


@dataclass(frozen=True)
class Update:
    type_url: str
    nonce: str
    version: str  # SotW version_info; delta system_version_info (informative only)
    resources: dict[str, str]  # name -> per-resource version, in the order received
    removed: tuple[str, ...] = ()
    raw: object = None

    @property
    def names(self) -> list[str]:
        return list(self.resources)


@dataclass
class XdsClient:
    protocol: str
    held: dict[str, dict[str, str]] = field(default_factory=dict)  # type -> name -> version

    def _hold(self, update: Update) -> Update:
        held = self.held.setdefault(update.type_url, {})
        if self.protocol == SOTW and update.type_url in _WHOLE_STATE:
            held.clear()
        held.update(update.resources)
        for name in update.removed:
            held.pop(name, None)
        return update


def per_type_method(type_url: str, delta: bool) -> str:
    """The gRPC method of the per-type discovery service of `type_url` (e.g. ClusterDiscoveryService/StreamClusters)."""
    ((service, (sotw, incremental, _)),) = [(s, m) for s, m in PER_TYPE_SERVICES.items() if m[2] == type_url]
    return f"/{service}/{incremental if delta else sotw}"


class SotwClient(XdsClient):
    def __init__(self, port: int, node_id: str, node_cluster: str = "edge", only: str | None = None) -> None:
        super().__init__(SOTW)
        self.port, self.node_id, self.node_cluster = port, node_id, node_cluster
        self.wire = (
            AdsClient(port, node_id, node_cluster)
            if only is None
            else AdsClient(port, node_id, node_cluster, per_type_method(only, delta=False))
        )
        self.names: dict[str, list[str]] = {}  # type -> what the last request named (SotW repeats it all)
        self.last: dict[str, discovery_pb2.DiscoveryResponse] = {}
        self.acked_version: dict[str, str] = {}

    def _send(self, type_url: str, nonce: str | None = None, error: str | None = None) -> None:
        last = self.last.get(type_url)
        nonce = nonce if nonce is not None else (last.nonce if last is not None else "")
        version = self.acked_version.get(type_url, "")
        self.wire.send(type_url, self.names.get(type_url, []), nonce=nonce, version=version, error=error)

    def start(self, type_url: str, names: Iterable[str] = ()) -> None:
        """The first request of a type: no names is the (legacy) wildcard for LDS and CDS."""
        self.names[type_url] = list(names)
        self._send(type_url)

    def subscribe(self, type_url: str, names: Iterable[str]) -> None:
        current = self.names.get(type_url, [])
        self.names[type_url] = [*current, *(n for n in names if n not in current)]
        self._send(type_url)

    def unsubscribe(self, type_url: str, names: Iterable[str]) -> None:
        gone = set(names)
        self.names[type_url] = [n for n in self.names.get(type_url, []) if n not in gone]
        self._send(type_url)

    def ack(self, update: Update) -> None:
        self.acked_version[update.type_url] = update.version
        self._send(update.type_url, nonce=update.nonce)

    def nack(self, update: Update, message: str) -> None:
        self._send(update.type_url, nonce=update.nonce, error=message)

    async def receive(self, timeout: float = 5.0) -> Update:
        response = await self.wire.receive(timeout)
        self.last[response.type_url] = response
        resources = {_name(r.type_url, r.value): digest(r.value) for r in response.resources}
        return self._hold(Update(response.type_url, response.nonce, response.version_info, resources, (), response))

    def reconnected(self) -> SotwClient:
        """A new stream that asks for what this one subscribed to, with the versions it ACKed."""
        again = SotwClient(self.port, self.node_id, self.node_cluster)
        for type_url, names in self.names.items():
            again.names[type_url] = list(names)
            again.acked_version[type_url] = self.acked_version.get(type_url, "")
            again.wire.send(type_url, names, version=self.acked_version.get(type_url, ""))
        return again

    async def close(self) -> None:
        await self.wire.close()


class DeltaClient(XdsClient):
    def __init__(self, port: int, node_id: str, node_cluster: str = "edge", only: str | None = None) -> None:
        super().__init__(DELTA)
        self.port, self.node_id, self.node_cluster = port, node_id, node_cluster
        self.wire = (
            DeltaAdsClient(port, node_id, node_cluster)
            if only is None
            else DeltaAdsClient(port, node_id, node_cluster, per_type_method(only, delta=True))
        )
        self.names: dict[str, set[str]] = {}

    def start(self, type_url: str, names: Iterable[str] = ()) -> None:
        self.names[type_url] = set(names)
        self.wire.send(type_url, subscribe=sorted(self.names[type_url]))

    def subscribe(self, type_url: str, names: Iterable[str]) -> None:
        self.names.setdefault(type_url, set()).update(names)
        self.wire.send(type_url, subscribe=list(names))

    def unsubscribe(self, type_url: str, names: Iterable[str]) -> None:
        self.names.setdefault(type_url, set()).difference_update(names)
        self.wire.send(type_url, unsubscribe=list(names))

    def ack(self, update: Update) -> None:
        self.wire.send(update.type_url, nonce=update.nonce)

    def nack(self, update: Update, message: str) -> None:
        self.wire.send(update.type_url, nonce=update.nonce, error=message)

    async def receive(self, timeout: float = 5.0) -> Update:
        response = await self.wire.receive(timeout)
        resources = {r.name: r.version for r in response.resources}
        for r in response.resources:  # the wrapper's version is the digest of the bytes it wraps
            assert r.version == digest(r.resource.value), r.name
            assert _name(r.resource.type_url, r.resource.value) == r.name
        return self._hold(
            Update(
                response.type_url,
                response.nonce,
                response.system_version_info,
                resources,
                tuple(response.removed_resources),
                response,
            )
        )

    def reconnected(self, initial: Mapping[str, Mapping[str, str]] | None = None) -> DeltaClient:
        """A new stream that subscribes to the same names and says what it holds (initial_resource_versions)."""
        again = DeltaClient(self.port, self.node_id, self.node_cluster)
        held = self.held if initial is None else initial
        for type_url, names in self.names.items():
            again.names[type_url] = set(names)
            again.held[type_url] = dict(held.get(type_url, {}))
            again.wire.send(type_url, subscribe=sorted(names), initial=held.get(type_url, {}))
        return again

    async def close(self) -> None:
        await self.wire.close()


def _name(type_url: str, value: bytes) -> str:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2

    if type_url == typeurls.ENDPOINT:
        return str(endpoint_pb2.ClusterLoadAssignment.FromString(value).cluster_name)
    kind = {typeurls.LISTENER: listener_pb2.Listener, typeurls.ROUTE: route_pb2.RouteConfiguration,
            typeurls.CLUSTER: cluster_pb2.Cluster}[type_url]
    return str(kind.FromString(value).name)


def new_client(
    protocol: str, port: int, node_id: str, node_cluster: str = "edge", only: str | None = None
) -> SotwClient | DeltaClient:
    """An ADS client, or with `only` a client of that type's own discovery service (CDS, EDS, LDS, RDS)."""
    if protocol == SOTW:
        return SotwClient(port, node_id, node_cluster, only)
    return DeltaClient(port, node_id, node_cluster, only)
