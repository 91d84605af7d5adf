"""A plain (non-bare) git repository in a test's tmp dir, committed to directly.

Git runs with a fixed identity and without the user's or the system's config, so commits work the
same on any machine.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


class GitRepo:
    """``git init -b <branch>`` in ``path`` (created); :meth:`commit` writes files and commits them.

    ``allow_empty``: commits that change nothing are made too (``git commit --allow-empty``);
    without it such a commit fails.
    """

    def __init__(self, path: Path, branch: str = "main", allow_empty: bool = False) -> None:
        self.path = path
        self.allow_empty = allow_empty
        path.mkdir(parents=True)
        self.git("init", "-q", "-b", branch)

    def git(self, *args: str) -> str:
        """Run git in the repository; its stdout, stripped. CalledProcessError if it fails."""
        env = {**os.environ, **GIT_ENV}
        done = subprocess.run(
            ["git", *args], cwd=self.path, env=env, capture_output=True, text=True, check=True, timeout=30
        )
        return done.stdout.strip()

    def commit(self, files: dict[str, str | None], message: str = "change") -> str:
        """Write (or, for None, delete) files and commit them all; return the new commit's full SHA."""
        for name, text in files.items():
            target = self.path / name
            if text is None:
                target.unlink()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
        self.git("add", "-A")
        self.git("commit", "-q", *(["--allow-empty"] if self.allow_empty else []), "-m", message)
        return self.git("rev-parse", "HEAD")
