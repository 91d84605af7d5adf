"""Rules a policy file must meet on *this* server, beyond being valid on its own.

A file can be well-formed and still unserviceable with the flags `aviary serve` runs with: an
``analysis`` block without ``analysis.prometheus`` has nowhere to send its queries unless the server
has ``--prometheus-url``. Left alone, every check round of such a rollout came back empty and the
canary was rolled back as "inconclusive" with no check rows and no log line. These rules turn that
into an error that names file and field, the same line in ``aviary validate``, in the admin API's
Validate and in what ``aviary serve`` refuses (aviary.app applies them before the rollout engine
sees a PolicySet). Pure functions: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from aviary.policy.schema import PolicyError, PolicySet, Rollout

__all__ = ["PROMETHEUS_FIELD", "PROMETHEUS_NEEDED", "needs_prometheus", "refuse_unserviceable"]

PROMETHEUS_FIELD = "spec.analysis.prometheus"
PROMETHEUS_NEEDED = "analysis needs a Prometheus: set analysis.prometheus or pass --prometheus-url"


def needs_prometheus(rollout: Rollout, file: str, default_url: str | None) -> PolicyError | None:
    """The error for a rollout whose checks would have no Prometheus to ask; None when they have one."""
    analysis = rollout.spec.analysis
    if analysis is None or analysis.prometheus or default_url or analysis.provider == "envoy":
        return None
    return PolicyError(file, PROMETHEUS_FIELD, PROMETHEUS_NEEDED)


def refuse_unserviceable(
    policy_set: PolicySet, default_url: str | None, serving: Callable[[str], Rollout | None]
) -> tuple[PolicySet, list[PolicyError]]:
    """``policy_set`` without the rollouts this server cannot run, and why each was refused.

    Like any refused file, a refused rollout that already runs keeps its running version
    (``serving(name)``); one that does not run yet stays out.
    """
    rollouts = dict(policy_set.rollouts)
    errors: list[PolicyError] = []
    for name, rollout in sorted(policy_set.rollouts.items()):
        error = needs_prometheus(rollout, policy_set.files.get(name, name), default_url)
        if error is None:
            continue
        errors.append(error)
        running = serving(name)
        if running is None:
            del rollouts[name]
        else:
            rollouts[name] = running
    if not errors:
        return policy_set, []
    files = {name: file for name, file in policy_set.files.items() if name in rollouts}
    return PolicySet(rollouts, files, policy_set.revision), errors
