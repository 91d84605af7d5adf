"""GitPolicySource against real git repositories in tmp_path; URL validation; the git runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from aviary.policy import git as git_module
from aviary.policy.git import GitError, redact, run_git, validate_repository_url
from aviary.policy.git_source import SHORT_SHA, GitPolicySource
from aviary.policy.schema import PolicyError, PolicySet
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
    real = asyncio.create_subprocess_exec

    async def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(list(args))
        return await real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(asyncio, "create_subprocess_exec", spy)
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
    real = asyncio.create_subprocess_exec

    async def no_shell(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a shell was used")

    async def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return await real(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_shell", no_shell)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
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
    real = asyncio.create_subprocess_exec
    processes: list[asyncio.subprocess.Process] = []

    async def keep_stdin_open(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        kwargs["stdin"] = asyncio.subprocess.PIPE
        process = await real(*args, **kwargs)
        processes.append(process)
        return process

    monkeypatch.setattr(asyncio, "create_subprocess_exec", keep_stdin_open)
    with pytest.raises(GitError, match=r"timed out after 0\.2s"):
        await git_module.run_git_bytes(["hash-object", "--stdin"], tmp_path, timeout=0.2, stdin=None)
    assert processes and processes[0].returncode is not None


def test_redact_hides_url_passwords() -> None:
    assert redact("fetch https://bot:s3cret@git.example.com/p.git") == "fetch https://bot:***@git.example.com/p.git"
    error = GitError(["git", "fetch", "https://bot:s3cret@h/p"], "fatal: https://bot:s3cret@h/p denied", 128)
    assert "s3cret" not in str(error)
