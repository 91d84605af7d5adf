"""The engine <-> xDS worker protocol (aviary.discovery.worker_protocol), without processes.

Snapshots out: what a worker rebuilds is what the engine published, byte for byte, and only what
changed travels. Events in: every proxy event comes back equal. Stream ids of different workers
never meet. Restarts back off. And the address reservation refuses a second holder.
"""

from __future__ import annotations

import marshal

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from rich.console import Console

from aviary.admin import convert, render
from aviary.discovery import typeurls, wire
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.delta import DeltaStream
from aviary.discovery.proxy_events import (
    ProxyConnected,
    ProxyDisconnected,
    ProxyEvent,
    ResourcesAcked,
    ResourcesNacked,
    ResponseSent,
    SubscriptionChanged,
)
from aviary.discovery.proxy_status import ProxyView
from aviary.discovery.resources import PublishedRollout, build_snapshot
from aviary.discovery.sharing import shared_sent
from aviary.discovery.snapshot import Snapshot
from aviary.discovery.sotw import SotwStream
from aviary.discovery.worker_protocol import (
    HEADER,
    WORKER_SHIFT,
    Barrier,
    ProtocolError,
    Ready,
    SentState,
    SnapshotMirror,
    Stop,
    Sync,
    barrier_message,
    decode_from_engine,
    decode_from_worker,
    encode_events,
    first_stream_id,
    next_failures,
    ready_message,
    restart_delay,
    stop_message,
    sync_message,
    worker_of,
)
from aviary.discovery.workers import reserve_address
from aviary.listen import ListenError
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend

V1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
V2 = Backend("v2", (Endpoint.model_validate("127.0.0.1:9002"),))
LISTENER = ListenerSpec(address="0.0.0.0", port=10000)


def snapshot(weight: int, name: str = "checkout") -> Snapshot:
    rollout = PublishedRollout.of(name, LISTENER, ("*",), ((V1, 100 - weight), (V2, weight)), (V1, V2))
    return build_snapshot([rollout])


def payload(data: bytes) -> bytes:
    (size,) = HEADER.unpack(data[: HEADER.size])
    assert len(data) == HEADER.size + size
    return data[HEADER.size :]


def to_worker(data: bytes | None) -> Sync:
    assert data is not None
    message = decode_from_engine(payload(data))
    assert isinstance(message, Sync)
    return message


def same(a: Snapshot, b: Snapshot) -> None:
    assert a.type_versions == b.type_versions and a.wildcard_versions == b.wildcard_versions
    for type_url in typeurls.PUSH_ORDER:
        assert {n: (r.entry, r.wildcard, r.references) for n, r in a.items(type_url).items()} == {
            n: (r.entry, r.wildcard, r.references) for n, r in b.items(type_url).items()
        }


def test_a_new_worker_gets_every_group_and_rebuilds_the_same_bytes() -> None:
    published = {"": snapshot(10), "edge": snapshot(30, "cart")}
    sent = SentState()
    mirror = SnapshotMirror()
    rebuilt = mirror.apply(to_worker(sync_message(sent, published)))
    assert rebuilt.keys() == published.keys()
    for group in published:
        same(rebuilt[group], published[group])
    assert not rebuilt[""].inconsistencies()


def test_only_what_changed_travels() -> None:
    sent, mirror = SentState(), SnapshotMirror()
    mirror.apply(to_worker(sync_message(sent, {"": snapshot(10), "edge": snapshot(30, "cart")})))
    assert sync_message(sent, {"": snapshot(10), "edge": snapshot(30, "cart")}) is None  # nothing new

    sync = to_worker(sync_message(sent, {"": snapshot(20), "edge": snapshot(30, "cart")}))
    assert [group for group, _ in sync.groups] == [""]  # "edge" did not change
    assert {r.type_url for r in sync.resources} == {typeurls.ROUTE}  # a weight: routes only, nothing else
    rebuilt = mirror.apply(sync)
    same(rebuilt[""], snapshot(20))
    same(rebuilt["edge"], snapshot(30, "cart"))

    sync = to_worker(sync_message(sent, {"": snapshot(20)}))
    assert sync.removed == ("edge",) and not sync.groups and not sync.resources
    assert mirror.apply(sync).keys() == {""}
    # Both sides forget the same resources: a route of the removed group comes back as new bytes.
    sync = to_worker(sync_message(sent, {"": snapshot(20), "edge": snapshot(30, "cart")}))
    assert {r.name for r in sync.resources} >= {n for n in snapshot(30, "cart").items(typeurls.ROUTE)}
    same(mirror.apply(sync)["edge"], snapshot(30, "cart"))


def test_a_worker_stream_serves_the_rebuilt_snapshot_like_the_engine() -> None:
    """SotwStream (unchanged) over a worker's cache answers with the engine's bytes."""
    published = {"": snapshot(10)}
    engine, worker = SnapshotCache(), SnapshotCache()
    engine.publish(published)
    worker.publish(SnapshotMirror().apply(to_worker(sync_message(SentState(), published))))
    request = discovery_pb2.DiscoveryRequest(type_url=typeurls.CLUSTER)
    request.node.id = "envoy-1"
    answers = []
    for cache in (engine, worker):
        stream = SotwStream(1, "peer", cache, lambda event: None)
        answers.append(stream.on_request(request))
    assert answers[0] == answers[1] and answers[0]


def test_a_worker_delta_stream_serves_the_rebuilt_snapshot_like_the_engine_and_its_events_travel() -> None:
    """DeltaStream over a worker's cache answers with the engine's bytes; its events cross the pipe equal."""
    published = {"": snapshot(10)}
    engine, worker = SnapshotCache(), SnapshotCache()
    engine.publish(published)
    worker.publish(SnapshotMirror().apply(to_worker(sync_message(SentState(), published))))
    request = discovery_pb2.DeltaDiscoveryRequest(type_url=typeurls.CLUSTER)
    request.node.id = "envoy-1"
    answers, events = [], []
    for cache in (engine, worker):
        stream = DeltaStream(first_stream_id(2), "peer", cache, events.append)
        [answer] = stream.on_request(request)
        nonce = discovery_pb2.DeltaDiscoveryResponse.FromString(answer).nonce
        stream.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=typeurls.CLUSTER, response_nonce=nonce))
        answers.append(answer)
    assert answers[0] == answers[1]
    decoded = decode_from_worker(payload(encode_events(events)))
    # A frame folds the responses of one type into one count (all the engine does with them).
    assert [e for e in decoded if not isinstance(e, ResponseSent)] == [
        e for e in events if not isinstance(e, ResponseSent)
    ]
    assert sum(e.count for e in decoded if isinstance(e, ResponseSent)) == sum(
        e.count for e in events if isinstance(e, ResponseSent)
    )
    assert any(isinstance(e, ResourcesAcked) for e in events)


def test_a_group_naming_an_unknown_resource_is_a_protocol_error() -> None:
    data = marshal.dumps(("sync", (), (("", ((typeurls.CLUSTER, "x", "v"),)),), ()))
    with pytest.raises(ProtocolError, match="never sent"):
        SnapshotMirror().apply(to_worker(HEADER.pack(len(data)) + data))


@pytest.mark.parametrize(
    "data", [b"", b"\x00garbage", marshal.dumps(["sync"]), marshal.dumps(("launch",)), marshal.dumps(("sync", 1))]
)
def test_malformed_frames_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_from_engine(data)
    with pytest.raises(ProtocolError):
        decode_from_worker(data)


def test_stop_ready_and_barriers() -> None:
    assert isinstance(decode_from_engine(payload(stop_message())), Stop)
    assert decode_from_worker(payload(ready_message(18000))) == Ready(18000)
    assert decode_from_worker(payload(barrier_message(7))) == Barrier(7)
    assert decode_from_engine(payload(barrier_message(7))) == Barrier(7)


def test_every_event_comes_back_equal() -> None:
    sid = first_stream_id(3)
    events: list[ProxyEvent] = [
        ProxyConnected(sid, "envoy-1", "edge", "ipv4:127.0.0.1:5000", 1700000000.5),
        SubscriptionChanged(sid, typeurls.ROUTE, False, frozenset({"route-a", "route-b"})),
        ResourcesAcked(sid, typeurls.ROUTE, "abc", {"route-a": "1", "route-b": "2"}, 10.25, 10.5),
        ResourcesNacked(sid, typeurls.CLUSTER, "def", {"c": "3"}, "rejected: ünïcode", 1700000001.0),
        ResponseSent(sid, typeurls.ENDPOINT, 1234),
        ProxyDisconnected(sid),
    ]
    assert decode_from_worker(payload(encode_events(events))) == events
    assert decode_from_worker(payload(encode_events([]))) == []


def test_responses_of_one_type_in_a_frame_fold_into_one_counted_event() -> None:
    a, b = first_stream_id(1), first_stream_id(1) + 1
    events: list[ProxyEvent] = [
        ResponseSent(a, typeurls.ROUTE, 100),
        ResponseSent(a, typeurls.CLUSTER, 7),
        ProxyDisconnected(a),
        ResponseSent(b, typeurls.ROUTE, 50),
        ResponseSent(b, typeurls.ROUTE, 25, count=2),
    ]
    assert decode_from_worker(payload(encode_events(events))) == [
        ResponseSent(a, typeurls.ROUTE, 175, count=4),  # where the first was: before its stream ended
        ResponseSent(a, typeurls.CLUSTER, 7),
        ProxyDisconnected(a),
    ]


def test_the_acks_of_one_response_carry_its_resources_once_per_frame() -> None:
    sent = shared_sent(typeurls.CLUSTER, "v-all", {f"cluster-{i}": f"{i:016x}" for i in range(200)})
    acks = [ResourcesAcked(first_stream_id(1) + i, typeurls.CLUSTER, "v-all", sent, 1.0, 2.0) for i in range(100)]
    one, hundred = len(encode_events(acks[:1])), len(encode_events(acks))
    assert hundred < one + 99 * 64  # each further ACK: its own fields and a reference to the shared mapping
    assert decode_from_worker(payload(encode_events(acks))) == acks


def test_stream_ids_of_different_workers_never_meet() -> None:
    assert first_stream_id(0) == 1  # the single process: as before
    for worker in (1, 2, 3, 1000):
        first = first_stream_id(worker)
        assert worker_of(first) == worker
        assert worker_of(first + (1 << WORKER_SHIFT) - 2) == worker  # its last stream id
        assert first > first_stream_id(worker - 1) + (1 << WORKER_SHIFT) - 3


def test_restarts_back_off_while_a_worker_keeps_dying() -> None:
    failures = 0
    delays = []
    for _ in range(8):
        failures = next_failures(failures, ran_for=0.5)
        delays.append(restart_delay(failures))
    assert delays[0] == pytest.approx(0.1)
    assert delays == sorted(delays) and delays[-1] == 5.0
    assert next_failures(failures, ran_for=60.0) == 1  # a worker that ran a while: at once again


def test_a_second_reservation_of_the_address_is_refused() -> None:
    first = reserve_address("127.0.0.1:0")
    try:
        with pytest.raises(ListenError, match="address already in use"):
            reserve_address(f"127.0.0.1:{first.port}")  # its probe binds (neither listens): the lock refuses
    finally:
        first.release()
    again = reserve_address(f"127.0.0.1:{first.port}")  # released: free again
    again.release()


def test_a_wire_response_over_rebuilt_entries_decodes() -> None:
    rebuilt = SnapshotMirror().apply(to_worker(sync_message(SentState(), {"": snapshot(10)})))[""]
    items = rebuilt.items(typeurls.ROUTE)
    response = discovery_pb2.DiscoveryResponse.FromString(
        wire.discovery_response("v", typeurls.ROUTE, "1", (items[n].entry for n in sorted(items)))
    )
    assert [r.type_url for r in response.resources] == [typeurls.ROUTE] * len(items)


def test_aviary_proxies_names_the_worker_only_when_there_are_workers() -> None:
    def table(*stream_ids: int) -> str:
        proxies = [convert.proxy_message(ProxyView(s, f"envoy-{s}", "edge", "peer", 0.0)) for s in stream_ids]
        console = Console(width=200, record=True)
        console.print(render.proxies_table(proxies))
        return console.export_text()

    assert "WORKER" not in table(1, 2)  # --xds-workers 1: as before
    assert [p.xds_worker for p in [convert.proxy_message(ProxyView(first_stream_id(2), "n", "", "", 0.0))]] == [2]
    assert "WORKER" in table(first_stream_id(1), first_stream_id(2))
