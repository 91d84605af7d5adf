"""`aviary serve --xds-workers 2`: streams in two worker processes, through real Envoys.

(Every other e2e test runs `aviary serve` with the default, one worker per core: two here.)

One `aviary serve --xds-workers 2` subprocess (tests/rig/serve_process.py) serves four Envoys, which
land on both workers (`aviary proxies -o json` says which), and a fake proxy
(tests/rig/gating_proxy.py) that withholds its ACK of the canary's 30 %.

What must hold:
- the 60 % step does not start while that one proxy holds its ACK, though every Envoy (on either
  worker) has 30 %: the gate waits for every proxy, whichever worker holds it;
- SIGKILL of the worker holding some Envoys: it is restarted, its Envoys reconnect and end on the
  current route (a weight set while they reconnect), the weight they route never goes down, and
  no request through the Envoys fails meanwhile;
- a second `aviary serve --xds-workers 2` on the same xDS port exits 2 with one line;
- stopping `aviary serve` (SIGTERM), or killing it, leaves no worker process behind;
- SIGSTOP of a worker holding some Envoys (alive, answering nothing), then a canary: no Envoy gets
  a route to it while those Envoys cannot ACK its cluster (make-before-break waits for every
  proxy); the supervisor finds the worker silent (heartbeats), kills and replaces it; the Envoys
  reconnect, get the current configuration and the canary steps on, the weight never going down
  and no request failing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviary.discovery.resources import cluster_name
from aviary.discovery.workers import HEARTBEAT_SECONDS, HUNG_AFTER, usable_cores
from tests.conftest import _FAILED, EnvoyFactory, LoadgenFactory
from tests.rig.backends import Backends
from tests.rig.control_plane import write_policy as write_rollout
from tests.rig.envoy import EnvoyProcess
from tests.rig.envoy_sampler import EnvoySampler
from tests.rig.gating_proxy import GatingProxy
from tests.rig.ports import free_ports
from tests.rig.serve_process import AviaryServe
from tests.rig.simple_http import http_request
from tests.rig.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

NAME = "shop"
HOST = "shop.example.com"
OLD, CANARY = cluster_name(NAME, "v1"), cluster_name(NAME, "v2")
ENVOYS = 4
HOLD = 5.0  # seconds the fake proxy withholds its ACK of 30 %: more than twice the interval
WORKERS = ("--xds-workers", "2")
INTERVAL = 2.0  # seconds per canary step


def write_policy(policies: Path, port: int, version: str, endpoint: str, steps: list[int] | None = None) -> None:
    strategy = {"steps": steps, "interval": f"{INTERVAL:g}s"} if steps is not None else None
    write_rollout(policies, NAME, port=port, version=version, endpoints=[endpoint], hosts=(HOST,), strategy=strategy)


def worker_pids(parent: int) -> dict[int, int]:
    """Worker number -> pid of the xDS workers whose parent is ``parent`` (from /proc)."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != parent or b"aviary.discovery.worker_main" not in args:
            continue
        found[int(args[args.index(b"--worker") + 1])] = int(entry)
    return found


def two_workers(parent: int | None, without: int | None = None, count: int = 2) -> dict[int, int] | None:
    """The two (``count``) workers of ``parent`` once there are that many (and none is ``without``), else None."""
    workers = worker_pids(parent or 0)
    return workers if len(workers) == count and without not in workers else None


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not reaped, does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def placement(plane: AviaryServe) -> dict[str, int]:
    """Node id -> xDS worker number of every connected proxy."""
    return {p["node_id"]: int(p.get("xds_worker", 0)) for p in plane.cli_json("proxies")}


def placement_of(plane: AviaryServe, nodes: set[str]) -> dict[str, int] | None:
    """`placement` once every one of ``nodes`` is connected, else None."""
    where = placement(plane)
    return where if where.keys() >= nodes else None


def disconnected(plane: AviaryServe, node: str) -> bool:
    return node not in placement(plane)


def metric_lines(plane: AviaryServe) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{plane.metrics_port}/metrics", timeout=5) as answer:
        text: str = answer.read().decode()
    return text.splitlines()


def worker_metrics(plane: AviaryServe) -> tuple[float, float, float]:
    """(streams over all workers, connected proxies, worker restarts) from the plane's /metrics."""
    lines = metric_lines(plane)

    def total(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    return total("aviary_xds_worker_streams{"), total("aviary_connected_proxies{"), total("aviary_xds_worker_restarts")


def engine_said(plane: AviaryServe, text: str) -> bool:
    """A line of the engine's log (rollout transitions) contains ``text``."""
    return any(text in entry.get("message", "") for entry in plane.log_entries())


def acked_route(plane: AviaryServe) -> dict[str, str]:
    """Node id -> the RDS version it ACKed."""
    out = {}
    for proxy in plane.cli_json("proxies"):
        for acked in proxy.get("acked", []):
            if acked["type_url"].endswith("RouteConfiguration"):
                out[proxy["node_id"]] = acked["version"]
    return out


@pytest.fixture
def plane(workdir: Path, request: pytest.FixtureRequest) -> Iterator[AviaryServe]:
    policies = workdir / "policies"
    policies.mkdir()
    serve = AviaryServe(workdir / "aviary", policies, workdir / "state" / "aviary.db")
    try:
        yield serve
    finally:
        if request.node.stash.get(_FAILED, False):
            print(f"\n===== {serve.describe()}")
        serve.stop()


def spread_envoys(plane: AviaryServe, envoy_factory: EnvoyFactory, port: int) -> list[EnvoyProcess]:
    """ENVOYS Envoys, with at least one on each worker (the kernel picks: an Envoy is restarted,
    i.e. reconnects from another source port, until both workers hold some). Odd ones speak delta
    xDS (``DELTA_GRPC``), even ones State-of-the-World: the gate and the worker restart hold for both."""
    envoys = [envoy_factory(plane.xds_port, node_id=f"envoy-{i}", delta=i % 2 == 1) for i in range(1, ENVOYS + 1)]
    for envoy in envoys:
        envoy.wait_ready()
        envoy.wait_for_listener(port)
    nodes = {e.node_id for e in envoys}
    for attempt in range(12):
        where = wait_until(lambda: placement_of(plane, nodes), 15, what="every Envoy connected")
        assert where is not None
        if len({where[n] for n in nodes}) == 2:
            return envoys
        moved = envoys[attempt % ENVOYS]
        moved.stop()
        wait_until(lambda: disconnected(plane, moved.node_id), 10, what="the Envoy gone")  # noqa: B023
        moved.start()
        moved.wait_ready()
    raise AssertionError(f"all Envoys stayed on one worker: {placement(plane)}")


def test_every_proxy_on_every_worker_gates_and_a_killed_worker_is_replaced(
    workdir: Path,
    plane: AviaryServe,
    backends: Backends,
    envoy_factory: EnvoyFactory,
    loadgen_factory: LoadgenFactory,
) -> None:
    backends.start(["v1", "v2"])
    (port,) = free_ports(1)
    route = f"route-127.0.0.1-{port}"
    write_policy(plane.policies, port, "v1", backends.address("v1"))
    proc = plane.start(*WORKERS)
    assert proc.pid is not None
    first_workers = wait_until(lambda: two_workers(proc.pid), 10, what="two workers")
    envoys = spread_envoys(plane, envoy_factory, port)
    for envoy in envoys:
        envoy.wait_rollout_weights(route, NAME, {"v1": 100}, 15)
    where = placement(plane)
    print(f"\n[xds-workers] workers {first_workers}, proxies on {where}")

    gate = GatingProxy(plane.xds_port, route, CANARY, 30, node_id="gating-proxy")
    samplers = [EnvoySampler(e, route, NAME).start() for e in envoys]
    try:
        gate.start()
        wait_until(lambda: gate.stats().acks.get("RDS"), 10, what="the gating proxy to ACK the route to v1")
        gate_worker = placement(plane)["gating-proxy"]
        others = [e for e in envoys if where[e.node_id] != gate_worker]
        assert others, f"no Envoy on another worker than the gating proxy's ({gate_worker}): {where}"
        lg = loadgen_factory(f"127.0.0.1:{port}", HOST, clients=4, rate_per_client=25.0)

        # -- the gate: 30 % everywhere, the 60 % step waits for the one proxy that holds its ACK
        # Small steps after 60 %: the pause below may come a few steps late on a loaded machine.
        write_policy(plane.policies, port, "v2", backends.address("v2"), steps=[30, 60, *range(65, 100, 5)])
        for envoy in envoys:
            envoy.wait_rollout_weights(route, NAME, {"v1": 70, "v2": 30}, 15)
        wait_until(gate.holding, 10, what="the gating proxy to hold its ACK of 30 %")
        held_since = time.monotonic()
        while time.monotonic() - held_since < HOLD:
            for envoy in envoys:
                assert envoy.route_weights(route).get(NAME) == {OLD: 70, CANARY: 30}, envoy.node_id
            time.sleep(0.2)  # observation cadence, not synchronisation
        status = plane.cli_json("status", NAME)
        assert status["weight"] == 30 and float(status.get("seconds_in_step", 0)) < 1.0, status
        gate.release()
        for envoy in envoys:
            envoy.wait_rollout_weights(route, NAME, {"v1": 40, "v2": 60}, 15)
        plane.cli("pause", NAME)
        weight = int(plane.cli_json("status", NAME)["weight"])
        for envoy in envoys:
            envoy.wait_rollout_weights(route, NAME, {"v1": 100 - weight, "v2": weight}, 15)

        # -- SIGKILL the worker that holds some Envoys; set a new weight while they reconnect
        victim_number = where[others[0].node_id]
        victims = [e.node_id for e in envoys if where[e.node_id] == victim_number]
        victim_pid = worker_pids(proc.pid)[victim_number]
        os.kill(victim_pid, signal.SIGKILL)
        new_weight = weight + 5  # up: the samplers check that no Envoy ever routes less to the canary
        plane.cli("set-weight", NAME, str(new_weight))
        replaced = wait_until(lambda: two_workers(proc.pid, victim_number), 20, what="the killed worker replaced")
        for envoy in envoys:
            envoy.wait_rollout_weights(route, NAME, {"v1": 100 - new_weight, "v2": new_weight}, 20)
        after = wait_until(lambda: placement_of(plane, set(where)), 20, what="every proxy back")
        assert after is not None
        assert victim_number not in after.values(), after  # its streams were reported gone
        routes = acked_route(plane)
        assert len({routes[n] for n in where}) == 1, routes  # all on one route version: the current one
        result = lg.stop()
    finally:
        for sampler in samplers:
            sampler.stop()
        gate.stop()
    print(f"[xds-workers] killed worker {victim_number} (pid {victim_pid}, Envoys {victims}); "
          f"workers now {replaced}; proxies on {after}; load {result.total} requests, {result.failed} failed")
    for sampler in samplers:
        assert not sampler.decreases(CANARY), (sampler.envoy.node_id, sampler.changes(CANARY))
    assert result.total > 100 and result.failed == 0, result.failures
    logs = plane.current.log_text()
    assert f"xDS worker {victim_number} (pid {victim_pid}) exited" in logs
    # The metrics count every worker's streams (the gating proxy has gone: the Envoys remain).
    wait_until(lambda: worker_metrics(plane) == (ENVOYS, ENVOYS, 1), 10, what="the worker metrics")

    # -- a second instance on the same xDS port is refused, with one line
    second = AviaryServe(workdir / "b", plane.policies, workdir / "b-state" / "state.db")
    second.xds_port = plane.xds_port
    b = second.spawn(*WORKERS)
    code = b.wait(15)
    lines = [line for line in b.log_text().splitlines() if line.strip()]
    assert (code, lines) == (2, [f"aviary serve: --xds-address 127.0.0.1:{plane.xds_port}: address already in use"])

    # -- stopping aviary serve stops every worker
    workers = worker_pids(proc.pid)
    assert proc.stop() == 0
    wait_until(lambda: not any(alive(pid) for pid in workers.values()), 10, what="no worker left")


def test_killing_the_engine_process_leaves_no_worker(plane: AviaryServe) -> None:
    """Workers notice the engine's end (their socket closes) and exit, even after a SIGKILL. With
    the default --xds-workers: one per usable core."""
    cores = usable_cores()
    if cores == 1:
        pytest.skip("one usable core: the default is the single process")
    proc = plane.start()
    workers = wait_until(lambda: two_workers(proc.pid, count=cores), 10, what=f"{cores} workers")
    assert workers is not None
    proc.kill9()
    wait_until(lambda: not any(alive(pid) for pid in workers.values()), 10, what="no worker left")


def test_a_hung_worker_is_replaced_and_the_rollout_waits_for_its_envoys(
    plane: AviaryServe,
    backends: Backends,
    envoy_factory: EnvoyFactory,
    loadgen_factory: LoadgenFactory,
) -> None:
    backends.start(["v1", "v2"])
    (port,) = free_ports(1)
    route = f"route-127.0.0.1-{port}"
    write_policy(plane.policies, port, "v1", backends.address("v1"))
    proc = plane.start(*WORKERS)
    assert proc.pid is not None
    wait_until(lambda: two_workers(proc.pid), 10, what="two workers")
    envoys = spread_envoys(plane, envoy_factory, port)
    for envoy in envoys:
        envoy.wait_rollout_weights(route, NAME, {"v1": 100}, 15)
    where = placement(plane)
    victim_number = where[envoys[0].node_id]
    victims = [e for e in envoys if where[e.node_id] == victim_number]
    victim_pid = worker_pids(proc.pid)[victim_number]
    samplers = {e.node_id: EnvoySampler(e, route, NAME).start() for e in envoys}
    try:
        lg = loadgen_factory(f"127.0.0.1:{port}", HOST, clients=4, rate_per_client=25.0)
        # -- SIGSTOP: the worker is alive but answers nothing. Then a canary starts.
        os.kill(victim_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        # The first heartbeat it misses is at most one heartbeat after the stop: it is killed no sooner.
        killed_no_sooner = stopped_at + (HUNG_AFTER - 1) * HEARTBEAT_SECONDS
        write_policy(plane.policies, port, "v2", backends.address("v2"), steps=[10, 20])
        wait_until(lambda: engine_said(plane, "Stable -> Progressing, canary v2 at 10%"),
                   killed_no_sooner - time.monotonic(), what="the canary's first step, before the worker can be hung")
        decided = time.monotonic() - stopped_at
        # While it is stopped, its Envoys cannot ACK the canary's cluster, so no Envoy is sent a
        # route to it (make-before-break waits for every proxy, on every worker), and the step's
        # clock does not start. An observation that ends after the worker may have been killed is
        # no evidence: it ends the watch. (The engine's log, not `aviary status`: a CLI process can
        # take seconds to start on a loaded machine.)
        held = 0.0
        while True:
            weights = {e.node_id: e.route_weights(route).get(NAME) for e in envoys}
            acked = engine_said(plane, "10% to v2 ACKed by every proxy")
            if (seen := time.monotonic()) >= killed_no_sooner:
                break
            assert all(w == {OLD: 100} for w in weights.values()) and not acked, weights
            held = seen - stopped_at
            time.sleep(0.2)  # observation cadence, not synchronisation
        assert held - decided >= 2 * INTERVAL, (decided, held)  # watched for two step intervals at least

        # -- found silent, killed, replaced; its Envoys reconnect and get the current configuration,
        # the canary's cluster and its first weight go out, and the steps go on
        replaced = wait_until(lambda: two_workers(proc.pid, victim_number), 30, what="the hung worker replaced")
        assert not alive(victim_pid)
        after = wait_until(lambda: placement_of(plane, set(where)), 20, what="every proxy back")
        assert after is not None and victim_number not in after.values(), after
        for sampler in samplers.values():
            wait_until(lambda: sampler.first_at(CANARY, 20), 30, what="every Envoy at the second step")  # noqa: B023
        result = lg.stop()
    finally:
        for sampler in samplers.values():
            sampler.stop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim_pid, signal.SIGCONT)  # if the test failed before the supervisor killed it
    print(f"\n[xds-workers] SIGSTOP of worker {victim_number} (pid {victim_pid}, Envoys "
          f"{[e.node_id for e in victims]}); the canary held {held:.1f}s after the stop; "
          f"workers now {replaced}; load {result.total} requests, {result.failed} failed")
    for node, sampler in samplers.items():
        assert not sampler.decreases(CANARY), (node, sampler.changes(CANARY))
    assert result.total > 100 and result.failed == 0, result.failures
    logs = plane.current.log_text()
    assert f"xDS worker {victim_number} (pid {victim_pid}) has not answered for {HUNG_AFTER} heartbeats" in logs
    assert 'aviary_xds_worker_restarts_total{reason="hung"} 1.0' in metric_lines(plane)


def test_envoy_reports_reach_the_engine_from_every_worker(
    plane: AviaryServe, backends: Backends, envoy_factory: EnvoyFactory
) -> None:
    """The metrics service and access logs of Envoys on both workers end in the engine's one store:
    ``aviary proxies`` shows when each reported."""
    backends.start(["v1"])
    (port,) = free_ports(1)
    write_rollout(plane.policies, NAME, port=port, version="v1", endpoints=[backends.address("v1")], hosts=(HOST,),
                  analysis={"provider": "envoy", "metrics": [{"name": "s", "template": "request-success-rate",
                                                               "min": 99}]})
    plane.start(*WORKERS)

    def reporting(*args: object, **kwargs: object) -> EnvoyProcess:
        return envoy_factory(*args, reports=True, **kwargs)

    spread_envoys(plane, reporting, port)
    for _ in range(20):  # the Envoys share the listener's port: the kernel picks one per connection
        assert http_request(port, "/", headers={"Host": HOST}).status == 200

    def every_one_reported() -> list[dict[str, object]] | None:
        proxies = plane.cli_json("proxies")
        done = (len(proxies) == ENVOYS and all("metrics_reported" in p for p in proxies)
                and any("access_log_reported" in p for p in proxies))
        return proxies if done else None

    try:
        proxies = wait_until(every_one_reported, 15, what="every Envoy's metrics and access logs in aviary proxies")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {plane.cli_json('proxies')}") from exc
    assert len({int(str(p.get("xds_worker", 0))) for p in proxies}) == 2, proxies  # both workers forwarded
    assert f"Envoy reports: {ENVOYS} of {ENVOYS} proxies" in plane.cli("status").stdout
