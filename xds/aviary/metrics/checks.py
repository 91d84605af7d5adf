"""One check round: ask the metric provider, judge every metric of the analysis.

The only I/O on the analysis path; the verdicts come from ``aviary.policy.analysis.judge``. A
provider error never escapes: it becomes an INCONCLUSIVE result carrying the error as reason.

Timing (what keeps a hanging Prometheus from slowing rollouts down):

- Every query of a round runs at once, each with ``query_timeout(checkEvery)`` seconds, so a
  round lasts at most about that long, and a silent Prometheus makes ``inconclusiveLimit`` rounds
  take about ``inconclusiveLimit x checkEvery``, not that many HTTP timeouts.
- ``check_round`` stamps a round with the time it *started*, on the caller's clock: that is when
  the queries ran. The next round is due ``checkEvery`` after that.
- A round that finishes later than ``late_after(analysis)`` after it started (the process was
  frozen or starved meanwhile) is made INCONCLUSIVE as a whole: when Prometheus evaluated it is
  unknown, and a stale pass must not end a step. The next round then starts at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aviary.metrics.provider import MetricProvider, MetricProviderError
from aviary.metrics.templates import TemplateError, render, request_count_query, template_query
from aviary.policy.analysis import CheckResult, inconclusive, judge
from aviary.policy.schema import Analysis, MetricCheck

__all__ = [
    "DEFAULT_QUERY_TIMEOUT",
    "LATE_GRACE",
    "QUERY_TIMEOUT_FLOOR",
    "QUERY_TIMEOUT_SHARE",
    "check_round",
    "late_after",
    "query_timeout",
    "run_checks",
]

DEFAULT_QUERY_TIMEOUT = 5.0
"""Seconds: the longest any query may take, however long ``checkEvery`` is."""
QUERY_TIMEOUT_SHARE = 0.8
"""Share of ``checkEvery`` a query may take: the round ends before the next one is due."""
QUERY_TIMEOUT_FLOOR = 0.5
"""Seconds: the shortest timeout, so that a very short ``checkEvery`` still leaves Prometheus time."""
LATE_GRACE = 1.0
"""Seconds a round may overrun its timeout (scheduling, a busy event loop) before it is late."""
_GUARD = 0.25  # how long past the timeout run_checks waits for a provider that does not keep to it


def query_timeout(check_every: float, ceiling: float = DEFAULT_QUERY_TIMEOUT) -> float:
    """min(ceiling, max(0.5 s, 0.8 x checkEvery)): 0.8 s for ``checkEvery: 1s``, 4 s for 5 s, 5 s above."""
    return min(ceiling, max(QUERY_TIMEOUT_FLOOR, check_every * QUERY_TIMEOUT_SHARE))


def late_after(analysis: Analysis) -> float:
    """Seconds after its start when a round's answers are too old to judge by: the window (the span
    its queries measure), but never less than the query timeout plus ``LATE_GRACE``."""
    return max(analysis.window, query_timeout(analysis.check_every) + LATE_GRACE)


async def check_round(provider: MetricProvider, analysis: Analysis, canary_cluster: str, stable_cluster: str,
                      clock: Callable[[], float]) -> tuple[float, tuple[CheckResult, ...]]:
    """``run_checks`` stamped with when it started on ``clock``; all INCONCLUSIVE if it ended late."""
    started = clock()
    results = await run_checks(provider, analysis, canary_cluster, stable_cluster)
    took = clock() - started
    limit = late_after(analysis)
    if took > limit:
        reason = (f"round took {took:.1f}s, more than {limit:g}s (was the control plane frozen?): "
                  "its answers are too old to judge")
        results = tuple(inconclusive(check, reason) for check in analysis.metrics)
    return started, results


async def run_checks(provider: MetricProvider, analysis: Analysis, canary_cluster: str,
                     stable_cluster: str) -> tuple[CheckResult, ...]:
    """Judge every metric of ``analysis`` for the canary; one result per metric, in order.

    All queries run concurrently, each distinct query once per round: the canary's request count
    (for minRequests), each metric, and the stable's value for ``maxDecreaseFromStable``. Each gets
    ``query_timeout(analysis.check_every)`` seconds.
    """
    window = analysis.window
    timeout = query_timeout(analysis.check_every)
    count_query = request_count_query(canary_cluster, window)
    plans: list[tuple[str, str | None] | TemplateError] = []
    for check in analysis.metrics:
        try:
            value_query = render(check, canary_cluster, stable_cluster, window)
            stable_query = (template_query(check.template, stable_cluster, window)
                            if check.template is not None and check.max_decrease_from_stable is not None
                            else None)
            plans.append((value_query, stable_query))
        except TemplateError as exc:
            plans.append(exc)
    wanted = [count_query] + [q for plan in plans if isinstance(plan, tuple) for q in plan if q is not None]
    distinct = list(dict.fromkeys(wanted))
    answers = dict(zip(distinct, await asyncio.gather(*(_ask(provider, q, timeout) for q in distinct)), strict=True))

    requests = answers[count_query]
    if isinstance(requests, MetricProviderError):
        return tuple(inconclusive(check, f"request count: {requests}") for check in analysis.metrics)

    def one(check: MetricCheck, plan: tuple[str, str | None] | TemplateError) -> CheckResult:
        if isinstance(plan, TemplateError):
            return inconclusive(check, str(plan))
        value_query, stable_query = plan
        value = answers[value_query]
        stable_value = answers[stable_query] if stable_query is not None else None
        if isinstance(value, MetricProviderError):
            return inconclusive(check, str(value))
        if isinstance(stable_value, MetricProviderError):
            return inconclusive(check, str(stable_value))
        return judge(check, value, stable_value, requests, analysis.min_requests)

    return tuple(one(check, plan) for check, plan in zip(analysis.metrics, plans, strict=True))


async def _ask(provider: MetricProvider, promql: str, timeout: float) -> float | MetricProviderError | None:
    """The provider's answer or its error; a provider that overruns ``timeout`` is not waited for."""
    try:
        return await asyncio.wait_for(provider.query_scalar(promql, timeout), timeout + _GUARD)
    except MetricProviderError as exc:
        return exc
    except TimeoutError:
        return MetricProviderError(f"{provider!r} did not answer within {timeout:g}s")
