"""Policies from a git branch: each commit applies as a whole, or not at all.

``GitPolicySource`` mirrors ``DirectoryWatcher`` (``load_once``, ``run``, ``reload``, ``current``,
and ``on_change(policy_set, errors)``), with a commit instead of a directory scan as the unit:

- Every poll asks the remote for the branch head (``git ls-remote``, one round trip) and fetches
  only when it moved. The branch defaults to the remote's default branch (its ``HEAD``).
- A new head is read straight from the object store: the ``*.yaml``/``*.yml`` files directly in
  ``path`` (no hidden files, no sub-folders, like ``load_directory``), parsed and checked against
  each other. All valid: the commit applies, ``PolicySet.revision`` is its full SHA and
  ``PolicySet.files`` maps each rollout to its path in the repository. Anything invalid: the whole
  commit is rejected, the last good commit keeps serving, ``on_change(last_good_set, errors)``
  reports the rejection and ``last_rejection`` holds it until a later commit applies.
- Errors name the commit in ``PolicyError.file`` as ``<short sha>:<path in repository>``, e.g.
  ``abc1234:policies/checkout.yaml``: exactly what ``git show`` takes to print the file.
- A failed fetch (network, credentials) is logged and retried on the next poll; what is serving
  stays. At start-up without a reachable remote, the local copy of the branch is used. While it
  fails, ``fetch_error`` (one line), ``fetch_failing_since`` and ``fetch_failures`` say so, for
  status and metrics; a WARNING is logged when it starts (or its reason changes), an INFO when
  it clears.
- A ``*.lock`` file left in the working copy by a git that was killed (a crash, an OOM kill, a
  timeout of ours) would make every later fetch fail. Our own git commands run one at a time under
  ``_lock``, so when one fails, any lock older than ``stale_lock_age`` seconds that no running
  process can own (no process has its working directory inside the repository) is stale: it is
  removed with a WARNING naming it and the poll is retried at once.
- The working copy is a bare repository at ``<workdir>/repo.git``. It remembers the last applied
  commit (``refs/aviary/good/...``), so a restart while the branch head is broken serves that
  commit again rather than nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

from aviary.policy.git import GitError, redact, run_git, run_git_bytes, validate_repository_url
from aviary.policy.loader import LoadResult, PolicyBook, is_policy_file_name, parse_policy_text
from aviary.policy.schema import PolicyError, PolicySet, Rollout
from aviary.policy.watcher import OnChange
from aviary.policy.workers import Parsed, PolicyWorkers, WorkerFailed

__all__ = ["SHORT_SHA", "STALE_LOCK_AGE", "GitPolicySource", "Rejection", "stale_locks"]

logger = logging.getLogger("aviary.policy")
_T = TypeVar("_T")

SHORT_SHA = 7
"""Length of the commit prefix in error file names and log lines."""

STALE_LOCK_AGE = 5.0
"""Seconds after which a git lock file nobody can be holding is removed. Git holds its locks for
milliseconds (a ref update, a config write); a few seconds leaves room for a slow disk."""

_WHOLE_FILE = "-"
_SYMLINK_MODE = b"120000"
_BAD_BRANCH = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^[-/.]|[/.]$|\.lock$")


@dataclass(frozen=True)
class Rejection:
    """The newest commit that could not be applied, and why; ``at`` is a Unix timestamp."""

    sha: str
    errors: tuple[PolicyError, ...]
    at: float


class _Unavailable(Exception):
    """The remote answered, but not with a usable branch head."""


class GitPolicySource:
    """Polls a git branch and awaits ``on_change`` when a new commit applies or is rejected.

    As with ``DirectoryWatcher``, ``on_change`` is awaited from the ``run()`` task and an exception
    from it is logged without stopping the polling. ``load_once()`` applies at start-up without
    calling ``on_change``; ``run()`` then reports only later commits.
    """

    def __init__(
        self,
        repository: str,
        workdir: Path,
        on_change: OnChange,
        branch: str | None = None,
        path: str = "",
        poll_interval: float = 10.0,
        git_timeout: float = 60.0,
        stale_lock_age: float = STALE_LOCK_AGE,
    ) -> None:
        self._url = validate_repository_url(repository)
        if branch is not None and (not branch or _BAD_BRANCH.search(branch)):
            raise ValueError(f"invalid branch name {branch!r}")
        self._branch = branch
        self._path = _normalise_path(path)
        self._workdir = workdir.absolute()  # git runs inside it, so a relative path would move
        self._repo = self._workdir / "repo.git"
        self._on_change = on_change
        self._poll_interval = poll_interval
        self._timeout = git_timeout
        self._stale_lock_age = stale_lock_age
        identity = hashlib.sha256(f"{branch or ''}\0{self._path}".encode()).hexdigest()[:16]
        self._good_ref = f"refs/aviary/good/{identity}"
        self._reload = asyncio.Event()
        self._lock = asyncio.Lock()
        self._workers = PolicyWorkers(workers=1)  # parsing a commit's files never blocks the event loop
        self._in_worker = False  # at start-up nothing is served yet: a thread is quicker than a new worker
        self._ready = False
        self._current = PolicySet()
        self._seen: str | None = None
        self._default: str | None = None
        self._last_rejection: Rejection | None = None
        self._fetch_error: str | None = None
        self._fetch_failing_since: float | None = None
        self._fetch_failures = 0

    @property
    def current(self) -> PolicySet:
        """The set of the last applied commit (empty, revision None, before any)."""
        return self._current

    @property
    def last_rejection(self) -> Rejection | None:
        return self._last_rejection

    @property
    def fetch_error(self) -> str | None:
        """Why the last poll could not reach the branch head (one line); None when it could."""
        return self._fetch_error

    @property
    def fetch_failing_since(self) -> float | None:
        """Unix time of the first failed poll of the current run of failures; None when it works."""
        return self._fetch_failing_since

    @property
    def fetch_failures(self) -> int:
        """Polls that could not reach the branch head since start (a counter, for metrics)."""
        return self._fetch_failures

    def reload(self) -> None:
        """Poll now instead of waiting for the interval (SIGHUP)."""
        self._reload.set()

    async def load_once(self) -> PolicySet:
        """Apply the branch head at start-up, falling back to the last commit applied before."""
        async with self._lock:
            head = await self._poll(notify=False, offline_ok=True)
            if self._current.revision is None:
                good = await self._git_optional(["rev-parse", "--verify", "-q", f"{self._good_ref}^{{commit}}"])
                if good and good != head:
                    with contextlib.suppress(GitError, OSError):
                        policy_set, errors = await self._evaluate(good)
                        if not errors:
                            self._current = policy_set
                            logger.info(
                                "policy commit %s applied (%d rollouts): last good commit, branch head unusable",
                                good[:SHORT_SHA], len(policy_set.rollouts),
                            )
            return self._current

    async def run(self) -> None:
        self._in_worker = True  # serving now: a parse must not hold up the event loop
        self._workers.reopen()  # run again after a crash: the last run closed them on its way out
        try:
            while True:
                self._reload.clear()
                try:
                    async with self._lock:
                        await self._poll(notify=True, offline_ok=False)
                except Exception:
                    logger.exception("policy poll of %s failed", redact(self._url))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reload.wait(), timeout=self._poll_interval)
        finally:  # cancelled at stop: the worker process goes too
            await asyncio.shield(self._workers.close())

    # ------------------------------------------------------------------------------------ polling

    async def _poll(self, *, notify: bool, offline_ok: bool) -> str | None:
        """Bring the branch head in and apply it if it is new; return its SHA (None if unknown)."""
        try:
            head = await self._unlocking(self._reach_head)
        except (GitError, _Unavailable, OSError) as exc:
            message = exc.short if isinstance(exc, GitError) else str(exc)
            if message != self._fetch_error:
                logger.warning("policy fetch from %s failed, retrying every %gs: %s",
                               redact(self._url), self._poll_interval, exc)
            self._fetch_error = message
            self._fetch_failures += 1
            if self._fetch_failing_since is None:
                self._fetch_failing_since = time.time()
            if not offline_ok or not self._ready:
                return None
            local = await self._local_head()
            if local is None:
                return None
            head = local
        else:
            if self._fetch_error is not None:
                failed_for = time.time() - (self._fetch_failing_since or time.time())
                logger.info("policy fetch from %s works again (it failed for %.0fs)", redact(self._url), failed_for)
            self._fetch_error = None
            self._fetch_failing_since = None
        if head != self._seen:
            try:
                await self._apply(head, notify=notify)
            except (GitError, OSError) as exc:  # the working copy itself is in trouble: retry next poll
                logger.warning("cannot read policy commit %s: %s", head[:SHORT_SHA], exc)
        return head

    async def _reach_head(self) -> str:
        await self._ensure_repository()
        return await self._fetch_head()

    async def _unlocking(self, action: Callable[[], Awaitable[_T]]) -> _T:
        """``action()``; if git fails and stale lock files are found and removed, ``action()`` again
        at once (once). Called with ``_lock`` held, so no git command of ours is running meanwhile."""
        try:
            return await action()
        except GitError:
            removed = await asyncio.to_thread(stale_locks, self._repo, self._stale_lock_age, True)
            if not removed:
                raise
            for path, age in removed:
                logger.warning("removed stale git lock %s (%.0fs old, left by a git process that did not "
                               "finish); retrying now", path, age)
        return await action()

    async def _ensure_repository(self) -> None:
        if self._ready:
            return
        if (self._repo / "HEAD").exists():
            if await self._git_optional(["config", "--get", "aviary.url"]) == self._url:
                self._ready = True
                return
            logger.info("policy repository changed to %s: starting a new working copy", redact(self._url))
            await asyncio.to_thread(shutil.rmtree, self._repo)
        self._workdir.mkdir(parents=True, exist_ok=True)
        await run_git(["init", "--bare", "-q", "--", str(self._repo)], self._workdir, self._timeout)
        await self._git(["config", "aviary.url", self._url])
        self._ready = True

    async def _fetch_head(self) -> str:
        """Ask the remote for the branch head, fetch it if it is not here yet, return its SHA."""
        if self._branch is not None:
            branch = self._branch
            listing = await self._git(["ls-remote", "--", self._url, f"refs/heads/{branch}"])
            heads = [sha for sha, _, ref in (line.partition("\t") for line in listing.splitlines())
                     if ref == f"refs/heads/{branch}"]
            if not heads:
                raise _Unavailable(f"branch {branch!r} not found in {redact(self._url)}")
            remote_sha = heads[0]
        else:
            listing = await self._git(["ls-remote", "--symref", "--", self._url, "HEAD"])
            default, head = _default_branch(listing)
            if not default or not head:
                raise _Unavailable(
                    f"{redact(self._url)} reports no default branch (no commits yet, or an old server: set the branch)"
                )
            branch, remote_sha = default, head
        if remote_sha == self._seen:
            return remote_sha  # fetched and judged already: one round trip per quiet poll
        tracking = f"refs/remotes/origin/{branch}"
        if await self._git_optional(["rev-parse", "--verify", "-q", tracking]) != remote_sha:
            await self._git(["fetch", "-q", "--no-tags", "--no-write-fetch-head", "--", self._url,
                             f"+refs/heads/{branch}:{tracking}"])
        if self._branch is None and branch != self._default:
            await self._git(["symbolic-ref", "refs/remotes/origin/HEAD", tracking])  # for _local_head
            self._default = branch
        return (await self._git(["rev-parse", "--verify", f"{tracking}^{{commit}}"])).strip()

    async def _local_head(self) -> str | None:
        """The branch head as last fetched, for start-up while the remote cannot be reached."""
        tracking = f"refs/remotes/origin/{self._branch}" if self._branch else "refs/remotes/origin/HEAD"
        head = await self._git_optional(["rev-parse", "--verify", "-q", f"{tracking}^{{commit}}"])
        if head:
            logger.warning("policy source offline: using the local copy of the branch at %s", head[:SHORT_SHA])
        return head

    # ------------------------------------------------------------------------------------ applying

    async def _apply(self, sha: str, *, notify: bool) -> None:
        policy_set, errors = await self._evaluate(sha)
        self._seen = sha
        short = sha[:SHORT_SHA]
        if errors:
            self._last_rejection = Rejection(sha, tuple(errors), time.time())
            for error in errors:
                logger.warning("policy commit %s rejected: %s", short, error)
            if notify:
                await self._notify(self._current, list(errors))
            return
        self._current = policy_set
        self._last_rejection = None
        logger.info("policy commit %s applied (%d rollouts)", short, len(policy_set.rollouts))
        try:
            await self._unlocking(lambda: self._git(["update-ref", self._good_ref, sha]))
        except (GitError, OSError) as exc:
            logger.warning("could not record %s as the last good policy commit: %s", short, exc)
        if notify:
            await self._notify(policy_set, [])

    async def _notify(self, policy_set: PolicySet, errors: list[PolicyError]) -> None:
        try:
            await self._on_change(policy_set, errors)
        except Exception:
            logger.exception("policy change callback failed")

    async def _evaluate(self, sha: str) -> tuple[PolicySet, list[PolicyError]]:
        """The PolicySet of commit ``sha``, or the errors that reject it (then the set is empty)."""
        short = sha[:SHORT_SHA]
        folder = f"{sha}:{self._path}" if self._path else f"{sha}^{{tree}}"
        if self._path:
            found = (await self._git_optional(["cat-file", "-t", folder])) or "missing"
            if found != "tree":
                reason = "no such folder in this commit" if found == "missing" else f"is a {found}, not a folder"
                return PolicySet(), [PolicyError(f"{short}:{self._path}", _WHOLE_FILE, reason)]
        listing = await run_git_bytes(["ls-tree", "-z", folder], self._repo, self._timeout)
        blobs: dict[str, str] = {}
        errors: list[PolicyError] = []
        for record in filter(None, listing.split(b"\0")):
            meta, _, raw_name = record.partition(b"\t")
            mode, kind, blob_id = meta.split(b" ")
            name = raw_name.decode("utf-8", "replace")
            if kind != b"blob" or not is_policy_file_name(name):
                continue
            file = f"{self._path}/{name}" if self._path else name
            if mode == _SYMLINK_MODE:
                errors.append(PolicyError(file, _WHOLE_FILE, "is a symbolic link; policy files must be regular files"))
            else:
                blobs[file] = blob_id.decode("ascii")
        contents = await self._read_blobs(list(blobs.values()))
        texts: dict[str, str] = {}
        for file, oid in sorted(blobs.items()):
            try:
                texts[file] = contents[oid].decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(PolicyError(file, _WHOLE_FILE, f"not UTF-8 text: {exc.reason} at byte {exc.start}"))
        valid: dict[str, Rollout] = {}
        for file, (rollout, parse_errors) in sorted((await self._parse(texts)).items()):
            errors.extend(parse_errors)
            if rollout is not None:
                valid[file] = rollout
        # A fresh book has nothing serving, so it applies the stateless cross-file rules; its
        # errors are the files broken on their own plus the conflicts. (``rollouts`` is unused.)
        policy_set, book_errors = PolicyBook().apply(LoadResult({}, errors, blobs, valid))
        if book_errors:
            return PolicySet(), [PolicyError(f"{short}:{e.file}", e.field, e.reason) for e in book_errors]
        return PolicySet(policy_set.rollouts, policy_set.files, revision=sha), []

    async def _parse(self, texts: dict[str, str]) -> dict[str, Parsed]:
        """Parse and validate in a worker process: a large policy set would hold the GIL for seconds."""
        if self._in_worker and texts:
            try:
                return await self._workers.parse_texts(texts)
            except WorkerFailed as exc:  # a thread, which holds the GIL at times, beats no load
                logger.warning("policy worker unavailable (%s); parsing in a thread", exc)
        return await asyncio.to_thread(lambda: {f: parse_policy_text(t, f) for f, t in texts.items()})

    async def _read_blobs(self, oids: list[str]) -> dict[str, bytes]:
        """Contents of many blobs from one ``git cat-file --batch``."""
        if not oids:
            return {}
        output = await run_git_bytes(["cat-file", "--batch"], self._repo, self._timeout,
                                     stdin="".join(f"{oid}\n" for oid in oids).encode())
        contents: dict[str, bytes] = {}
        position = 0
        for oid in oids:
            end = output.index(b"\n", position)
            header = output[position:end].split(b" ")
            if len(header) != 3:
                raise GitError(["cat-file", "--batch"], f"unexpected answer for {oid}: {header!r}")
            size = int(header[2])
            contents[oid] = output[end + 1 : end + 1 + size]
            position = end + 1 + size + 1
        return contents

    # ------------------------------------------------------------------------------------- helpers

    async def _git(self, args: list[str]) -> str:
        return await run_git(args, self._repo, self._timeout)

    async def _git_optional(self, args: list[str]) -> str | None:
        """Output of a query that may legitimately fail (missing ref or key): None then."""
        try:
            return (await self._git(args)).strip() or None
        except GitError:
            return None


def stale_locks(repository: Path, min_age: float, remove: bool = False) -> list[tuple[Path, float]]:
    """Git lock files (``*.lock``: ``index.lock``, ``config.lock``, ``packed-refs.lock``,
    ``shallow.lock``, ``refs/**.lock``, ...) under ``repository`` older than ``min_age`` seconds,
    with their age; removed when ``remove``.

    None is reported while any process has its working directory inside the repository: that
    could be a git still at work (ours run there; one left over from a killed Aviary would too).
    The caller makes sure no git command of its own is running.
    """
    now = time.time()
    old: list[tuple[Path, float]] = []
    for folder, _, names in os.walk(repository):
        for name in names:
            if name.endswith(".lock"):
                path = Path(folder) / name
                with contextlib.suppress(FileNotFoundError):  # its owner finished meanwhile
                    if (age := now - path.lstat().st_mtime) >= min_age:
                        old.append((path, age))
    if not old or _processes_inside(repository):
        return []
    found: list[tuple[Path, float]] = []
    for path, age in old:
        if remove:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
        found.append((path, age))
    return found


def _processes_inside(repository: Path) -> bool:
    """Whether a process (other than this one) works inside ``repository``; False where /proc
    cannot tell (the age of the lock is the only guard then)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return False
    inside = str(repository.resolve())
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone meanwhile, or another user's: not ours
            continue
        if cwd == inside or cwd.startswith(inside + os.sep):
            return True
    return False


def _default_branch(listing: str) -> tuple[str | None, str | None]:
    """(branch, sha) from ``git ls-remote --symref URL HEAD``."""
    branch = sha = None
    for line in listing.splitlines():
        target, _, name = line.partition("\t")
        if name != "HEAD":
            continue
        if target.startswith("ref: refs/heads/"):
            branch = target.removeprefix("ref: refs/heads/")
        elif not target.startswith("ref:"):
            sha = target
    return branch, sha


def _normalise_path(path: str) -> str:
    """A folder inside the repository, as git names it: relative, '/'-separated, "" for the root."""
    if any(char in path for char in "\0\n\r\t:\\"):
        raise ValueError(f"invalid policy path {path!r}: control characters, ':' and '\\' are not allowed")
    pure = PurePosixPath(path.strip("/") or ".")
    if ".." in pure.parts:
        raise ValueError(f"invalid policy path {path!r}: must stay inside the repository (no '..')")
    return "" if str(pure) == "." else str(pure)


_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*://|^[^/\s:@]+@[^/\s:]+:")


def is_git_repository(policies: str | Path) -> bool:
    """Whether `--policies` names a git repository rather than a plain directory of files.

    URLs (https://, ssh://, file://, git@host:path) are repositories; a local path is one when it
    is a repository's top folder (it holds .git) or a bare repository (HEAD and objects/).
    """
    text = str(policies)
    if _REMOTE.match(text):
        return True
    path = Path(text)
    return (path / ".git").exists() or ((path / "HEAD").is_file() and (path / "objects").is_dir())
