"""Incremental (delta) xDS protocol state of one ADS stream, without any I/O.

`DeltaStream` is the delta twin of `SotwStream` (sotw.py): `on_request()` and
`on_snapshot_changed()` return the encoded DeltaDiscoveryResponses to write, and it reports the
same proxy events, so ACK gates, make-before-break and NACK blame read a delta proxy exactly as
they read a SotW one. The rules (Envoy's "xDS REST and gRPC protocol", incremental section):

- subscriptions are kept per type: `resource_names_subscribe` adds, `resource_names_unsubscribe`
  removes; "*" is the wildcard, and a type's first request naming nothing at all is the legacy
  wildcard (LDS and CDS only). Once named, an empty subscription is just empty.
- what the client holds (name -> version) is tracked per type; a response carries the resources
  whose version differs, and `removed_resources` for what it holds that is gone and for subscribed
  names that do not exist (once; such a name is sent when it appears).
- a name in `resource_names_subscribe` is sent even when the client should hold it already (it may
  have forgotten it), except on the type's first request, whose `initial_resource_versions` says
  what the client kept from an earlier stream: those, unchanged, are not resent.
- unsubscribing a name while subscribed to "*": it is sent again if the wildcard covers it,
  otherwise reported removed (the client cannot tell which); without "*", nothing is sent.
- nonces pair a response with its ACK or NACK, nothing more: subscription changes are applied
  whatever the nonce (stale or none; a request without one is spontaneous).
- ACK and NACK are reported once per response, with the client's whole state of the type after
  that response, which is what SotW reports: `ProxyStatus` holds the same thing for both. A NACKed
  version counts as sent: it is not resent until it changes (no resend loop, as in SotW).
- a type's first request is always answered, even with nothing: a proxy finishes starting, and one
  that reconnects with everything current (`initial_resource_versions`) ACKs that empty response,
  which tells the ACK gates what it holds on this stream (its ACKs on the old stream went with it).
- route configurations wait, as in SotW, until the proxy ACKed the clusters they name and their
  endpoints (`warm_routes`), even on the type's first request: a proxy reconnecting after a change
  gets the new cluster first, the route to it after.
- a per-type stream (`only_type`, `server`) serves one type, as in SotW (`sotw.supported`).

Like SotW, a stream holds shared values (`sharing.Sent`, interned name sets) and the responses are
shared too: streams that go from the same state to the same state (a weight change pushed to a
fleet) get one body, computed once (`_diff`), each with its own nonce.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from envoy.service.discovery.v3 import discovery_pb2

from aviary.discovery import typeurls, wire
from aviary.discovery.proxy_events import (
    ResourcesAcked,
    ResourcesNacked,
    ResponseSent,
    SubscriptionChanged,
)
from aviary.discovery.sharing import Sent, selection, shared_names, shared_sent
from aviary.discovery.snapshot import Resource, Snapshot
from aviary.discovery.sotw import (
    MAX_RESOURCE_NAMES,
    WILDCARD_TYPES,
    StreamError,
    check_node,
    supported,
)
from aviary.discovery.typed_streams import TypedStream

__all__ = ["DeltaStream", "held"]

log = logging.getLogger("aviary.xds")

WILDCARD = "*"
MAX_PENDING = 64  # responses awaiting their ACK per type; an older one's late ACK is then ignored as stale
_NO_NAMES: frozenset[str] = frozenset()


def versions_digest(versions: Mapping[str, str]) -> str:
    """The version of a name -> version mapping: `snapshot.set_version` of the same resources."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(versions):
        h.update(name.encode())
        h.update(b"\0")
        h.update(versions[name].encode())
        h.update(b"\0")
    return h.hexdigest()


def held(type_url: str, versions: Mapping[str, str]) -> Sent:
    """What a client holds of a type, as the interned `Sent` every equal holder shares."""
    return shared_sent(type_url, versions_digest(versions), versions)


@dataclass(slots=True)
class _TypeState:
    have: Sent  # name -> version the client holds, as far as it was sent (NACKed versions included)
    wildcard: bool = False
    names: frozenset[str] = _NO_NAMES  # explicitly subscribed, "*" apart
    absent: frozenset[str] = _NO_NAMES  # subscribed names already reported not to exist
    pending: list[tuple[str, Sent, float]] = field(default_factory=list)  # (nonce, held after it, sent at)
    checked: str = ""  # the type's snapshot version last compared: unchanged means nothing to send
    acked: Sent | None = None  # what the client holds as of its latest ACK (warm_routes reads it)
    held: bool = False  # a response is due but waits (a route for its clusters' ACKs: warm_routes)


@dataclass(slots=True)
class DeltaStream(TypedStream[_TypeState]):
    DELTA: ClassVar[bool] = True

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> list[bytes]:
        check_node(self, request)
        type_url = request.type_url
        if not supported(self, type_url):
            return []
        count = (
            len(request.resource_names_subscribe)
            + len(request.resource_names_unsubscribe)
            + len(request.initial_resource_versions)
        )
        if count > MAX_RESOURCE_NAMES:
            raise StreamError(
                f"{typeurls.short_name(type_url)} request names {count} resources; "
                f"at most {MAX_RESOURCE_NAMES} are accepted"
            )
        state = self._types.get(type_url)
        first = state is None
        if state is None:
            initial = dict(request.initial_resource_versions)
            state = self._types[type_url] = _TypeState(held(type_url, initial))
        acked = bool(request.response_nonce) and self._answered(type_url, state, request)
        self._update_subscription(type_url, state, request, first)
        return self._ordered(type_url, state, force=first, acked=acked)

    def _answered(self, type_url: str, state: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> bool:
        """Report the ACK or NACK of the response `request.response_nonce` names, once; True for an ACK."""
        nonce = request.response_nonce
        index = next((i for i, (pending, _, _) in enumerate(state.pending) if pending == nonce), None)
        if index is None:
            log.debug("stale nonce %s from %s for %s", nonce, self.node_id, typeurls.short_name(type_url))
            return False
        _, after, sent_at = state.pending[index]
        del state.pending[: index + 1]  # a client answers in order: earlier ones are answered or moot
        if request.HasField("error_detail"):
            message = request.error_detail.message
            log.warning(
                "proxy NACKed (delta): node=%s type=%s version=%s: %s",
                self.node_id,
                typeurls.short_name(type_url),
                after.version,
                message,
            )
            self.emit(ResourcesNacked(self.stream_id, type_url, after.version, after, message, time.time()))
            return False
        state.acked = after
        self.emit(ResourcesAcked(self.stream_id, type_url, after.version, after, sent_at, time.monotonic()))
        return True

    def _update_subscription(
        self, type_url: str, state: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest, first: bool
    ) -> None:
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        if not subscribe and not unsubscribe:
            if first:
                state.wildcard = type_url in WILDCARD_TYPES  # the legacy wildcard
                self.emit(SubscriptionChanged(self.stream_id, type_url, state.wildcard, state.names))
            return
        wildcard = (state.wildcard and WILDCARD not in unsubscribe) or WILDCARD in subscribe
        names = set(state.names)
        absent = set(state.absent)
        have = dict(state.have)
        covered = self._snapshot().items(type_url)
        for name in unsubscribe - {WILDCARD} - subscribe:
            names.discard(name)
            absent.discard(name)
            resource = covered.get(name)
            if not wildcard:
                have.pop(name, None)  # the client forgets it: nothing to send
            elif resource is not None and resource.wildcard:
                have.pop(name, None)  # still the client's through "*": sent again so it knows to keep it
            # else: not covered by "*": still held, so the next response reports it removed
        for name in subscribe - {WILDCARD}:
            names.add(name)
            if not first:  # a first request's initial_resource_versions is what the client holds
                have.pop(name, None)  # resent even if the client should hold it: it may have forgotten it
                absent.discard(name)
        changed = wildcard != state.wildcard or names != state.names
        state.wildcard, state.names = wildcard, shared_names(frozenset(names))
        state.absent = shared_names(frozenset(absent))
        if have != state.have:
            state.have = held(type_url, have)
        state.checked = ""  # a new selection: compare it even if the snapshot did not change
        if changed or first:
            self.emit(SubscriptionChanged(self.stream_id, type_url, state.wildcard, state.names))

    def _respond(self, type_url: str, state: _TypeState, force: bool) -> bytes | None:
        snapshot = self._snapshot()
        version = snapshot.type_versions[type_url]
        if not force and state.checked == version:
            return None  # nothing of this type changed since we last looked
        target = selection(snapshot, type_url, state.names, state.wildcard).sent
        diff = _diff(snapshot, type_url, state.have, target, state.names, state.absent)
        if diff.changes and type_url == typeurls.ROUTE and not self._clusters_acked(snapshot, target):
            state.held = True  # `checked` stays: looked at again after the proxy's next CDS or EDS ACK
            return None
        state.checked, state.absent, state.held = version, diff.absent, False
        if not diff.changes and not force:
            state.have = target  # equal content: share the selection's value
            return None
        nonce = str(next(self._nonces))
        state.have = target
        state.pending.append((nonce, target, time.monotonic()))
        if len(state.pending) > MAX_PENDING:
            del state.pending[0]
        response = wire.with_nonce(diff.body, nonce)
        self.emit(ResponseSent(self.stream_id, type_url, len(response)))
        return response


# ---- responses shared between streams -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Diff:
    body: bytes  # the DeltaDiscoveryResponse without its nonce
    changes: int  # resources sent plus names removed
    absent: frozenset[str]  # subscribed names that do not exist, after this response


class _Kept(OrderedDict[Any, Any]):
    """A least-recently-used cache bounded by the bytes it holds as well as by entries: old resource
    versions and bodies would otherwise pile up for as long as the process runs."""

    def __init__(self, entries: int, size: int, weigh: Callable[[Any], int]) -> None:
        super().__init__()
        self._entries, self._size, self._weigh, self.held = entries, size, weigh, 0

    def get_fresh(self, key: Any) -> Any:
        found = self.get(key)
        if found is not None:
            self.move_to_end(key)
        return found

    def keep(self, key: Any, value: Any) -> None:
        self[key] = value
        self.held += self._weigh(value)
        while len(self) > 1 and (len(self) > self._entries or self.held > self._size):
            _, dropped = self.popitem(last=False)
            self.held -= self._weigh(dropped)


_diffs = _Kept(256, 64 << 20, lambda diff: len(diff.body))  # a miss recomputes: bounds, not correctness
_entries = _Kept(65_536, 32 << 20, len)


def _diff(
    snapshot: Snapshot, type_url: str, have: Sent, target: Sent, names: frozenset[str], absent: frozenset[str]
) -> _Diff:
    """What takes a client holding `have` to `target`; keyed by content versions (see `sharing`)."""
    key = (type_url, have.version, target.version, names, absent, snapshot.flavour)
    found: _Diff | None = _diffs.get_fresh(key)
    if found is not None:
        return found
    items = snapshot.items(type_url)
    changed = sorted(name for name, version in target.items() if have.get(name) != version)
    removed = sorted((have.keys() - target.keys()) | (names - target.keys() - absent))
    entries = (_entry(items[name], snapshot.flavour) for name in changed)
    body = wire.delta_response_body(target.version, type_url, entries, removed)
    found = _Diff(body, len(changed) + len(removed), shared_names(frozenset(names - target.keys())))
    _diffs.keep(key, found)
    return found


def _entry(resource: Resource, flavour: str) -> bytes:
    """A resource wrapped for delta once per (type, name, version), for every stream and response."""
    key = (resource.type_url, resource.name, resource.version, flavour)
    found: bytes | None = _entries.get_fresh(key)
    if found is None:
        found = wire.delta_resource_entry(resource.name, resource.version, resource.any_bytes)
        _entries.keep(key, found)
    return found
