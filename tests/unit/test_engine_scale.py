"""The pieces that keep the engine's cost linear in the number of rollouts (issue 11, "Scale").

Each fast path is checked against the plain computation it replaces: the wake-up heap against a
scan of every rollout, the snapshot's consistency check against a set difference per resource,
and the loader's reuse of parsed files against parsing every file again.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.route.v3 import route_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from aviary.discovery import resources, typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.resources import PublishedRollout, build_route_configuration
from aviary.discovery.snapshot import Resource, Snapshot, digest
from aviary.policy import loader
from aviary.policy.loader import parse_policy_text
from aviary.policy.rollout_state import Abort, Phase, RolloutStatus, Tick
from aviary.policy.schema import Endpoint, ListenerSpec, PolicySet
from aviary.runner import RolloutRunner
from aviary.store.sqlite import Save, StateStore, StateWriteError
from aviary.traffic import Backend, Stickiness
from aviary.wake_schedule import WakeSchedule
from tests.rig.policies import rollout_doc

# ---- the wake-up schedule -----------------------------------------------------------------------

NAMES = [f"r{i}" for i in range(6)]
TIMES = st.one_of(st.none(), st.integers(0, 20).map(float))
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(NAMES), TIMES),  # the rollout's wake-up changes, marked
        st.tuples(st.just("set-unmarked"), st.sampled_from(NAMES), TIMES),  # changes, not marked yet
        st.tuples(st.just("mark"), st.sampled_from(NAMES), st.none()),
        st.tuples(st.just("due"), st.none(), st.integers(0, 20).map(float)),
        st.tuples(st.just("next"), st.none(), st.none()),
    ),
    max_size=60,
)


@given(OPERATIONS)
@settings(max_examples=300, deadline=None)
def test_the_wake_schedule_answers_as_a_scan_of_every_marked_rollout(
    operations: list[tuple[Any, ...]],
) -> None:
    """A rollout's time is read when the schedule is next read after the rollout was marked."""
    truth: dict[str, float | None] = {}  # what when(name) returns now
    marked: set[str] = set()
    seen: dict[str, float | None] = {}  # what it returned at the first read after the last mark

    def read() -> dict[str, float]:
        for name in marked:
            seen[name] = truth.get(name)
        marked.clear()
        return {n: when for n, when in seen.items() if when is not None}

    schedule = WakeSchedule(lambda name: truth.get(name))
    for kind, name, value in operations:
        if kind in ("set", "set-unmarked"):
            truth[name] = value
            if kind == "set":
                schedule.mark(name)
                marked.add(name)
        elif kind == "mark":
            schedule.mark(name)
            marked.add(name)
        elif kind == "due":
            expected = sorted((when, n) for n, when in read().items() if when <= value)
            assert schedule.due(value) == [n for _, n in expected]
        else:
            times = list(read().values())
            assert schedule.next_time() == (min(times) if times else None)
    assert schedule.scheduled() == read()


def test_a_due_rollout_stays_scheduled_until_marked() -> None:
    when = {"a": 1.0}
    schedule = WakeSchedule(when.get)
    schedule.mark("a")
    assert schedule.due(5.0) == ["a"] and schedule.due(5.0) == ["a"]
    when["a"] = 7.0
    schedule.mark("a")
    assert schedule.due(5.0) == [] and schedule.next_time() == 7.0


def test_stale_heap_entries_are_dropped() -> None:
    when: dict[str, float] = {}
    schedule = WakeSchedule(when.get)
    for t in range(1000):  # one rollout rescheduled a thousand times: the heap must not keep them all
        when["a"] = float(t)
        schedule.mark("a")
        assert schedule.next_time() == float(t)
    assert len(schedule._heap) < 200


# ---- the snapshot's consistency check -----------------------------------------------------------

LOWER = {typeurls.LISTENER: typeurls.ROUTE, typeurls.ROUTE: typeurls.CLUSTER, typeurls.CLUSTER: typeurls.ENDPOINT}
RESOURCE_NAMES = ["a", "b", "c", "d"]


def _resource(type_url: str, name: str, references: frozenset[str]) -> Resource:
    return Resource(name, type_url, f"{name}-{sorted(references)}", b"", b"", references=references)


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    resources = []
    for type_url in typeurls.PUSH_ORDER:
        for name in draw(st.sets(st.sampled_from(RESOURCE_NAMES))):
            references = frozenset(draw(st.sets(st.sampled_from(RESOURCE_NAMES)))) if type_url in LOWER else frozenset()
            resources.append(_resource(type_url, name, references))
    return Snapshot.of(resources)


def _inconsistencies_by_set_difference(snapshot: Snapshot) -> list[str]:
    """The check as it was written first: each resource's references minus the names below."""
    problems = []
    for upper, lower in LOWER.items():
        present = snapshot.items(lower)
        for resource in snapshot.items(upper).values():
            for ref in sorted(resource.references - present.keys()):
                problems.append(f"{typeurls.short_name(upper)} {resource.name!r} references missing "
                                f"{typeurls.short_name(lower)} {ref!r}")
    return problems


@given(snapshots())
@settings(max_examples=300, deadline=None)
def test_the_consistency_check_finds_what_a_set_difference_finds(snapshot: Snapshot) -> None:
    assert snapshot.inconsistencies() == _inconsistencies_by_set_difference(snapshot)
    assert snapshot.inconsistencies() == _inconsistencies_by_set_difference(snapshot)  # once computed, the same


def test_the_consistency_check_is_linear_in_the_references() -> None:
    """20,000 clusters each naming its own load assignment: a set difference per resource walked
    every load assignment for every cluster (400 million steps); a lookup per reference does not."""
    names = [f"c{i}" for i in range(20_000)]
    snapshot = Snapshot.of([_resource(typeurls.CLUSTER, n, frozenset({n})) for n in names]
                           + [_resource(typeurls.ENDPOINT, n, frozenset()) for n in names[1:]])
    assert snapshot.inconsistencies() == ["CDS 'c0' references missing EDS 'c0'"]


# ---- the loader's parsed files ------------------------------------------------------------------


def _write(directory: Path, name: str, version: str) -> None:
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(rollout_doc(name, version, (20, 50))))


def test_a_directory_load_parses_only_files_whose_bytes_changed(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a", "b", "c"):
        _write(tmp_path, name, "v1")
    first = loader.load_directory(tmp_path)
    parsed: list[str] = []
    real = loader.parse_policy_text

    def counting(text: str, file: str) -> loader.Parsed:
        parsed.append(Path(file).name)
        return real(text, file)

    monkeypatch.setattr(loader, "parse_policy_text", counting)
    again = loader.load_directory(tmp_path)
    assert parsed == [] and again.rollouts == first.rollouts and again.errors == first.errors
    _write(tmp_path, "b", "v2")
    (tmp_path / "c.yaml").write_text("spec: [")  # broken now
    changed = loader.load_directory(tmp_path)
    assert sorted(parsed) == ["b.yaml", "c.yaml"]
    assert changed.rollouts["b"][0].spec.version == "v2" and "c" not in changed.rollouts
    assert [e.file for e in changed.errors] == [str(tmp_path / "c.yaml")]
    monkeypatch.setattr(loader, "parse_policy_text", real)
    assert loader.load_directory(tmp_path).errors == changed.errors  # errors reused as they were


# ---- one transaction and one publish per turn of the engine loop --------------------------------


class CountingStore(StateStore):
    """The real store, counting transactions of saves (and failing them on demand)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.transactions: list[list[str]] = []
        self.full = False

    def save_many(self, saves: Iterable[Save]) -> None:
        batch = list(saves)
        if self.full:
            raise StateWriteError(self.path, "database or disk is full")
        self.transactions.append([status.rollout for status, *_ in batch])
        super().save_many(batch)


class Engine:
    def __init__(self, tmp_path: Path, names: tuple[str, ...] = ("a", "b", "c")) -> None:
        self.now = 1000.0
        self.cache = SnapshotCache()
        self.director = TrafficDirector(self.cache, ProxyStatus())
        self.store = CountingStore(tmp_path / "state.db")
        self.runner = RolloutRunner(self.director, clock=lambda: self.now, store=self.store)
        self.names = names

    def apply(self, version: str) -> None:
        policies = {}
        for name in self.names:
            parsed, errors = parse_policy_text(yaml.safe_dump(rollout_doc(name, version, (20, 50))), f"{name}.yaml")
            assert parsed is not None, errors
            policies[name] = parsed
        self.runner.apply_policies(PolicySet(policies))
        self.runner.process_queued()

    def phase(self, name: str) -> Phase:
        status = self.runner.status(name)
        assert status is not None
        return status.phase


def test_a_batch_of_events_is_saved_in_one_transaction_and_published_once(tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    engine.apply("v1")
    engine.apply("v2")  # canaries at 20 %: each a move away from stable, each saved at once
    assert all(engine.phase(n) is Phase.PROGRESSING for n in engine.names)
    engine.store.transactions.clear()
    generation = engine.cache.generation
    for name in engine.names:
        engine.runner.submit(name, Abort(by="test"))  # toward stable: saved with the batch
    engine.runner.process_queued()
    assert all(engine.phase(n) is Phase.ROLLED_BACK for n in engine.names)
    assert engine.store.transactions == [["a", "b", "c"]]
    assert engine.cache.generation == generation + 1  # one snapshot for the three rollbacks
    saved = engine.store.load()
    assert {n: saved[n].status.phase for n in engine.names} == dict.fromkeys(engine.names, Phase.ROLLED_BACK)
    engine.store.close()


def test_a_batch_that_cannot_be_saved_still_rolls_back_and_saves_later(tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    engine.apply("v1")
    engine.apply("v2")
    engine.store.full = True
    for name in engine.names:
        engine.runner.submit(name, Abort(by="test"))
    engine.runner.process_queued()
    assert all(engine.phase(n) is Phase.ROLLED_BACK for n in engine.names)  # carried out all the same
    assert all(engine.director.desired(n).canary is None for n in engine.names)  # type: ignore[union-attr]
    assert all(engine.runner.state_error(n) for n in engine.names)
    engine.store.full = False
    engine.now += 2
    engine.runner.retry()
    assert not any(engine.runner.state_error(n) for n in engine.names)
    saved = engine.store.load()
    assert {n: saved[n].status.phase for n in engine.names} == dict.fromkeys(engine.names, Phase.ROLLED_BACK)
    assert all(saved[n].events[-1].to_phase is Phase.ROLLED_BACK for n in engine.names)  # the events too
    engine.store.close()


def test_a_move_away_from_stable_in_a_batch_commits_at_once_or_not_at_all(tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    engine.apply("v1")
    engine.store.transactions.clear()
    with engine.runner._one_batch():
        engine.runner.handle("a", Tick(engine.now))  # nothing to save
        engine.apply("v2")  # new canaries: each commits before it is carried out
        assert engine.store.transactions == [["a"], ["b"], ["c"]]  # saved: before anything is published
        assert all(engine.director.published_route(n) == {"v1": 100} for n in engine.names)
    assert all(engine.director.published_route(n) == {"v1": 80, "v2": 20} for n in engine.names)
    engine.store.close()

    engine = Engine(tmp_path / "full")
    (tmp_path / "full").mkdir(exist_ok=True)
    engine.apply("v1")
    engine.store.full = True
    engine.apply("v2")  # cannot be saved: not carried out
    assert all(engine.phase(n) is Phase.STABLE for n in engine.names)
    assert all(engine.director.desired(n).canary is None for n in engine.names)  # type: ignore[union-attr]
    engine.store.close()


def test_save_many_stores_every_rollout_and_a_changed_policy(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    first, errors = parse_policy_text(yaml.safe_dump(rollout_doc("a", "v1", (20, 50))), "a.yaml")
    second, _ = parse_policy_text(yaml.safe_dump(rollout_doc("a", "v2", (20, 50))), "a.yaml")
    other, _ = parse_policy_text(yaml.safe_dump(rollout_doc("b", "v1", (20, 50))), "b.yaml")
    assert first is not None and second is not None and other is not None, errors
    status_a = RolloutStatus("a", Phase.STABLE, Backend("v1", first.spec.endpoints))
    status_b = RolloutStatus("b", Phase.STABLE, Backend("v1", other.spec.endpoints))
    store.save_many([(status_a, first, (), "c1"), (status_b, other, (), None)])
    store.save_many([(status_a, second, (), "c2")])  # another policy object: encoded again
    saved = store.load()
    assert saved["a"].rollout == second and saved["a"].git_commit == "c2" and saved["b"].rollout == other
    store.close()


# ---- the shared route configuration, assembled from cached virtual hosts -----------------------


def test_an_assembled_route_configuration_is_what_protobuf_serializes() -> None:
    listener = ListenerSpec(address="0.0.0.0", port=10000)
    v1 = Backend("v1", (Endpoint.model_validate("10.0.0.1:8080"),))
    v2 = Backend("v2", (Endpoint.model_validate("backend.internal:8080"),))
    rollouts = [
        PublishedRollout.of("b", listener, ("b.example.com", "*.b.example.com"), ((v1, 70), (v2, 30)), (v1, v2),
                            stickiness=Stickiness(header="x-user"), mirror=(v2, 5)),
        PublishedRollout.of("a", listener, ("a.example.com",), ((v1, 100),), (v1,)),
    ]
    resource = build_route_configuration("route-0.0.0.0-10000", rollouts)
    message = route_pb2.RouteConfiguration(
        name="route-0.0.0.0-10000",
        virtual_hosts=[resources._virtual_host(r, r.hosts) for r in sorted(rollouts, key=lambda r: r.name)])
    expected = message.SerializeToString(deterministic=True)
    assert resource == Resource.from_message("route-0.0.0.0-10000", typeurls.ROUTE, message,
                                             references=resource.references, parts=resource.parts)
    assert resource.version == digest(expected)
    assert [name for name, _ in resource.parts] == ["a", "b"]
    assert dict(resource.parts) == {vh.name: digest(vh.SerializeToString(deterministic=True))
                                    for vh in message.virtual_hosts}
    assert resource.references == {"a_v1", "b_v1", "b_v2"}
