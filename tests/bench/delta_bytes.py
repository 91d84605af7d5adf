"""SotW against delta for the same changes: bytes on the wire per stream, and server CPU per change.

    python -m tests.bench.delta_bytes [--rollouts 100] [--streams 1000]   (from the repository root)

No sockets: the bench drives `SotwStream` and `DeltaStream` (the protocol state machines the server
runs per stream) over one `SnapshotCache` fed by the real `TrafficDirector`, with ``--rollouts``
rollouts on one listener (one route configuration with a virtual host each, two clusters each once
a canary runs). Each stream asks as Envoy does (wildcard CDS and LDS, EDS and RDS by name, EDS
names following CDS) and ACKs every response. Three changes are measured:

- ``weight``: a running canary's weight moves (RDS only);
- ``new canary``: one rollout starts a canary (a cluster and its endpoints appear, the route moves);
- ``promotion``: that canary becomes the stable (the old cluster goes away).

Bytes are exact (what one stream is sent, every response of the change, subscription follow-ups
included). CPU is this process's time inside the streams' own calls (requests handled, responses
computed: the server's part; gRPC's cost per byte comes on top) for ``--streams`` streams of a kind
and one change, summed per call, so it is noisy. The same changes through real gRPC against
`aviary serve`, timed: tests/bench/fanout_delta.py (`make bench`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2

from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.delta import DeltaStream
from aviary.discovery.director import Placement, TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.sotw import SotwStream
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend, TrafficPlan

LISTENER = ListenerSpec(address="0.0.0.0", port=10000)
CDS, EDS, LDS, RDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE


def backend(version: str, index: int) -> Backend:
    return Backend(version, (Endpoint.model_validate(f"10.{index // 250}.{index % 250}.{ord(version[-1])}:8080"),))


class Proxy:
    """One stream of either protocol, asking as Envoy does and ACKing everything; counts bytes."""

    def __init__(self, protocol: str, cache: SnapshotCache, index: int) -> None:
        self.protocol = protocol
        self.bytes = 0
        self.cpu = 0.0  # seconds inside the stream's own calls: the server's part, not this client's
        self.eds: set[str] = set()
        node = {"node": {"id": f"bench-{index}", "cluster": "edge"}}
        if protocol == "sotw":
            self.stream: SotwStream | DeltaStream = SotwStream(index, "bench", cache, lambda e: None)
            self._feed(discovery_pb2.DiscoveryRequest(type_url=CDS, **node))  # type: ignore[arg-type]
            self._feed(discovery_pb2.DiscoveryRequest(type_url=LDS))
        else:
            self.stream = DeltaStream(index, "bench", cache, lambda e: None)
            self._feed(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, **node))  # type: ignore[arg-type]
            self._feed(discovery_pb2.DeltaDiscoveryRequest(type_url=LDS))
        self._feed_requests([self._request(RDS, subscribe=[f"route-{LISTENER.address}-{LISTENER.port}"])])

    def _request(self, type_url: str, nonce: str = "", subscribe: list[str] | None = None,
                 version: str = "") -> Any:
        if self.protocol == "sotw":
            names = subscribe if subscribe is not None else (sorted(self.eds) if type_url == EDS else
                                                             [f"route-{LISTENER.address}-{LISTENER.port}"]
                                                             if type_url == RDS else [])
            return discovery_pb2.DiscoveryRequest(type_url=type_url, response_nonce=nonce, version_info=version,
                                                  resource_names=names)
        return discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce,
                                                   resource_names_subscribe=subscribe or [])

    def _feed(self, request: Any) -> None:
        self._feed_requests([request])

    def _feed_requests(self, requests: list[Any]) -> None:
        while requests:
            started = time.process_time()
            responses = self.stream.on_request(requests.pop(0))
            self.cpu += time.process_time() - started
            self._answer(responses, requests)

    def _answer(self, responses: list[bytes], requests: list[Any]) -> None:
        for raw in responses:
            self.bytes += len(raw)
            if self.protocol == "sotw":
                response = discovery_pb2.DiscoveryResponse.FromString(raw)
                requests.append(self._request(response.type_url, response.nonce, version=response.version_info))
                packed = [r.value for r in response.resources]
            else:
                delta = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
                requests.append(self._request(delta.type_url, delta.nonce))
                packed = [r.resource.value for r in delta.resources]
                response = delta
            if response.type_url == CDS:
                names = {cluster_pb2.Cluster.FromString(value).name for value in packed}
                new = names - self.eds
                if self.protocol == "sotw":
                    if names != self.eds:
                        self.eds = names
                        requests.append(self._request(EDS))
                elif new:
                    self.eds |= new
                    requests.append(self._request(EDS, subscribe=sorted(new)))

    def changed(self) -> None:
        requests: list[Any] = []
        started = time.process_time()
        responses = self.stream.on_snapshot_changed()
        self.cpu += time.process_time() - started
        self._answer(responses, requests)
        self._feed_requests(requests)


@dataclass
class Change:
    name: str
    apply: Callable[[TrafficDirector], None]


def run(rollouts: int, streams: int) -> dict[str, Any]:
    cache = SnapshotCache()
    director = TrafficDirector(cache, ProxyStatus())  # no proxy registered: every gate is open
    for i in range(rollouts):
        director.set_rollout(f"r{i:04}", Placement(LISTENER, (f"r{i}.example.com",)),
                             TrafficPlan(backend("v1", i), backend("v2", i), 10))
    changes = [
        Change("weight", lambda d: d.set_desired_traffic("r0000", TrafficPlan(backend("v1", 0), backend("v2", 0), 20))),
        Change("new canary", lambda d: d.set_desired_traffic(
            "r0001", TrafficPlan(backend("v2", 1), backend("v3", 1), 10))),
        Change("promotion", lambda d: d.set_desired_traffic("r0001", TrafficPlan(backend("v3", 1)))),
    ]
    results: dict[str, Any] = {"rollouts": rollouts, "streams": streams, "changes": {}}
    fleets = {p: [Proxy(p, cache, i) for i in range(streams)] for p in ("sotw", "delta")}
    for change in changes:
        before = {p: [proxy.bytes for proxy in fleet] for p, fleet in fleets.items()}
        change.apply(director)
        row: dict[str, Any] = {}
        for protocol, fleet in fleets.items():
            cpu_before = sum(proxy.cpu for proxy in fleet)
            for proxy in fleet:
                proxy.changed()
            cpu = sum(proxy.cpu for proxy in fleet) - cpu_before
            sent = [proxy.bytes - b for proxy, b in zip(fleet, before[protocol], strict=True)]
            row[protocol] = {"bytes_per_stream": max(sent), "cpu_seconds": round(cpu, 4)}
        results["changes"][change.name] = row
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{results['rollouts']} rollouts on one listener, {results['streams']} streams per protocol",
        f"{'change':<12} {'SotW bytes':>11} {'delta bytes':>12} {'SotW CPU s':>11} {'delta CPU s':>12}",
    ]
    for name, row in results["changes"].items():
        lines.append(f"{name:<12} {row['sotw']['bytes_per_stream']:>11} {row['delta']['bytes_per_stream']:>12} "
                     f"{row['sotw']['cpu_seconds']:>11.4f} {row['delta']['cpu_seconds']:>12.4f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rollouts", type=int, default=100)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    results = run(args.rollouts, args.streams)
    print(table(results))
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
