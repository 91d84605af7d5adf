"""Persisted rollout state: SQLite in WAL mode, written before anything is pushed to proxies.

What a restart must not lose is what the engine decided: each rollout's status (phase, stable and
canary versions, weight, step, step start, check counters, overrides), the git commit it was
applied from, and its recent events. `save()` commits before the caller publishes, so after a
crash the control plane never serves an older weight than Envoy already has.

Exceptions::

    StateError          the state file cannot be used (not a database, corrupt, newer schema,
                        undecodable rows, not writable); the message says which file and what to do
    └── StateInUse      another process holds its lock (``aviary.store.lock``); names the PID
    StateWriteError     a write did not commit (disk full, read-only, I/O error): nothing of it
                        is stored, the file stays usable and the same write can be retried

Schema changes are numbered migrations applied in order (`PRAGMA user_version` holds the number);
a file from a newer Aviary is refused rather than guessed at.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from aviary.discovery.resources import legacy_cluster_name
from aviary.matching import CohortRule
from aviary.policy.rollout_state import RolloutStatus, TransitionEvent
from aviary.policy.schema import Endpoint, Rollout
from aviary.store.lock import LockError, LockHeld, ProcessLock
from aviary.traffic import Backend, Stickiness

__all__ = [
    "EVENTS_KEPT", "SCHEMA_VERSION", "Save", "SavedRollout", "StateError", "StateInUse", "StateStore",
    "StateWriteError",
]

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


def _v3(db: sqlite3.Connection) -> None:
    # What the director published per rollout (route and clusters, by cluster name), so a restart
    # keeps every cluster a proxy's route may still name. Cluster names changed from
    # `<rollout>-<version>` (not injective) to `<rollout>_<version>` in the same release: a state
    # file from before records the clusters Envoy holds under their old names, derived from each
    # rollout's status, so an upgraded control plane adds the new ones before retiring those.
    db.execute("CREATE TABLE published (rollout TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for name, status_json in db.execute("SELECT name, status FROM rollouts").fetchall():
        try:
            status = _STATUS.validate_json(status_json)
        except ValidationError:
            continue  # load() reports the row as undecodable
        db.execute("INSERT INTO published (rollout, value) VALUES (?, ?)",
                   (name, encode_published(legacy_published(status))))


@dataclass(frozen=True, slots=True)
class SavedPublished:
    """What was published for one rollout: route (cluster name, weight), clusters (name, backend),
    cohort routes (cohort, cluster name), stickiness, mirror (cluster name, percent). Rows saved
    before a field existed lack it in the JSON: no migration, every later field is optional."""

    route: tuple[tuple[str, int], ...]
    clusters: tuple[tuple[str, Backend], ...]
    cohorts: tuple[tuple[CohortRule, str], ...] = ()
    stickiness: Stickiness | None = None
    mirror: tuple[str, int] | None = None


_COHORTS: TypeAdapter[tuple[tuple[CohortRule, str], ...]] = TypeAdapter(tuple[tuple[CohortRule, str], ...])
_STICKINESS: TypeAdapter[Stickiness | None] = TypeAdapter(Stickiness | None)


def legacy_published(status: RolloutStatus) -> SavedPublished:
    """What releases up to state schema 2 published for this status, under its `<rollout>-<version>` names."""
    def legacy(backend: Backend) -> str:
        return legacy_cluster_name(status.rollout, backend.version)

    if status.canary is None:
        return SavedPublished(((legacy(status.stable), 100),), ((legacy(status.stable), status.stable),))
    route = ((legacy(status.stable), 100 - status.weight), (legacy(status.canary), status.weight))
    return SavedPublished(route, ((legacy(status.stable), status.stable), (legacy(status.canary), status.canary)))


def encode_published(published: SavedPublished) -> str:
    return json.dumps({
        "route": [[cluster, weight] for cluster, weight in published.route],
        "clusters": [[cluster, {"version": b.version, "endpoints": [str(e) for e in b.endpoints]}]
                     for cluster, b in published.clusters],
        **({"cohorts": _COHORTS.dump_python(published.cohorts, mode="json")} if published.cohorts else {}),
        **({"stickiness": _STICKINESS.dump_python(published.stickiness, mode="json")}
           if published.stickiness is not None else {}),
        **({"mirror": list(published.mirror)} if published.mirror is not None else {}),
    })


def decode_published(text: str) -> SavedPublished:
    value = json.loads(text)
    return SavedPublished(
        tuple((str(cluster), int(weight)) for cluster, weight in value["route"]),
        tuple(
            (str(cluster), Backend(str(b["version"]), tuple(Endpoint.model_validate(e) for e in b["endpoints"])))
            for cluster, b in value["clusters"]
        ),
        _COHORTS.validate_python(value.get("cohorts", ())),
        _STICKINESS.validate_python(value.get("stickiness")),
        (str(value["mirror"][0]), int(value["mirror"][1])) if value.get("mirror") else None,
    )


MIGRATIONS: Sequence[Callable[[sqlite3.Connection], None]] = (_v1, _v2, _v3)
SCHEMA_VERSION = len(MIGRATIONS)


class StateError(Exception):
    """The state file cannot be used as it is."""


class StateInUse(StateError):
    """Another process holds the state file's lock (see ``aviary.store.lock``)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(
            f"state file {path} is in use by another aviary serve ({holder}); stop it or use another --state"
        )
        self.path = path
        self.pid = pid


def _check_writable(path: Path) -> None:
    """Raise the OS error that would stop SQLite from writing ``path`` (or its -wal and -shm files).

    SQLite says only "unable to open database file" or opens read-only and fails at the first
    write; the OS error ("Is a directory", "Read-only file system", "Permission denied") is what
    an operator can act on.
    """
    if path.exists() or path.is_symlink():
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(errno.EACCES, f"directory {path.parent} is not writable (SQLite keeps "
                                            f"{path.name}-wal and {path.name}-shm there)")


class StateWriteError(Exception):
    """A write (``save``, ``delete``, ``mark_alive``) did not commit; ``reason`` is SQLite's text for
    the OS error, e.g. "database or disk is full" or "attempt to write a readonly database"."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"state file {self.path} cannot be written: {self.reason}"


Save = tuple[RolloutStatus, Rollout, Sequence[TransitionEvent], str | None]
"""One rollout's save: status, policy, new events, git commit (see ``StateStore.save_many``)."""


@dataclass(frozen=True, slots=True)
class SavedRollout:
    status: RolloutStatus
    rollout: Rollout
    saved_at: float
    git_commit: str | None
    events: tuple[TransitionEvent, ...]


class StateStore:
    def __init__(self, path: Path, *, reset: bool = False) -> None:
        """Lock ``path`` for this process (``StateInUse`` if another has it), then open it.

        The lock comes first, before ``reset`` deletes anything: a second ``--reset-state`` against
        a running instance must be refused, not delete the file that instance keeps writing.
        """
        self.path = path
        self._policies: dict[str, tuple[Rollout, str]] = {}  # rollout -> (policy, its JSON), see _policy_json
        try:
            self._lock = ProcessLock.acquire(path)
        except LockHeld as held:
            raise StateInUse(path, held.pid) from None
        except LockError as exc:
            raise StateError(
                f"state file {path} cannot be used: cannot open lock file {exc.lock_file}: {exc.reason}"
            ) from None
        try:
            self._open(reset)
        except BaseException:
            if hasattr(self, "_db"):
                self._db.close()
            self._lock.release()
            raise

    def _open(self, reset: bool) -> None:
        path = self.path
        try:
            if reset:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
            _check_writable(path)
        except OSError as exc:
            raise StateError(f"state file {path} cannot be used: {exc.strerror or exc}") from None
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            (mode,) = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
            if str(mode).lower() != "wal":  # SQLite falls back silently when it cannot write
                raise StateError(f"state file {path} cannot be used: cannot switch to WAL mode (got {mode!r})")
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

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction at run time: all or nothing, and a failure (disk full, read-only,
        I/O error) is a StateWriteError the caller can retry, never a half-open transaction."""
        _roll_back(self._db)  # whatever an earlier failure may have left open
        try:
            with self._transaction():
                yield
        except sqlite3.Error as exc:
            raise StateWriteError(self.path, self._why(exc)) from exc

    def _why(self, exc: sqlite3.Error) -> str:
        """SQLite's text, plus the OS error it hides when it says only "disk I/O error" (a file
        system the kernel turned read-only after an error, a file that cannot be opened any more)."""
        reason = str(exc)
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CLOEXEC))
        except OSError as os_error:
            reason += f" ({os_error.strerror or os_error})"
        return reason

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
        self.save_many([(status, rollout, events, git_commit)])

    def save_many(self, saves: Iterable[Save]) -> None:
        """Commit several rollouts' statuses (and their new events) in one transaction: all or
        none. The engine saves what one turn of its loop decided this way, before publishing it:
        one commit per turn instead of one per rollout."""
        now = time.time()
        with self._write():
            for status, rollout, events, git_commit in saves:
                self._db.execute(
                    "INSERT INTO rollouts (name, status, saved_at, git_commit, policy) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET status=excluded.status, saved_at=excluded.saved_at, "
                    "git_commit=excluded.git_commit, policy=excluded.policy",
                    (status.rollout, _STATUS.dump_json(status).decode(), now, git_commit, self._policy_json(rollout)),
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

    def _policy_json(self, rollout: Rollout) -> str:
        """The policy as JSON, encoded once per parsed policy (policies are frozen; most saves are
        of a check round, under the same policy object as the save before)."""
        cached = self._policies.get(rollout.name)
        if cached is not None and cached[0] is rollout:
            return cached[1]
        text = rollout.model_dump_json(by_alias=True)
        self._policies[rollout.name] = (rollout, text)
        return text

    def mark_alive(self, at: float, proxies: Iterable[str]) -> None:
        """Record that this process was alive at `at`, serving these proxy node ids."""
        with self._write():
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

    def save_published(self, name: str, published: SavedPublished | None) -> None:
        """Record what is published for a rollout now (None: nothing any more). Written after the
        publish: a publish adds clusters before any route names them, so the record lags safely."""
        with self._write():
            if published is None:
                self._db.execute("DELETE FROM published WHERE rollout = ?", (name,))
            else:
                self._db.execute(
                    "INSERT INTO published (rollout, value) VALUES (?, ?) "
                    "ON CONFLICT(rollout) DO UPDATE SET value=excluded.value",
                    (name, encode_published(published)),
                )

    def load_published(self) -> dict[str, SavedPublished]:
        saved = {}
        for name, text in self._db.execute("SELECT rollout, value FROM published ORDER BY rollout").fetchall():
            try:
                saved[name] = decode_published(text)
            except (ValueError, KeyError, TypeError, ValidationError) as exc:
                raise StateError(self._unusable(f"published state of {name!r} cannot be decoded: {exc}")) from exc
        return saved

    def delete(self, name: str) -> None:
        self._policies.pop(name, None)
        with self._write():
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
        """Close the database, then free the lock for the next process."""
        try:
            self._db.close()
        finally:
            self._lock.release()


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        return self._db

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if kind is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error:
                _roll_back(self._db)  # a failed COMMIT (disk full) may leave the transaction open
                raise
        _roll_back(self._db)


def _roll_back(db: sqlite3.Connection) -> None:
    """End an open transaction; SQLite may have rolled it back by itself (SQLITE_FULL, SQLITE_IOERR),
    and a ROLLBACK that fails must not hide the error that caused it."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
