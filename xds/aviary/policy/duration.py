"""Durations as people write them in policy files ("500ms", "30s", "1m30s").

Everything inside Aviary works in float seconds; this module is the one place that converts, so that
error messages can show a duration the way the user wrote it rather than as ``90.0``.
"""

from __future__ import annotations

import math
import re

__all__ = ["format_duration", "parse_duration", "parse_flag_duration"]

# Units largest first: a compound duration must list them in this order, each at most once, so that
# "30s1m" (almost certainly a typo) is rejected instead of silently meaning 90 seconds.
_UNITS: tuple[tuple[str, float], ...] = (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001))
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_EXAMPLES = 'e.g. "500ms", "30s", "2m", "1h" or "1m30s"'


def parse_duration(value: str | int | float) -> float:
    """Return ``value`` in seconds; raise ``ValueError`` with a reason a user can act on.

    Bare numbers are taken as seconds so that Python callers can pass ``30.0``; YAML users normally
    write a unit, and a unitless string is rejected because "30" versus "30ms" is too easy to misread.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration ({_EXAMPLES}), got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value.strip())
    else:
        raise ValueError(f"expected a duration ({_EXAMPLES}), got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be greater than zero, got {value!r}")
    return seconds


def parse_flag_duration(text: str, *, allow_zero: bool = False) -> float:
    """A command-line duration in seconds: "10s", "1m30s", "500ms", or a bare number of seconds ("10").

    Unlike policy files, a bare number is accepted: ``--git-poll 10`` meant seconds before flags took
    units, and scripts written then keep working. ``allow_zero`` for flags where 0 means "not at all".
    The ``ValueError`` reads ``invalid duration 'abc': <reason>``, ready to follow the flag's name.
    """
    stripped = text.strip()
    try:
        seconds = float(stripped)
    except ValueError:
        try:
            seconds = _parse_text(stripped)
        except ValueError as exc:
            raise ValueError(f"invalid duration {text!r}: {_flag_reason(str(exc))}") from None
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "greater than zero"
        raise ValueError(f"invalid duration {text!r}: must be {bound}")
    return seconds


def _flag_reason(message: str) -> str:
    if "largest to smallest" in message:
        return "units must go from largest to smallest, each once"
    return 'expected a number of seconds or a duration such as "500ms", "10s", "2m", "1h" or "1m30s"'


def _parse_text(text: str) -> float:
    if not text:
        raise ValueError(f"expected a duration ({_EXAMPLES}), got an empty string")
    total = 0.0
    position = 0
    last_rank = -1
    order = [unit for unit, _ in _UNITS]
    for match in _PART.finditer(text):
        if match.start() != position:
            break
        number, unit = match.groups()
        rank = order.index(unit)
        if rank <= last_rank:
            raise ValueError(f"invalid duration {text!r}: units must go from largest to smallest, each once")
        last_rank = rank
        total += float(number) * _UNITS[rank][1]
        position = match.end()
    if position != len(text) or last_rank < 0:
        raise ValueError(f"invalid duration {text!r} ({_EXAMPLES})")
    return total


def format_duration(seconds: float) -> str:
    """Render seconds compactly ("1m30s", "500ms", "1.5s") for messages and status output."""
    if seconds < 1:
        millis = round(seconds * 1000, 3)
        return f"{millis:g}ms"
    parts: list[str] = []
    remaining = round(seconds, 3)
    for unit, size in _UNITS[:2]:
        whole = int(remaining // size)
        if whole:
            parts.append(f"{whole}{unit}")
            remaining = round(remaining - whole * size, 3)
    if remaining or not parts:
        parts.append(f"{remaining:g}s")
    return "".join(parts)
