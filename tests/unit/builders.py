"""Builders the traffic-plan unit tests share (cohorts, mirroring, stickiness): two backends, a
policy text parsed to a spec, a plan published as the director would, the routes it renders to,
and a batch of plans checked by ``envoy --mode validate``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf import any_pb2

from aviary.discovery import typeurls
from aviary.discovery.resources import PublishedRollout, build_snapshot, violations
from aviary.policy.loader import parse_policy_text
from aviary.policy.rollout import SetTraffic
from aviary.policy.schema import Endpoint, ListenerSpec, RolloutSpec
from aviary.traffic import Backend, TrafficPlan
from tests.unit.test_snapshot_invariants import bootstrap, envoy_validate

V1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
V2 = Backend("v2", (Endpoint.model_validate("127.0.0.1:9002"),))


def parse(text: str) -> tuple[Any, list[str]]:
    """A policy file's text (as ``checkout.yaml``): the rollout (None if refused) and its errors."""
    rollout, errors = parse_policy_text(text, "checkout.yaml")
    return rollout, [str(e) for e in errors]


def spec_of(text: str) -> RolloutSpec:
    """The spec of a policy text that must load without an error."""
    rollout, errors = parse(text)
    assert errors == [], errors
    result: RolloutSpec = rollout.spec
    return result


def plans(actions: Iterable[Any]) -> list[TrafficPlan]:
    """The plans of the SetTraffic actions among ``actions``, in order."""
    return [a.traffic for a in actions if isinstance(a, SetTraffic)]


def published(plan: TrafficPlan, name: str = "checkout", hosts: tuple[str, ...] = ("*",)) -> PublishedRollout:
    """``plan`` as published on 127.0.0.1:10000: its weights, cohorts, stickiness and mirror."""
    assert plan.canary is not None
    return PublishedRollout.of(name, ListenerSpec(address="127.0.0.1", port=10000), hosts,
                               [(plan.stable, 100 - plan.canary_weight), (plan.canary, plan.canary_weight)],
                               [plan.stable, plan.canary], [(c, plan.canary) for c in plan.cohorts],
                               plan.stickiness, mirror=(plan.canary, plan.mirror) if plan.mirror else None)


def routes_of(snapshot: Any, prefix: str = "route-") -> list[route_components_pb2.Route]:
    """The routes of the first virtual host of the snapshot's one route configuration named ``prefix...``."""
    [resource] = [r for n, r in snapshot.items(typeurls.ROUTE).items() if n.startswith(prefix)]
    config = route_pb2.RouteConfiguration()
    any_pb2.Any.FromString(resource.any_bytes).Unpack(config)
    return list(config.virtual_hosts[0].routes)


def assert_envoy_accepts(plans: Iterable[TrafficPlan], path: Path) -> None:
    """Every plan published as its own rollout ``r<i>`` (host ``r<i>.example.com``) in one snapshot:
    no violation, and ``envoy --mode validate`` accepts it (the config written to ``path``)."""
    rollouts = [published(plan, f"r{i}", (f"r{i}.example.com",)) for i, plan in enumerate(plans)]
    snapshot = build_snapshot(rollouts)
    assert violations(snapshot) == []
    result = envoy_validate(bootstrap(snapshot), path)
    assert result.returncode == 0, (result.stdout, result.stderr)
