"""The client side of the `aviary` command: status, watch, pause, resume, promote, abort, retry,
set-weight, proxies, and `validate --remote`.

Every command talks to `aviary serve`'s admin API (``--admin``, env ``AVIARY_ADMIN``, default
127.0.0.1:18001) with the token in ``--token-file`` (env ``AVIARY_TOKEN_FILE``). Exit status: 0
done, 1 refused or failed (the reason on stderr, e.g. ``not found: ...``), 2 unusable options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from aviary.admin import render
from aviary.admin.auth import AuthConfigError
from aviary.admin.client import COMMANDS, AdminClient, AdminError, ClientConfig
from aviary.admin.server import DEFAULT_ADMIN_ADDRESS
from aviary.admin.v1 import admin_pb2 as pb
from aviary.flags import duration
from aviary.policy.loader import policy_files
from aviary.tls import ClientTls, TlsConfigError

__all__ = ["add_admin_commands", "client_config"]

Action = Callable[[AdminClient, argparse.Namespace, Console], Awaitable[int]]

_HELP = {
    "pause": "stop a rollout's automation where it is (traffic stays)",
    "resume": "continue automation after pause or set-weight",
    "promote": "skip the remaining steps and make the canary stable",
    "abort": "roll the canary back now",
    "retry": "start a rolled-back canary again from the first step",
}


def client_config(args: argparse.Namespace) -> ClientConfig:
    token_file = args.token_file or os.environ.get("AVIARY_TOKEN_FILE") or None
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = ClientTls(
            ca=Path(args.tls_ca) if args.tls_ca else None,
            cert=Path(args.tls_cert) if args.tls_cert else None,
            key=Path(args.tls_key) if args.tls_key else None,
        )
    return ClientConfig(
        address=args.admin or os.environ.get("AVIARY_ADMIN") or DEFAULT_ADMIN_ADDRESS,
        token_file=Path(token_file) if token_file else None,
        tls=tls,
        timeout=args.timeout,
    )


def _run(args: argparse.Namespace, action: Action) -> int:
    def fail(message: object, status: int) -> int:
        print(f"aviary {args.command}: {message}", file=sys.stderr)
        return status

    try:
        config = client_config(args)
    except TlsConfigError as exc:
        return fail(exc, 2)

    async def go() -> int:
        async with AdminClient(config) as client:
            return await action(client, args, _console())

    try:
        return asyncio.run(go())
    except AdminError as exc:
        return fail(exc, 1)
    except (AuthConfigError, TlsConfigError) as exc:
        return fail(exc, 2)


def _json(args: argparse.Namespace) -> bool:
    return bool(args.output == "json")


def _console() -> Console:
    """Rich output; when piped, lines are not wrapped at 80 columns (scripts grep whole lines)."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=1000)
    return console


# ---- commands ------------------------------------------------------------------------------


async def _status(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    if args.name:
        rollout = await client.get_rollout(args.name)
        print(render.as_json(rollout)) if _json(args) else console.print(render.rollout_detail(rollout))
    else:
        overview = await client.overview()
        if _json(args):  # the whole answer: rollouts, policy source (fetch errors), control-plane health
            print(render.as_json(overview))
        else:
            if (health := render.health_line(overview.health)) is not None:
                console.print(health, soft_wrap=True)  # first, one line: what keeps it from working
            console.print(render.rollouts_table(overview.rollouts))
            console.print(render.policy_summary(overview.policy))
            if (reports := render.reports_line(await client.list_proxies())) is not None:
                console.print(reports, soft_wrap=True)  # only once some proxy reports (provider: envoy)
    return 0


async def _explain(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    explanation = await client.explain(args.name)
    print(render.as_json(explanation)) if _json(args) else console.print(render.explanation(explanation))
    return 0


async def _proxies(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    proxies = await client.list_proxies()
    print(render.as_json(proxies)) if _json(args) else console.print(render.proxies_table(proxies))
    return 0


def _report(rollout: pb.Rollout, args: argparse.Namespace) -> int:
    print(render.as_json(rollout) if _json(args) else render.rollout_line(rollout))
    return 0


async def _command(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    return _report(await client.command(args.command, args.name), args)


async def _set_weight(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    rollout = await client.set_weight(args.name, args.percent)
    _report(rollout, args)
    if not _json(args) and (hint := render.resume_hint(rollout)):
        print(hint)
    return 0


async def _validate_remote(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    files = [f for p in map(Path, args.paths) for f in (policy_files(p) if p.is_dir() else [p])]
    errors: list[pb.ValidateError] = []
    for file in files:
        try:
            text = file.read_text()
        except OSError as exc:
            errors.append(pb.ValidateError(file=str(file), field="-", reason=exc.strerror or str(exc)))
            continue
        errors += await client.validate(text, str(file))
    if _json(args):
        print(render.as_json(errors))
    else:
        for error in errors:
            print(f"{error.file}: {error.field}: {error.reason}")
        if not errors:
            print(f"{len(files)} file(s) valid")
    return 1 if errors else 0


async def _watch(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    """Until Ctrl-C (or SIGTERM): events as they arrive; the listing is re-read every --refresh seconds
    for the values no transition carries (check rounds, time in step). With ``-o json``: one line per
    rollout's current state, then one line per event."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await _watch_until_cancelled(client, args, console)
    except asyncio.CancelledError:
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print(f"aviary {args.command}: the server ended the watch", file=sys.stderr)
    return 1


async def _listing(client: AdminClient, name: str) -> dict[str, pb.Rollout]:
    if name:
        return {name: await client.get_rollout(name)}
    return {r.name: r for r in await client.list_rollouts()}


async def _watch_until_cancelled(client: AdminClient, args: argparse.Namespace, console: Console) -> None:
    stream = client.watch(args.name or "")
    await anext(stream)  # subscribed: nothing that happens from here on is missed
    target = args.name or "all rollouts"
    print(f"watching {target} on {client.config.address} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    if _json(args):
        # First where each rollout is now (objects with "name"), then what happens (with "rollout").
        for _, rollout in sorted((await _listing(client, args.name)).items()):
            print(render.as_json(rollout), flush=True)
        async for event in stream:
            if event is not None:
                print(render.as_json(event), flush=True)
        return
    rollouts = await _listing(client, args.name)
    recent: deque[pb.RolloutEvent] = deque(maxlen=8)
    following: asyncio.Future[Any] = asyncio.ensure_future(anext(stream))
    try:
        with Live(render.watch_view(rollouts, recent), console=console, auto_refresh=False) as live:
            while True:
                done, _ = await asyncio.wait({following}, timeout=args.refresh)
                if following in done:
                    try:
                        event = following.result()
                    except StopAsyncIteration:
                        return
                    following = asyncio.ensure_future(anext(stream))
                    if event is not None:
                        recent.append(event)
                        rollouts[event.rollout] = render.apply_event(rollouts.get(event.rollout), event)
                else:
                    rollouts = await _listing(client, args.name)
                live.update(render.watch_view(rollouts, recent), refresh=True)
    finally:
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, AdminError):
            await following
        await stream.aclose()
        if not console.is_terminal:
            console.line()  # a terminal gets its line from Live; a file ends the last one here


# ---- the parser ----------------------------------------------------------------------------


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("admin API connection")
    group.add_argument("--admin", metavar="HOST:PORT",
                       help=f"admin API address (env AVIARY_ADMIN; default {DEFAULT_ADMIN_ADDRESS})")
    group.add_argument("--token-file", metavar="FILE", help="bearer token file (env AVIARY_TOKEN_FILE)")
    group.add_argument("--tls-ca", metavar="FILE", help="CA that signed the server's certificate (enables TLS)")
    group.add_argument("--tls-cert", metavar="FILE", help="client certificate, for a server that requires mTLS")
    group.add_argument("--tls-key", metavar="FILE", help="key of --tls-cert")
    group.add_argument("--timeout", type=duration(), default="10s", metavar="DURATION",
                       help="how long one call may take, e.g. 10s, 500ms")
    group.add_argument("--output", "-o", choices=["text", "json"], default="text",
                       help="json: for scripts, one object per line for watch")


def add_admin_commands(commands: Any, validate: argparse.ArgumentParser | None = None) -> None:
    """Add the client subcommands to `commands` (the subparsers of the `aviary` parser). With the
    `validate` parser, add `validate --remote` (the server checks the files; local by default)."""

    def add(name: str, action: Action, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, help=help, description=help)
        _add_connection_options(parser)
        parser.set_defaults(func=lambda args: _run(args, action))
        return parser

    status = add("status", _status, "show rollouts: phase, versions, weight, step, last check")
    status.add_argument("name", nargs="?", help="one rollout, in detail")
    explain = add("explain", _explain, "show why: every check round (queries, values, samples, effects, "
                                        "verdicts, rules) and every transition of one rollout")
    explain.add_argument("name", help="rollout name")
    watch = add("watch", _watch, "follow rollouts live as they change (Ctrl-C to stop)")
    watch.add_argument("name", nargs="?", help="only this rollout")
    watch.add_argument("--refresh", type=duration(), default="2s", metavar="DURATION",
                       help="re-read check values and time in step this often, e.g. 1s")
    for verb in COMMANDS:
        add(verb, _command, _HELP[verb]).add_argument("name", help="rollout name")
    set_weight = add("set-weight", _set_weight, "set the canary weight by hand; automation pauses until resume")
    set_weight.add_argument("name", help="rollout name")
    set_weight.add_argument("percent", type=int, help="canary weight 0..100")
    add("proxies", _proxies, "list connected proxies and what they ACKed or NACKed")

    if validate is not None:
        _add_connection_options(validate)
        validate.add_argument("--remote", action="store_true", help="let the admin API check the files")
        local = validate.get_default("func")

        def validate_either(args: argparse.Namespace) -> int:
            result: int = _run(args, _validate_remote) if args.remote else local(args)
            return result

        validate.set_defaults(func=validate_either)
