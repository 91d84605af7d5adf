"""GitPolicySource against real git repositories in tmp_path; URL validation; the git runner."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from aviary.admin.convert import policy_message
from aviary.admin.render import as_json, policy_summary
from aviary.child_process import PIPE, ChildProcess
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.observability import ControlPlaneMetrics
from aviary.policy import git as git_module
from aviary.policy.git import GitError, redact, run_git, validate_repository_url
from aviary.policy.git_source import SHORT_SHA, GitPolicySource, stale_locks
from aviary.policy.schema import PolicyError, PolicySet
from aviary.policy.source import PolicyState
from aviary.runner import RolloutRunner
from tests.rig.git_repo import GitRepo
from tests.rig.policies import rollout_text
from tests.rig.policy_changes import PolicyRecorder, poll_until

DEADLINE = 10.0
def policy(name: str, version: str = "v1", host: str | None = None) -> str:
    return rollout_text(name, version, host or name + ".example.com")


async def wait_until(condition: Callable[[], bool]) -> None:
    await poll_until(condition, DEADLINE, interval=0.01)


@contextlib.asynccontextmanager
async def running(source: GitPolicySource) -> AsyncIterator[None]:
    task = asyncio.create_task(source.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def remote(tmp_path: Path) -> GitRepo:
    return GitRepo(tmp_path / "remote", allow_empty=True)


def make_source(tmp_path: Path, remote: GitRepo, recorder: PolicyRecorder, **options: Any) -> GitPolicySource:
    # A long interval: every poll in these tests is triggered by reload().
    return GitPolicySource(str(remote.path), tmp_path / "state" / "git", recorder, poll_interval=3600, **options)


# ------------------------------------------------------------------------------------ applying


async def test_valid_commit_applies_with_its_sha(tmp_path: Path, remote: GitRepo) -> None:
    sha = remote.commit({"checkout.yaml": policy("checkout"), "cart.yml": policy("cart"), "README.md": "hi"})
    recorder = PolicyRecorder(DEADLINE)
    source = make_source(tmp_path, remote, recorder)
    policy_set = await source.load_once()
    assert policy_set.revision == sha
    assert sorted(policy_set.rollouts) == ["cart", "checkout"]
    assert policy_set.files == {"cart": "cart.yml", "checkout": "checkout.yaml"}
    assert source.current is policy_set
    assert source.last_rejection is None and source.fetch_error is None
    assert recorder.changes.empty()  # load_once applies without calling on_change, like DirectoryWatcher
    assert (tmp_path / "state" / "git" / "repo.git").is_dir()


async def test_broken_commit_is_rejected_whole_and_the_fix_applies(
    tmp_path: Path, remote: GitRepo, caplog: pytest.LogCaptureFixture
) -> None:
    good = remote.commit({"checkout.yaml": policy("checkout")})
    recorder = PolicyRecorder(DEADLINE)
    source = make_source(tmp_path, remote, recorder)
    serving = await source.load_once()
    caplog.set_level(logging.INFO, logger="aviary.policy")
    async with running(source):
        # A valid new file in the same commit must not sneak in: the commit applies whole or not at all.
        bad = remote.commit({"checkout.yaml": policy("checkout", version="V 2"), "cart.yaml": policy("cart")})
        source.reload()
        policy_set, errors = await recorder.next()
        assert policy_set is serving and policy_set.revision == good
        assert [(e.file, e.field) for e in errors] == [(f"{bad[:SHORT_SHA]}:checkout.yaml", "spec.version")]
        assert "invalid version 'V 2'" in errors[0].reason
        assert source.current is serving
        rejection = source.last_rejection
        assert rejection is not None and rejection.sha == bad and list(rejection.errors) == errors
        short = bad[:SHORT_SHA]
        assert f"policy commit {short} rejected: {short}:checkout.yaml: spec.version:" in caplog.text

        fixed = remote.commit({"checkout.yaml": policy("checkout", version="v2")})
        source.reload()
        policy_set, errors = await recorder.next()
        assert errors == []
        assert policy_set.revision == fixed and sorted(policy_set.rollouts) == ["cart", "checkout"]
        assert policy_set.rollouts["checkout"].spec.version == "v2"
        assert source.current is policy_set and source.last_rejection is None
        assert f"policy commit {fixed[:SHORT_SHA]} applied (2 rollouts)" in caplog.text


async def test_version_bump_is_a_changed_spec(tmp_path: Path, remote: GitRepo) -> None:
    remote.commit({"checkout.yaml": policy("checkout", version="v1")})
    recorder = PolicyRecorder(DEADLINE)
    source = make_source(tmp_path, remote, recorder)
    before = await source.load_once()
    async with running(source):
        bumped = remote.commit({"checkout.yaml": policy("checkout", version="v2")})
        source.reload()
        after, errors = await recorder.next()
    assert errors == [] and after.revision == bumped
    assert before.rollouts["checkout"].spec.version == "v1"
    assert after.rollouts["checkout"].spec.version == "v2"
    assert after.rollouts["checkout"].spec != before.rollouts["checkout"].spec


async def test_removed_file_leaves_the_set(tmp_path: Path, remote: GitRepo) -> None:
    remote.commit({"checkout.yaml": policy("checkout"), "cart.yaml": policy("cart")})
    recorder = PolicyRecorder(DEADLINE)
    source = make_source(tmp_path, remote, recorder)
    await source.load_once()
    async with running(source):
        removed = remote.commit({"cart.yaml": None})
        source.reload()
        policy_set, errors = await recorder.next()
    assert errors == [] and policy_set.revision == removed and list(policy_set.rollouts) == ["checkout"]


async def test_cross_file_conflict_rejects_the_commit(tmp_path: Path, remote: GitRepo) -> None:
    sha = remote.commit({"a.yaml": policy("checkout"), "b.yaml": policy("checkout", host="other.example.com")})
    source = make_source(tmp_path, remote, PolicyRecorder(DEADLINE))
    policy_set = await source.load_once()
    assert policy_set == PolicySet() and source.current.revision is None
    rejection = source.last_rejection
    assert rejection is not None and rejection.sha == sha
    assert [(e.file, e.field) for e in rejection.errors] == [(f"{sha[:SHORT_SHA]}:b.yaml", "metadata.name")]
    assert "already used by a.yaml" in rejection.errors[0].reason


async def test_no_new_commit_means_no_callback(tmp_path: Path, remote: GitRepo) -> None:
    remote.commit({"checkout.yaml": policy("checkout")})
    recorder = PolicyRecorder(DEADLINE)
    source = make_source(tmp_path, remote, recorder)
    await source.load_once()
    calls: list[list[str]] = []
    real = git_module.spawn

    async def spy(argv: Sequence[str], **kwargs: Any) -> ChildProcess:
        calls.append(list(argv))
        return await real(argv, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(git_module, "spawn", spy)
        async with running(source):
            await wait_until(lambda: len(calls) >= 1)
            source.reload()
            await wait_until(lambda: len(calls) >= 2)
            source.reload()
            await wait_until(lambda: len(calls) >= 3)
    assert {call[1] for call in calls} == {"ls-remote"}  # one round trip per poll; nothing fetched or re-read
    assert recorder.changes.empty()


async def test_callback_exception_does_not_stop_polling(
    tmp_path: Path, remote: GitRepo, caplog: pytest.LogCaptureFixture
) -> None:
    remote.commit({"checkout.yaml": policy("checkout")})
    recorder = PolicyRecorder(DEADLINE)
    failures = 0

    async def flaky(policy_set: PolicySet, errors: list[PolicyError]) -> None:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RuntimeError("publish failed")
        await recorder(policy_set, errors)

    source = GitPolicySource(str(remote.path), tmp_path / "git", flaky, poll_interval=3600)
    await source.load_once()
    async with running(source):
        remote.commit({"checkout.yaml": policy("checkout", version="v2")})
        source.reload()
        await wait_until(lambda: failures == 1)
        third = remote.commit({"checkout.yaml": policy("checkout", version="v3")})
        source.reload()
        policy_set, _ = await recorder.next()
    assert policy_set.revision == third
    assert "policy change callback failed" in caplog.text


# ------------------------------------------------------------------------------- path and branch


async def test_path_selects_a_folder_without_sub_folders(tmp_path: Path, remote: GitRepo) -> None:
    sha = remote.commit({
        "policies/checkout.yaml": policy("checkout"),
        "policies/archive/old.yaml": policy("old"),
        "policies/.hidden.yaml": policy("hidden"),
        "elsewhere.yaml": "not: [valid",
    })
    source = make_source(tmp_path, remote, PolicyRecorder(DEADLINE), path="/policies/")
    policy_set = await source.load_once()
    assert policy_set.revision == sha
    assert policy_set.files == {"checkout": "policies/checkout.yaml"}


async def test_path_errors_name_the_file_in_the_repository(tmp_path: Path, remote: GitRepo) -> None:
    sha = remote.commit({"policies/checkout.yaml": policy("checkout").replace("endpoints", "endpionts")})
    source = make_source(tmp_path, remote, PolicyRecorder(DEADLINE), path="policies")
    await source.load_once()
    assert source.last_rejection is not None
    errors = source.last_rejection.errors
    assert {error.file for error in errors} == {f"{sha[:SHORT_SHA]}:policies/checkout.yaml"}
    assert [(error.field, error.reason) for error in errors] == [
        ("spec.endpoints", "required field is missing"),
        ("spec.endpionts", "unknown field 'endpionts' (did you mean 'endpoints'?)"),
    ]


async def test_missing_path_rejects_the_commit(tmp_path: Path, remote: GitRepo) -> None:
    sha = remote.commit({"checkout.yaml": policy("checkout")})
    source = make_source(tmp_path, remote, PolicyRecorder(DEADLINE), path="policies")
    assert await source.load_once() == PolicySet()
    assert source.last_rejection is not None
    assert source.last_rejection.errors == (
        PolicyError(f"{sha[:SHORT_SHA]}:policies", "-", "no such folder in this commit"),
    )


@pytest.mark.parametrize("path", ["../outside", "a/../../b", "a:b", "a\nb"])
def test_bad_paths_are_refused(tmp_path: Path, remote: GitRepo, path: str) -> None:
    with pytest.raises(ValueError, match="invalid policy path"):
        make_source(tmp_path, remote, PolicyRecorder(DEADLINE), path=path)


async def test_default_branch_is_the_remotes_head(tmp_path: Path) -> None:
    remote = GitRepo(tmp_path / "remote", branch="trunk", allow_empty=True)
    trunk = remote.commit({"checkout.yaml": policy("checkout")})
    remote.git("checkout", "-q", "-b", "feature")
    remote.commit({"checkout.yaml": policy("checkout", version="v9")})
    remote.git("checkout", "-q", "trunk")
    policy_set = await make_source(tmp_path, remote, PolicyRecorder(DEADLINE)).load_once()
    assert policy_set.revision == trunk and policy_set.rollouts["checkout"].spec.version == "v1"


async def test_branch_selection(tmp_path: Path, remote: GitRepo) -> None:
    remote.commit({"checkout.yaml": policy("checkout")})
    remote.git("checkout", "-q", "-b", "release/eu")
    eu = remote.commit({"checkout.yaml": policy("checkout", version="v2")})
    remote.git("checkout", "-q", "main")
    recorder = PolicyRecorder(DEADLINE)
    source = make_source(tmp_path, remote, recorder, branch="release/eu")
    policy_set = await source.load_once()
    assert policy_set.revision == eu and policy_set.rollouts["checkout"].spec.version == "v2"
    async with running(source):
        remote.commit({"checkout.yaml": policy("checkout", version="v3")})  # on main: ignored
        remote.git("checkout", "-q", "release/eu")
        later = remote.commit({"checkout.yaml": policy("checkout", version="v4")})
        source.reload()
        policy_set, _ = await recorder.next()
    assert policy_set.revision == later and policy_set.rollouts["checkout"].spec.version == "v4"


async def test_missing_branch_is_a_fetch_error(tmp_path: Path, remote: GitRepo) -> None:
    remote.commit({"checkout.yaml": policy("checkout")})
    source = make_source(tmp_path, remote, PolicyRecorder(DEADLINE), branch="nope")
    assert await source.load_once() == PolicySet()
    assert source.fetch_error is not None and "branch 'nope' not found" in source.fetch_error


@pytest.mark.parametrize("branch", ["", "-x", "a b", "a..b", "a:b", "a~1", "x.lock", "ext::x"])
def test_bad_branch_names_are_refused(tmp_path: Path, remote: GitRepo, branch: str) -> None:
    with pytest.raises(ValueError, match="invalid branch name"):
        make_source(tmp_path, remote, PolicyRecorder(DEADLINE), branch=branch)


# ------------------------------------------------------------------------------ failure and restart


async def test_fetch_failure_keeps_serving_and_recovers(
    tmp_path: Path, remote: GitRepo, caplog: pytest.LogCaptureFixture
) -> None:
    good = remote.commit({"checkout.yaml": policy("checkout")})
    recorder = PolicyRecorder(DEADLINE)
    source = make_source(tmp_path, remote, recorder)
    serving = await source.load_once()
    away = tmp_path / "away"
    async with running(source):
        remote.path.rename(away)
        source.reload()
        await wait_until(lambda: source.fetch_error is not None)
        assert source.current is serving and serving.revision == good
        assert "policy fetch from" in caplog.text and "failed" in caplog.text
        away.rename(remote.path)
        later = remote.commit({"checkout.yaml": policy("checkout", version="v2")})
        source.reload()
        policy_set, errors = await recorder.next()
    assert errors == [] and policy_set.revision == later and source.fetch_error is None


async def test_fetch_failure_is_counted_with_its_start(tmp_path: Path, remote: GitRepo) -> None:
    remote.commit({"checkout.yaml": policy("checkout")})
    source = make_source(tmp_path, remote, PolicyRecorder(DEADLINE))
    await source.load_once()
    assert (source.fetch_error, source.fetch_failing_since, source.fetch_failures) == (None, None, 0)
    remote.path.rename(tmp_path / "away")
    before = time.time()
    async with running(source):
        source.reload()
        await wait_until(lambda: source.fetch_failures == 1)
        since = source.fetch_failing_since
        assert since is not None and before <= since <= time.time()
        source.reload()
        await wait_until(lambda: source.fetch_failures == 2)
        assert source.fetch_failing_since == since  # the start of this run of failures, not the latest
        # One line, the git subcommand first, without git's advice paragraphs.
        assert source.fetch_error is not None and "\n" not in source.fetch_error
        assert source.fetch_error.startswith("git ls-remote: ")
        assert "does not appear to be a git repository" in source.fetch_error
        (tmp_path / "away").rename(remote.path)
        source.reload()
        await wait_until(lambda: source.fetch_error is None)
    assert source.fetch_failing_since is None and source.fetch_failures == 2


def working_copy(tmp_path: Path) -> Path:
    return tmp_path / "state" / "git" / "repo.git"


async def test_a_stale_ref_lock_is_removed_and_the_commit_applies(
    tmp_path: Path, remote: GitRepo, caplog: pytest.LogCaptureFixture
) -> None:
    # What a git killed in the middle of a fetch leaves: the lock of the ref it was updating.
    remote.commit({"checkout.yaml": policy("checkout")})
    recorder = PolicyRecorder(DEADLINE)
    source = make_source(tmp_path, remote, recorder, stale_lock_age=30)
    await source.load_once()
    lock = working_copy(tmp_path) / "refs" / "remotes" / "origin" / "main.lock"
    lock.write_text("")
    later = remote.commit({"checkout.yaml": policy("checkout", version="v2")})
    caplog.set_level(logging.INFO, logger="aviary.policy")
    async with running(source):
        # A lock younger than stale_lock_age could belong to a git at work: it stays, the fetch fails.
        source.reload()
        await wait_until(lambda: source.fetch_error is not None)
        assert "cannot lock ref 'refs/remotes/origin/main'" in (source.fetch_error or "")
        assert lock.exists() and source.current.revision != later
        # Once it is old, the next poll removes it and fetches at once.
        os.utime(lock, (time.time() - 60, time.time() - 60))
        source.reload()
        policy_set, errors = await recorder.next()
    assert errors == [] and policy_set.revision == later
    assert not lock.exists() and source.fetch_error is None and source.fetch_failing_since is None
    assert f"removed stale git lock {lock} (60s old" in caplog.text
    assert "works again" in caplog.text


@pytest.mark.parametrize("name", ["index.lock", "config.lock", "packed-refs.lock", "shallow.lock", "HEAD.lock",
                                  "refs/heads/main.lock", "refs/aviary/good/0123456789abcdef.lock"])
def test_stale_locks_finds_every_git_lock_file(tmp_path: Path, name: str) -> None:
    repository = tmp_path / "repo.git"
    (repository / "refs" / "heads").mkdir(parents=True)
    old, young = repository / name, repository / "refs" / "young.lock"
    old.parent.mkdir(parents=True, exist_ok=True)
    for path in (old, young, repository / "refs" / "heads" / "main"):
        path.write_text("")
    os.utime(old, (time.time() - 10, time.time() - 10))
    assert [path for path, _ in stale_locks(repository, 5.0)] == [old]
    assert old.exists()  # only looked
    ((path, age),) = stale_locks(repository, 5.0, remove=True)
    assert path == old and 9 < age < 60
    assert not old.exists() and young.exists() and (repository / "refs" / "heads" / "main").exists()


def test_locks_stay_while_a_process_works_in_the_repository(tmp_path: Path) -> None:
    # A git left running by a killed Aviary would work there: its locks are not stale, however old.
    repository = tmp_path / "repo.git"
    repository.mkdir()
    lock = repository / "index.lock"
    lock.write_text("")
    os.utime(lock, (time.time() - 600, time.time() - 600))
    worker = subprocess.Popen(["sleep", "60"], cwd=repository)
    try:
        assert stale_locks(repository, 5.0, remove=True) == []
    finally:
        worker.kill()
        worker.wait()
    assert lock.exists()
    assert [path for path, _ in stale_locks(repository, 5.0, remove=True)] == [lock]


async def test_restart_offline_serves_the_local_copy(tmp_path: Path, remote: GitRepo) -> None:
    sha = remote.commit({"checkout.yaml": policy("checkout")})
    url = remote.path.as_uri()  # file:// stays a valid URL once the repository is gone
    await GitPolicySource(url, tmp_path / "git", PolicyRecorder(DEADLINE)).load_once()
    shutil.rmtree(remote.path)
    source = GitPolicySource(url, tmp_path / "git", PolicyRecorder(DEADLINE))
    policy_set = await source.load_once()
    assert policy_set.revision == sha and list(policy_set.rollouts) == ["checkout"]
    assert source.fetch_error is not None


async def test_restart_with_a_broken_head_serves_the_last_good_commit(tmp_path: Path, remote: GitRepo) -> None:
    good = remote.commit({"checkout.yaml": policy("checkout")})
    await make_source(tmp_path, remote, PolicyRecorder(DEADLINE)).load_once()
    bad = remote.commit({"checkout.yaml": "kind: [oops"})
    source = make_source(tmp_path, remote, PolicyRecorder(DEADLINE))
    policy_set = await source.load_once()
    assert policy_set.revision == good
    assert source.last_rejection is not None and source.last_rejection.sha == bad


async def test_changed_repository_starts_a_new_working_copy(tmp_path: Path, remote: GitRepo) -> None:
    remote.commit({"checkout.yaml": policy("checkout")})
    await make_source(tmp_path, remote, PolicyRecorder(DEADLINE)).load_once()
    other = GitRepo(tmp_path / "other", allow_empty=True)
    sha = other.commit({"cart.yaml": policy("cart")})
    policy_set = await make_source(tmp_path, other, PolicyRecorder(DEADLINE)).load_once()
    assert policy_set.revision == sha and list(policy_set.rollouts) == ["cart"]


async def test_relative_workdir(tmp_path: Path, remote: GitRepo, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = remote.commit({"checkout.yaml": policy("checkout")})
    monkeypatch.chdir(tmp_path)
    source = GitPolicySource(str(remote.path), Path("state/git"), PolicyRecorder(DEADLINE))
    assert (await source.load_once()).revision == sha
    assert (tmp_path / "state" / "git" / "repo.git" / "HEAD").is_file()


async def test_empty_remote_is_a_fetch_error(tmp_path: Path, remote: GitRepo) -> None:
    source = make_source(tmp_path, remote, PolicyRecorder(DEADLINE))
    assert await source.load_once() == PolicySet()
    assert source.fetch_error is not None and "no default branch" in source.fetch_error


# ------------------------------------------------------------------------- shown in status and metrics


def test_a_fetch_error_is_shown_with_its_start_in_local_time() -> None:
    since = 1780000000.0  # 2026-05-28T20:26:40Z
    state = PolicyState("file:///srv/p.git", applied_commit="a" * 40, fetch_error="git fetch: cannot lock ref 'x'",
                        fetch_failing_since=since, fetch_failures=3)
    message = policy_message(state)
    assert message.fetch_error == "since 2026-05-28T20:26:40Z: git fetch: cannot lock ref 'x'"
    local = datetime.fromtimestamp(since).strftime("%H:%M:%S")
    text = policy_summary(message).plain
    assert text.splitlines()[-1] == f"git fetch failing since {local}: git fetch: cannot lock ref 'x'"
    assert json.loads(as_json(message))["fetch_error"] == message.fetch_error
    healthy = policy_message(PolicyState("file:///srv/p.git", applied_commit="a" * 40))
    assert healthy.fetch_error == "" and "fetch" not in policy_summary(healthy).plain


def test_fetch_failures_are_metrics() -> None:
    state = [PolicyState("repo")]
    metrics = ControlPlaneMetrics(ProxyStatus(), RolloutRunner(TrafficDirector(SnapshotCache(), ProxyStatus())))
    metrics.observe_policy_source(lambda: state[0])
    assert metrics.registry.get_sample_value("aviary_policy_fetch_failing") == 0.0
    assert metrics.registry.get_sample_value("aviary_policy_fetch_failures_total") == 0.0
    state[0] = PolicyState("repo", fetch_error="git ls-remote: boom", fetch_failing_since=1.0, fetch_failures=2)
    assert metrics.registry.get_sample_value("aviary_policy_fetch_failing") == 1.0
    assert metrics.registry.get_sample_value("aviary_policy_fetch_failures_total") == 2.0


# --------------------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/acme/policies.git",
        "http://git.internal:8080/policies",
        "https://user:token@github.com/acme/policies.git",
        "ssh://git@github.com/acme/policies.git",
        "ssh://git@[::1]:2222/policies.git",
        "git@github.com:acme/policies.git",
        "github.com:acme/policies.git",
        "file:///srv/git/policies.git",
    ],
)
def test_urls_accepted(url: str) -> None:
    assert validate_repository_url(url) == url


def test_existing_local_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert validate_repository_url("repo") == str(tmp_path.resolve() / "repo")
    assert validate_repository_url(str(tmp_path / "repo")) == str(tmp_path.resolve() / "repo")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("--upload-pack=evil", "must not start with '-'"),
        ("-oProxyCommand=x", "must not start with '-'"),
        ("ext::sh -c x", "whitespace"),
        ("ext::sh", "transport helpers such as 'ext::'"),
        ("fd::17", "transport helpers such as 'fd::'"),
        ("a b", "whitespace"),
        ("https://host/repo\n", "control character"),
        ("https://host/\x00", "control character"),
        ("", "empty"),
        ("git://host/repo", "unsupported scheme 'git://'"),
        ("ftp://host/repo", "unsupported scheme"),
        ("https:///no-host", "missing host"),
        ("ssh://-oProxyCommand=x/repo", "must not start with '-'"),
        ("git@-oProxyCommand=x:repo", "must not start with '-'"),
        ("host:", "missing the repository path"),
        ("file://", "needs a path"),
        ("./does/not/exist", "no such local path"),
    ],
)
def test_urls_rejected(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=r"invalid repository URL|repository URL is empty") as raised:
        validate_repository_url(url)
    assert reason in str(raised.value)


def test_source_validates_its_url(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not start with '-'"):
        GitPolicySource("--upload-pack=touch /tmp/x", tmp_path, PolicyRecorder(DEADLINE))


# --------------------------------------------------------------------------------- the runner


async def test_git_never_runs_through_a_shell(
    tmp_path: Path, remote: GitRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = remote.commit({"checkout.yaml": policy("checkout")})
    calls: list[tuple[Any, ...]] = []
    real = git_module.spawn

    async def no_shell(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a shell was used")

    async def spy(argv: Sequence[str], **kwargs: Any) -> ChildProcess:
        assert "shell" not in kwargs
        calls.append(tuple(argv))
        return await real(argv, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_shell", no_shell)
    monkeypatch.setattr(subprocess, "getoutput", no_shell)
    monkeypatch.setattr(git_module, "spawn", spy)
    assert (await make_source(tmp_path, remote, PolicyRecorder(DEADLINE)).load_once()).revision == sha
    assert calls and all(call[0] == "git" and all(isinstance(arg, str) for arg in call) for call in calls)
    assert ("git", "ls-remote", "--symref", "--", str(remote.path.resolve()), "HEAD") in calls


async def test_git_error_names_command_and_stderr(tmp_path: Path) -> None:
    with pytest.raises(GitError) as raised:
        await run_git(["rev-parse", "--verify", "no-such-ref"], tmp_path, timeout=10)
    error = raised.value
    assert error.command == ("git", "rev-parse", "--verify", "no-such-ref")
    assert error.returncode == 128 and "not a git repository" in error.stderr
    assert str(error).startswith("git rev-parse --verify no-such-ref failed (exit 128): fatal:")


async def test_git_runs_without_prompts_or_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("GIT_CONFIG_PARAMETERS", "'core.pager'='evil'")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[url \"ext::sh -c \"]\n\tinsteadOf = https://\n")
    monkeypatch.setenv("HOME", str(home))
    assert await run_git(["config", "--list"], tmp_path, timeout=10) == ""
    environment = git_module._environment()
    assert environment["GIT_TERMINAL_PROMPT"] == "0" and environment["GIT_CONFIG_NOSYSTEM"] == "1"
    assert environment["GIT_ALLOW_PROTOCOL"] == "https:http:ssh:file"
    assert "GIT_DIR" not in environment and "GIT_CONFIG_PARAMETERS" not in environment


async def test_git_timeout_kills_the_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `git hash-object --stdin` with stdin kept open never finishes on its own.
    real = git_module.spawn
    processes: list[ChildProcess] = []

    async def keep_stdin_open(argv: Sequence[str], **kwargs: Any) -> ChildProcess:
        kwargs["stdin"] = PIPE
        process = await real(argv, **kwargs)
        processes.append(process)
        return process

    monkeypatch.setattr(git_module, "spawn", keep_stdin_open)
    with pytest.raises(GitError, match=r"timed out after 0\.2s"):
        await git_module.run_git_bytes(["hash-object", "--stdin"], tmp_path, timeout=0.2, stdin=None)
    assert processes and processes[0].returncode is not None


def test_git_error_short_is_one_line() -> None:
    lock_failure = GitError(
        ["git", "fetch", "-q", "--", "/srv/p.git", "+refs/heads/main:refs/remotes/origin/main"],
        "error: cannot lock ref 'refs/remotes/origin/main': Unable to create '/w/main.lock': File exists.\n\n"
        "Another git process seems to be running in this repository, e.g.\nan editor opened by 'git commit'.",
        1,
    )
    assert lock_failure.short == ("git fetch: cannot lock ref 'refs/remotes/origin/main': "
                                  "Unable to create '/w/main.lock': File exists.")
    timed_out = GitError(["git", "ls-remote", "--", "x"], "timed out after 60s")
    assert timed_out.short == "git ls-remote: timed out after 60s"
    assert GitError(["git", "fetch"], "", 128).short == "git fetch: exit 128"


def test_redact_hides_url_passwords() -> None:
    assert redact("fetch https://bot:s3cret@git.example.com/p.git") == "fetch https://bot:***@git.example.com/p.git"
    error = GitError(["git", "fetch", "https://bot:s3cret@h/p"], "fatal: https://bot:s3cret@h/p denied", 128)
    assert "s3cret" not in str(error)


# ---- a git that leaves a helper behind ------------------------------------------------------------
# `git fetch` runs helpers (upload-pack, ssh, remote-https) that inherit its output pipes. Killing git
# alone left them holding the pipes, and asyncio waits for every pipe to close: stopping the control
# plane during a fetch waited for the helper (a teardown once hung 15 s), and a 1 s timeout took 20 s.
# An alias runs a shell, whose sleep inherits the pipes; the marker file says the helper is running.
SLOW_HELPER = ["-c", "alias.slow=!touch helper-started && sleep 30", "slow"]


async def test_cancelling_git_also_stops_the_helpers_it_started(tmp_path: Path) -> None:
    await run_git(["init", "-q"], tmp_path, 10)
    task = asyncio.create_task(run_git(SLOW_HELPER, tmp_path, 60))
    deadline = time.monotonic() + 10
    while not (tmp_path / "helper-started").exists():
        assert time.monotonic() < deadline, "git never started its helper"
        await asyncio.sleep(0.01)  # polling the marker
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 5  # before: the helper's 30 s


async def test_a_git_timeout_is_kept_even_when_a_helper_holds_its_output(tmp_path: Path) -> None:
    await run_git(["init", "-q"], tmp_path, 10)
    started = time.monotonic()
    with pytest.raises(GitError, match="timed out after 1s"):
        await run_git(SLOW_HELPER, tmp_path, 1)
    assert time.monotonic() - started < 5  # before: the helper's 30 s
