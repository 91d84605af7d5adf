"""Who is connected and what each proxy has ACKed or NACKed, folded from stream events.

Read by the traffic director (make-before-break and ACK-gating) and by the admin API. It is fed
only through `apply(event)`, so it does not care where the streams run.

Proxies are also kept in classes of equals (`ProxyClass`): those of the same node cluster that
subscribe to the same names and ACKed the same responses of every type. The gates
(`make_before_break.holds_up`) read nothing else of a proxy, so they answer alike for every member
of a class, and the director asks them once per class instead of once per proxy: a thousand
proxies that ACKed the same route are one question, not a thousand. Subscriptions and ACKed
responses are shared values (`sharing`), so a class is keyed by their identity, and a proxy moves
between classes in O(1) per event.

A proxy is one view however it connects: an ADS stream carries every type, while an Envoy without
ADS opens one stream per type (ClusterDiscoveryService and the others; `ProxyConnected.type_url`
says which). Those per-type streams of one node (`node.id`) are merged into one view (`_Merged`):
the gates then see its clusters, endpoints, listeners and routes together, as for ADS, and a NACK
on its RDS stream is blamed with what its other streams ACKed. Envoy opens several streams of one
type (an EDS stream per cluster, an RDS stream per route configuration): the view holds, per type,
the union of their subscriptions and of their latest ACKs. Listeners get the events of a merged
stream under the view's id (the id of the node's first per-type stream). A stream that ends takes
its part with it (a type no stream serves any more starts afresh, as on a new ADS stream), and
listeners are told the type's subscription changed; the view goes with the node's last stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from aviary.discovery.delta import versions_digest
from aviary.discovery.proxy_events import (
    ProxyConnected,
    ProxyDisconnected,
    ProxyEvent,
    ResourcesAcked,
    ResourcesNacked,
    SubscriptionChanged,
)
from aviary.discovery.sharing import Sent, shared_names, shared_sent


@dataclass(frozen=True, slots=True)
class Nack:
    type_url: str
    version: str
    message: str
    at: float


@dataclass(slots=True)
class Subscription:
    wildcard: bool = False
    names: frozenset[str] = frozenset()

    def covers(self, name: str, wildcard_resource: bool = True) -> bool:
        return (self.wildcard and wildcard_resource) or name in self.names


@dataclass(slots=True)
class ProxyView:
    """One connected stream of one proxy (node)."""

    stream_id: int
    node_id: str
    node_cluster: str
    peer: str
    connected_at: float
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    acked_versions: dict[str, str] = field(default_factory=dict)
    acked: dict[str, Mapping[str, str]] = field(default_factory=dict)
    last_nack: Nack | None = None
    nacks: int = 0

    def subscription(self, type_url: str) -> Subscription:
        return self.subscriptions.get(type_url) or Subscription()

    def acked_version_of(self, type_url: str, name: str) -> str | None:
        return self.acked.get(type_url, MappingProxyType({})).get(name)


Listener = Callable[[ProxyEvent], None]
ClassKey = tuple[Any, ...]
_MOVES_KEPT = 64  # per class: the moves remembered (one per response its members ACKed since)


def class_key(proxy: ProxyView) -> ClassKey:
    """What the gates can tell apart of a proxy: its node cluster (its proxy group), and per type
    its subscription and the response it ACKed last, by identity (`sharing` makes equal ones one
    object; a proxy whose value is not shared simply gets a class of its own)."""
    return (
        proxy.node_cluster,
        tuple(sorted((t, s.wildcard, id(s.names)) for t, s in proxy.subscriptions.items())),
        tuple(sorted((t, id(acked)) for t, acked in proxy.acked.items())),
    )


@dataclass(eq=False, slots=True)
class ProxyClass:
    """Connected proxies that look the same to the gates (see the module docstring).

    Compared by identity: a class that emptied is dropped, and one made later for equal values is
    another object, so nothing keyed by a class (the director's verdicts) outlives the values it
    was computed from (the key holds `id()`s, valid while a member holds those objects).
    """

    key: ClassKey
    members: dict[int, ProxyView] = field(default_factory=dict)
    _sample: ProxyView | None = None
    # (type URL, id of the response ACKed) -> the class a member moved to with that ACK: the next
    # thousand members that ACK the same response move without building their key again
    acked_moves: dict[tuple[str, int], ProxyClass] = field(default_factory=dict)

    @property
    def sample(self) -> ProxyView:
        """Any one member: what the gates are asked about, for all of them."""
        if self._sample is None:
            self._sample = next(iter(self.members.values()))
        return self._sample

    def __len__(self) -> int:
        return len(self.members)


@dataclass(slots=True)
class _Merged:
    """The per-type streams of one node that make up one view (see the module docstring)."""

    node_id: str
    view_id: int
    streams: dict[int, str] = field(default_factory=dict)  # stream id -> the type it serves
    subscriptions: dict[int, Subscription] = field(default_factory=dict)  # by stream
    acked: dict[int, Mapping[str, str]] = field(default_factory=dict)  # by stream, its latest ACK

    def of_type(self, type_url: str) -> list[int]:
        return [stream for stream, served in self.streams.items() if served == type_url]

    def subscription(self, type_url: str) -> Subscription:
        """The union of the type's streams' subscriptions (Envoy opens an EDS stream per cluster)."""
        streams = [self.subscriptions[s] for s in self.of_type(type_url) if s in self.subscriptions]
        return Subscription(any(s.wildcard for s in streams), frozenset().union(*(s.names for s in streams)))

    def holds(self, type_url: str) -> Sent | None:
        """What the type's streams ACKed, together (None before any ACK)."""
        acked = [self.acked[s] for s in self.of_type(type_url) if s in self.acked]
        if not acked:
            return None
        together: dict[str, str] = {}
        for mapping in acked:
            together.update(mapping)
        return shared_sent(type_url, versions_digest(together), together)


class ProxyStatus:
    def __init__(self) -> None:
        self._proxies: dict[int, ProxyView] = {}
        self._merged: dict[str, _Merged] = {}  # node id -> its per-type streams
        self._merged_of: dict[int, _Merged] = {}  # per-type stream id -> the same
        self._classes: dict[ClassKey, ProxyClass] = {}
        self._class_of: dict[int, ProxyClass] = {}
        self._last_acked: dict[str, tuple[Mapping[str, str], str, Sent]] = {}  # type URL -> see `_shared_acked`
        self._listeners: list[Listener] = []
        self.push_ack_latencies: list[float] = []  # seconds, most recent last, bounded

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` after every applied event (on the event loop, must not block)."""
        self._listeners.append(listener)

    def apply(self, event: ProxyEvent) -> None:
        if self._merged_of or (isinstance(event, ProxyConnected) and event.type_url):
            merged = self._merge(event)
            if merged is None:
                return
            event = merged
        match event:  # the most frequent first
            case ResourcesAcked():
                if proxy := self._proxies.get(event.stream_id):
                    # Shared with every proxy that ACKed the same (`sharing`); read-only either way.
                    acked = self._shared_acked(event)
                    proxy.acked[event.type_url] = acked
                    proxy.acked_versions[event.type_url] = event.version
                    self._record_latency(event.at - event.sent_at)
                    self._move_on_ack(proxy, event.type_url, acked)
            case ProxyConnected():
                self._leave_class(event.stream_id)  # the same stream id twice: the second wins
                connected = ProxyView(event.stream_id, event.node_id, event.node_cluster, event.peer, event.at)
                self._proxies[event.stream_id] = connected
                self._join_class(connected)
            case ProxyDisconnected():
                self._proxies.pop(event.stream_id, None)
                self._leave_class(event.stream_id)
            case SubscriptionChanged():
                if proxy := self._proxies.get(event.stream_id):
                    # Names from a worker arrive as a new frozenset per event: shared here, for the classes.
                    names = shared_names(event.names)
                    proxy.subscriptions[event.type_url] = Subscription(event.wildcard, names)
                    self._join_class(proxy)
            case ResourcesNacked():
                if proxy := self._proxies.get(event.stream_id):
                    proxy.last_nack = Nack(event.type_url, event.version, event.message, event.at)
                    proxy.nacks += 1
        for listener in self._listeners:
            listener(event)

    def _merge(self, event: ProxyEvent) -> ProxyEvent | None:
        """The event as it applies to the merged view of a per-type stream (None: already applied)."""
        if isinstance(event, ProxyConnected):
            if not event.type_url:
                return event
            merged = self._merged.get(event.node_id)
            first = merged is None or merged.view_id not in self._proxies
            if merged is None or first:
                merged = self._merged[event.node_id] = _Merged(event.node_id, event.stream_id)
            merged.streams[event.stream_id] = event.type_url
            self._merged_of[event.stream_id] = merged
            if first:
                return event  # the node's first per-type stream: its view is made as for ADS
            for listener in self._listeners:
                listener(event)
            return None
        merged = self._merged_of.get(event.stream_id)
        if merged is None:
            return event
        view = merged.view_id
        if isinstance(event, ProxyDisconnected):
            del self._merged_of[event.stream_id]
            type_url = merged.streams.pop(event.stream_id)
            merged.subscriptions.pop(event.stream_id, None)
            merged.acked.pop(event.stream_id, None)
            if not merged.streams:
                del self._merged[merged.node_id]
                return replace(event, stream_id=view)
            return self._merged_type_changed(merged, type_url)
        if isinstance(event, SubscriptionChanged):
            merged.subscriptions[event.stream_id] = Subscription(event.wildcard, event.names)
            together = merged.subscription(event.type_url)
            return SubscriptionChanged(view, event.type_url, together.wildcard, together.names)
        if isinstance(event, ResourcesAcked):
            merged.acked[event.stream_id] = event.resources
            if len(merged.of_type(event.type_url)) > 1:
                held = merged.holds(event.type_url)
                assert held is not None
                return replace(event, stream_id=view, version=held.version, resources=held)
        return event if event.stream_id == view else replace(event, stream_id=view)

    def _merged_type_changed(self, merged: _Merged, type_url: str) -> SubscriptionChanged | None:
        """One of the view's streams of `type_url` ended: the view holds what the others hold (a type
        none serves any more starts afresh, as on a new ADS stream), told to listeners as a change
        of the type's subscription."""
        proxy = self._proxies.get(merged.view_id)
        if proxy is None:
            return None
        held = merged.holds(type_url)
        if held is None:
            proxy.acked.pop(type_url, None)
            proxy.acked_versions.pop(type_url, None)
        else:
            proxy.acked[type_url], proxy.acked_versions[type_url] = held, held.version
        if not merged.of_type(type_url):
            proxy.subscriptions.pop(type_url, None)
            self._join_class(proxy)
            for listener in self._listeners:
                listener(SubscriptionChanged(merged.view_id, type_url, False, frozenset()))
            return None
        together = merged.subscription(type_url)
        return SubscriptionChanged(merged.view_id, type_url, together.wildcard, together.names)

    def _shared_acked(self, event: ResourcesAcked) -> Sent:
        """`shared_sent` of what the ACK carries; the last one per type is remembered by identity
        (the ACKs of one response from a worker's frame carry one dict, from a stream its `Sent`)."""
        last = self._last_acked.get(event.type_url)
        if last is not None and last[0] is event.resources and last[1] == event.version:
            return last[2]
        acked = shared_sent(event.type_url, event.version, event.resources)
        self._last_acked[event.type_url] = (event.resources, event.version, acked)
        return acked

    def _move_on_ack(self, proxy: ProxyView, type_url: str, acked: Sent) -> None:
        """`_join_class` after an ACK, through the move the class's last member with that ACK made
        (if that class still lives: a class made later for the same key is another object)."""
        current = self._class_of.get(proxy.stream_id)
        if current is None:
            self._join_class(proxy)
            return
        move = (type_url, id(acked))  # `acked` is held by this proxy, so its id names it
        target = current.acked_moves.get(move)
        if target is None or self._classes.get(target.key) is not target:
            self._join_class(proxy)
            if len(current.acked_moves) >= _MOVES_KEPT:
                current.acked_moves.clear()
            current.acked_moves[move] = self._class_of[proxy.stream_id]
            return
        if target is not current:
            self._leave_class(proxy.stream_id)
            target.members[proxy.stream_id] = proxy
            self._class_of[proxy.stream_id] = target

    def _join_class(self, proxy: ProxyView) -> None:
        """Move the proxy to the class of its current state (a new one if none has it)."""
        key = class_key(proxy)
        current = self._class_of.get(proxy.stream_id)
        if current is not None and current.key == key:
            return
        self._leave_class(proxy.stream_id)
        joined = self._classes.get(key)
        if joined is None:
            joined = self._classes[key] = ProxyClass(key)
        joined.members[proxy.stream_id] = proxy
        self._class_of[proxy.stream_id] = joined

    def _leave_class(self, stream_id: int) -> None:
        left = self._class_of.pop(stream_id, None)
        if left is None:
            return
        gone = left.members.pop(stream_id)
        if left._sample is gone:
            left._sample = None
        if not left.members:
            del self._classes[left.key]

    def classes(self) -> list[ProxyClass]:
        """Connected proxies by class of equals (see the module docstring), none empty."""
        return list(self._classes.values())

    def class_of(self, stream_id: int) -> ProxyClass | None:
        return self._class_of.get(stream_id)

    def _record_latency(self, seconds: float) -> None:
        self.push_ack_latencies.append(seconds)
        if len(self.push_ack_latencies) > 10_000:
            del self.push_ack_latencies[:5_000]

    def __iter__(self) -> Iterator[ProxyView]:
        return iter(list(self._proxies.values()))

    def __len__(self) -> int:
        return len(self._proxies)

    def get(self, stream_id: int) -> ProxyView | None:
        return self._proxies.get(stream_id)

