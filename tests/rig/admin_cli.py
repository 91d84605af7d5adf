"""The `aviary` admin CLI run as a user would: ``python -m aviary ...`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def write_token_file(path: Path, token: str) -> Path:
    """Write a bearer-token file (the token and a newline, as an editor leaves it); return its path."""
    path.write_text(token + "\n")
    return path


def cli_args(admin: str, token_file: Path, *args: str) -> list[str]:
    """The command line of ``aviary <args> --admin <admin> --token-file <token_file>``."""
    return [sys.executable, "-m", "aviary", *args, "--admin", admin, "--token-file", str(token_file)]


def run_cli(
    admin: str, token_file: Path, *args: str, ok: bool = True, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI against ``admin`` and wait (30 s at most). ``ok``: assert that it exits 0.
    ``env``: variables set on top of this process's environment."""
    full_env = {**os.environ, **env} if env is not None else None
    done = subprocess.run(
        cli_args(admin, token_file, *args), capture_output=True, text=True, timeout=30, check=False, env=full_env
    )
    if ok:
        assert done.returncode == 0, f"aviary {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
    return done
