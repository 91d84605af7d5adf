"""Desired traffic: the value the engine hands to the snapshot builder.

It is the only thing that crosses from "what should run" (policy, engine, admin overrides) to
"what Envoy is told" (discovery). Keeping it a small frozen value means the engine never needs
to know Envoy's types and the snapshot builder never needs to know why a weight was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

from aviary.policy.schema import Endpoint


@dataclass(frozen=True, slots=True)
class Backend:
    """One version of a service and where it runs; becomes the cluster `<rollout>-<version>`."""

    version: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class DesiredTraffic:
    """How one rollout's requests should be split between its stable and canary backends.

    `canary_weight` is a percentage 0..100 of requests sent to `canary`; the rest go to
    `stable`. A canary with weight 0 still has its cluster published, so that raising the
    weight later is a route change only (make-before-break).
    """

    stable: Backend
    canary: Backend | None = None
    canary_weight: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.canary_weight <= 100:
            raise ValueError(f"canary_weight must be within 0..100, got {self.canary_weight}")
        if self.canary is None and self.canary_weight != 0:
            raise ValueError("canary_weight needs a canary backend")
        if self.canary is not None and self.canary.version == self.stable.version:
            raise ValueError(f"canary and stable are both version {self.stable.version!r}")

    def weights(self) -> dict[str, int]:
        """Version -> percent, only for backends that exist."""
        if self.canary is None:
            return {self.stable.version: 100}
        return {self.stable.version: 100 - self.canary_weight, self.canary.version: self.canary_weight}
