"""Which rollouts a proxy's NACK of a shared route configuration is blamed on.

The rollouts of one listener are virtual hosts of one RouteConfiguration, and Envoy accepts or
rejects it whole: its NACK names the resource and gives a message, never the virtual host. A
virtual host unchanged since the version that proxy last ACKed cannot be what it refused, so the
suspects are those that changed. When several changed in one push (two rollouts stepping within a
millisecond, or a change queued behind a rejected one), blaming them all would roll back innocent
canaries, so the suspects are narrowed, only on evidence:

1. a suspect whose virtual host is exactly the content this proxy already rejected, with the same
   message, explains the NACK by itself (the rejected content was still in flight);
2. Envoy quotes the offending value in its message (``regex 'a{100}' RE2 program size ...``,
   ``malformed IP address: ...``): a quoted text found in the virtual host of exactly one suspect
   names it.

Without such evidence every suspect is blamed, as before. Pure functions over plain values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_QUOTED = re.compile(r"'([^']{2,})'")


@dataclass(frozen=True, slots=True)
class KnownRejection:
    """A virtual host this proxy rejected (digest of its bytes) and what Envoy said about it."""

    rollout: str
    part: str
    message: str


def route_suspects(
    candidates: Iterable[str], rejected: Mapping[str, str], accepted: Mapping[str, str]
) -> list[str]:
    """The candidates whose virtual host (name -> digest) in the rejected version differs from the
    version the proxy last ACKed."""
    return [name for name in candidates if name in rejected and accepted.get(name) != rejected[name]]


def narrowed(
    suspects: list[str],
    rejected: Mapping[str, str],
    message: str,
    known: Iterable[KnownRejection],
    virtual_hosts: Mapping[str, bytes],
) -> list[str]:
    """The suspects to blame: see the module docstring for when fewer than all of them are."""
    if len(suspects) <= 1:
        return suspects
    known = list(known)
    explained = [
        name for name in suspects
        if any(k.rollout == name and k.part == rejected.get(name) and k.message == message for k in known)
    ]
    if explained:
        return explained
    quoted: list[str] = []
    for text in _QUOTED.findall(message):
        fragment = text.encode()
        holders = [name for name in suspects if fragment in virtual_hosts.get(name, b"")]
        if len(holders) == 1 and holders[0] not in quoted:
            quoted.append(holders[0])
    return quoted or suspects
