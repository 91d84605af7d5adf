"""Who is connected and what each proxy has ACKed or NACKed, folded from stream events.

Read by the traffic director (make-before-break and ACK-gating) and by the admin API. It is fed
only through `apply(event)`, so it does not care where the streams run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from aviary.discovery.proxy_events import (
    ProxyConnected,
    ProxyDisconnected,
    ProxyEvent,
    ResourcesAcked,
    ResourcesNacked,
    SubscriptionChanged,
)
from aviary.discovery.sharing import shared_sent


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


class ProxyStatus:
    def __init__(self) -> None:
        self._proxies: dict[int, ProxyView] = {}
        self._listeners: list[Listener] = []
        self.push_ack_latencies: list[float] = []  # seconds, most recent last, bounded

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` after every applied event (on the event loop, must not block)."""
        self._listeners.append(listener)

    def apply(self, event: ProxyEvent) -> None:
        match event:
            case ProxyConnected():
                self._proxies[event.stream_id] = ProxyView(
                    event.stream_id, event.node_id, event.node_cluster, event.peer, event.at
                )
            case ProxyDisconnected():
                self._proxies.pop(event.stream_id, None)
            case SubscriptionChanged():
                if proxy := self._proxies.get(event.stream_id):
                    proxy.subscriptions[event.type_url] = Subscription(event.wildcard, event.names)
            case ResourcesAcked():
                if proxy := self._proxies.get(event.stream_id):
                    # Shared with every proxy that ACKed the same (`sharing`); read-only either way.
                    proxy.acked[event.type_url] = shared_sent(event.type_url, event.version, event.resources)
                    proxy.acked_versions[event.type_url] = event.version
                    self._record_latency(event.at - event.sent_at)
            case ResourcesNacked():
                if proxy := self._proxies.get(event.stream_id):
                    proxy.last_nack = Nack(event.type_url, event.version, event.message, event.at)
                    proxy.nacks += 1
        for listener in self._listeners:
            listener(event)

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

