"""Durations: what users may write, what they may not, and how we print them back."""

from __future__ import annotations

import pytest

from aviary.policy.duration import format_duration, parse_duration, parse_flag_duration


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


# ---- command-line flags: units like the policy files, and a bare number is seconds ----------


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10.0), ("1m30s", 90.0), ("500ms", 0.5), ("10", 10.0),
                                               ("2.5", 2.5), (" 1h ", 3600.0)])
def test_flag_durations(text: str, seconds: float) -> None:
    assert parse_flag_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "invalid duration 'abc': expected a number of seconds or a duration such as"),
        ("", "invalid duration '': expected"),
        ("0", "invalid duration '0': must be greater than zero"),
        ("0s", "invalid duration '0s': must be greater than zero"),
        ("-1", "invalid duration '-1': must be greater than zero"),
        ("nan", "invalid duration 'nan': must be greater than zero"),
        ("inf", "invalid duration 'inf': must be greater than zero"),
        ("30s1m", "invalid duration '30s1m': units must go from largest to smallest, each once"),
    ],
)
def test_flag_durations_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_flag_duration(text)
    assert str(refused.value).startswith(message)


def test_flag_duration_zero_where_it_means_not_at_all() -> None:
    assert parse_flag_duration("0", allow_zero=True) == 0.0
    with pytest.raises(ValueError, match="must be zero or more"):
        parse_flag_duration("-1", allow_zero=True)
