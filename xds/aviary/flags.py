"""How the `aviary` command reads its flags: durations with units, defaults in --help, one-line errors.

Shared by `serve`, `validate` and the admin commands (aviary.admin.commands), so every subcommand
takes durations and reports a bad flag the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from aviary.policy.duration import parse_flag_duration

__all__ = ["HelpFormatter", "Parser", "duration"]


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
