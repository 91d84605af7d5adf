"""The traffic plan: the value the engine hands to the snapshot builder.

It is the only thing that crosses from "what should run" (policy, engine, admin overrides) to
"what Envoy is told" (discovery). Keeping it a small frozen value means the engine never needs
to know Envoy's types and the snapshot builder never needs to know why a plan was chosen.

A plan is ordered: its cohort rules are tried first (a request that matches an opened cohort goes
to the canary, whatever the weight), then the weighted default splits the rest. Later parts of
issue 10 extend it here, as fields with neutral defaults so that every existing plan keeps its
digest: the stickiness key (a hash policy for the default), the mirror (a fraction copied to the
canary) and the backends kept warm after a promotion.
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
class TrafficPlan:
    """How one rollout's requests reach its stable and canary backends.

    `cohorts` (in policy order) send their requests to `canary`; every other request is split by
    `canary_weight`, a percentage 0..100 sent to `canary`, the rest to `stable`. A canary with
    weight 0 still has its cluster published, so that raising the weight or opening a cohort later
    is a route change only (make-before-break).
    """

    stable: Backend
    canary: Backend | None = None
    canary_weight: int = 0
    cohorts: tuple[CohortRule, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.canary_weight <= 100:
            raise ValueError(f"canary_weight must be within 0..100, got {self.canary_weight}")
        if self.canary is None and (self.canary_weight != 0 or self.cohorts):
            raise ValueError("canary_weight and cohorts need a canary backend")
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
        text = json.dumps(
            [self.stable.version, [str(e) for e in self.stable.endpoints],
             self.canary.version if self.canary else None,
             [str(e) for e in self.canary.endpoints] if self.canary else None,
             self.canary_weight, repr(self.cohorts)],
            separators=(",", ":"),
        )
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def describe(self) -> str:
        split = ", ".join(f"{v}={w}%" for v, w in self.weights().items())
        return f"{split}; cohorts {', '.join(self.cohort_names)}" if self.cohorts else split
