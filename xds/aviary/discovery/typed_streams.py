"""What a State-of-the-World and a delta stream share, whatever their wire rules.

Both hold one state per resource type and answer in `typeurls.PUSH_ORDER`: a snapshot change goes
out clusters first, routes last; a request's own response never overtakes a change of a type that
comes before it; and a route held back for its clusters (`warm_routes`) goes once their ACKs arrive.
`SotwStream` (`sotw`) and `DeltaStream` (`delta`) add how a type's response is built (`_respond`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.config_sources import for_per_type
from aviary.discovery.proxy_events import ProxyEvent
from aviary.discovery.sharing import Sent
from aviary.discovery.snapshot import Snapshot
from aviary.discovery.warm_routes import AckSource, NodeStreams, route_may_go

__all__ = ["TypedStream", "ack_source"]


class _TypeState(Protocol):
    wildcard: bool
    names: frozenset[str]
    acked: Sent | None  # what the latest ACK says the proxy holds (warm_routes reads it)
    held: bool  # a response is due but waits (a route for its clusters' ACKs: warm_routes)


StateT = TypeVar("StateT", bound=_TypeState)


class _PerTypeStream(AckSource, Protocol):
    node_id: str | None
    only_type: str | None
    siblings: NodeStreams | None


def ack_source(stream: _PerTypeStream, type_url: str) -> AckSource | None:
    """Where `stream` reads the proxy's ACKs of `type_url` (`warm_routes`): itself on ADS, the
    node's stream of that type in this process on a per-type service (None if there is none)."""
    if stream.only_type is None:
        return stream
    if stream.siblings is None or stream.node_id is None:
        return None
    return stream.siblings.get(stream.node_id, type_url)


@dataclass(slots=True)
class TypedStream(Generic[StateT]):
    stream_id: int
    peer: str
    cache: SnapshotCache
    emit: Callable[[ProxyEvent], None]
    node_id: str | None = None
    node_cluster: str = ""
    _types: dict[str, StateT] = field(default_factory=dict)
    _nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    warned_types: set[str] = field(default_factory=set)
    only_type: str | None = None  # a per-type discovery service's stream: serves this type only
    siblings: NodeStreams | None = None  # this process's per-type streams, for a per-type stream's route hold
    xds_cluster: str | None = None  # set (check_node) on a per-type LDS or CDS stream: see `config_sources`

    DELTA: ClassVar[bool] = False  # which rendering a per-type stream's config sources name

    def _respond(self, type_url: str, state: StateT, force: bool) -> bytes | None:
        raise NotImplementedError

    def _snapshot(self) -> Snapshot:
        snapshot = self.cache.snapshot_for(self.node_cluster)
        return snapshot if self.xds_cluster is None else for_per_type(snapshot, self.DELTA, self.xds_cluster)

    def on_snapshot_changed(self) -> list[bytes]:
        responses = []
        for type_url in typeurls.PUSH_ORDER:
            state = self._types.get(type_url)
            if state is not None and (response := self._respond(type_url, state, force=False)):
                responses.append(response)
        return responses

    def subscription_of(self, type_url: str) -> tuple[bool, frozenset[str]] | None:
        state = self._types.get(type_url)
        return (state.wildcard, state.names) if state is not None else None

    def acked_of(self, type_url: str) -> Mapping[str, str] | None:
        state = self._types.get(type_url)
        return state.acked if state is not None else None

    def _ordered(self, type_url: str, state: StateT, force: bool, acked: bool) -> list[bytes]:
        """The responses a request of `type_url` calls for, in push order.

        A snapshot change this stream has not pushed yet (its wake-up may be queued behind this
        request) goes out for the types before this one first: a response never overtakes a change
        of a type that comes before it in PUSH_ORDER (clusters before the routes that name them).
        After an ACK of clusters or endpoints, a route held for them may go: on this stream (ADS),
        or on the node's RDS stream, woken to look again (per-type services).
        """
        responses = []
        for earlier in typeurls.PUSH_ORDER[: typeurls.PUSH_ORDER.index(type_url)]:
            earlier_state = self._types.get(earlier)
            if earlier_state is not None and (response := self._respond(earlier, earlier_state, force=False)):
                responses.append(response)
        if response := self._respond(type_url, state, force):
            responses.append(response)
        if acked and type_url in (typeurls.CLUSTER, typeurls.ENDPOINT):
            routes = self._types.get(typeurls.ROUTE)
            if routes is not None and routes.held and (route := self._respond(typeurls.ROUTE, routes, force=False)):
                responses.append(route)
            elif self.only_type is not None and self.siblings is not None and self.node_id is not None:
                self.siblings.wake(self.node_id, typeurls.ROUTE)
        return responses

    def _clusters_acked(self, snapshot: Snapshot, routes: Sent) -> bool:
        return route_may_go(snapshot, routes, ack_source(self, typeurls.CLUSTER),
                            ack_source(self, typeurls.ENDPOINT))  # fmt: skip
