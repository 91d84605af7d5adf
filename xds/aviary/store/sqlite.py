"""Persisted rollout state: SQLite in WAL mode, written before anything is pushed to proxies.

What a restart must not lose is what the engine decided: each rollout's status (phase, stable and
canary versions, weight, step, step start, check counters, overrides), the git commit it was
applied from, and its recent events. `save()` commits before the caller publishes, so after a
crash the control plane never serves an older weight than Envoy already has.

Exceptions::

    StateError          the state file cannot be used (not a database, corrupt, newer schema,
                        undecodable rows); the message says which file and what to do

Schema changes are numbered migrations applied in order (`PRAGMA user_version` holds the number);
a file from a newer Aviary is refused rather than guessed at.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from aviary.policy.rollout_state import RolloutStatus, TransitionEvent
from aviary.policy.schema import Rollout

__all__ = ["EVENTS_KEPT", "SCHEMA_VERSION", "SavedRollout", "StateError", "StateStore"]

EVENTS_KEPT = 200  # per rollout

_STATUS = TypeAdapter(RolloutStatus)
_EVENT = TypeAdapter(TransitionEvent)


def _v1(db: sqlite3.Connection) -> None:
    # One statement per execute(): executescript() would commit the migration's transaction early.
    for statement in (
        """
        CREATE TABLE rollouts (
            name        TEXT PRIMARY KEY,
            status      TEXT NOT NULL,      -- RolloutStatus as JSON
            saved_at    REAL NOT NULL,      -- wall clock of the save
            git_commit  TEXT,
            policy      TEXT NOT NULL       -- the Rollout policy it runs under, as JSON
        )""",
        """
        CREATE TABLE events (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            rollout     TEXT NOT NULL,
            at          REAL NOT NULL,
            event       TEXT NOT NULL       -- TransitionEvent as JSON
        )""",
        "CREATE INDEX events_by_rollout ON events (rollout, id)",
    ):
        db.execute(statement)


def _v2(db: sqlite3.Connection) -> None:
    # What a restart needs besides rollouts: when the previous process was last alive (so a step
    # keeps the time it had spent) and which proxies it served (so gates wait for them to return).
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


MIGRATIONS: Sequence[Callable[[sqlite3.Connection], None]] = (_v1, _v2)
SCHEMA_VERSION = len(MIGRATIONS)


class StateError(Exception):
    """The state file cannot be used as it is."""


@dataclass(frozen=True, slots=True)
class SavedRollout:
    status: RolloutStatus
    rollout: Rollout
    saved_at: float
    git_commit: str | None
    events: tuple[TransitionEvent, ...]


class StateStore:
    def __init__(self, path: Path, *, reset: bool = False) -> None:
        self.path = path
        if reset:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable against a process crash
            self._check_integrity()
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StateError(self._unusable(str(exc))) from exc

    def _unusable(self, why: str) -> str:
        return (
            f"state file {self.path} is not usable ({why}); move it away to keep it for inspection, "
            "or start with --reset-state to begin with empty state on purpose"
        )

    def _check_integrity(self) -> None:
        (result,) = self._db.execute("PRAGMA quick_check").fetchone()
        if result != "ok":
            raise StateError(self._unusable(f"integrity check: {result}"))

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StateError(
                self._unusable(f"schema version {version} is newer than this Aviary's {SCHEMA_VERSION}")
            )
        for number in range(version, SCHEMA_VERSION):
            with self._transaction():
                MIGRATIONS[number](self._db)
                self._db.execute(f"PRAGMA user_version = {number + 1}")

    def _transaction(self) -> _Transaction:
        self._db.execute("BEGIN IMMEDIATE")
        return _Transaction(self._db)

    @property
    def schema_version(self) -> int:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        return int(version)

    def save(
        self,
        status: RolloutStatus,
        rollout: Rollout,
        events: Sequence[TransitionEvent] = (),
        git_commit: str | None = None,
    ) -> None:
        """Commit one rollout's status (and its new events) durably; call before publishing."""
        now = time.time()
        with self._transaction():
            self._db.execute(
                "INSERT INTO rollouts (name, status, saved_at, git_commit, policy) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET status=excluded.status, saved_at=excluded.saved_at, "
                "git_commit=excluded.git_commit, policy=excluded.policy",
                (status.rollout, _STATUS.dump_json(status).decode(), now, git_commit,
                 rollout.model_dump_json(by_alias=True)),
            )
            for event in events:
                self._db.execute(
                    "INSERT INTO events (rollout, at, event) VALUES (?, ?, ?)",
                    (event.rollout, event.at, _EVENT.dump_json(event).decode()),
                )
            if events:
                self._db.execute(
                    "DELETE FROM events WHERE rollout = ? AND id NOT IN "
                    "(SELECT id FROM events WHERE rollout = ? ORDER BY id DESC LIMIT ?)",
                    (status.rollout, status.rollout, EVENTS_KEPT),
                )

    def mark_alive(self, at: float, proxies: Iterable[str]) -> None:
        """Record that this process was alive at `at`, serving these proxy node ids."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('alive', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (json.dumps({"at": at, "proxies": sorted(set(proxies))}),),
            )

    def last_alive(self) -> tuple[float | None, frozenset[str]]:
        """When the previous process was last alive, and the proxies it served then."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'alive'").fetchone()
        if row is None:
            return None, frozenset()
        try:
            value = json.loads(row[0])
            return float(value["at"]), frozenset(str(p) for p in value["proxies"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(self._unusable(f"meta 'alive' cannot be decoded: {exc}")) from exc

    def delete(self, name: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM rollouts WHERE name = ?", (name,))
            self._db.execute("DELETE FROM events WHERE rollout = ?", (name,))

    def load(self) -> dict[str, SavedRollout]:
        rows = self._db.execute(
            "SELECT name, status, saved_at, git_commit, policy FROM rollouts ORDER BY name"
        ).fetchall()
        saved = {}
        for name, status_json, saved_at, git_commit, policy in rows:
            try:
                status = _STATUS.validate_json(status_json)
                rollout = Rollout.model_validate_json(policy)
                events = tuple(
                    _EVENT.validate_json(text)
                    for (text,) in self._db.execute(
                        "SELECT event FROM events WHERE rollout = ? ORDER BY id", (name,)
                    ).fetchall()
                )
            except (ValidationError, ValueError, json.JSONDecodeError) as exc:
                raise StateError(self._unusable(f"rollout {name!r} cannot be decoded: {exc}")) from exc
            saved[name] = SavedRollout(status, rollout, float(saved_at), git_commit, events)
        return saved

    def close(self) -> None:
        self._db.close()


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        return self._db

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
