"""The admin API in process: a ControlPlane (no Envoy) with its admin server, called over gRPC.

Without proxies connected every weight counts as ACKed at once, so commands take effect within
the call. Policies are handed to the runner directly; nothing waits on the directory watcher.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aviary.admin.client import AdminClient, AdminError, ClientConfig
from aviary.admin.server import AdminConfig, AdminConfigError, is_loopback
from aviary.admin.service import SERVICE_NAME
from aviary.admin.v1 import admin_pb2 as pb
from aviary.app import ControlPlane, ServeConfig
from aviary.discovery import typeurls
from aviary.policy.loader import parse_policy_text
from aviary.policy.rollout_machine import Resume
from aviary.policy.schema import PolicySet
from aviary.tls import ClientTls, ServerTls, TlsConfigError
from tests.rig.ads_client import AdsClient
from tests.rig.certs import Pki, make_pki
from tests.rig.policies import rollout_doc
from tests.rig.waiting import async_wait_until

TOKEN = "s3cret-token"
Code = grpc.StatusCode


def policy(name: str = "shop", version: str = "v1", steps: tuple[int, ...] = (20, 50)) -> dict[str, Any]:
    return rollout_doc(name, version, steps)


def apply(plane: ControlPlane, *docs: dict[str, Any]) -> None:
    """Hand these policies to the engine, as the watcher would after reading them."""
    rollouts = {}
    for doc in docs:
        rollout, errors = parse_policy_text(yaml.safe_dump(doc), f"{doc['metadata']['name']}.yaml")
        assert rollout is not None, errors
        rollouts[rollout.name] = rollout
    plane.runner.apply_policies(PolicySet(rollouts))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


PlaneFactory = Callable[..., Awaitable[ControlPlane]]


@pytest.fixture
async def plane_factory(tmp_path: Path) -> AsyncIterator[PlaneFactory]:
    made: list[ControlPlane] = []

    async def make(admin: AdminConfig | None = None, xds_tls: ServerTls | None = None) -> ControlPlane:
        policies = tmp_path / f"policies-{len(made)}"
        policies.mkdir()
        (policies / "shop.yaml").write_text(yaml.safe_dump(policy()))
        config = ServeConfig(
            policies, xds_address="127.0.0.1:0", admin=admin or AdminConfig("127.0.0.1:0"), xds_tls=xds_tls
        )
        plane = ControlPlane(config)
        await plane.start()
        made.append(plane)
        return plane

    yield make
    for plane in made:
        await plane.stop(0)


@pytest.fixture
async def plane(plane_factory: PlaneFactory, token_file: Path) -> ControlPlane:
    return await plane_factory(AdminConfig("127.0.0.1:0", token_file=token_file))


@pytest.fixture
async def client(plane: ControlPlane, token_file: Path) -> AsyncIterator[AdminClient]:
    async with AdminClient(ClientConfig(f"127.0.0.1:{plane.admin_port}", token_file)) as c:
        yield c


async def refused(call: Awaitable[object]) -> AdminError:
    with pytest.raises(AdminError) as info:
        await call
    return info.value


# ---- reads -------------------------------------------------------------------------------------


async def test_list_and_get_a_stable_rollout(client: AdminClient) -> None:
    (shop,) = await client.list_rollouts()
    assert (shop.name, shop.phase, shop.stable_version, shop.canary_version) == ("shop", "Stable", "v1", "")
    assert (shop.weight, shop.steps) == (0, 2)
    # No canary: no step, no weight a proxy ACKed (absent, not a -1 sentinel)
    assert not shop.HasField("step") and not shop.HasField("acked_weight") and not shop.HasField("step_weight")
    assert shop.events[0].reason == "first sight: version v1 is stable"
    assert shop.events[0].to_phase == "Stable" and shop.events[0].from_phase == ""
    again = await client.get_rollout("shop")
    assert (again.name, again.phase, len(again.events)) == ("shop", "Stable", 1)


async def test_get_a_canary_shows_weight_step_and_time_in_step(plane: ControlPlane, client: AdminClient) -> None:
    apply(plane, policy(version="v2"))
    shop = await client.get_rollout("shop")
    assert (shop.phase, shop.stable_version, shop.canary_version) == ("Progressing", "v1", "v2")
    assert (shop.weight, shop.step, shop.steps, shop.acked_weight, shop.step_weight) == (20, 1, 2, 20, 20)  # 1-based
    assert shop.seconds_in_step >= 0.0
    assert "step 1 started" in shop.reason
    assert [e.to_phase for e in shop.events] == ["Stable", "Progressing", "Progressing"]
    assert shop.events[-1].time.seconds > 0


async def test_checks_carry_values_and_thresholds(plane: ControlPlane) -> None:
    from aviary.admin.convert import WallClock, check_message
    from aviary.policy.analysis import CheckOutcome, CheckResult, Thresholds

    result = CheckResult("success", CheckOutcome.FAIL, 97.5, 99.9, Thresholds(min=99.0), "97.5 < min 99")
    message = check_message(result)
    assert (message.name, message.outcome, message.value, message.stable_value) == ("success", "Fail", 97.5, 99.9)
    assert message.min == 99.0 and not message.HasField("max") and not message.HasField("max_decrease_from_stable")
    assert WallClock(100.0, 1_000.0).timestamp(90.0).seconds == 990


async def test_list_proxies_shows_a_connected_proxy(plane: ControlPlane, client: AdminClient) -> None:
    ads = AdsClient(plane.xds_port, node_id="envoy-7", node_cluster="edge")
    try:
        ads.send(typeurls.CLUSTER)
        response = await ads.receive()
        ads.ack(response)
        await async_wait_until(lambda: any(p.node_id == "envoy-7" for p in plane.proxies), 5, what="connect")

        async def acked() -> list[pb.Proxy]:
            proxies = await client.list_proxies()
            return proxies if proxies and proxies[0].acked else []

        (proxy,) = await async_wait_until(acked, 5, what="an ACK in ListProxies")
        assert (proxy.node_id, proxy.node_cluster) == ("envoy-7", "edge")
        assert proxy.peer and proxy.connected_since.seconds > 0
        assert [a.type_url for a in proxy.acked] == [typeurls.CLUSTER]
        assert not proxy.HasField("last_nack")
    finally:
        await ads.close()


async def test_validate_reports_errors_without_applying(client: AdminClient) -> None:
    assert await client.validate(yaml.safe_dump(policy(version="v9"))) == []
    bad = policy()
    bad["spec"]["strategy"]["steps"] = [50, 20]
    (error,) = await client.validate(yaml.safe_dump(bad), "shop.yaml")
    assert (error.file, error.field) == ("shop.yaml", "spec.strategy.steps[1]")
    assert "must exceed" in error.reason
    (error,) = await client.validate("", "")
    assert error.file == "<request>"
    assert (await client.get_rollout("shop")).stable_version == "v1"


# ---- commands ----------------------------------------------------------------------------------


async def test_pause_resume_set_weight_promote(plane: ControlPlane, client: AdminClient) -> None:
    apply(plane, policy(version="v2"))
    paused = await client.command("pause", "shop")
    assert (paused.phase, paused.weight) == ("Paused", 20)
    assert [(o.kind, o.detail) for o in paused.overrides] == [("pause", "paused by admin until Resume")]
    resumed = await client.command("resume", "shop")
    assert (resumed.phase, resumed.weight, list(resumed.overrides)) == ("Progressing", 20, [])
    manual = await client.set_weight("shop", 35)
    assert (manual.phase, manual.weight) == ("Paused", 35)
    assert manual.overrides[0].kind == "set-weight"
    assert plane.director.desired("shop") is not None
    assert plane.director.desired("shop").weights() == {"v1": 65, "v2": 35}  # type: ignore[union-attr]
    promoted = await client.command("promote", "shop")
    assert (promoted.phase, promoted.weight) == ("Promoting", 100)

    async def stable() -> bool:
        shop = await client.get_rollout("shop")
        return (shop.phase, shop.stable_version, shop.canary_version) == ("Stable", "v2", "")

    await async_wait_until(stable, 5, what="v2 to become stable once 100% is ACKed")


async def test_a_resumed_rollout_takes_its_next_step_when_due(plane: ControlPlane, client: AdminClient) -> None:
    """Resume must wake the engine: a paused rollout's loop had nothing to wait for."""
    doc = policy(version="v2")
    doc["spec"]["strategy"]["interval"] = "1s"
    apply(plane, doc)
    assert (await client.command("pause", "shop")).phase == "Paused"
    await async_wait_until(lambda: plane.runner._inbox.empty(), 5, what="the engine idle")
    plane.runner.command("shop", Resume())  # no await: the loop cannot run in between
    # Resuming changes no weight, so nothing is published and nothing else would wake the loop.
    assert not plane.runner._inbox.empty(), "the engine loop was not woken to plan its next step"

    async def next_step() -> bool:
        return (await client.get_rollout("shop")).weight == 50

    await async_wait_until(next_step, 30, what="the step after 20 % once resumed")  # a hang bound


async def test_abort_then_retry(plane: ControlPlane, client: AdminClient) -> None:
    apply(plane, policy(version="v2"))
    aborted = await client.command("abort", "shop")
    assert (aborted.phase, aborted.stable_version, aborted.failed_version, aborted.weight) == (
        "RolledBack", "v1", "v2", 0
    )
    assert "aborted by admin" in aborted.reason
    retried = await client.command("retry", "shop")
    assert (retried.phase, retried.canary_version, retried.weight, retried.failed_version) == (
        "Progressing", "v2", 20, ""
    )


@pytest.mark.parametrize(
    ("verb", "reason"),
    [
        ("promote", "shop: no canary: rollout is Stable"),
        ("pause", "shop: no canary: rollout is Stable"),
        ("resume", "shop: no canary: rollout is Stable"),
        ("abort", "shop: no canary: rollout is Stable"),
        ("retry", "shop: nothing to retry: rollout is Stable"),
    ],
)
async def test_a_command_that_does_not_apply_is_failed_precondition(
    client: AdminClient, verb: str, reason: str
) -> None:
    error = await refused(client.command(verb, "shop"))
    assert error.code is Code.FAILED_PRECONDITION
    assert error.detail == reason
    assert str(error) == f"refused: {reason}"


async def test_set_weight_on_a_stable_rollout_is_failed_precondition(client: AdminClient) -> None:
    error = await refused(client.set_weight("shop", 10))
    assert error.code is Code.FAILED_PRECONDITION


async def test_unknown_rollout_is_not_found(client: AdminClient) -> None:
    for call in (client.get_rollout("nope"), client.command("pause", "nope"), client.set_weight("nope", 5)):
        error = await refused(call)
        assert error.code is Code.NOT_FOUND
        assert error.detail == "no rollout named 'nope' (known: shop)"
        assert str(error).startswith("not found: ")


@pytest.mark.parametrize("weight", [-1, 101])
async def test_weight_outside_0_100_is_invalid_argument(
    plane: ControlPlane, client: AdminClient, weight: int
) -> None:
    apply(plane, policy(version="v2"))
    error = await refused(client.set_weight("shop", weight))
    assert error.code is Code.INVALID_ARGUMENT
    assert error.detail == f"weight must be within 0..100, got {weight}"
    assert (await client.get_rollout("shop")).weight == 20


async def test_empty_name_is_invalid_argument(client: AdminClient) -> None:
    for call in (client.get_rollout(""), client.command("promote", ""), client.set_weight("", 5)):
        error = await refused(call)
        assert error.code is Code.INVALID_ARGUMENT
        assert error.detail == "a rollout name is required"


# ---- watch -------------------------------------------------------------------------------------


async def test_watch_streams_transitions_and_unsubscribes_on_cancel(plane: ControlPlane, client: AdminClient) -> None:
    listeners_before = len(plane.runner._listeners)
    stream = client.watch()
    assert await anext(stream) is None  # subscribed
    apply(plane, policy(version="v2"))
    await client.command("pause", "shop")
    events = [await anext(stream) for _ in range(3)]
    assert [(e.from_phase, e.to_phase, e.weight) for e in events if e] == [
        ("Stable", "Progressing", 20),
        ("Progressing", "Progressing", 20),
        ("Progressing", "Paused", 20),
    ]
    first = events[0]
    assert first is not None
    assert (first.rollout, first.stable_version, first.canary_version, first.step) == ("shop", "v1", "v2", 1)
    assert len(plane.runner._listeners) == listeners_before + 1
    await stream.aclose()
    await async_wait_until(
        lambda: len(plane.runner._listeners) == listeners_before, 5, what="the watch to unsubscribe"
    )


async def test_watch_one_rollout_filters_the_others(plane: ControlPlane, client: AdminClient) -> None:
    apply(plane, policy(), policy("cart"))
    stream = client.watch("cart")
    assert await anext(stream) is None
    apply(plane, policy(version="v2"), policy("cart", version="v3"))
    event = await anext(stream)
    assert event is not None and (event.rollout, event.canary_version) == ("cart", "v3")
    await client.command("pause", "shop")
    await client.command("pause", "cart")
    events = [await anext(stream) for _ in range(2)]
    assert {e.rollout for e in events if e} == {"cart"}
    await stream.aclose()


async def test_watch_of_an_unknown_rollout_is_not_found(client: AdminClient) -> None:
    error = await refused(anext(client.watch("nope")))
    assert error.code is Code.NOT_FOUND


async def test_watch_ends_unavailable_when_the_plane_stops(plane: ControlPlane, client: AdminClient) -> None:
    stream = client.watch()
    assert await anext(stream) is None
    await plane.stop(1)
    error = await refused(anext(stream))
    assert error.code is Code.UNAVAILABLE
    assert "shutting down" in error.detail


# ---- authentication ----------------------------------------------------------------------------


async def test_no_token_and_wrong_token_are_unauthenticated(
    plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = f"127.0.0.1:{plane.admin_port}"
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    caplog.set_level(logging.WARNING, "aviary.admin")
    for token_file, detail in ((None, "missing token"), (wrong, "invalid token")):
        async with AdminClient(ClientConfig(address, token_file)) as c:
            for call in (c.list_rollouts(), c.command("promote", "shop"), anext(c.watch())):
                error = await refused(call)
                assert error.code is Code.UNAUTHENTICATED
                assert error.detail.startswith(detail)
                assert str(error).startswith("authentication failed: ")
    assert "refused: invalid token" in caplog.text
    assert "from ipv4:127.0.0.1:" in caplog.text
    assert TOKEN not in caplog.text


async def test_malformed_authorization_is_unauthenticated(plane: ControlPlane) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.admin_port}") as channel:
        list_rollouts = channel.unary_unary(
            f"/{SERVICE_NAME}/ListRollouts",
            request_serializer=pb.ListRolloutsRequest.SerializeToString,
            response_deserializer=pb.ListRolloutsResponse.FromString,
        )
        for value in (TOKEN, f"Basic {TOKEN}"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await list_rollouts(pb.ListRolloutsRequest(), metadata=(("authorization", value),))
            assert info.value.code() is Code.UNAUTHENTICATED
        ok = await list_rollouts(pb.ListRolloutsRequest(), metadata=(("authorization", f"bearer {TOKEN}"),))
        assert [r.name for r in ok.rollouts] == ["shop"]


async def test_health_is_serving_without_a_token(plane: ControlPlane) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.admin_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING


async def _list_services(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(metadata=metadata)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    return [s.name for s in response.list_services_response.service]


async def test_reflection_lists_the_admin_service_with_the_token(plane: ControlPlane) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.admin_port}") as channel:
        services = await _list_services(channel, (("authorization", f"Bearer {TOKEN}"),))
        assert SERVICE_NAME in services
        assert "grpc.health.v1.Health" in services
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _list_services(channel, ())
        assert info.value.code() is Code.UNAUTHENTICATED


async def test_without_a_token_file_loopback_needs_no_token(plane_factory: PlaneFactory) -> None:
    plane = await plane_factory(AdminConfig("127.0.0.1:0"))
    async with AdminClient(ClientConfig(f"127.0.0.1:{plane.admin_port}")) as c:
        assert [r.name for r in await c.list_rollouts()] == ["shop"]


@pytest.mark.parametrize("address", ["0.0.0.0:18001", "[::]:0", "10.1.2.3:18001", "admin.example.com:18001", ":0"])
async def test_exposed_address_without_token_is_refused_at_start_up(tmp_path: Path, address: str) -> None:
    with pytest.raises(AdminConfigError, match="without --admin-token-file"):
        ControlPlane(ServeConfig(tmp_path, xds_address="127.0.0.1:0", admin=AdminConfig(address)))


def test_loopback_addresses() -> None:
    for address in ("127.0.0.1:1", "127.3.4.5:1", "localhost:1", "[::1]:1"):
        assert is_loopback(address), address
    for address in ("0.0.0.0:1", "[::]:1", "192.168.0.1:1", "example.com:1"):
        assert not is_loopback(address), address


async def test_empty_token_file_is_refused_at_start_up(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(AdminConfigError, match="is empty"):
        admin = AdminConfig("127.0.0.1:0", token_file=empty)
        ControlPlane(ServeConfig(tmp_path, xds_address="127.0.0.1:0", admin=admin))


# ---- TLS ---------------------------------------------------------------------------------------


async def test_tls_admin(plane_factory: PlaneFactory, pki: Pki, token_file: Path) -> None:
    tls = ServerTls(pki.server_cert, pki.server_key)
    plane = await plane_factory(AdminConfig("127.0.0.1:0", token_file=token_file, tls=tls))
    address = f"127.0.0.1:{plane.admin_port}"
    async with AdminClient(ClientConfig(address, token_file, ClientTls(ca=pki.ca))) as c:
        assert [r.name for r in await c.list_rollouts()] == ["shop"]
    async with AdminClient(ClientConfig(address, token_file, timeout=2)) as plaintext:
        assert (await refused(plaintext.list_rollouts())).code is Code.UNAVAILABLE
    other_ca = make_pki(pki.ca.parent / "other", "another CA")
    async with AdminClient(ClientConfig(address, token_file, ClientTls(ca=other_ca.ca), timeout=2)) as untrusted:
        assert (await refused(untrusted.list_rollouts())).code is Code.UNAVAILABLE


async def test_mtls_admin_requires_a_client_certificate(plane_factory: PlaneFactory, pki: Pki) -> None:
    tls = ServerTls(pki.server_cert, pki.server_key, client_ca=pki.ca)
    plane = await plane_factory(AdminConfig("127.0.0.1:0", tls=tls))
    address = f"127.0.0.1:{plane.admin_port}"
    with_cert = ClientTls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    async with AdminClient(ClientConfig(address, tls=with_cert)) as c:
        assert [r.name for r in await c.list_rollouts()] == ["shop"]
    async with AdminClient(ClientConfig(address, tls=ClientTls(ca=pki.ca), timeout=2)) as no_cert:
        assert (await refused(no_cert.list_rollouts())).code is Code.UNAVAILABLE


async def test_tls_files_that_cannot_be_read_fail_at_start_up(tmp_path: Path, pki: Pki) -> None:
    missing = ServerTls(tmp_path / "missing.pem", pki.server_key)
    with pytest.raises(TlsConfigError, match=r"TLS certificate .*missing\.pem"):
        ControlPlane(ServeConfig(tmp_path, xds_address="127.0.0.1:0", xds_tls=missing))
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    with pytest.raises(TlsConfigError, match="not a PEM file"):
        ControlPlane(ServeConfig(tmp_path, xds_address="127.0.0.1:0", xds_tls=ServerTls(not_pem, pki.server_key)))


async def test_mtls_xds(plane_factory: PlaneFactory, pki: Pki) -> None:
    plane = await plane_factory(xds_tls=ServerTls(pki.server_cert, pki.server_key, client_ca=pki.ca))
    node = base_pb2.Node(id="envoy-tls", cluster="edge")
    request = discovery_pb2.DiscoveryRequest(type_url=typeurls.CLUSTER, node=node)

    async def first_response(credentials: grpc.ChannelCredentials) -> discovery_pb2.DiscoveryResponse:
        async with grpc.aio.secure_channel(f"127.0.0.1:{plane.xds_port}", credentials) as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(timeout=3)
            await call.write(request)
            response = await call.read()
            call.cancel()
            return response

    ca, cert, key = pki.ca.read_bytes(), pki.client_cert.read_bytes(), pki.client_key.read_bytes()
    response = await first_response(grpc.ssl_channel_credentials(ca, key, cert))
    assert response.type_url == typeurls.CLUSTER and len(response.resources) == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await first_response(grpc.ssl_channel_credentials(ca))
    assert info.value.code() is Code.UNAVAILABLE


def test_client_tls_needs_cert_and_key_together(pki: Pki) -> None:
    with pytest.raises(TlsConfigError):
        ClientTls(ca=pki.ca, cert=pki.client_cert)


def test_check_message_carries_kind_queries_and_compare_bounds() -> None:
    from aviary.admin.convert import check_message
    from aviary.policy.analysis import CheckOutcome, CheckResult, Thresholds

    result = CheckResult("p99-vs", CheckOutcome.FAIL, 300.0, 200.0, Thresholds(max=1.2, by="ratio"), "1.5 > max (1.2)",
                         "compare", ("q-canary", "q-stable"), None, None)
    message = check_message(result)
    assert (message.kind, list(message.queries), message.compare_by, message.max) == (
        "compare", ["q-canary", "q-stable"], "ratio", 1.2)
    assert not message.HasField("canary_samples") and not message.HasField("min")
    samples = check_message(CheckResult("l", CheckOutcome.PASS, None, None, Thresholds(), "ok", "judge", (), 40, 41,
                                        2.5, (-1.0, 6.0)))
    assert (samples.canary_samples, samples.stable_samples) == (40, 41)
    assert (samples.effect, samples.effect_low, samples.effect_high) == (2.5, -1.0, 6.0)
    assert not message.HasField("effect")


async def test_explain_lists_every_round_with_its_checks_and_transitions(plane: ControlPlane,
                                                                         client: AdminClient) -> None:
    import io

    from rich.console import Console

    from aviary.admin import render
    from aviary.policy.analysis import CheckOutcome, CheckResult, Thresholds
    from aviary.policy.rollout_state import ChecksCompleted

    doc = policy(version="v2")
    doc["spec"]["analysis"] = {"prometheus": "http://127.0.0.1:9", "checkEvery": "1h",
                               "metrics": [{"name": "success", "template": "request-success-rate", "min": 99}]}
    apply(plane, doc)

    def started() -> bool:
        status = plane.runner.status("shop")
        return status is not None and status.step_started_at is not None

    await async_wait_until(started, 10, what="step 1 ACKed")
    at = plane.runner.now()
    passing = (CheckResult("success", CheckOutcome.PASS, 99.5, None, Thresholds(min=99.0), "99.5 >= min (99)",
                           queries=("sum(x)",)),)
    failing = (CheckResult("success", CheckOutcome.FAIL, 90.0, None, Thresholds(min=99.0), "90 < min (99)"),)
    plane.runner.handle("shop", ChecksCompleted(passing, at, "v2"))
    plane.runner.handle("shop", ChecksCompleted(failing, at + 0.001, "v2"))
    explained = await client.explain("shop")
    assert explained.name == "shop"
    assert [(r.outcome, r.step, r.weight, r.canary_version) for r in explained.rounds] == [
        ("Pass", 1, 20, "v2"), ("Fail", 1, 20, "v2")]
    assert explained.rounds[0].checks[0].queries == ["sum(x)"] and not explained.rounds[0].transitions
    assert "rolled back v2" in explained.rounds[1].transitions[0]
    assert explained.events[-1].to_phase == "RolledBack"
    out = io.StringIO()
    Console(file=out, width=300).print(render.explanation(explained))
    assert "90 < min (99)" in out.getvalue() and "rolled back v2" in out.getvalue()
    assert "rolled back v2" in render.as_json(explained)
    await refused(client.explain("nope"))
