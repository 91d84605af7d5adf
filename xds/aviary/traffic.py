"""The traffic plan: the value the engine hands to the snapshot builder.

It is the only thing that crosses from "what should run" (policy, engine, admin overrides) to
"what Envoy is told" (discovery). Keeping it a small frozen value means the engine never needs
to know Envoy's types and the snapshot builder never needs to know why a plan was chosen.

A plan is ordered: its cohort rules are tried first (a request that matches an opened cohort goes
to the canary, whatever the weight), then the weighted default splits the rest, by a hash of the
stickiness key when there is one, and copies a fraction of it to the canary (the mirror). New
fields get neutral defaults and enter the digest only when set, so an existing plan keeps its
digest. A guarded promotion needs no field of its own: it is the plan at weight 100, whose stable
backend (the previous version) therefore stays published.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from aviary.matching import CohortRule
from aviary.policy.schema import Endpoint


@dataclass(frozen=True, slots=True)
class Backend:
    """One version of a service and where it runs; becomes the cluster `<rollout>_<version>`."""

    version: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Stickiness:
    """What keeps one user on one version: a request header, or a cookie.

    The default split hashes this key (not a random draw), so a user's version depends only on the
    key and the weight; a cookie with a ``ttl`` is issued by Envoy when the request has none, so
    anonymous users stick too.
    """

    header: str | None = None
    cookie: str | None = None
    ttl: float | None = None  # seconds; cookie only

    def __post_init__(self) -> None:
        if (self.header is None) == (self.cookie is None):
            raise ValueError("stickiness needs exactly one of header and cookie")
        if self.ttl is not None and self.cookie is None:
            raise ValueError("ttl applies to a cookie only")

    def describe(self) -> str:
        if self.header is not None:
            return f"header {self.header}"
        return f"cookie {self.cookie}" + (f" (ttl {self.ttl:g}s)" if self.ttl is not None else "")


@dataclass(frozen=True, slots=True)
class TrafficPlan:
    """How one rollout's requests reach its stable and canary backends.

    `cohorts` (in policy order) send their requests to `canary`; every other request is split by
    `canary_weight`, a percentage 0..100 sent to `canary`, the rest to `stable`. A canary with
    weight 0 still has its cluster published, so that raising the weight or opening a cohort later
    is a route change only (make-before-break). `stickiness` makes the split a function of a hash
    of the user's key (canary listed last, so a rising weight moves users from stable to canary
    only); `mirror` is the percentage of the split's requests also copied to the canary (users get
    the answer of the cluster the split chose).
    """

    stable: Backend
    canary: Backend | None = None
    canary_weight: int = 0
    cohorts: tuple[CohortRule, ...] = ()
    stickiness: Stickiness | None = None
    mirror: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.canary_weight <= 100:
            raise ValueError(f"canary_weight must be within 0..100, got {self.canary_weight}")
        if not 0 <= self.mirror <= 100:
            raise ValueError(f"mirror must be within 0..100, got {self.mirror}")
        if self.canary is None and (self.canary_weight != 0 or self.cohorts or self.mirror):
            raise ValueError("canary_weight, cohorts and mirror need a canary backend")
        if self.canary is not None and self.canary.version == self.stable.version:
            raise ValueError(f"canary and stable are both version {self.stable.version!r}")

    def weights(self) -> dict[str, int]:
        """Version -> percent of the requests no cohort claims, only for backends that exist."""
        if self.canary is None:
            return {self.stable.version: 100}
        return {self.stable.version: 100 - self.canary_weight, self.canary.version: self.canary_weight}

    @property
    def cohort_names(self) -> tuple[str, ...]:
        return tuple(cohort.name for cohort in self.cohorts)

    @property
    def digest(self) -> str:
        """A short content hash: equal plans, equal digests (logs and status name plans by it)."""
        parts: list[object] = [
            self.stable.version, [str(e) for e in self.stable.endpoints],
            self.canary.version if self.canary else None,
            [str(e) for e in self.canary.endpoints] if self.canary else None,
            self.canary_weight, repr(self.cohorts),
        ]
        # Later fields only when set: a plan without them keeps the digest it always had.
        if self.stickiness is not None:
            parts.append(["stickiness", repr(self.stickiness)])
        if self.mirror:
            parts.append(["mirror", self.mirror])
        text = json.dumps(parts, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def describe(self) -> str:
        text = ", ".join(f"{v}={w}%" for v, w in self.weights().items())
        if self.cohorts:
            text += f"; cohorts {', '.join(self.cohort_names)}"
        if self.mirror and self.canary is not None:
            text += f"; mirror {self.mirror}% to {self.canary.version}"
        if self.stickiness is not None:
            text += f"; sticky by {self.stickiness.describe()}"
        return text
