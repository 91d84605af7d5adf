"""The SQLite state store: round trips, bounded events, schema versions and unusable files."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviary.policy.rollout_state import Phase, RolloutStatus, TransitionEvent
from aviary.policy.schema import Endpoint, Rollout
from aviary.runner import stopped_for_restart
from aviary.store.sqlite import EVENTS_KEPT, SCHEMA_VERSION, StateError, StateStore
from aviary.traffic import Backend

V1 = Backend("v1", (Endpoint.model_validate("127.0.0.1:9001"),))
V2 = Backend("v2", (Endpoint.model_validate("backend.internal:9002"),))
ROLLOUT = Rollout.model_validate(
    {
        "apiVersion": "aviary.dev/v1",
        "kind": "Rollout",
        "metadata": {"name": "checkout"},
        "spec": {
            "listener": {"address": "127.0.0.1", "port": 10000},
            "hosts": ["*"],
            "version": "v2",
            "endpoints": ["backend.internal:9002"],
            "strategy": {"steps": [30, 60], "interval": "1m"},
        },
    }
)
CANARY = RolloutStatus("checkout", Phase.PROGRESSING, V1, V2, weight=30, step_index=0, step_started_at=1000.0,
                       acked_weight=30)


def _event(i: int) -> TransitionEvent:
    return TransitionEvent("checkout", float(i), Phase.STABLE, Phase.PROGRESSING, 30, "v1", "v2", 0, f"event {i}")


def test_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.save(CANARY, ROLLOUT, [_event(1)], git_commit="abc123")
    store.close()
    saved = StateStore(tmp_path / "state.db").load()["checkout"]
    assert saved.status == CANARY
    assert saved.rollout == ROLLOUT
    assert saved.git_commit == "abc123"
    assert [e.reason for e in saved.events] == ["event 1"]


def test_events_are_bounded(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    for i in range(EVENTS_KEPT + 25):
        store.save(CANARY, ROLLOUT, [_event(i)])
    events = store.load()["checkout"].events
    assert len(events) == EVENTS_KEPT
    assert events[-1].reason == f"event {EVENTS_KEPT + 24}"


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    assert store.schema_version == SCHEMA_VERSION
    (mode,) = sqlite3.connect(tmp_path / "state.db").execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"


def test_not_a_database_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match=r"state\.db is not usable .*--reset-state"):
        StateStore(path)
    assert path.read_bytes().startswith(b"this is not sqlite")  # left alone for inspection


def test_reset_state_starts_fresh(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"garbage" * 100)
    assert StateStore(path, reset=True).load() == {}


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    StateStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StateError, match="newer than this Aviary"):
        StateStore(path)


def test_undecodable_row_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    store.save(CANARY, ROLLOUT)
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE rollouts SET status = '{\"phase\": \"Nope\"}'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="rollout 'checkout' cannot be decoded"):
        StateStore(path).load()


def test_migration_from_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    sqlite3.connect(path).close()  # version 0: an empty database
    store = StateStore(path)
    assert store.schema_version == SCHEMA_VERSION
    store.save(CANARY, ROLLOUT)
    assert "checkout" in store.load()


def test_last_alive_and_proxies_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    assert store.last_alive() == (None, frozenset())
    store.mark_alive(1234.5, ["envoy-2", "envoy-1", "envoy-1"])
    store.close()
    assert StateStore(tmp_path / "state.db").last_alive() == (1234.5, frozenset({"envoy-1", "envoy-2"}))


def test_migration_from_version_1_keeps_rollouts(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    store.save(CANARY, ROLLOUT)
    store.close()
    db = sqlite3.connect(path)  # back to the version 1 layout, as an older Aviary left it
    db.execute("DROP TABLE meta")
    db.execute("DROP TABLE published")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = StateStore(path)
    assert store.schema_version == SCHEMA_VERSION
    assert store.load()["checkout"].status == CANARY
    store.mark_alive(1.0, [])


def test_restored_step_clock_stops_until_the_weight_is_acked_again() -> None:
    status = RolloutStatus("checkout", Phase.PROGRESSING, V1, V2, weight=30, step_started_at=1000.0,
                           acked_weight=30, step_checked_at=1010.0)
    # Last alive 20 s into the step: its clock stops, and 20 s are credited once proxies ACK again.
    stopped, resumption = stopped_for_restart(status, last_alive=1020.0)
    assert stopped.step_started_at is None
    assert stopped.step_checked_at is None and stopped.step_outcome is None
    assert stopped.weight == 30
    assert resumption is not None and resumption.elapsed == 20.0


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` read-only for this process: a read-only bind mount over it as root (mode bits do not
    stop root), mode 0444 otherwise."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:  # a container without CAP_SYS_ADMIN
        pytest.skip(f"root, but cannot bind-mount here: {mounted.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_state_file_is_refused_with_the_os_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    store.save(CANARY, ROLLOUT)
    store.close()  # checkpoints: nothing left in -wal
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    with read_only(path), pytest.raises(StateError, match=rf"state\.db cannot be used: {reason}$"):
        StateStore(path)
    assert StateStore(path).load()["checkout"].status == CANARY  # writable again: all there


def test_a_read_only_state_directory_is_refused_with_the_os_error(tmp_path: Path) -> None:
    """SQLite needs to create -wal and -shm next to the file: a read-only directory is refused at
    start, naming the file and the OS error, not at the first save."""
    directory = tmp_path / "state"
    store = StateStore(directory / "state.db")
    store.save(CANARY, ROLLOUT)
    store.close()
    with read_only(directory), pytest.raises(StateError) as refused:
        StateStore(directory / "state.db")
    assert str(refused.value).startswith(f"state file {directory / 'state.db'} cannot be used: ")
    reasons = ("Read-only file system", "Permission denied", "not writable")
    assert any(why in str(refused.value) for why in reasons), refused.value
    assert StateStore(directory / "state.db").load()["checkout"].status == CANARY
