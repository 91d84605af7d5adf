"""When check rounds run and how long they may take: query timeouts from checkEvery, rounds stamped
with their start, late rounds, and a hanging Prometheus that must neither slow rounds down nor pile
up threads."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.metrics import prometheus as prometheus_module
from aviary.metrics.checks import check_round, late_after, query_timeout, run_checks
from aviary.metrics.prometheus import WORKERS, PrometheusProvider
from aviary.metrics.provider import MetricProviderError
from aviary.policy.analysis import CheckOutcome
from aviary.policy.rollout_state import Phase, WeightAcked
from aviary.policy.schema import Analysis, PolicySet, Rollout
from aviary.policy.server_rules import PROMETHEUS_NEEDED
from aviary.runner import RolloutRunner
from tests.rig.policies import rollout_doc
from tests.rig.silent_server import SilentServer
from tests.rig.waiting import async_wait_until

CANARY, STABLE = "shop-v2", "shop-v1"


def analysis(check_every: str = "1s", **extra: Any) -> Analysis:
    return Analysis.model_validate({
        "checkEvery": check_every, "window": "30s", "minRequests": 1,
        "metrics": [{"name": "success", "template": "request-success-rate", "min": 99},
                    {"name": "vs-stable", "template": "request-success-rate", "maxDecreaseFromStable": 1},
                    {"name": "p99", "template": "request-duration-p99", "max": 500}],
        **extra,
    })


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    with SilentServer() as server:
        yield server


# ------------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize(("check_every", "ceiling", "timeout"), [
    (1.0, 5.0, 0.8), (5.0, 5.0, 4.0), (10.0, 5.0, 5.0), (60.0, 5.0, 5.0),
    (0.5, 5.0, 0.5), (0.1, 5.0, 0.5),  # the floor leaves Prometheus half a second
    (2.0, 1.0, 1.0),  # a provider's own lower limit wins
])
def test_query_timeout_follows_check_every(check_every: float, ceiling: float, timeout: float) -> None:
    assert query_timeout(check_every, ceiling) == pytest.approx(timeout)


def test_a_round_is_late_after_its_window_or_its_timeout() -> None:
    assert late_after(analysis("1s")) == 30.0  # the window
    assert late_after(analysis("10s", window="2s")) == 6.0  # 5 s timeout + 1 s grace


# ------------------------------------------------------------------------ hanging Prometheus


async def test_a_hanging_prometheus_makes_the_round_inconclusive_on_time(silent: SilentServer) -> None:
    provider = PrometheusProvider(silent.url)  # its own limit: 5 s
    started = time.monotonic()
    results = await run_checks(provider, analysis("1s"), CANARY, STABLE)
    took = time.monotonic() - started
    print(f"round against a silent Prometheus, checkEvery 1s: {took:.2f}s")
    # The round's limit is 0.8 s (the reasons below say so); the wall time is only bounded loosely,
    # below the provider's own 5 s limit: a tight bound failed on a loaded 2-core machine (1.3 s).
    assert 0.7 < took < 4.0  # all queries at once, cut at 0.8 s (it was 5 s each, one after the other)
    assert [r.outcome for r in results] == [CheckOutcome.INCONCLUSIVE] * 3
    assert {r.reason for r in results} == {f"request count: Prometheus {silent.url} timed out after 0.8s"}
    # Request count, canary success (asked by two checks, sent once), stable success, p99.
    assert silent.accepted == 4
    provider.close()


def prometheus_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("prometheus-query"))


async def test_rounds_against_a_hanging_prometheus_do_not_pile_up(silent: SilentServer) -> None:
    provider = PrometheusProvider(silent.url)
    before = prometheus_threads()
    for _ in range(6):  # back to back: no time for abandoned queries to drain between rounds
        await run_checks(provider, analysis("0.5s"), CANARY, STABLE)
        assert provider.in_flight <= 4  # one round's distinct queries at most
    assert prometheus_threads() - before <= WORKERS
    await async_wait_until(lambda: provider.in_flight == 0 and silent.open == 0, 5.0,
                           what="every abandoned query to end")
    provider.close()


@dataclass
class StuckThread:
    """Stands in for PrometheusProvider._query when a worker thread hangs past every timeout
    (a stuck DNS lookup, a server trickling bytes): it returns only when released."""

    release: threading.Event = field(default_factory=threading.Event)
    calls: list[str] = field(default_factory=list)

    def __call__(self, promql: str, timeout: float, deadline: float) -> Any:
        self.calls.append(promql)
        self.release.wait(30)
        return []


async def test_a_query_still_hanging_is_not_sent_again(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = PrometheusProvider("http://127.0.0.1:9")
    stuck = StuckThread()
    monkeypatch.setattr(provider, "_query", stuck)
    try:
        with pytest.raises(MetricProviderError, match=r"^Prometheus http://127.0.0.1:9 timed out after 0.3s$"):
            await provider.query_scalar("up", 0.3)
        assert provider.in_flight == 1  # its thread runs on
        with pytest.raises(MetricProviderError, match="has not answered the same query of the previous round"):
            await provider.query_scalar("up", 0.3)
        monkeypatch.setattr(prometheus_module, "MAX_IN_FLIGHT", 2)
        with pytest.raises(MetricProviderError, match="timed out"):
            await provider.query_scalar("other", 0.3)
        with pytest.raises(MetricProviderError, match="has 2 queries unanswered: not sending more"):
            await provider.query_scalar("third", 0.3)
        assert stuck.calls == ["up", "other"]  # refused queries never reach a thread
    finally:
        stuck.release.set()
    await async_wait_until(lambda: provider.in_flight == 0, 5.0, what="the stuck threads to return")
    assert await provider.query_scalar("up", 0.3) is None  # released: asked again
    provider.close()


# -------------------------------------------------------------------------------- stamping


@dataclass
class SlowProvider:
    """Answers every query after ``delay`` seconds, moving ``clock`` on by ``jump`` meanwhile (a freeze)."""

    clock: list[float]
    delay: float = 0.0
    jump: float = 0.0
    value: float = 100.0
    asked_at: list[float] = field(default_factory=list)

    async def query_scalar(self, promql: str, timeout: float) -> float | None:
        self.asked_at.append(self.clock[0])
        await asyncio.sleep(self.delay)
        self.clock[0] += self.jump
        return self.value


async def test_a_round_is_stamped_when_it_started() -> None:
    now = [1000.0]
    provider = SlowProvider(now, jump=2.0)  # each of 4 distinct queries moves the clock on by 2 s
    started, results = await check_round(provider, analysis("1s"), CANARY, STABLE, lambda: now[0])
    assert started == 1000.0 and now[0] == 1008.0
    assert [r.outcome for r in results] == [CheckOutcome.PASS] * 3


async def test_a_round_that_ends_after_a_freeze_is_inconclusive() -> None:
    now = [1000.0]
    provider = SlowProvider(now, jump=10.0)  # 4 queries: a 40 s freeze, longer than the 30 s window
    started, results = await check_round(provider, analysis("1s"), CANARY, STABLE, lambda: now[0])
    assert started == 1000.0
    assert [r.outcome for r in results] == [CheckOutcome.INCONCLUSIVE] * 3
    assert results[0].reason == ("round took 40.0s, more than 30s (was the control plane frozen?): "
                                 "its answers are too old to judge")


def canary_rollout(version: str, check_every: str, inconclusive_limit: int = 3) -> Rollout:
    doc = rollout_doc("shop", version, steps=(20, 50))
    doc["spec"]["analysis"] = {"prometheus": "http://prometheus.invalid:9090", "checkEvery": check_every,
                               "window": "30s", "minRequests": 1, "inconclusiveLimit": inconclusive_limit,
                               "metrics": [{"name": "success", "template": "request-success-rate", "min": 99}]}
    return Rollout.model_validate(doc)


@contextlib.asynccontextmanager
async def canary_running(provider: Any, check_every: str, clock: Callable[[], float],
                         inconclusive_limit: int = 3) -> Any:
    """A runner with shop's canary v2 at 20 %, ACKed, and its loop running."""
    runner = RolloutRunner(TrafficDirector(SnapshotCache(), ProxyStatus()), provider_factory=lambda url: provider,
                           clock=clock)
    runner.apply_policies(PolicySet({"shop": canary_rollout("v1", check_every, inconclusive_limit)}))
    runner.apply_policies(PolicySet({"shop": canary_rollout("v2", check_every, inconclusive_limit)}))
    runner.handle("shop", WeightAcked("v2", 20, clock()))
    task = asyncio.create_task(runner.run())
    try:
        yield runner
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_runner_stamps_rounds_with_their_start_and_keeps_the_pace() -> None:
    now = [0.0]
    base = time.monotonic()

    def clock() -> float:
        now[0] = time.monotonic() - base
        return now[0]

    provider = SlowProvider(now, delay=0.3)
    async with canary_running(provider, "0.5s", clock) as runner:
        status = runner.status("shop")
        assert status is not None and status.step_started_at is not None
        step_started = status.step_started_at
        await async_wait_until(lambda: len(provider.asked_at) >= 6, 5.0, what="three rounds")  # 2 queries each
        status = runner.status("shop")
    assert status is not None and status.last_check_at is not None
    rounds = provider.asked_at[::2]
    # Each round starts checkEvery after the previous one *started*: 0.5 s apart, not 0.8.
    gaps = [later - earlier for earlier, later in itertools.pairwise(rounds)]
    print(f"round starts after the step began: {[round(t - step_started, 2) for t in rounds]}")
    assert all(0.45 < gap < 0.65 for gap in gaps), gaps
    assert status.last_check_at in [pytest.approx(t, abs=0.02) for t in rounds]  # a start, not an end


@dataclass
class HangingProvider:
    """Never answers (a provider that does not keep to its timeout)."""

    asked: int = 0

    async def query_scalar(self, promql: str, timeout: float) -> float | None:
        self.asked += 1
        await asyncio.sleep(3600)
        return None


async def test_a_hanging_provider_reaches_the_inconclusive_limit_in_rounds_of_check_every() -> None:
    provider = HangingProvider()
    started = time.monotonic()
    async with canary_running(provider, "0.5s", time.monotonic, inconclusive_limit=1) as runner:
        await async_wait_until(lambda: runner.status("shop").phase is Phase.ROLLED_BACK,
                               5.0, what="the rollback after 2 inconclusive rounds")
    took = time.monotonic() - started
    print(f"2 rounds against a provider that never answers, checkEvery 0.5s: rolled back after {took:.2f}s")
    # Rounds from 0.5 s and 1.25 s, each cut at 0.5 s (the floor) + 0.25 s: about 2 s. Without the
    # cut the first round would never end.
    assert took < 3.0


@dataclass
class FlakyProvider:
    """Refuses while ``down`` is set, then answers 100 (a healthy canary)."""

    down: bool = True
    asked: int = 0

    async def query_scalar(self, promql: str, timeout: float) -> float | None:
        self.asked += 1
        if self.down:
            raise MetricProviderError(f"{self!r} unreachable: connection refused")
        return 100.0

    def __repr__(self) -> str:
        return "Prometheus http://127.0.0.1:9"


async def test_a_failing_provider_is_logged_once_per_rollout_and_once_when_it_answers_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = FlakyProvider()
    with caplog.at_level(logging.INFO, logger="aviary.engine"):
        async with canary_running(provider, "0.5s", time.monotonic, inconclusive_limit=100):
            await async_wait_until(lambda: provider.asked >= 8, 10.0, what="four rounds refused")
            provider.down, answered = False, provider.asked
            await async_wait_until(lambda: provider.asked >= answered + 4, 10.0, what="two rounds answered")
    lines = [r.getMessage() for r in caplog.records if "Prometheus http://127.0.0.1:9" in r.getMessage()]
    assert lines == [
        "rollout shop: checks inconclusive: request count: Prometheus http://127.0.0.1:9 unreachable: "
        "connection refused",
        "rollout shop: Prometheus http://127.0.0.1:9 answers again",
    ]


async def test_a_restored_analysis_without_any_prometheus_says_so_in_every_check() -> None:
    """Such a policy is refused at load (server_rules); one restored from the state of a server that
    had --prometheus-url used to get rounds with no check rows at all, then a bare rollback."""
    doc = rollout_doc("shop", "v2", steps=(20, 50))
    doc["spec"]["analysis"] = {"checkEvery": "0.5s", "inconclusiveLimit": 100,
                               "metrics": [{"name": "success", "template": "request-success-rate", "min": 99}]}
    runner = RolloutRunner(TrafficDirector(SnapshotCache(), ProxyStatus()), clock=time.monotonic)
    runner.apply_policies(PolicySet({"shop": canary_rollout("v1", "0.5s")}))
    runner.apply_policies(PolicySet({"shop": Rollout.model_validate(doc)}))
    runner.handle("shop", WeightAcked("v2", 20, time.monotonic()))
    task = asyncio.create_task(runner.run())
    try:
        await async_wait_until(lambda: bool(runner.status("shop").last_checks), 5.0, what="a check round")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    [check] = runner.status("shop").last_checks
    assert (check.name, check.outcome, check.reason) == ("success", CheckOutcome.INCONCLUSIVE, PROMETHEUS_NEEDED)
