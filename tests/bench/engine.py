"""The rollout engine under load: many rollouts under analysis at once (part of `make bench`).

`aviary serve` (a real subprocess, tests/bench/fanout.py) runs ``rollouts`` canaries at 10 %, each
checked every ``check_every`` seconds against a stub Prometheus with fixed answers (tests/rig/fake_prometheus.py: the
one stub the benchmark allows, so that Prometheus's own cost and timing stay out of the figure; its
asyncio variant, as the thread-per-connection one cannot answer the 2,000 queries a second that
1,000 rollouts checked every second ask on 2 cores). One fan-out client stream ACKs every push, as
an Envoy would, so that the canaries' steps count as served. Measured:
  - the engine's CPU over a ``window`` of seconds (the serve process tree, from /proc), given per 10 s;
  - from the first failing answer the stub gives for one rollout to the arrival, at the client, of the
    route that rolls it back (weight 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aviary.admin.client import AdminClient, AdminError
from aviary.discovery.resources import cluster_name
from tests.bench.bare_server import rollout_name
from tests.bench.fanout import LineProcess, Profiler, aviary_server, clients, poll
from tests.bench.procstat import cpu_seconds
from tests.rig.fake_prometheus import Answer, LoopFakePrometheus, vector_body

HEALTHY = Answer(body=vector_body("100"))  # success rate 100 %, and 100 requests: every check passes
FAILING = Answer(body=vector_body("50"))  # success rate 50 % with 50 requests (above minRequests): a failure


class Answers:
    """Every query gets HEALTHY until ``fail(cluster)``; then queries naming that cluster get FAILING."""

    def __init__(self) -> None:
        self.failing: str | None = None
        self.first_failure_at: float | None = None

    def fail(self, cluster: str) -> None:
        self.failing = cluster

    def __call__(self, query: str) -> Answer:
        if self.failing is not None and f'"{self.failing}"' in query:
            if self.first_failure_at is None:
                self.first_failure_at = time.time()
            return FAILING
        return HEALTHY


async def rollback_arrival(procs: list[LineProcess], admin: AdminClient, victim: str) -> float:
    """When the route that rolled ``victim`` back reached the client: the first route change after
    which the admin API shows the victim rolled back with weight 0 ACKed (other pushes may come first)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for proc in procs:
            proc.send("mark")
        for proc in procs:
            await proc.expect("marked", 30)
        done = [await proc.expect("changed", 120) for proc in procs]
        arrived = max(float(d[1]) for d in done)

        async def rolled_back() -> bool:
            rollout = await admin.get_rollout(victim)
            return rollout.phase == "RolledBack" and rollout.HasField("acked_weight") and rollout.acked_weight == 0

        with contextlib.suppress(TimeoutError):  # not this push: wait for the next one
            await poll(rolled_back, 2, f"{victim} rolled back")
            return arrived
    raise TimeoutError(f"{victim} was not rolled back within 120 s")


async def bench_engine(
    rollouts: int, window: float, profile_to: Path | None = None, check_every: int = 1
) -> dict[str, Any]:
    """Every rollout checked every ``check_every`` seconds. With ``profile_to``, py-spy samples the
    serve process during the window (collapsed stacks)."""
    answers = Answers()
    victim = rollout_name(rollouts // 2)
    with (
        LoopFakePrometheus(respond=answers) as prometheus,
        tempfile.TemporaryDirectory(prefix="aviary-engine-") as tmp,
    ):
        analysis = {
            "prometheus": prometheus.url, "checkEvery": f"{check_every}s", "window": f"{max(5, check_every)}s",
            "minRequests": 5, "failureLimit": 0, "inconclusiveLimit": 10,
            "metrics": [{"name": "success", "template": "request-success-rate", "min": 99}],
        }  # fmt: skip
        work = Path(tmp)
        async with (
            aviary_server(1, work, rollouts=rollouts, analysis=analysis) as server,
            clients(server.port, 1, work) as procs,
        ):
            for proc in procs:
                proc.send("connect")
            for proc in procs:
                await proc.expect("ready", 120)
            await server.settle()
            pids = server.pids()
            queries_before = len(prometheus.queries)
            profiler = Profiler(server.extra["pid"], profile_to) if profile_to is not None else None
            if profiler is not None:
                profiler.toggle(True)
            cpu0, t0, stub0 = cpu_seconds(pids), time.monotonic(), time.process_time()
            await asyncio.sleep(window)  # the measurement window itself, not a wait for an event
            cpu, elapsed = cpu_seconds(pids) - cpu0, time.monotonic() - t0
            if profiler is not None:
                profiler.toggle(False)
            stub_cpu = time.process_time() - stub0  # this process: the stub's threads, mostly
            queries = len(prometheus.queries) - queries_before
            admin = server.extra["admin"]
            asked = time.monotonic()
            listed = await admin.list_rollouts()  # is the admin API responsive while the engine works?
            admin_ms = (time.monotonic() - asked) * 1000
            phases = Counter(r.phase for r in listed)
            answers.fail(cluster_name(victim, "v2"))
            try:
                pushed_at: float | None = await rollback_arrival(procs, admin, victim)
                rolled = await admin.get_rollout(victim)
                after = {"victim_phase_after": rolled.phase, "victim_weight_after": rolled.weight}
            except (TimeoutError, AdminError) as exc:  # an engine too busy to answer is a result too
                pushed_at, after = None, {"rollback_error": f"{type(exc).__name__}: {exc}"}
    failing_at = answers.first_failure_at
    return {
        "rollouts_under_analysis": rollouts, "check_every_s": check_every, "window_s": round(elapsed, 1),
        "engine_cpu_s_per_10s": round(cpu / elapsed * 10, 2),
        "engine_cpu_cores": round(cpu / elapsed, 3),
        "prometheus_queries_per_s": round(queries / elapsed, 1),
        # a round asks two queries (request count, success rate): rounds/s against the 1 s the policy asks
        "check_rounds_per_s": round(queries / 2 / elapsed, 1),
        "check_rounds_per_s_wanted": round(rollouts / check_every, 1),
        # what a round costs, all in: on a loaded machine the engine gets less CPU and runs fewer rounds
        "engine_cpu_ms_per_check_round": round(cpu / (queries / 2) * 1000, 3) if queries else None,
        "phases_after_window": dict(sorted(phases.items())), "admin_list_rollouts_ms": round(admin_ms, 1),
        "stub_and_driver_cpu_cores": round(stub_cpu / elapsed, 3),
        "failing_answer_to_rollback_push_ms": (
            round((pushed_at - failing_at) * 1000, 1) if pushed_at is not None and failing_at is not None else None
        ),
        **after,
        **({"profile_top": profiler.top()} if profiler is not None else {}),
        "goal": "engine CPU < 0.5 core",
    }  # fmt: skip
