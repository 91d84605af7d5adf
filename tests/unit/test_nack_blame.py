"""Blaming a route NACK on the virtual hosts that can have caused it (`discovery/nack_blame.py`)."""

from __future__ import annotations

from aviary.discovery.nack_blame import KnownRejection, narrowed, route_suspects

ACCEPTED = {"alpha": "a1", "bravo": "b1", "charlie": "c1"}
REGEX_MESSAGE = "regex 'a{100}' RE2 program size of 104 > max program size of 100"


def test_only_virtual_hosts_that_changed_since_the_last_ack_are_suspects() -> None:
    rejected = {"alpha": "a1", "bravo": "b2", "charlie": "c1"}
    assert route_suspects(["alpha", "bravo", "charlie"], rejected, ACCEPTED) == ["bravo"]
    # A rollout new to the route, and one not in the rejected version at all (being removed).
    assert route_suspects(["bravo", "delta", "echo"], {"bravo": "b1", "delta": "d1"}, ACCEPTED) == ["delta"]


def test_a_single_suspect_is_blamed_whatever_the_message() -> None:
    assert narrowed(["bravo"], {"bravo": "b2"}, "anything", [], {}) == ["bravo"]


def test_content_this_proxy_already_rejected_explains_the_nack() -> None:
    rejected = {"alpha": "a2", "bravo": "b2"}
    known = [KnownRejection("bravo", "b2", REGEX_MESSAGE)]
    assert narrowed(["alpha", "bravo"], rejected, REGEX_MESSAGE, known, {}) == ["bravo"]
    # Another message, or bravo's content changed since: no longer evidence.
    assert narrowed(["alpha", "bravo"], rejected, "other", known, {}) == ["alpha", "bravo"]
    moved_on = [KnownRejection("bravo", "b1", REGEX_MESSAGE)]
    assert narrowed(["alpha", "bravo"], rejected, REGEX_MESSAGE, moved_on, {}) == ["alpha", "bravo"]


def test_a_quoted_value_found_in_one_virtual_host_names_it() -> None:
    hosts = {"alpha": b"\n\x05alpha...weights", "bravo": b"\n\x05bravo...a{100}..."}
    assert narrowed(["alpha", "bravo"], {"alpha": "a2", "bravo": "b2"}, REGEX_MESSAGE, [], hosts) == ["bravo"]


def test_without_evidence_every_suspect_is_blamed() -> None:
    both = {"alpha": b"a{100}", "bravo": b"a{100}"}
    rejected = {"alpha": "a2", "bravo": "b2"}
    assert narrowed(["alpha", "bravo"], rejected, REGEX_MESSAGE, [], both) == ["alpha", "bravo"]
    assert narrowed(["alpha", "bravo"], rejected, REGEX_MESSAGE, [], {}) == ["alpha", "bravo"]
    assert narrowed(["alpha", "bravo"], rejected, "no quotes here", [], {"alpha": b"no"}) == ["alpha", "bravo"]
