"""The `aviary` command: `serve` runs the control plane, `validate` checks policy files."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aviary import eventloop, logs
from aviary.admin.commands import add_admin_commands
from aviary.admin.options import add_serve_options, serve_settings
from aviary.admin.server import AdminConfigError
from aviary.app import STOP_GRACE_SECONDS, ControlPlane, ServeConfig
from aviary.discovery.workers import usable_cores
from aviary.flags import Parser, duration
from aviary.listen import ListenError, check_can_listen
from aviary.policy.duration import format_duration
from aviary.policy.git import validate_repository_url
from aviary.policy.git_source import is_git_repository
from aviary.policy.loader import load_paths
from aviary.policy.server_rules import needs_prometheus
from aviary.simulation.commands import add_simulation_commands
from aviary.store.lock import LockError, LockHeld, ProcessLock
from aviary.store.sqlite import StateError
from aviary.tls import TlsConfigError

log = logging.getLogger("aviary")


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
        xds_workers=args.xds_workers,
        **admin_and_tls,
    )

    # Refusals that touch nothing come first: a busy port, then the git working copy's lock. The
    # state file's lock is taken by StateStore, before it reads, writes or resets anything.
    try:
        _check_addresses(config)
    except ListenError as exc:
        print(f"aviary serve: {_LISTEN_FLAGS[exc.role]} {exc}", file=sys.stderr)
        return 2
    git_lock = None
    if not isinstance(policies, Path):
        git_dir = state_dir / "git"
        try:
            git_lock = ProcessLock.acquire(git_dir, state_dir / "git.lock")
        except LockHeld as held:
            print(
                f"aviary serve: git working copy {git_dir} is in use by another aviary serve ({held.holder}); "
                "stop it or use another --state-dir",
                file=sys.stderr,
            )
            return 2
        except LockError as exc:
            print(f"aviary serve: --state-dir {state_dir}: cannot open lock file {exc.lock_file}: {exc.reason}",
                  file=sys.stderr)
            return 2

    async def run() -> None:
        try:
            plane = ControlPlane(config)
        except (StateError, AdminConfigError, TlsConfigError) as exc:
            print(f"aviary serve: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        # Handlers first: a SIGTERM that arrives while starting still stops the plane cleanly.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def shut_down(sig: signal.Signals) -> None:
            if not stop.is_set():  # one line, however often it is sent
                log.info("shutting down (%s), grace period %s", sig.name, format_duration(STOP_GRACE_SECONDS))
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, shut_down, sig)
        try:
            await plane.start()
            await stop.wait()
        except ListenError as exc:  # taken between the check above and now
            print(f"aviary serve: {_LISTEN_FLAGS[exc.role]} {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except StateError as exc:  # a saved row that cannot be decoded, found while loading
            print(f"aviary serve: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        finally:
            await plane.stop(STOP_GRACE_SECONDS)

    try:
        eventloop.run(run())
    finally:
        if git_lock is not None:
            git_lock.release()
    return 0


_LISTEN_FLAGS = {"xds": "--xds-address", "admin": "--admin-address", "metrics": "--metrics-address"}


def _check_addresses(config: ServeConfig) -> None:
    """ListenError for the first address that cannot be bound now (before any state is touched)."""
    check_can_listen("xds", config.xds_address)
    if config.admin is not None:
        check_can_listen("admin", config.admin.address)
    if config.metrics_address:
        check_can_listen("metrics", config.metrics_address)


def _validate(args: argparse.Namespace) -> int:
    """The files on their own and together, then against the server they are for (--prometheus-url)."""
    result = load_paths([Path(p) for p in args.paths])
    errors = list(result.errors)
    for file, rollout in sorted(result.valid.items()):
        if (error := needs_prometheus(rollout, file, args.prometheus_url)) is not None:
            errors.append(error)
    for error in errors:
        print(error)
    if errors:
        return 1
    print(f"{len(result.files)} file(s) valid")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="aviary", description="Envoy xDS control plane for canary releases")
    parser.add_argument("--version", action="version", version=f"aviary {package_version()}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="least severe log lines written")
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object per line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the xDS control plane", description="Run the xDS control plane.")
    # Also accepted after `serve`, where operators look for them.
    serve.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"],
                       help="as before the command (default: info)")
    serve.add_argument("--log-format", default=argparse.SUPPRESS, choices=["text", "json"],
                       help="as before the command (default: text)")
    serve.add_argument(
        "--policies", required=True,
        help="directory of policy files, or a git repository (URL, or local path to a repository)",
    )
    serve.add_argument("--git-branch", default=None, help="branch to follow (default: the remote's default)")
    serve.add_argument("--git-path", default="", help="sub-folder of the repository with the policy files "
                                                      "(default: its top)")
    serve.add_argument("--git-poll", type=duration(), default="10s", metavar="DURATION",
                       help="how often to ask the repository for new commits, e.g. 10s, 1m")
    serve.add_argument("--xds-address", default="127.0.0.1:18000", help="HOST:PORT for the ADS gRPC server")
    serve.add_argument(
        "--xds-workers", type=_worker_count, default="auto", metavar="N",
        help="processes that hold the xDS streams: N > 1 starts N worker processes sharing the xDS port, "
             "replaced if they die or hang; 1 serves them in this process "
             f"(default: auto, one per usable core: {usable_cores()} here)",
    )
    serve.add_argument(
        "--prometheus-url", default=None,
        help="Prometheus for analysis checks whose policy names none (default: none; such policies are refused)",
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
        "--reconnect-grace", type=duration(allow_zero=True), default="30s", metavar="DURATION",
        help="after a restart, how long rollouts wait for the proxies served before to reconnect (0: not at all)",
    )
    serve.add_argument(
        "--prune", action="store_true", help="remove rollouts whose policy file is gone (default: keep, orphaned)"
    )
    add_serve_options(serve)  # --admin-address, --admin-token-file, --admin-tls-*, --xds-tls-*
    serve.set_defaults(func=_serve)

    validate = commands.add_parser(
        "validate", help="check policy files; one 'file: field: reason' per problem",
        description="Check policy files; one 'file: field: reason' line per problem.",
    )
    validate.add_argument("paths", nargs="+", help="policy files or directories")
    validate.add_argument(
        "--prometheus-url", default=None,
        help="the Prometheus `aviary serve --prometheus-url` will have: analysis without analysis.prometheus "
             "needs one (default: none; ignored with --remote, where the server's own applies)",
    )
    validate.set_defaults(func=_validate)
    add_admin_commands(commands, validate)  # status, watch, pause, ..., proxies; validate --remote
    add_simulation_commands(commands, package_version())  # record, simulate
    return parser


def _worker_count(text: str) -> int:
    """``--xds-workers``: "auto" (one per usable core, ``usable_cores``) or a whole number >= 1."""
    if text.strip().lower() == "auto":
        return usable_cores()
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), "unknown" when run from a bare checkout."""
    try:
        return importlib.metadata.version("aviary")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_TIME_FLAGS = ("--from", "--to", "--start")


def _joined_relative_times(argv: Sequence[str]) -> list[str]:
    """``--from -15m`` as ``--from=-15m``: argparse takes a value starting with "-" for a flag."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in _TIME_FLAGS and arg.startswith("-") and arg[1:2].isdigit():
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_joined_relative_times(sys.argv[1:] if argv is None else argv))
    logs.configure(args.log_level, args.log_format)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
