"""Durations: what users may write, what they may not, and how we print them back."""

from __future__ import annotations

import pytest

from aviary.policy.duration import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h2m3s4ms", 3723.004),
        ("1.5s", 1.5),
        (" 10s ", 10.0),
        (30, 30.0),
        (0.25, 0.25),
    ],
)
def test_parses(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("5", "invalid duration"),
        ("5x", "invalid duration"),
        ("s", "invalid duration"),
        ("-5s", "invalid duration"),
        ("30s1m", "largest to smallest"),
        ("1m1m", "largest to smallest"),
        ("0s", "greater than zero"),
        (0, "greater than zero"),
        (-1, "greater than zero"),
        (float("nan"), "greater than zero"),
        (True, "expected a duration"),
        (None, "expected a duration"),
    ],
)
def test_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.5, "500ms"), (5.0, "5s"), (90.0, "1m30s"), (3600.0, "1h"), (3661.5, "1h1m1.5s"), (120.0, "2m")],
)
def test_formats(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", ["500ms", "5s", "2m", "1h", "1m30s", "1h1m1.5s"])
def test_round_trip(text: str) -> None:
    assert format_duration(parse_duration(text)) == text
