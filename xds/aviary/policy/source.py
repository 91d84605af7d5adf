"""What the status shows about the policy source: a plain value, read by the admin API."""

from __future__ import annotations

from dataclasses import dataclass

from aviary.policy.schema import PolicyError


@dataclass(frozen=True, slots=True)
class PolicyState:
    source: str
    applied_commit: str | None = None
    rejected_commit: str | None = None
    errors: tuple[PolicyError, ...] = ()
    fetch_error: str | None = None  # git: why the branch head cannot be reached (one line)
    fetch_failing_since: float | None = None  # git: Unix time of the first failure of this run
    fetch_failures: int = 0  # git: failed polls since start
