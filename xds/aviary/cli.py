"""The `aviary` command: `serve` runs the control plane, `validate` checks policy files."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aviary import logs
from aviary.admin.commands import add_admin_commands
from aviary.admin.options import add_serve_options, serve_settings
from aviary.admin.server import AdminConfigError
from aviary.app import ControlPlane, ServeConfig
from aviary.policy.git import validate_repository_url
from aviary.policy.git_source import is_git_repository
from aviary.policy.loader import validate_paths
from aviary.store.sqlite import StateError
from aviary.tls import TlsConfigError


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/aviary, else ~/.local/state/aviary."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "aviary"


def _serve(args: argparse.Namespace) -> int:
    policies: Path | str = args.policies
    if is_git_repository(args.policies):
        try:
            validate_repository_url(args.policies)
        except ValueError as exc:
            print(f"aviary serve: --policies {args.policies!r}: {exc}", file=sys.stderr)
            return 2
    elif not Path(args.policies).is_dir():
        print(f"aviary serve: --policies {args.policies}: not a directory or git repository", file=sys.stderr)
        return 2
    else:
        policies = Path(args.policies)
    state_dir = Path(args.state_dir)
    try:
        admin_and_tls = serve_settings(args)
    except TlsConfigError as exc:
        print(f"aviary serve: {exc}", file=sys.stderr)
        return 2
    config = ServeConfig(
        policies=policies,
        git_branch=args.git_branch,
        git_path=args.git_path,
        git_poll=args.git_poll,
        state_dir=state_dir,
        xds_address=args.xds_address,
        prometheus_url=args.prometheus_url,
        state_path=Path(args.state) if args.state else state_dir / "state.db",
        reset_state=args.reset_state,
        prune=args.prune,
        metrics_address=args.metrics_address or None,
        reconnect_grace=args.reconnect_grace,
        **admin_and_tls,
    )

    async def run() -> None:
        try:
            plane = ControlPlane(config)
        except (StateError, AdminConfigError, TlsConfigError) as exc:
            print(f"aviary serve: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        # Handlers first: a SIGTERM that arrives while starting still stops the plane cleanly.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await plane.start()
            await stop.wait()
        finally:
            await plane.stop()

    asyncio.run(run())
    return 0


def _validate(args: argparse.Namespace) -> int:
    errors = validate_paths([Path(p) for p in args.paths])
    for error in errors:
        print(error)
    if errors:
        return 1
    print(f"{len(args.paths)} path(s) valid")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aviary", description="Envoy xDS control plane for canary releases")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object per line")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the xDS control plane")
    # Also accepted after `serve`, where operators look for them.
    serve.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", default=argparse.SUPPRESS, choices=["text", "json"])
    serve.add_argument(
        "--policies", required=True,
        help="directory of policy files, or a git repository (URL, or local path to a repository)",
    )
    serve.add_argument("--git-branch", default=None, help="branch to follow (default: the remote's default)")
    serve.add_argument("--git-path", default="", help="sub-folder of the repository with the policy files")
    serve.add_argument("--git-poll", type=float, default=10.0, metavar="SECONDS", help="how often to fetch")
    serve.add_argument("--xds-address", default="127.0.0.1:18000", help="HOST:PORT for the ADS gRPC server")
    serve.add_argument(
        "--prometheus-url", default=None, help="Prometheus for analysis checks whose policy names none"
    )
    serve.add_argument(
        "--metrics-address", default="127.0.0.1:18002", help="HOST:PORT for Prometheus /metrics ('' to disable)"
    )
    serve.add_argument("--state-dir", default=str(default_state_dir()), help="where Aviary keeps its state")
    serve.add_argument("--state", default=None, help="SQLite state file (default: STATE_DIR/state.db)")
    serve.add_argument(
        "--reset-state", action="store_true", help="discard the state file and start fresh (on purpose)"
    )
    serve.add_argument(
        "--reconnect-grace", type=float, default=30.0, metavar="SECONDS",
        help="after a restart, how long rollouts wait for the proxies served before to reconnect",
    )
    serve.add_argument(
        "--prune", action="store_true", help="remove rollouts whose policy file is gone (default: keep, orphaned)"
    )
    add_serve_options(serve)  # --admin-address, --admin-token-file, --admin-tls-*, --xds-tls-*
    serve.set_defaults(func=_serve)

    validate = commands.add_parser("validate", help="check policy files; one 'file: field: reason' per problem")
    validate.add_argument("paths", nargs="+", help="policy files or directories")
    validate.set_defaults(func=_validate)
    add_admin_commands(commands, validate)  # status, watch, pause, ..., proxies; validate --remote
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
