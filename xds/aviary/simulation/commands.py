"""``aviary record`` and ``aviary simulate``: flags, input errors as one line, exit statuses.

Exit statuses of ``simulate``: 0 promoted, 3 rolled back, 4 still running or paused when the data
ended, 2 invalid input (flags, policy, recording, or a policy the recording cannot answer). A sweep
exits 0 once every combination ran (its lines are the result). ``record``: 0, 1 when Prometheus
could not answer, 2 invalid input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from aviary.flags import duration, point_in_time
from aviary.metrics.recorder import RecordError, RecordRequest, record
from aviary.metrics.recording import Recording, RecordingError
from aviary.policy.loader import parse_policy_text
from aviary.policy.schema import Rollout
from aviary.simulation.replay import SimulationError, SimulationResult, simulate
from aviary.simulation.report import as_dict, sweep_table, table
from aviary.simulation.sweep import SweepError, parse_setting, variants

__all__ = ["add_simulation_commands"]

INVALID = 2
_TIME_HELP = "RFC 3339 (2026-12-01T10:00:00Z), unix seconds, or a duration before now (-15m)"


class _Refused(Exception):
    """Invalid input: the message is the one line to print."""


def add_simulation_commands(commands: Any, version: str) -> None:
    recorder = commands.add_parser(
        "record", help="fetch from Prometheus what a policy's checks query, into a file for aviary simulate",
        description="Fetch every series a policy's checks would query, over a span of time at the scrape "
                    "resolution, into one compressed file with its provenance.")
    recorder.add_argument("--prometheus", required=True, metavar="URL", help="the Prometheus to read")
    recorder.add_argument("--policy", required=True, metavar="FILE", help="the policy file whose checks to record")
    _recording_flags(recorder, required=True)
    recorder.add_argument("-o", "--output", required=True, metavar="FILE", help="the recording to write (gzip JSON)")
    recorder.set_defaults(func=lambda args: _record(args, version))

    simulator = commands.add_parser(
        "simulate", help="replay a policy on recorded metrics with the real engine; no proxy is touched",
        description="Run the engine of aviary serve over recorded metrics on a simulated clock. Exit status: "
                    "0 promoted, 3 rolled back, 4 still running or paused at the end of the data, 2 invalid "
                    "input (a sweep: 0 once every combination ran).")
    simulator.add_argument("policy", metavar="POLICY", help="the policy file to try")
    simulator.add_argument("--metrics", metavar="FILE", help="a recording made by aviary record")
    simulator.add_argument("--prometheus", metavar="URL", help="instead of --metrics: record from this Prometheus "
                                                               "first (with --from, --to, --stable)")
    _recording_flags(simulator, required=False)
    simulator.add_argument("--start", type=point_in_time(), metavar="TIME",
                           help=f"when the canary's policy arrives (default: the recording's --from); {_TIME_HELP}")
    simulator.add_argument("--ack-delay", type=duration(allow_zero=True), default="0s", metavar="DURATION",
                           help="how long the simulated proxies take to ACK a change")
    simulator.add_argument("--plot", metavar="FILE", help="write a PNG timeline of the run")
    simulator.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
    simulator.add_argument("--sweep", action="append", metavar="PATH=V1,V2,...",
                           help="try every value of a policy setting, e.g. analysis.failureLimit=0,1,2 "
                                "(repeatable: every combination runs)")
    simulator.set_defaults(func=lambda args: _simulate(args, version))


def _recording_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--from", dest="span_from", type=point_in_time(), required=required, metavar="TIME",
                        help=f"start of the span; {_TIME_HELP}")
    parser.add_argument("--to", dest="span_to", type=point_in_time(), default="now", metavar="TIME",
                        help=f"end of the span; {_TIME_HELP}")
    parser.add_argument("--stable", metavar="VERSION", help="the stable version of the recorded traffic")
    parser.add_argument("--canary", metavar="VERSION",
                        help="the canary version of the recorded traffic (default: the policy's version)")
    parser.add_argument("--step", type=duration(), default="1s", metavar="DURATION",
                        help="seconds between recorded points: the scrape interval")


def _load_policy(path: str, flag: str) -> tuple[Rollout, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _Refused(f"{flag} {path}: cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    rollout, errors = parse_policy_text(text, path)
    if rollout is None:
        raise _Refused("; ".join(str(error) for error in errors))
    return rollout, text


def _request(args: argparse.Namespace, rollout: Rollout, policy: str, version: str) -> RecordRequest:
    if rollout.spec.analysis is None:
        raise _Refused(f"{policy}: spec.analysis is missing: the policy queries nothing to record or replay")
    if args.stable is None:
        raise _Refused("--stable: give the stable version of the recorded traffic (the policy names only "
                       f"its canary, {rollout.spec.version})")
    canary = args.canary or rollout.spec.version
    if canary == args.stable:
        raise _Refused(f"--canary and --stable are both {canary}: a canary is compared with another version")
    if args.span_from >= args.span_to:
        raise _Refused("--from must be before --to")
    web = [m.name for m in (rollout.spec.analysis.metrics if rollout.spec.analysis else ()) if m.web is not None]
    if web:
        raise _Refused(f"{policy}: checks {', '.join(web)} read a web source, which aviary record cannot "
                       "record (it reads Prometheus only)")
    return RecordRequest(args.prometheus, rollout, policy, canary, args.stable, args.span_from, args.span_to, args.step,
                         version)


def _record(args: argparse.Namespace, version: str) -> int:
    try:
        rollout, _ = _load_policy(args.policy, "--policy")
        recording, empty = record(_request(args, rollout, args.policy, version))
    except _Refused as exc:
        print(f"aviary record: {exc}", file=sys.stderr)
        return INVALID
    except RecordError as exc:
        print(f"aviary record: {exc}", file=sys.stderr)
        return 1
    try:
        recording.save(Path(args.output))
    except OSError as exc:
        print(f"aviary record: -o {args.output}: cannot be written: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for line in empty:
        print(f"aviary record: note: {line}", file=sys.stderr)
    points = sum(len(s.times) for s in recording.series.values())
    print(f"recorded {len(recording.series)} queries ({points:,} points, {recording.covers()}) into {args.output}")
    return 0


def _simulate(args: argparse.Namespace, version: str) -> int:
    for name in ("aviary.engine", "aviary.director"):  # their info lines would repeat the table
        quiet = logging.getLogger().level > logging.DEBUG  # --log-level debug shows them
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.DEBUG)
    try:
        rollout, text = _load_policy(args.policy, "POLICY")
        recording = _recording(args, rollout, version)
        settings = [parse_setting(sweep) for sweep in args.sweep or ()]
        if settings and args.plot:
            raise _Refused("--plot draws one run: leave out --sweep")
        if settings:
            runs = [(variant.label, variant.rollout) for variant in variants(text, args.policy, settings)]
        else:
            runs = [("", rollout)]
        results = [(label, asyncio.run(simulate(candidate, args.policy, recording, start=args.start,
                                                  ack_delay=args.ack_delay)))
                   for label, candidate in runs]
    except (_Refused, RecordingError, SimulationError, SweepError, RecordError) as exc:
        print(f"aviary simulate: {exc}", file=sys.stderr)
        return INVALID
    if args.output == "json":
        bodies = [as_dict(result, recording, args.policy, args.ack_delay, label or None) for label, result in results]
        print(json.dumps(bodies if settings else bodies[0], sort_keys=True))
    elif settings:
        print(sweep_table(results))
    else:
        print(table(results[0][1], recording, args.policy, args.ack_delay))
    if args.plot:
        return _plot(results[0][1], rollout, args.plot)
    return 0 if settings else results[0][1].outcome.value


def _plot(result: SimulationResult, rollout: Rollout, path: str) -> int:
    from aviary.simulation.plot import plot

    title = f"{rollout.name}: canary {result.canary} against stable {result.stable}"
    try:
        plot(result, Path(path), title)
    except OSError as exc:
        print(f"aviary simulate: --plot {path}: cannot be written: {exc.strerror or exc}", file=sys.stderr)
        return INVALID
    return result.outcome.value


def _recording(args: argparse.Namespace, rollout: Rollout, version: str) -> Recording:
    if (args.metrics is None) == (args.prometheus is None):
        raise _Refused("give --metrics FILE (from aviary record), or --prometheus URL with --from and --to")
    if args.metrics is not None:
        return Recording.load(Path(args.metrics))
    if args.span_from is None:
        raise _Refused("--prometheus needs --from (and --to, default now)")
    recording, empty = record(_request(args, rollout, args.policy, version))
    for line in empty:
        print(f"aviary simulate: note: {line}", file=sys.stderr)
    return recording
