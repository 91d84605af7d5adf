"""Request conditions of a cohort: which requests a named group of users sends.

Values shared by the policy schema (which parses them), the traffic plan (which carries them) and
the Envoy renderer (which turns them into route matches): plain frozen dataclasses, hashable, so a
plan that contains them can be compared, digested and memoized. Nothing here knows Envoy.

Regular expressions are RE2 (what Envoy runs): ``re2_problem`` rejects what Python's ``re`` accepts
but RE2 lacks (backreferences, lookaround, atomic groups, possessive quantifiers), so a policy is
refused at load rather than NACKed by every proxy. It also refuses a regex whose RE2 program is
surely over Envoy's default limit (``re2_program_size_at_least``); one under that lower bound may
still be over the limit, and is NACKed (then rolled back like any NACK).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CONDITION_KINDS",
    "QUERY_CONDITION_KINDS",
    "CohortRule",
    "Condition",
    "Match",
    "cookie_regex_problem",
    "cookie_value_regex",
    "re2_problem",
    "re2_program_size_at_least",
]

ConditionKind = Literal["exact", "prefix", "suffix", "contains", "regex", "present", "absent"]
CONDITION_KINDS: tuple[ConditionKind, ...] = ("exact", "prefix", "suffix", "contains", "regex", "present", "absent")
# Envoy's QueryParameterMatcher has a string matcher or ``present_match`` and no inversion: no ``absent``.
QUERY_CONDITION_KINDS: tuple[ConditionKind, ...] = ("exact", "prefix", "suffix", "contains", "regex", "present")


@dataclass(frozen=True, slots=True)
class Condition:
    """One test of a header's or cookie's value; ``value`` is empty for present/absent."""

    kind: ConditionKind
    value: str = ""


@dataclass(frozen=True, slots=True, repr=False)
class Match:
    """One entry of a cohort's ``match``: every condition holds (AND). Names are lower case for
    headers (HTTP header names are case-insensitive), as written for cookies and query parameters.

    ``repr`` leaves out an empty ``query``: a plan's digest hashes the repr of its cohorts, and a
    plan written before query conditions existed must keep its digest.
    """

    headers: tuple[tuple[str, Condition], ...] = ()
    cookies: tuple[tuple[str, Condition], ...] = ()
    query: tuple[tuple[str, Condition], ...] = ()

    def __repr__(self) -> str:
        text = f"Match(headers={self.headers!r}, cookies={self.cookies!r}"
        return text + (f", query={self.query!r})" if self.query else ")")


@dataclass(frozen=True, slots=True)
class CohortRule:
    """A named group of requests: any entry of ``match`` matches (OR)."""

    name: str
    match: tuple[Match, ...]


_RE2_LACKS = (
    (re.compile(r"\\[1-9]"), "backreferences (\\1..\\9)"),
    (re.compile(r"\(\?P=\w+\)"), "named backreferences (?P=name)"),
    (re.compile(r"\(\?<?[=!]"), "lookaround ((?=, (?!, (?<=, (?<!)"),
    (re.compile(r"\(\?>"), "atomic groups ((?>...)"),
    (re.compile(r"(?<!\\)[*+?}][+]"), "possessive quantifiers (*+, ++, ?+)"),
    (re.compile(r"\\[Z]"), "\\Z (use $)"),
)


def re2_problem(pattern: str) -> str | None:
    """Why Envoy's RE2 would refuse ``pattern`` (None: it compiles in Python and uses nothing RE2
    lacks). Checked on the raw text: an escaped backslash before a digit is refused too (rare, safe)."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regular expression: {exc}"
    for construct, what in _RE2_LACKS:
        if construct.search(pattern):
            return f"RE2 (what Envoy runs) has no {what}"
    size = re2_program_size_at_least(pattern)
    if size > ENVOY_RE2_MAX_PROGRAM_SIZE:
        return (f"RE2 compiles it to at least {size} instructions, over Envoy's limit of "
                f"{ENVOY_RE2_MAX_PROGRAM_SIZE} (re2.max_program_size): use fewer counted repetitions")
    return None


ENVOY_RE2_MAX_PROGRAM_SIZE = 100  # Envoy's default re2.max_program_size.error_level: a larger regex is NACKed


def re2_program_size_at_least(pattern: str) -> int:
    """A lower bound of the size of the program RE2 compiles ``pattern`` to (a pattern Python parses).

    RE2 has no repeat instruction: ``x{n,m}`` becomes n copies of ``x`` and nested optional ones, so
    a path through the program that matches takes at least one instruction per character matched
    on it, and distinct ones through counted copies. Counted here: one per literal or class,
    ``n`` times the minimum for ``x{n,m}`` (once for ``x+``, never for ``x*``), and for an
    alternation its largest branch only (RE2 factors common prefixes out of branches). Anchors,
    loops and the fixed instructions RE2 adds are not counted: the bound is never above the size
    Envoy reports (``a{97}``: bound 97, Envoy's 101; ``(ab|cd){30}``: bound 60, Envoy's 184).
    """
    parser: Any = importlib.import_module("re._parser")  # the stdlib's own regex parser (untyped)
    return _least(parser.parse(pattern), parser)


def _least(items: Any, parser: Any) -> int:
    constants = parser
    total = 0
    for op, arg in items:
        if op in (constants.LITERAL, constants.NOT_LITERAL, constants.ANY, constants.IN):
            total += 1
        elif op in (constants.MAX_REPEAT, constants.MIN_REPEAT):
            low, _, sub = arg
            total += low * _least(sub, parser)
        elif op is constants.SUBPATTERN:
            total += _least(arg[-1], parser)
        elif op is constants.BRANCH:
            total += max((_least(branch, parser) for branch in arg[1]), default=0)
    return total


def cookie_value_regex(pattern: str) -> str:
    """``pattern`` rewritten so it cannot match past the end of one cookie's value.

    A cookie condition is matched against the whole ``cookie`` header, so ``.`` is narrowed to
    ``[^;]``; constructs that could still match ``;`` are refused by ``cookie_regex_problem``.
    """
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if char == "[":
            end = pattern.index("]", i + 2) if pattern[i + 1 : i + 2] == "]" else pattern.index("]", i + 1)
            out.append(pattern[i : end + 1])
            i = end + 1
            continue
        out.append("[^;]" if char == "." else char)
        i += 1
    return "".join(out)


def cookie_regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be confined to one cookie's value (None: it can)."""
    problem = re2_problem(pattern)
    if problem:
        return problem
    if re.search(r"\[\^", pattern):
        return "a cookie regex may not use negated classes [^...] (they could match past the cookie's ';')"
    if re.search(r"\\[SWDPp]", pattern):
        return "a cookie regex may not use \\S, \\W, \\D, \\p or \\P (they could match past the cookie's ';')"
    if ";" in pattern:
        return "a cookie value never contains ';'"
    return None
