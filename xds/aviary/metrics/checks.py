"""One check round: plan every check, ask the providers, let each check judge its answers.

The only I/O on the analysis path; what to ask and how to judge it belongs to the check kinds
(``aviary.metrics.kinds``), the verdicts to pure functions in ``aviary.policy.analysis``. A
provider error never escapes: it becomes an INCONCLUSIVE result carrying the error as reason.
Providers are given per source (``prometheus``, ``web``, ``envoy``); the caller owns their lifecycle.

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
import dataclasses
from collections.abc import Callable, Mapping

from aviary.metrics.kinds import PROMETHEUS, Answer, Ask, Check, RoundContext, checks_of, request_count_ask
from aviary.metrics.provider import MetricProvider, MetricProviderError
from aviary.metrics.templates import Side, TemplateError
from aviary.policy.analysis import CheckOutcome, CheckResult
from aviary.policy.schema import Analysis

Providers = MetricProvider | Mapping[str, MetricProvider]
"""The providers of a round by source; a single provider is the Prometheus one."""

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


async def check_round(providers: Providers, analysis: Analysis, canary: Side | str, stable: Side | str,
                      clock: Callable[[], float], *, since: float | None = None,
                      judge_failed: tuple[tuple[str, str], ...] = ()) -> tuple[float, tuple[CheckResult, ...]]:
    """``run_checks`` stamped with when it started on ``clock``; all INCONCLUSIVE if it ended late.
    ``since``/``judge_failed``: see ``RoundContext`` (what the judge needs of the canary's run)."""
    started = clock()
    results = await run_checks(providers, analysis, canary, stable, since=since, judge_failed=judge_failed)
    took = clock() - started
    limit = late_after(analysis)
    if took > limit:
        reason = (f"round took {took:.1f}s, more than {limit:g}s (was the control plane frozen?): "
                  "its answers are too old to judge")
        results = tuple(dataclasses.replace(result, outcome=CheckOutcome.INCONCLUSIVE, value=None, stable_value=None,
                                            canary_samples=None, stable_samples=None, effect=None,
                                            effect_interval=None, reason=reason, rule=None)
                        for result in results)
    return started, results


async def run_checks(providers: Providers, analysis: Analysis, canary: Side | str, stable: Side | str,
                     checks: tuple[Check, ...] | None = None, *, since: float | None = None,
                     judge_failed: tuple[tuple[str, str], ...] = ()) -> tuple[CheckResult, ...]:
    """Judge every check of ``analysis`` (or ``checks``) for the canary, in order.

    All asks run concurrently, each distinct ask once per round: the canary's request count (for
    minRequests) and what every check planned. Each gets ``query_timeout(analysis.check_every)``
    seconds. ``canary``/``stable`` may be bare cluster names (no version or weight known).
    """
    context = RoundContext(analysis, Side.of(canary), Side.of(stable), since, judge_failed)
    checks = checks_of(analysis) if checks is None else checks
    by_source = providers if isinstance(providers, Mapping) else {PROMETHEUS: providers}
    timeout = query_timeout(analysis.check_every)
    count = request_count_ask(analysis, context.canary.cluster)
    plans: list[tuple[Ask, ...] | TemplateError] = []
    for check in checks:
        try:
            plans.append(check.plan(context))
        except TemplateError as exc:
            plans.append(exc)
    wanted = [count] + [ask for plan in plans if isinstance(plan, tuple) for ask in plan]
    distinct = list(dict.fromkeys(wanted))
    answered = await asyncio.gather(*(_ask(by_source.get(ask.source), ask, timeout) for ask in distinct))
    answers = dict(zip(distinct, answered, strict=True))

    requests = answers[count]
    if isinstance(requests, MetricProviderError):
        return tuple(result for check in checks for result in check.unanswered(f"request count: {requests}"))
    canary_requests = requests if isinstance(requests, float | int) or requests is None else None

    def one(check: Check, plan: tuple[Ask, ...] | TemplateError) -> tuple[CheckResult, ...]:
        if isinstance(plan, TemplateError):
            return check.unanswered(str(plan))
        return check.judge(context, tuple(answers[ask] for ask in plan), canary_requests)

    return tuple(result for check, plan in zip(checks, plans, strict=True) for result in one(check, plan))


async def _ask(provider: MetricProvider | None, ask: Ask, timeout: float) -> Answer:
    """The provider's answer or its error; a provider that overruns ``timeout`` is not waited for."""
    if provider is None:
        return MetricProviderError(f"no {ask.source} provider for this round")
    try:
        if ask.window is None or ask.step is None:
            return await asyncio.wait_for(provider.query_scalar(ask.query, timeout), timeout + _GUARD)
        series = provider.query_series(ask.query, ask.window, ask.step, timeout)
        return await asyncio.wait_for(series, timeout + _GUARD)
    except MetricProviderError as exc:
        return exc
    except TimeoutError:
        return MetricProviderError(f"{provider!r} did not answer within {timeout:g}s")
