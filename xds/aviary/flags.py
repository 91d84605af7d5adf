"""How the `aviary` command reads its flags: durations with units, defaults in --help, one-line errors.

Shared by `serve`, `validate` and the admin commands (aviary.admin.commands), so every subcommand
takes durations and reports a bad flag the same way.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

from aviary.policy.duration import parse_flag_duration

__all__ = ["HelpFormatter", "Parser", "duration", "parse_time", "point_in_time"]


def duration(*, allow_zero: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: "10s", "1m30s", "500ms" or a bare number of seconds -> float seconds.

    Declare the default as text ("10s"): argparse converts it with this type, and --help shows it
    as written rather than as ``10.0``.
    """

    def convert(text: str) -> float:
        try:
            return parse_flag_duration(text, allow_zero=allow_zero)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = "duration"
    return convert


def parse_time(text: str, now: float) -> float:
    """Unix seconds from RFC 3339 (``2026-12-01T10:00:00Z``), unix seconds (``1764583200``), a
    duration before ``now`` (``-15m``) or ``now``; ValueError with what was expected otherwise."""
    stripped = text.strip()
    if stripped.lower() == "now":
        return now
    if stripped.startswith("-"):
        return now - parse_flag_duration(stripped[1:])
    try:
        seconds = float(stripped)
    except ValueError:
        try:
            moment = datetime.fromisoformat(stripped)
        except ValueError:
            raise ValueError(f"invalid time {text!r}: expected RFC 3339 (2026-12-01T10:00:00Z), unix seconds "
                             "or a duration before now (-15m)") from None
        if moment.tzinfo is None:
            raise ValueError(f"invalid time {text!r}: give a time zone (Z or +01:00)") from None
        return moment.astimezone(UTC).timestamp()
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid time {text!r}: unix seconds must be a positive number")
    return seconds


def point_in_time(clock: Callable[[], float] = time.time) -> Callable[[str], float]:
    """An argparse ``type`` for ``--from``/``--to``/``--start``: see ``parse_time``."""

    def convert(text: str) -> float:
        try:
            return parse_time(text, clock())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = "time"
    return convert


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option that has a default worth showing.

    Unlike argparse.ArgumentDefaultsHelpFormatter it leaves out None and False (no value, a switch
    that is off) and options whose help already says what the default is.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        if (
            "default" in help_text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return help_text
        return f"{help_text} (default: {default})" if help_text else f"(default: {default})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``aviary serve: argument --git-poll: invalid
    duration 'abc': ...``) and whose help shows defaults; its subcommands are Parsers too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
