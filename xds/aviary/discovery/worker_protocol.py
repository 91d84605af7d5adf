"""What crosses between the engine process and the xDS stream workers, without any I/O.

`aviary serve --xds-workers N` (N > 1) runs the streams in N worker processes
(``aviary.discovery.workers`` starts them, ``aviary.discovery.worker_main`` is their entry point).
They talk over one Unix socket pair per worker. Each frame is a 4-byte big-endian length and that
many bytes of ``marshal`` data: tuples of str, bytes, int, float, bool, dict and frozenset only
(marshal builds no objects of ours and runs nothing; both ends are this program and version).

Engine -> worker::

    ("sync", removed_groups, groups, resources)
        removed_groups  (group, ...)                          groups that no longer exist
        groups          ((group, ((type_url, name, version), ...)), ...)
                                                             the full membership of each group that
                                                             changed since the last sync
        resources       ((type_url, name, version, wildcard, references, any_bytes), ...)
                                                             only resources the worker does not hold
    ("stop",)           close the streams (status OK) and exit
    ("barrier", n)      the answer to the worker's barrier n: every sync written before it is applied
    ("ping",)           a heartbeat: answer ("pong",) (a worker that does not, for long, is hung)

Worker -> engine::

    ("ready", port)     the first sync is in its cache and it listens: it accepts streams only now
    ("events", (event, ...))
                        proxy events (``proxy_events``) as (tag, *fields), in the order emitted,
                        but those of one frame that only count responses (`ResponseSent`) folded
                        into one per type; the ACKs of one response share its resources
    ("barrier", n)      before a new stream is answered (see below)
    ("pong",)           the answer to a ping, from the worker's event loop
    ("reports", counters, samples)
                        what proxies reported on the Envoy report services during one turn of the
                        worker's loop (``aviary.reports.forward.Batch``): ((node id, node cluster,
                        ((cluster, code class, delta), ...)), ...) and ((node id, node cluster,
                        ((cluster, duration ms, status), ...)), ...)

Only what changed travels: a resource is identified by (type URL, name, version), its version
being a digest of its bytes, and each side keeps exactly the resources that the current groups
name (`SentState` on the engine side, `SnapshotMirror` in the worker), so both know what the
other holds without asking. Each resource is encoded once in the engine (``snapshot.Resource``);
the worker rebuilds the same `Resource` values from the bytes and the streams concatenate them as
they do in one process.

Never older: a proxy that ACKed a snapshot on one worker and reconnects to another must not be
served an older one there. The engine writes each publish to every worker at once, before any
proxy can ACK it, but the new worker may not have read it yet. So a worker answers a new stream's
first request only after a barrier: it asks the engine ("barrier", n), the engine answers after
writing the current snapshots, and frames arrive in order, so by then the worker has everything
that was published before the stream started. New streams arriving together share one barrier.

Stream ids are unique across processes and restarts: every worker process (a restart too) gets a
new number `worker` from the engine, and numbers its streams from ``worker << WORKER_SHIFT``; the
single-process server numbers from 1, i.e. worker 0.
"""

from __future__ import annotations

import marshal
import operator
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aviary.discovery import wire
from aviary.discovery.proxy_events import (
    ProxyConnected,
    ProxyDisconnected,
    ProxyEvent,
    ResourcesAcked,
    ResourcesNacked,
    ResponseSent,
    SubscriptionChanged,
)
from aviary.discovery.sharing import Sent
from aviary.discovery.snapshot import Resource, Snapshot
from aviary.reports.forward import Batch

__all__ = [
    "HEADER",
    "MAX_FRAME",
    "WORKER_SHIFT",
    "Barrier",
    "Ping",
    "Pong",
    "ProtocolError",
    "Ready",
    "Reports",
    "SentState",
    "SnapshotMirror",
    "Stop",
    "Sync",
    "barrier_message",
    "decode_events",
    "decode_from_engine",
    "decode_from_worker",
    "encode_events",
    "first_stream_id",
    "frame",
    "next_failures",
    "ping_message",
    "pong_message",
    "ready_message",
    "reports_message",
    "restart_delay",
    "stop_message",
    "sync_message",
    "worker_of",
]

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30
WORKER_SHIFT = 32  # stream id = worker << 32 | n: 4 billion streams per worker process

ResourceKey = tuple[str, str, str]  # (type_url, name, version)


class ProtocolError(Exception):
    """A frame that is not one of the messages above: the peer is not this program, or broke."""


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


# ---- stream ids ---------------------------------------------------------------------------------


def first_stream_id(worker: int) -> int:
    return (worker << WORKER_SHIFT) | 1


def worker_of(stream_id: int) -> int:
    """The worker process that holds a stream (0: the engine process itself, `--xds-workers 1`)."""
    return stream_id >> WORKER_SHIFT


# ---- snapshots: engine -> worker ----------------------------------------------------------------


def _key(resource: Resource) -> ResourceKey:
    return (resource.type_url, resource.name, resource.version)


def _members(snapshot: Snapshot) -> tuple[ResourceKey, ...]:
    return tuple(_key(r) for items in snapshot.resources.values() for r in items.values())


@dataclass(slots=True)
class SentState:
    """What one worker holds: each group's type versions, and the resources those groups name."""

    groups: dict[str, Mapping[str, str]] = field(default_factory=dict)
    resources: set[ResourceKey] = field(default_factory=set)


def sync_message(sent: SentState, snapshots: Mapping[str, Snapshot]) -> bytes | None:
    """The frame that brings a worker holding `sent` to `snapshots` (None: it has them); updates `sent`."""
    removed = tuple(sorted(sent.groups.keys() - snapshots.keys()))
    changed = {g: s for g, s in sorted(snapshots.items()) if sent.groups.get(g) != s.type_versions}
    if not removed and not changed:
        return None
    new: dict[ResourceKey, Resource] = {}
    for snapshot in changed.values():
        for items in snapshot.resources.values():
            for resource in items.values():
                key = _key(resource)
                if key not in sent.resources:
                    new[key] = resource
    groups = tuple((g, _members(s)) for g, s in changed.items())
    resources = tuple(
        (r.type_url, r.name, r.version, r.wildcard, tuple(sorted(r.references)), r.any_bytes) for r in new.values()
    )
    sent.groups = {g: s.type_versions for g, s in snapshots.items()}
    sent.resources = {key for s in snapshots.values() for key in _members(s)}
    return frame(marshal.dumps(("sync", removed, groups, resources)))


def stop_message() -> bytes:
    return frame(marshal.dumps(("stop",)))


def barrier_message(number: int) -> bytes:
    """Both ways: a worker's request for barrier `number`, and the engine's answer."""
    return frame(marshal.dumps(("barrier", number)))


def ping_message() -> bytes:
    return frame(marshal.dumps(("ping",)))


def pong_message() -> bytes:
    return frame(marshal.dumps(("pong",)))


@dataclass(frozen=True, slots=True)
class Barrier:
    number: int


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Sync:
    removed: tuple[str, ...]
    groups: tuple[tuple[str, tuple[ResourceKey, ...]], ...]
    resources: tuple[Resource, ...]


@dataclass(frozen=True, slots=True)
class Stop:
    pass


def decode_from_engine(payload: bytes) -> Sync | Stop | Barrier | Ping:
    message = _loads(payload)
    try:
        if message[0] == "stop":
            return Stop()
        if message[0] == "ping":
            return Ping()
        if message[0] == "barrier":
            return Barrier(int(message[1]))
        if message[0] != "sync":
            raise ProtocolError(f"unknown message {message[0]!r} from the engine")
        _, removed, groups, raw = message
        resources = tuple(
            Resource(
                name=name,
                type_url=type_url,
                version=version,
                any_bytes=any_bytes,
                entry=wire.sotw_entry(type_url, name, version, any_bytes),
                wildcard=wildcard,
                references=frozenset(references),
            )
            for type_url, name, version, wildcard, references, any_bytes in raw
        )
        return Sync(tuple(removed), tuple((g, tuple(map(tuple, keys))) for g, keys in groups), resources)
    except (ValueError, TypeError, IndexError) as exc:
        raise ProtocolError(f"malformed message from the engine: {exc}") from exc


class SnapshotMirror:
    """The worker's copy of the engine's snapshots, rebuilt from `Sync` messages."""

    def __init__(self) -> None:
        self.resources: dict[ResourceKey, Resource] = {}
        self.snapshots: dict[str, Snapshot] = {}

    def apply(self, sync: Sync) -> dict[str, Snapshot]:
        """Apply one sync; returns every group's snapshot (for ``SnapshotCache.publish``)."""
        for resource in sync.resources:
            self.resources[_key(resource)] = resource
        for group in sync.removed:
            self.snapshots.pop(group, None)
        for group, keys in sync.groups:
            try:
                self.snapshots[group] = Snapshot.of(self.resources[key] for key in keys)
            except KeyError as exc:
                raise ProtocolError(f"group {group!r} names a resource the worker was never sent: {exc}") from None
        kept = {_key(r) for s in self.snapshots.values() for items in s.resources.values() for r in items.values()}
        self.resources = {k: r for k, r in self.resources.items() if k in kept}
        return dict(self.snapshots)


# ---- events: worker -> engine -------------------------------------------------------------------

_EVENT_TAGS: dict[type[Any], str] = {
    ProxyConnected: "c",
    SubscriptionChanged: "s",
    ResourcesAcked: "a",
    ResourcesNacked: "n",
    ResponseSent: "r",
    ProxyDisconnected: "d",
}
_EVENT_TYPES = {tag: kind for kind, tag in _EVENT_TAGS.items()}


def _fields(kind: type[Any]) -> Callable[[Any], tuple[Any, ...]]:
    """The event's fields in declaration order, as `kind(*fields)` takes them back."""
    names: tuple[str, ...] = kind.__slots__
    get = operator.attrgetter(*names)
    return get if len(names) > 1 else lambda event: (get(event),)


_EVENT_FIELDS = {kind: _fields(kind) for kind in _EVENT_TAGS}
_RESOURCES_AT: dict[type[Any], int] = {
    kind: kind.__slots__.index("resources") for kind in (ResourcesAcked, ResourcesNacked)
}


def _plain(resources: Mapping[str, str]) -> dict[str, str]:
    # A `Sent` hands its own dict: the ACKs of one response in a frame share it, and marshal
    # writes an object it meets again as a back-reference, so the frame carries it once.
    return resources.as_dict() if isinstance(resources, Sent) else dict(resources)


def encode_events(events: Iterable[ProxyEvent]) -> bytes:
    """One frame of events, in order; the `ResponseSent` of one type are folded into the first
    (responses and bytes added up: all the engine does with them is count)."""
    encoded: list[tuple[Any, ...]] = []
    responses: dict[str, int] = {}  # type URL -> index of its folded ResponseSent in `encoded`
    for event in events:
        kind = type(event)
        if isinstance(event, ResponseSent):
            at = responses.get(event.type_url)
            if at is not None:
                tag, stream_id, type_url, size, count = encoded[at]
                encoded[at] = (tag, stream_id, type_url, size + event.size, count + event.count)
                continue
            responses[event.type_url] = len(encoded)
        fields = _EVENT_FIELDS[kind](event)
        at = _RESOURCES_AT.get(kind)
        if at is not None:
            fields = (*fields[:at], _plain(fields[at]), *fields[at + 1:])
        encoded.append((_EVENT_TAGS[kind], *fields))
    return frame(marshal.dumps(("events", tuple(encoded))))


def ready_message(port: int) -> bytes:
    return frame(marshal.dumps(("ready", port)))


@dataclass(frozen=True, slots=True)
class Ready:
    port: int


def decode_events(encoded: Iterable[tuple[Any, ...]]) -> list[ProxyEvent]:
    events: list[ProxyEvent] = []
    for tag, *fields in encoded:
        kind = _EVENT_TYPES.get(tag)
        if kind is None:
            raise ProtocolError(f"unknown event {tag!r} from a worker")
        events.append(kind(*fields))
    return events


def reports_message(batch: Batch) -> bytes:
    return frame(marshal.dumps(("reports", *batch)))


@dataclass(frozen=True, slots=True)
class Reports:
    batch: Batch


def decode_from_worker(payload: bytes) -> Ready | Barrier | Pong | Reports | list[ProxyEvent]:
    message = _loads(payload)
    try:
        if message[0] == "reports":
            counters, samples = message[1], message[2]
            if not isinstance(counters, tuple) or not isinstance(samples, tuple):
                raise TypeError("reports must be tuples")
            return Reports((counters, samples))
        if message[0] == "pong":
            return Pong()
        if message[0] == "ready":
            return Ready(int(message[1]))
        if message[0] == "barrier":
            return Barrier(int(message[1]))
        if message[0] == "events":
            return decode_events(message[1])
    except (ValueError, TypeError, IndexError) as exc:
        raise ProtocolError(f"malformed message from a worker: {exc}") from exc
    raise ProtocolError(f"unknown message {message[0]!r} from a worker")


def _loads(payload: bytes) -> tuple[Any, ...]:
    try:
        message = marshal.loads(payload)
    except (ValueError, EOFError, TypeError) as exc:
        raise ProtocolError(f"undecodable frame: {exc}") from exc
    if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
        raise ProtocolError("a frame must hold a tuple that starts with its kind")
    return message


# ---- restarts -----------------------------------------------------------------------------------

RESTART_BASE_SECONDS = 0.1
RESTART_MAX_SECONDS = 5.0
STABLE_SECONDS = 10.0  # a worker that ran this long before it died starts the back-off afresh


def next_failures(failures: int, ran_for: float) -> int:
    """Consecutive quick deaths of one worker slot, after one that ran `ran_for` seconds."""
    return 1 if ran_for >= STABLE_SECONDS else failures + 1


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker after `failures` consecutive quick deaths (1: at once-ish)."""
    return min(RESTART_MAX_SECONDS, RESTART_BASE_SECONDS * 2.0 ** max(0, failures - 1))
