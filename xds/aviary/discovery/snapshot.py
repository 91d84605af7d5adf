"""Snapshots: immutable, already-serialized sets of xDS resources.

A snapshot is built once per change and then only read. Every resource carries the bytes it
will be sent as, and a version derived from those bytes, so that:

- streams never build protobuf objects on the push path (they concatenate bytes);
- "did it change?" is a string comparison, per resource, per stream;
- versions are stable across control-plane restarts: the same content has the same version,
  so a reconnecting proxy is not sent what it already has as if it were new.

Nothing here knows about rollouts; `resources.py` turns desired traffic into these values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.message import Message

from aviary.discovery import typeurls, wire


def digest(*parts: bytes) -> str:
    """A short content hash: resource versions, and the digests of a resource's `parts`."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Resource:
    """One named xDS resource, serialized once.

    `wildcard` says whether a wildcard subscription (Envoy's LDS/CDS) receives it: listeners
    meant for proxyless gRPC clients (`api_listener`) are only sent to those who name them.
    `references` are the names, in the next type down, this resource needs to be useful
    (listener -> route configuration, route -> clusters, EDS cluster -> load assignment).
    `parts` are (name, digest) of the independent pieces of a resource shared by several owners
    (the virtual hosts of a route configuration), so that when a proxy rejects the resource, the
    piece that changed since the version it accepted can be told from those that did not.
    """

    name: str
    type_url: str
    version: str
    any_bytes: bytes
    entry: bytes
    wildcard: bool = True
    references: frozenset[str] = frozenset()
    parts: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_message(
        cls,
        name: str,
        type_url: str,
        message: Message,
        *,
        wildcard: bool = True,
        references: Iterable[str] = (),
        parts: Iterable[tuple[str, str]] = (),
    ) -> Resource:
        return cls.from_bytes(name, type_url, message.SerializeToString(deterministic=True), wildcard=wildcard,
                              references=references, parts=parts)

    @classmethod
    def from_bytes(
        cls,
        name: str,
        type_url: str,
        value: bytes,
        *,
        wildcard: bool = True,
        references: Iterable[str] = (),
        parts: Iterable[tuple[str, str]] = (),
    ) -> Resource:
        """From a message's deterministic serialization (assembled from cached pieces, say)."""
        any_bytes = wire.encode_any(type_url, value)
        version = digest(value)
        return cls(
            name=name,
            type_url=type_url,
            version=version,
            any_bytes=any_bytes,
            entry=wire.sotw_entry(type_url, name, version, any_bytes),
            wildcard=wildcard,
            references=frozenset(references),
            parts=tuple(parts),
        )


def set_version(resources: Iterable[Resource]) -> str:
    """Version of a set of resources: changes when any member or membership changes."""
    h = hashlib.blake2b(digest_size=8)
    for resource in sorted(resources, key=lambda r: r.name):
        h.update(resource.name.encode())
        h.update(b"\0")
        h.update(resource.version.encode())
        h.update(b"\0")
    return h.hexdigest()


_BELOW = {  # what each type's references name
    typeurls.LISTENER: typeurls.ROUTE,
    typeurls.ROUTE: typeurls.CLUSTER,
    typeurls.CLUSTER: typeurls.ENDPOINT,
}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one group of proxies should have, per type URL, by resource name."""

    resources: Mapping[str, Mapping[str, Resource]]
    # "" as published; a rendering for some proxies (`config_sources.for_per_type`) names itself here,
    # and whatever caches bytes by content version keys on it too: its resources keep their versions.
    flavour: str = ""
    wildcard_versions: Mapping[str, str] = field(init=False)
    type_versions: Mapping[str, str] = field(init=False)  # all resources of a type, named ones too
    _problems: tuple[str, ...] | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        frozen = {t: MappingProxyType(dict(self.resources.get(t, {}))) for t in typeurls.PUSH_ORDER}
        object.__setattr__(self, "resources", MappingProxyType(frozen))
        wildcard = {t: set_version(r for r in items.values() if r.wildcard) for t, items in frozen.items()}
        object.__setattr__(self, "wildcard_versions", MappingProxyType(wildcard))
        every = {t: set_version(items.values()) for t, items in frozen.items()}
        object.__setattr__(self, "type_versions", MappingProxyType(every))

    @classmethod
    def of(cls, resources: Iterable[Resource]) -> Snapshot:
        by_type: dict[str, dict[str, Resource]] = {t: {} for t in typeurls.PUSH_ORDER}
        for resource in resources:
            items = by_type[resource.type_url]
            if resource.name in items:
                raise ValueError(f"duplicate {typeurls.short_name(resource.type_url)} resource {resource.name!r}")
            items[resource.name] = resource
        return cls(by_type)

    def items(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources.get(type_url, MappingProxyType({}))

    def select(self, type_url: str, names: Iterable[str], wildcard: bool) -> dict[str, Resource]:
        """What a subscription to `names` (plus everything, when `wildcard`) receives."""
        items = self.items(type_url)
        chosen = {n: r for n, r in items.items() if r.wildcard} if wildcard else {}
        for name in names:
            resource = items.get(name)
            if resource is not None:
                chosen[name] = resource
        return chosen

    def inconsistencies(self) -> list[str]:
        """References that point nowhere; a snapshot with any must not be published.

        O(references): each reference is looked up in the type below. (It was ``references -
        present.keys()``, which Python computes by walking every key of the type below, once per
        resource: with 1,000 rollouts, some 10 million steps per check, and the director checks
        each snapshot it builds.) Computed once per snapshot: the director and the cache both ask.
        """
        if self._problems is None:
            object.__setattr__(self, "_problems", tuple(self._dangling()))
        assert self._problems is not None
        return list(self._problems)

    def _dangling(self) -> list[str]:
        problems: list[str] = []
        for upper, lower in _BELOW.items():
            present = self.items(lower)
            for resource in self.items(upper).values():
                missing = [ref for ref in resource.references if ref not in present]
                for ref in sorted(missing):
                    problems.append(
                        f"{typeurls.short_name(upper)} {resource.name!r} references missing "
                        f"{typeurls.short_name(lower)} {ref!r}"
                    )
        return problems

    def equivalent(self, other: Snapshot) -> bool:
        return self.type_versions == other.type_versions


EMPTY = Snapshot.of(())
