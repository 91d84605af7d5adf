"""What streams that were sent the same thing share, instead of holding a copy each.

Thousands of proxies usually subscribe to the same names and are sent the same resources. Each
stream used to keep, per type, a dict of every resource name it was sent and the set of names it
subscribes to, and `ProxyStatus` a copy of that dict per proxy: about 55 KB per stream with 100
rollouts on one listener, more than grpc and asyncio cost for the stream itself. Here those are
immutable values, interned, held by reference; a stream keeps only its nonce and pointers.

- `Sent`: what one response of a type carried (resource name -> version) and its version. Versions
  are content hashes (`snapshot.set_version`), so a (type, version) pair names one content: the same
  trust `SotwStream` already puts in `Snapshot.type_versions` when it skips unchanged types.
- `selection()`: what a subscription selects from a snapshot, as a `Sent` plus the encoded response
  without its nonce, computed once per (snapshot content, subscription) for every stream that asks.
- `shared_names()`: one frozenset per distinct subscription.

Pools are weak or bounded: a value lives as long as some stream or proxy record holds it.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterator, KeysView, Mapping
from dataclasses import dataclass
from typing import Any

from aviary.discovery import wire
from aviary.discovery.snapshot import Snapshot, set_version


class Sent(Mapping[str, str]):
    """Resource name -> version of one response's resources, and the response's version. Read-only."""

    __slots__ = ("__weakref__", "_versions", "type_url", "version")

    def __init__(self, type_url: str, version: str, versions: Mapping[str, str]) -> None:
        self.type_url = type_url
        self.version = version
        self._versions = dict(versions)

    def __getitem__(self, name: str) -> str:
        return self._versions[name]

    def get(self, name: str, default: Any = None) -> Any:  # dict's, not Mapping's slower one
        return self._versions.get(name, default)

    def keys(self) -> KeysView[str]:  # dict's: `keys() >= names` runs in C (warm_routes)
        return self._versions.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self._versions)

    def __len__(self) -> int:
        return len(self._versions)

    def __contains__(self, name: object) -> bool:
        return name in self._versions

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sent):
            return self is other or self._versions == other._versions
        if isinstance(other, dict):  # what a worker's ACK carries (`worker_protocol`): no copy
            return self._versions == other
        return isinstance(other, Mapping) and self._versions == dict(other)

    def as_dict(self) -> dict[str, str]:
        """The mapping itself, not a copy, for `marshal` (the worker pipe); it must not be changed.
        Every ACK of one response hands the same dict, so a frame of ACKs carries it once."""
        return self._versions

    __hash__ = None  # type: ignore[assignment]  # a mapping: equal to a dict with the same items

    def __repr__(self) -> str:
        return f"Sent({self.type_url!r}, {self.version!r}, {self._versions!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Across a pipe (stream workers), the receiving process shares it with its own equal ones.
        return shared_sent, (self.type_url, self.version, self._versions)


_sent: weakref.WeakValueDictionary[tuple[str, str], Sent] = weakref.WeakValueDictionary()


def shared_sent(type_url: str, version: str, versions: Mapping[str, str]) -> Sent:
    """The interned `Sent` equal to `versions`; a fresh one when `version` names other content
    (a test's made-up version, say): sharing never changes what a proxy is recorded to have."""
    if isinstance(versions, Sent) and versions.version == version and versions.type_url == type_url:
        known = _sent.setdefault((type_url, version), versions)
        return known if known == versions else versions
    found = _sent.get((type_url, version))
    if found is not None and found == versions:
        return found
    fresh = Sent(type_url, version, versions)
    return fresh if found is not None else _sent.setdefault((type_url, version), fresh)


_names: weakref.WeakValueDictionary[frozenset[str], frozenset[str]] = weakref.WeakValueDictionary()
_NO_NAMES: frozenset[str] = frozenset()


def shared_names(names: frozenset[str]) -> frozenset[str]:
    """The one frozenset equal to `names` that every stream subscribing to those names holds."""
    if not names:
        return _NO_NAMES
    known = _names.get(names)
    if known is None:
        known = frozenset(names)  # a distinct object: the pool's key must not keep its value alive
        _names[names] = known
    return known


@dataclass(frozen=True, slots=True)
class Selection:
    """What one subscription receives from one snapshot's resources of a type."""

    sent: Sent
    body: bytes  # the DiscoveryResponse without its nonce: `wire.with_nonce(body, nonce)`


_SELECTIONS_KEPT = 256  # distinct (snapshot content, subscription) pairs; evicted ones are recomputed
_selections: OrderedDict[tuple[str, str, str, bool, frozenset[str], str], Selection] = OrderedDict()


def selection(snapshot: Snapshot, type_url: str, names: frozenset[str], wildcard: bool) -> Selection:
    """`snapshot.select()` and the response it makes, once for all streams with this subscription.

    Keyed by the type's content versions (every resource, and which are sent to wildcard
    subscribers), not by the snapshot object: an unchanged type in a new snapshot is not recomputed.
    """
    key = (type_url, snapshot.type_versions[type_url], snapshot.wildcard_versions[type_url], wildcard, names,
           snapshot.flavour)  # fmt: skip
    found = _selections.get(key)
    if found is not None:
        _selections.move_to_end(key)
        return found
    selected = snapshot.select(type_url, names, wildcard)
    wildcard_only = wildcard and not names
    version = snapshot.wildcard_versions[type_url] if wildcard_only else set_version(selected.values())
    sent = shared_sent(type_url, version, {name: r.version for name, r in selected.items()})
    entries = (selected[name].entry for name in sorted(selected))
    found = Selection(sent, wire.discovery_response_body(version, type_url, entries))
    _selections[key] = found
    if len(_selections) > _SELECTIONS_KEPT:
        _selections.popitem(last=False)
    return found
