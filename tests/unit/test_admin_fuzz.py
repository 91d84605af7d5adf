"""Hostile admin API calls: each gets a proper status, and the control plane keeps serving.

An in-process ControlPlane with the admin API and a token serves two rollouts: ``shop`` (stable)
and ``cart`` (a canary at 20 %). Hypothesis draws calls: any method, rollout names (unicode, empty,
huge), weights over the whole int32 range, Validate texts (arbitrary and binary-ish text, huge
text, deeply nested YAML, alias bombs, huge integers), and authorization metadata (right, wrong,
missing, malformed, duplicated). The examples are drawn first and then sent over gRPC in turn.

Every call must end with the status the request deserves (OK, INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION or UNAUTHENTICATED; never UNKNOWN or INTERNAL) within a deadline. Afterwards a
normal GetRollout works and an xDS client still gets its configuration.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aviary.admin.server import AdminConfig
from aviary.admin.service import SERVICE_NAME
from aviary.admin.v1 import admin_pb2 as pb
from aviary.app import ControlPlane, ServeConfig
from aviary.discovery import typeurls
from aviary.policy.loader import MAX_POLICY_BYTES
from tests.rig.ads_client import AdsClient
from tests.rig.policies import rollout_doc
from tests.rig.waiting import async_wait_until

pytestmark = pytest.mark.timeout(120)

TOKEN = "fuzz-token-0123456789"
KNOWN = ("shop", "cart")
Code = grpc.StatusCode
INT32 = (-(2**31), 2**31 - 1)
CALL_DEADLINE = 15.0  # seconds; a call that takes longer is a failure, not a slow pass
FUZZ_BUDGET = 20.0  # seconds of calls at most; the examples are drawn up front


def policy(name: str, version: str) -> str:
    return yaml.safe_dump(rollout_doc(name, version))


# ------------------------------------------------------------------------------ strategies

names = st.one_of(
    st.sampled_from([*KNOWN, "", "nope", "SHOP", "shop ", " cart", "shop\x00", "cart-v2", "🐦"]),
    st.text(max_size=64),
    st.builds(lambda s, n: (s or "x") * n, st.text(min_size=1, max_size=4), st.integers(1_000, 60_000)),
)
weights = st.one_of(st.integers(-5, 105), st.sampled_from([*INT32, -1, 101, 2**16]), st.integers(*INT32))


def nested(n: int, kind: str) -> str:
    if kind == "flow-list":
        return "[" * n + "]" * n
    if kind == "flow-map":
        return "{a: " * n + "1" + "}" * n
    return "\n".join(" " * i + "- " for i in range(0, 2 * min(n, 400), 2))  # block sequences


def alias_bomb(levels: int, width: int, where: str) -> str:
    """``levels`` anchors, each a list of ``width`` aliases of the one before: width**levels nodes."""
    lines = ["x0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    top = f"*a{levels - 1}"
    if where == "endpoints":  # where a validation message used to print the whole expansion
        lines.append(
            "apiVersion: aviary.dev/v1\nkind: Rollout\nmetadata: {name: bomb}\n"
            f"spec: {{listener: {{port: 10000}}, hosts: [a.example.com], version: v1, endpoints: {top}}}"
        )
    elif where == "hosts":
        lines.append(
            "apiVersion: aviary.dev/v1\nkind: Rollout\nmetadata: {name: bomb}\n"
            f"spec: {{listener: {{port: 10000}}, hosts: {top}, version: v1, endpoints: ['127.0.0.1:1']}}"
        )
    else:
        lines.append(f"bomb: {top}")
    return "\n".join(lines) + "\n"


VALID = (policy("shop", "v9"), policy("cart", "v3"))

# (text, whether Validate must report errors: True, False, or None for "either"). At most ~3 MB of
# UTF-8: past 4 MiB gRPC itself refuses the message (RESOURCE_EXHAUSTED) before Aviary sees it.
texts = st.one_of(
    st.tuples(st.text(max_size=2_000), st.none()),
    st.tuples(st.binary(max_size=2_000).map(lambda b: b.decode("latin-1")), st.none()),
    st.tuples(st.sampled_from(VALID), st.just(False)),
    st.tuples(st.sampled_from(["", "---\n---\n", "\ufeff", "!!python/object:os.system ls"]), st.just(True)),
    st.tuples(st.builds(lambda junk: policy("shop", "v2") + junk, st.text(max_size=200)), st.none()),
    st.tuples(
        st.builds(lambda n, ch: "a: " + ch * n, st.integers(100_000, 1_500_000), st.sampled_from(["x", "é", "[", " "])),
        st.just(True),
    ),
    st.tuples(st.builds(nested, st.integers(1, 50_000), st.sampled_from(["flow-list", "flow-map", "block"])),
              st.just(True)),
    st.tuples(
        st.builds(alias_bomb, st.integers(2, 12), st.integers(2, 12), st.sampled_from(["endpoints", "hosts", "top"])),
        st.just(True),
    ),
    # huge integers: a port of 6 to 20 000 digits (Python refuses to parse more than 4300)
    st.tuples(st.builds(lambda n: policy("shop", "v2").replace("10000", "1" * n), st.integers(6, 20_000)),
              st.just(True)),
)

BEARER = f"Bearer {TOKEN}"
_printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=80)


@dataclass(frozen=True)
class Auth:
    metadata: tuple[tuple[str, str | bytes], ...] | None
    valid: bool


auths = st.one_of(
    st.just(Auth(None, False)),
    st.sampled_from([BEARER, f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN}"]).map(
        lambda v: Auth((("authorization", v),), True)
    ),
    _printable.filter(lambda t: t != TOKEN).map(lambda t: Auth((("authorization", f"Bearer {t}"),), False)),
    _printable.filter(lambda t: t.lower() != "bearer").map(lambda t: Auth((("authorization", t),), False)),
    st.sampled_from([TOKEN, f"Basic {TOKEN}", "Bearer", "Bearer ", f"Bearer{TOKEN}", f"Token {TOKEN}"]).map(
        lambda v: Auth((("authorization", v),), False)
    ),
    st.just(Auth((("authorization", BEARER), ("authorization", BEARER)), False)),  # one value, not two
    st.just(Auth((("authorization", "Bearer wrong"), ("authorization", BEARER)), False)),
    st.just(Auth((("authorization-bin", TOKEN.encode()),), False)),
    st.just(Auth((("x-authorization", BEARER),), False)),
)
# Three calls in four carry the right token, so that the handlers themselves get fuzzed.
call_auth = st.integers(0, 3).flatmap(lambda n: st.just(Auth((("authorization", BEARER),), True)) if n else auths)

METHODS = ("GetRollout", "Pause", "Resume", "Promote", "Abort", "Retry", "SetWeight", "Validate",
           "ListRollouts", "ListProxies", "WatchRollouts")


@dataclass(frozen=True)
class Call:
    method: str
    request: Any
    auth: Auth
    expect_errors: bool | None = None  # Validate only

    def expected(self) -> set[Code]:
        """The codes this call may end with."""
        if not self.auth.valid:
            return {Code.UNAUTHENTICATED}
        request, method = self.request, self.method
        if method == "Validate" and len(request.text.encode()) > MAX_POLICY_BYTES:
            return {Code.INVALID_ARGUMENT}  # refused before parsing, naming the limit
        if method in ("Validate", "ListRollouts", "ListProxies"):
            return {Code.OK}
        if method == "SetWeight" and not 0 <= request.weight <= 100:
            return {Code.INVALID_ARGUMENT}
        if method == "WatchRollouts":
            return {Code.OK} if request.name in ("", *KNOWN) else {Code.NOT_FOUND}
        if not request.name:
            return {Code.INVALID_ARGUMENT}
        if request.name not in KNOWN:
            return {Code.NOT_FOUND}
        if method == "GetRollout":
            return {Code.OK}
        return {Code.OK, Code.FAILED_PRECONDITION}

    def describe(self) -> str:
        text = str(self.request).replace("\n", " ")
        return f"{self.method}({text[:200]}{'...' if len(text) > 200 else ''}) auth={self.auth.metadata!r:.120}"


@st.composite
def calls(draw: st.DrawFn) -> Call:
    method = draw(st.sampled_from(METHODS))
    expect_errors = None
    if method == "Validate":
        text, expect_errors = draw(texts)
        request: Any = pb.ValidateRequest(text=text, file=draw(st.one_of(st.just(""), st.text(max_size=100))))
    elif method == "SetWeight":
        request = pb.SetWeightRequest(name=draw(names), weight=draw(weights))
    elif method == "ListRollouts":
        request = pb.ListRolloutsRequest()
    elif method == "ListProxies":
        request = pb.ListProxiesRequest()
    elif method == "WatchRollouts":
        request = pb.WatchRolloutsRequest(name=draw(names))
    elif method == "GetRollout":
        request = pb.GetRolloutRequest(name=draw(names))
    else:
        request = pb.RolloutRequest(name=draw(names))
    return Call(method, request, draw(call_auth), expect_errors)


# ------------------------------------------------------------------------------ the plane


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    policies = tmp_path / "policies"
    policies.mkdir()
    for name in KNOWN:
        (policies / f"{name}.yaml").write_text(policy(name, "v1"))
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    config = ServeConfig(
        policies, xds_address="127.0.0.1:0", poll_interval=0.1, admin=AdminConfig("127.0.0.1:0", token_file=token)
    )
    plane = ControlPlane(config)
    await plane.start()
    try:
        (policies / ".cart.tmp").write_text(policy("cart", "v2"))
        (policies / ".cart.tmp").replace(policies / "cart.yaml")

        def cart_at_20() -> bool:
            status = plane.runner.status("cart")
            return status is not None and status.canary is not None and status.weight == 20

        await async_wait_until(cart_at_20, 10, what="cart's canary at 20 %")
        yield plane
    finally:
        await plane.stop(0)


def _stub(channel: grpc.aio.Channel, method: str) -> Any:
    response = {
        "Validate": pb.ValidateResponse,
        "ListRollouts": pb.ListRolloutsResponse,
        "ListProxies": pb.ListProxiesResponse,
        "WatchRollouts": pb.RolloutEvent,
    }.get(method, pb.Rollout)
    kind = channel.unary_stream if method == "WatchRollouts" else channel.unary_unary
    return kind(
        f"/{SERVICE_NAME}/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )


async def send(channel: grpc.aio.Channel, call: Call) -> tuple[Code, Any]:
    """The call's final status and its response (None for errors and watches)."""
    stub = _stub(channel, call.method)
    metadata = call.auth.metadata
    if call.method == "WatchRollouts":
        stream = stub(call.request, metadata=metadata, timeout=CALL_DEADLINE)
        try:
            if Code.OK not in call.expected():
                # A refusal ends the call; a watch wrongly opened would run into the deadline.
                return await stream.code(), None
            # The server sends initial metadata once it has subscribed; refusals end the call instead.
            await stream.initial_metadata()
            if stream.done():
                return await stream.code(), None
            stream.cancel()
            return Code.OK, None
        except grpc.aio.AioRpcError as exc:
            return exc.code(), None
    try:
        response = await stub(call.request, metadata=metadata, timeout=CALL_DEADLINE)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return Code.OK, response


def check(call: Call, code: Code, response: Any) -> None:
    assert code not in (Code.UNKNOWN, Code.INTERNAL), (code, response, call.describe())
    assert code in call.expected(), (code, response if code != Code.OK else "", call.describe())
    if code is not Code.OK:
        assert isinstance(response, str | None)
        return
    if call.method == "Validate":
        if call.expect_errors is not None:
            assert bool(response.errors) is call.expect_errors, (list(response.errors)[:3], call.describe())
        for error in response.errors:
            assert error.reason and error.file == (call.request.file or "<request>"), (error, call.describe())
            assert len(error.reason) < 100_000, (len(error.reason), call.describe())
    elif call.method in ("GetRollout", "Pause", "Resume", "Promote", "Abort", "Retry", "SetWeight"):
        assert response.name == call.request.name, call.describe()
        assert 0 <= response.weight <= 100, (response.weight, call.describe())
    elif call.method == "ListRollouts":
        assert sorted(r.name for r in response.rollouts) == sorted(KNOWN)


# ------------------------------------------------------------------------------ the test


async def test_hostile_admin_calls_get_proper_statuses_and_the_plane_keeps_serving(plane: ControlPlane) -> None:
    drawn: list[Call] = []

    @settings(
        max_examples=1500,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(calls())
    def collect(call: Call) -> None:
        drawn.append(call)

    collect()
    outcomes: Counter[str] = Counter()
    slowest = (0.0, "")
    started = time.monotonic()
    sent = 0
    options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.admin_port}", options=options) as channel:
        for call in drawn:
            if time.monotonic() - started > FUZZ_BUDGET:
                break
            t0 = time.monotonic()
            code, response = await send(channel, call)
            took = time.monotonic() - t0
            slowest = max(slowest, (took, call.describe()))
            check(call, code, response)
            outcomes[f"{call.method}:{code.name}"] += 1
            sent += 1
        elapsed = time.monotonic() - started

        # Still serving: a normal GetRollout, and the plane's state is coherent.
        get = _stub(channel, "GetRollout")
        shop = await get(pb.GetRolloutRequest(name="shop"), metadata=(("authorization", BEARER),), timeout=5)
        assert (shop.name, shop.stable_version) == ("shop", "v1")
        listed = await _stub(channel, "ListRollouts")(
            pb.ListRolloutsRequest(), metadata=(("authorization", BEARER),), timeout=5
        )
        assert sorted(r.name for r in listed.rollouts) == sorted(KNOWN)

    # An xDS client still gets its configuration.
    ads = AdsClient(plane.xds_port, node_id="after-fuzz", node_cluster="edge")
    try:
        ads.send(typeurls.CLUSTER)
        response = await ads.receive(timeout=10)
        clusters = {cluster_pb2.Cluster.FromString(r.value).name for r in response.resources}
        assert response.type_url == typeurls.CLUSTER and "shop_v1" in clusters, clusters
        ads.ack(response)
    finally:
        await ads.close()

    print(
        f"\nadmin fuzz: {sent} of {len(drawn)} drawn calls in {elapsed:.1f} s; slowest {slowest[0]:.3f} s "
        f"({slowest[1][:120]}); outcomes {dict(sorted(outcomes.items()))}"
    )
    assert sent >= min(len(drawn), 100), (sent, len(drawn), elapsed)
    by_code = Counter(key.split(":")[1] for key in outcomes)
    assert by_code["OK"] and by_code["UNAUTHENTICATED"] and by_code["NOT_FOUND"] and by_code["INVALID_ARGUMENT"]


def test_nested_and_aliased_yaml_is_refused_before_loading() -> None:
    """The YAML guard on its own (files, git commits and Validate): depth and alias expansion are
    bounded, plain files pass; and the loader reports a refused text as a policy error."""
    from aviary.policy.loader import parse_policy_text
    from aviary.policy.yaml_guard import yaml_bomb as _yaml_bomb

    assert _yaml_bomb(policy("shop", "v1")) is None
    assert _yaml_bomb(nested(10, "flow-list")) is None
    assert "deeper" in (_yaml_bomb(nested(500, "flow-list")) or "")
    assert "deeper" in (_yaml_bomb(nested(500, "block")) or "")
    assert "expands" in (_yaml_bomb(alias_bomb(9, 9, "endpoints")) or "")
    assert _yaml_bomb(alias_bomb(2, 3, "top")) is None
    assert _yaml_bomb("a: [") is None  # left to the loader, which says where
    rollout, errors = parse_policy_text(alias_bomb(9, 9, "endpoints"), "bomb.yaml")
    assert rollout is None and "expands" in str(errors[0])
