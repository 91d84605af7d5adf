"""State-of-the-World protocol state of one ADS stream, without any I/O.

`SotwStream.on_request()` and `on_snapshot_changed()` take what arrived and return the encoded
responses to write, so the rules below are tested without sockets:

- a response carries a fresh nonce and the version of exactly what it contains;
- ACK: the request echoes the latest nonce and has no error_detail (reported once per response);
- NACK: the same with error_detail; it is reported once and the rejected content is not sent
  again: the next response for that type waits for different content (go-control-plane's
  resend loop, its issue #962, is what this avoids);
- a request with a nonce that is not the latest for its type is stale and ignored;
- LDS and CDS requests without names (or with "*") are wildcard, until a request of that type names
  something: from then on only "*" is (no names is then no subscription); RDS and EDS are by name,
  and a name that does not exist yet is remembered and sent when it appears;
- a response is sent only when what the subscription selects differs from what was last sent;
- a first wildcard request is always answered, even when empty, so a proxy finishes starting;
- a route configuration waits until the proxy has ACKed the clusters it names and their
  endpoints (`warm_routes`: a proxy that reconnects after a change would otherwise route to a
  cluster still warming): on this stream for ADS, on the node's CDS and EDS streams for a
  per-type one;
- a per-type stream (`only_type`: ClusterDiscoveryService and the others, `server`) serves that
  one type; a request for another type ends the stream (INVALID_ARGUMENT).

What a stream was sent and subscribes to are values shared with every stream sent the same
(`sharing`): per type, a stream holds its nonces and pointers, not copies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from envoy.service.discovery.v3 import discovery_pb2

from aviary.discovery import typeurls, wire
from aviary.discovery.config_sources import xds_cluster_of
from aviary.discovery.proxy_events import (
    ProxyConnected,
    ProxyEvent,
    ResourcesAcked,
    ResourcesNacked,
    ResponseSent,
    SubscriptionChanged,
)
from aviary.discovery.sharing import Sent, selection, shared_names
from aviary.discovery.typed_streams import TypedStream

log = logging.getLogger("aviary.xds")

WILDCARD_TYPES = frozenset({typeurls.LISTENER, typeurls.CLUSTER})
MAX_RESOURCE_NAMES = 10_000
_NOTHING: MappingProxyType[str, str] = MappingProxyType({})


class StreamError(Exception):
    """A request that breaks the protocol badly enough that the stream must end."""


class StreamIdentity(Protocol):
    """What every stream (SotW here, delta in `delta.py`) knows of its proxy, checked alike."""

    node_id: str | None
    node_cluster: str
    warned_types: set[str]
    only_type: str | None  # the one type a per-type stream serves; None for ADS
    xds_cluster: str | None  # where its listeners' routes and clusters' endpoints come from (config_sources)

    @property
    def stream_id(self) -> int: ...

    @property
    def peer(self) -> str: ...

    @property
    def emit(self) -> Callable[[ProxyEvent], None]: ...


def check_node(
    stream: StreamIdentity, request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest
) -> None:
    """The first request names the proxy (reported connected); later ones may omit it, not change it."""
    has_node = request.HasField("node") and request.node.id
    if stream.node_id is None:
        if not has_node:
            raise StreamError(f"the first {type(request).__name__} on a stream must carry node.id")
        stream.node_id = request.node.id
        stream.node_cluster = request.node.cluster
        if stream.only_type in (typeurls.LISTENER, typeurls.CLUSTER):
            stream.xds_cluster = xds_cluster_of(request.node)
        stream.emit(ProxyConnected(stream.stream_id, stream.node_id, stream.node_cluster, stream.peer, time.time(),
                                   stream.only_type or ""))  # fmt: skip
        protocol = " (delta)" if isinstance(request, discovery_pb2.DeltaDiscoveryRequest) else ""
        if stream.only_type is not None:
            protocol += f" ({typeurls.short_name(stream.only_type)} only)"
        log.info("proxy connected%s: node=%s cluster=%s peer=%s", protocol, stream.node_id, stream.node_cluster,
                 stream.peer)  # fmt: skip
    elif has_node and request.node.id != stream.node_id:
        raise StreamError(f"node.id changed on one stream from {stream.node_id!r} to {request.node.id!r}")


def supported(stream: StreamIdentity, type_url: str) -> bool:
    """Whether this server serves ``type_url``; an unsupported one is logged once per stream and ignored.

    A per-type stream serves its one type: a request for another is a protocol error (`StreamError`).
    """
    if stream.only_type is not None and type_url != stream.only_type:
        raise StreamError(
            f"this stream serves only {typeurls.short_name(stream.only_type)}; a request for "
            f"{typeurls.short_name(type_url)} belongs on its own discovery service or on ADS"
        )
    if type_url in typeurls.SUPPORTED:
        return True
    if type_url not in stream.warned_types:
        stream.warned_types.add(type_url)
        log.warning("proxy %s asked for unsupported type %r; ignoring its requests", stream.node_id, type_url)
    return False


@dataclass(slots=True)
class _TypeState:
    wildcard: bool = False
    names: frozenset[str] = frozenset()
    named: bool = False  # a request of this type has named something: the legacy wildcard is over
    last_nonce: str | None = None
    last_sent: Sent | None = None  # what the latest response carried, and its version
    last_sent_at: float = 0.0
    answered_nonce: str | None = None  # the response whose ACK or NACK was already reported
    acked: Sent | None = None  # what the latest ACKed response carried
    held: bool = False  # a response is due but waits (a route for its clusters' ACKs: warm_routes)
    checked: str = ""  # the type's snapshot version last compared: unchanged means nothing to send


@dataclass(slots=True)
class SotwStream(TypedStream[_TypeState]):
    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> list[bytes]:
        check_node(self, request)
        type_url = request.type_url
        if not supported(self, type_url):
            return []
        if len(request.resource_names) > MAX_RESOURCE_NAMES:
            raise StreamError(
                f"{typeurls.short_name(type_url)} request names {len(request.resource_names)} resources; "
                f"at most {MAX_RESOURCE_NAMES} are accepted"
            )
        state = self._types.get(type_url)
        first = state is None
        if state is None:
            state = self._types[type_url] = _TypeState()
        nonce = request.response_nonce
        if nonce and nonce != state.last_nonce:
            log.debug("stale nonce %s from %s for %s ignored", nonce, self.node_id, typeurls.short_name(type_url))
            return []
        # A proxy repeats the latest nonce on every request until the next response (e.g. when its
        # EDS or RDS subscription changes): the ACK or NACK of a response is reported once.
        acked = False
        if nonce and state.last_sent is not None and nonce != state.answered_nonce:
            state.answered_nonce = nonce
            if request.HasField("error_detail"):
                self._nacked(type_url, state, request.error_detail.message)
            else:
                acked = True
                state.acked = state.last_sent
                self.emit(
                    ResourcesAcked(
                        self.stream_id,
                        type_url,
                        state.last_sent.version,
                        state.last_sent,  # immutable: shared, not copied
                        state.last_sent_at,
                        time.monotonic(),
                    )
                )
        self._update_subscription(type_url, state, request)
        return self._ordered(type_url, state, force=first and state.wildcard, acked=acked)

    def _nacked(self, type_url: str, state: _TypeState, message: str) -> None:
        sent = state.last_sent
        version = sent.version if sent is not None else ""
        log.warning(
            "proxy NACKed: node=%s type=%s version=%s: %s",
            self.node_id,
            typeurls.short_name(type_url),
            version,
            message,
        )
        self.emit(
            ResourcesNacked(
                self.stream_id, type_url, version, sent if sent is not None else _NOTHING, message, time.time()
            )
        )

    def _update_subscription(
        self, type_url: str, state: _TypeState, request: discovery_pb2.DiscoveryRequest
    ) -> None:
        names = frozenset(request.resource_names)
        state.named = state.named or bool(names)
        wildcard = "*" in names or (type_url in WILDCARD_TYPES and not state.named)
        names = shared_names(names - {"*"})
        if (wildcard, names) != (state.wildcard, state.names) or state.last_nonce is None:
            state.wildcard, state.names = wildcard, names
            state.checked = ""  # a new selection: compare it even if the snapshot did not change
            self.emit(SubscriptionChanged(self.stream_id, type_url, wildcard, names))

    def _respond(self, type_url: str, state: _TypeState, force: bool) -> bytes | None:
        snapshot = self._snapshot()
        version = snapshot.type_versions[type_url]
        if not force and state.checked == version:
            return None  # nothing of this type changed since we last looked
        selected = selection(snapshot, type_url, state.names, state.wildcard)
        sent, last = selected.sent, state.last_sent
        # Versions hash the contents (name and version of each resource): equal versions, equal contents.
        if not force and ((last is not None and sent.version == last.version) or (last is None and not sent)):
            state.checked, state.held = version, False
            return None
        if type_url == typeurls.ROUTE and not force and not self._clusters_acked(snapshot, sent):
            state.held = True  # `checked` stays: looked at again after this stream's next CDS or EDS ACK
            return None
        state.checked, state.held = version, False
        nonce = str(next(self._nonces))
        state.last_nonce, state.last_sent = nonce, sent
        state.last_sent_at = time.monotonic()
        response = wire.with_nonce(selected.body, nonce)
        self.emit(ResponseSent(self.stream_id, type_url, len(response)))
        return response
