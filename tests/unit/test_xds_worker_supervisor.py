"""The xDS worker supervisor (aviary.discovery.workers): how many workers by default, and a worker
that hangs is found out by its heartbeats, killed and replaced like one that died.

The hanging worker is a fake (tests/rig/fake_xds_worker.py): a real process with the engine's
protocol whose loop blocks after two heartbeats, alive and holding its socket.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from aviary.cli import build_parser
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.proxy_events import ProxyConnected, ProxyDisconnected, ProxyEvent
from aviary.discovery.resources import PublishedRollout, build_snapshot
from aviary.discovery.worker_protocol import (
    HEADER,
    Ping,
    Pong,
    decode_from_engine,
    decode_from_worker,
    first_stream_id,
    ping_message,
    pong_message,
)
from aviary.discovery.workers import EXITED, HUNG, NOT_LISTENING, Silence, XdsWorkers, usable_cores
from aviary.policy.schema import Endpoint, ListenerSpec
from aviary.traffic import Backend
from tests.rig import fake_xds_worker
from tests.rig.waiting import async_wait_until

FAKE = (sys.executable, str(Path(fake_xds_worker.__file__)))

# ---- how many by default ------------------------------------------------------------------------


def cgroup(tmp_path: Path, own: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 tree under tmp_path with ``cpu.max`` files, and a /proc/self/cgroup naming ``own``."""
    root = tmp_path / "cgroup"
    for path, text in limits.items():
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/") / "cpu.max").write_text(text)
    (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_one_worker_per_core_this_process_may_use(tmp_path: Path) -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    root, proc = cgroup(tmp_path, "/", {})
    assert usable_cores(root, proc) == cores
    assert usable_cores(root, tmp_path / "missing") == cores  # cgroup v1, not Linux: the affinity alone


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"/pod/app": "max 100000"}, None),  # no quota
        ({"/pod/app": "100000 100000"}, 1),  # limits: {cpu: 1}
        ({"/pod/app": "150000 100000"}, 2),  # 1.5 CPUs: rounded up
        ({"/pod": "50000 100000", "/pod/app": "max 100000"}, 1),  # a parent's quota counts too
        ({"/pod/app": "garbage"}, None),
    ],
)
def test_a_cgroup_cpu_quota_caps_the_default(tmp_path: Path, limits: dict[str, str], expected: int | None) -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    root, proc = cgroup(tmp_path, "/pod/app", limits)
    assert usable_cores(root, proc) == (min(cores, expected) if expected else cores)


def test_the_flag_defaults_to_one_per_core_and_takes_auto_or_a_number(capsys: pytest.CaptureFixture[str]) -> None:
    parse = build_parser().parse_args
    assert parse(["serve", "--policies", "p"]).xds_workers == usable_cores()
    assert parse(["serve", "--policies", "p", "--xds-workers", "auto"]).xds_workers == usable_cores()
    assert parse(["serve", "--policies", "p", "--xds-workers", "1"]).xds_workers == 1  # today's single process
    assert parse(["serve", "--policies", "p", "--xds-workers", "3"]).xds_workers == 3
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parse(["serve", "--policies", "p", "--xds-workers", bad])
    with pytest.raises(SystemExit):
        parse(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: auto, one per usable core: {usable_cores()} here)" in help_text


# ---- heartbeats ---------------------------------------------------------------------------------


def test_ping_and_pong_frames() -> None:
    assert decode_from_engine(ping_message()[HEADER.size :]) == Ping()
    assert decode_from_worker(pong_message()[HEADER.size :]) == Pong()


def test_silence_counts_heartbeats_without_a_word_and_any_frame_resets_it() -> None:
    silence = Silence(limit=3)
    assert [silence.tick(0), silence.tick(0)] == [False, False]
    assert not silence.tick(1)  # a frame (a pong, events) since the last heartbeat
    assert [silence.tick(1), silence.tick(1), silence.tick(1)] == [False, False, True]


# ---- the supervisor with real processes (fakes) --------------------------------------------------


def published() -> SnapshotCache:
    backend = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
    rollout = PublishedRollout.of("shop", ListenerSpec(address="0.0.0.0", port=10000), ("*",), ((backend, 100),),
                                  (backend,))
    cache = SnapshotCache()
    cache.publish({"": build_snapshot([rollout])})
    return cache


async def test_a_worker_that_stops_answering_is_killed_and_replaced() -> None:
    events: list[ProxyEvent] = []
    pool = XdsWorkers(published(), events.append, "127.0.0.1:0", 2, heartbeat=0.05, hung_after=5,
                      command=(*FAKE, "--hang", "1"))
    await pool.start()
    try:
        first = {w.number: w.process for w in pool._workers.values()}
        assert sorted(first) == [1, 2]
        # Worker 1 answers two pings, then blocks: after 5 silent heartbeats it is killed; number 3 replaces it.
        await async_wait_until(lambda: pool.streams() == {2: 1, 3: 1}, 20, what="worker 1 replaced")
        assert first[1].returncode == -9 and first[2].returncode is None
        assert pool.restarts == {EXITED: 0, HUNG: 1, NOT_LISTENING: 0}
        assert ProxyDisconnected(first_stream_id(1)) in events  # its proxy is reported gone
        connected = [e.node_id for e in events if isinstance(e, ProxyConnected)]
        assert sorted(connected) == ["node-1", "node-2", "node-3"]
    finally:
        await pool.stop(0)
    assert all(process.returncode is not None for process in first.values())


async def test_workers_that_answer_are_left_alone() -> None:
    pool = XdsWorkers(published(), lambda event: None, "127.0.0.1:0", 1, heartbeat=0.02, hung_after=3,
                      command=FAKE)
    await pool.start()
    try:
        (worker,) = pool._workers.values()
        await async_wait_until(lambda: worker.heard > 30, 20, what="30 frames from the worker")  # 10 x hung_after
        assert pool.restarts[HUNG] == 0 and worker.process.returncode is None
    finally:
        await pool.stop(0)
