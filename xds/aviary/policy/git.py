"""Running git safely: argument lists only, no prompts, no user configuration, a hard timeout.

``run_git`` is the only way Aviary starts git. It never goes through a shell, so nothing in a
repository URL, branch or path can be interpreted as shell syntax. Its environment makes git:

- never prompt (``GIT_TERMINAL_PROMPT=0``, stdin from /dev/null, ssh in batch mode unless the
  operator set ``GIT_SSH_COMMAND`` themselves): a missing credential is an error, not a hang;
- ignore system and user configuration (``GIT_CONFIG_NOSYSTEM=1``, ``GIT_CONFIG_GLOBAL=/dev/null``),
  so an operator's aliases, hooks paths or ``url.insteadOf`` rules cannot change what runs;
- speak only the transports ``validate_repository_url`` accepts (``GIT_ALLOW_PROTOCOL``), which is
  a second fence behind the URL check against ``ext::`` and other transport helpers.

``HOME`` is left alone: OpenSSH keys and ``~/.netrc`` are how deployments usually authenticate.

Errors: ``GitError`` (git exited non-zero, timed out or could not be started) carries the command
and git's stderr, with any password in a URL replaced by ``***``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from aviary.child_process import DEVNULL, PIPE, ChildProcess, spawn

__all__ = ["GitError", "redact", "run_git", "run_git_bytes", "validate_repository_url"]

KILL_WAIT_SECONDS = 5.0  # after SIGKILL of the group, how long to wait for the exit to be reported

_ALLOWED_SCHEMES = ("https", "http", "ssh", "file")
_EXPECTED = "expected https://, http://, ssh://, file://, user@host:path or an existing local path"
_HELPER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# scp-like syntax as git reads it: [user@]host:path, where no '/' comes before the first ':'.
_SCP = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>\[[^\]/]+\]|[^@/:\[\]]+):(?P<path>.*)$")
_REDIRECTING = frozenset({
    "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR", "GIT_NAMESPACE", "GIT_CEILING_DIRECTORIES", "GIT_DISCOVERY_ACROSS_FILESYSTEM",
    "GIT_ASKPASS", "GIT_EXEC_PATH", "GIT_TEMPLATE_DIR", "GIT_REPLACE_REF_BASE",
})
_PASSWORD = re.compile(r"(://[^/@:\s]*):[^/@\s]*@")


class GitError(Exception):
    """A git command failed; ``command`` and ``stderr`` are redacted of URL passwords."""

    def __init__(self, command: Sequence[str], stderr: str, returncode: int | None = None) -> None:
        self.command = tuple(redact(arg) for arg in command)
        self.stderr = redact(stderr.strip())
        self.returncode = returncode
        status = "timed out or could not start" if returncode is None else f"exit {returncode}"
        detail = f": {self.stderr}" if self.stderr else ""
        super().__init__(f"{' '.join(self.command)} failed ({status}){detail}")

    @property
    def short(self) -> str:
        """One line for status displays: the git subcommand and git's first message, without the
        ``fatal:``/``error:`` prefix or the advice paragraphs git adds (the log has the full text)."""
        verb = next((arg for arg in self.command[1:] if not arg.startswith("-")), "git")
        first = next((line.strip() for line in self.stderr.splitlines() if line.strip()), "")
        for prefix in ("fatal: ", "error: "):
            first = first.removeprefix(prefix)
        if not first:
            first = "timed out or could not start" if self.returncode is None else f"exit {self.returncode}"
        return f"git {verb}: {first}"


def redact(text: str) -> str:
    """Replace the password of ``scheme://user:password@host`` with ``***``."""
    return _PASSWORD.sub(r"\1:***@", text)


def _environment() -> dict[str, str]:
    # Variables that would point git at another repository or inject configuration are dropped;
    # the rest (GIT_SSL_CAINFO, GIT_SSH_COMMAND, proxies) are how operators reach their server.
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in _REDIRECTING and not name.startswith("GIT_CONFIG")
    }
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_ALLOW_PROTOCOL=":".join(_ALLOWED_SCHEMES),
        GIT_NO_REPLACE_OBJECTS="1",
        LC_ALL="C",
    )
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    return env


async def run_git_bytes(args: Sequence[str], cwd: Path, timeout: float, stdin: bytes | None = None) -> bytes:
    """Run ``git *args`` in ``cwd``; return stdout. Raises GitError on failure or after ``timeout`` s."""
    command = ["git", *args]
    try:
        process = await spawn(
            command,
            cwd=cwd,
            env=_environment(),
            stdin=PIPE if stdin is not None else DEVNULL,
            stdout=PIPE,
            stderr=PIPE,
            start_new_session=True,  # its own process group: the helpers git starts go with it
        )
    except OSError as exc:
        raise GitError(command, f"cannot start git: {exc.strerror or exc}") from exc
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(stdin), timeout)
    except TimeoutError:
        raise GitError(command, f"timed out after {timeout:g}s") from None
    finally:
        if process.returncode is None:  # timed out or cancelled: never leave git running
            await asyncio.shield(_kill_group(process))
    if process.returncode != 0:
        raise GitError(command, stderr.decode("utf-8", "replace"), process.returncode)
    return stdout


async def _kill_group(process: ChildProcess) -> None:
    """Kill git and every helper it started (fetch runs upload-pack, ssh, remote-https...).

    Killing git alone is not enough: a helper that inherited git's stdout keeps the pipe open, and
    asyncio reports the exit only once every pipe is closed, so a stop or a timeout would wait for
    that helper to finish on its own (seen: 20 s for a 1 s timeout).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), KILL_WAIT_SECONDS)


async def run_git(args: Sequence[str], cwd: Path, timeout: float) -> str:
    """``run_git_bytes`` decoded as UTF-8 (undecodable bytes replaced)."""
    return (await run_git_bytes(args, cwd, timeout)).decode("utf-8", "replace")


def validate_repository_url(text: str) -> str:
    """Return the repository location to hand to git, or raise ValueError saying what is wrong.

    Accepted: ``https://``, ``http://``, ``ssh://`` and ``file://`` URLs, scp-like ``user@host:path``
    and existing local paths (returned absolute, since git runs in another directory). Refused:
    anything git could read as an option (a leading ``-``, also in an ssh user or host), whitespace
    and control characters, and transport helpers such as ``ext::sh -c ...`` that run commands.
    """
    if not text:
        raise ValueError("repository URL is empty")
    if text.startswith("-"):
        raise ValueError(f"invalid repository URL {text!r}: must not start with '-' (git would read it as an option)")
    bad = next((char for char in text if char.isspace() or ord(char) < 32 or ord(char) == 127), None)
    if bad is not None:
        raise ValueError(f"invalid repository URL {text!r}: contains whitespace or a control character ({bad!r})")
    if _HELPER.match(text):
        transport = text.split("::", 1)[0]
        raise ValueError(
            f"invalid repository URL {text!r}: transport helpers such as '{transport}::' are not allowed ({_EXPECTED})"
        )
    scheme = _SCHEME.match(text)
    if scheme:
        return _check_url(text, scheme.group(1).lower())
    scp = _SCP.match(text)
    if scp:
        user, host, path = scp.group("user") or "", scp.group("host"), scp.group("path")
        if user.startswith("-") or host.startswith("-"):
            raise ValueError(f"invalid repository URL {text!r}: user and host must not start with '-'")
        if not path:
            raise ValueError(f"invalid repository URL {text!r}: missing the repository path after ':'")
        return text
    path = Path(text)
    if path.exists():
        return str(path.resolve())
    raise ValueError(f"invalid repository URL {text!r}: {_EXPECTED} (no such local path)")


def _check_url(text: str, scheme: str) -> str:
    if scheme not in _ALLOWED_SCHEMES:
        raise ValueError(f"invalid repository URL {text!r}: unsupported scheme '{scheme}://' ({_EXPECTED})")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise ValueError(f"invalid repository URL {text!r}: {exc}") from None
    if scheme == "file":
        if not parts.path or parts.path == "/":
            raise ValueError(f"invalid repository URL {text!r}: a file:// URL needs a path")
        return text
    if not parts.hostname:
        raise ValueError(f"invalid repository URL {text!r}: missing host")
    if parts.hostname.startswith("-") or (parts.username or "").startswith("-"):
        raise ValueError(f"invalid repository URL {text!r}: user and host must not start with '-'")
    return text
