"""One check round: ask the metric provider, judge every metric of the analysis.

The only I/O on the analysis path; the verdicts come from ``aviary.policy.analysis.judge``. A
provider error never escapes: it becomes an INCONCLUSIVE result carrying the error as reason.
"""

from __future__ import annotations

import asyncio

from aviary.metrics.provider import MetricProvider, MetricProviderError
from aviary.metrics.templates import TemplateError, render, request_count_query, template_query
from aviary.policy.analysis import CheckResult, inconclusive, judge
from aviary.policy.schema import Analysis, MetricCheck

__all__ = ["run_checks"]


async def run_checks(provider: MetricProvider, analysis: Analysis, canary_cluster: str,
                     stable_cluster: str) -> tuple[CheckResult, ...]:
    """Judge every metric of ``analysis`` for the canary; one result per metric, in order.

    Queries run concurrently: the canary's request count (for minRequests), each metric, and the
    stable's value for ``maxDecreaseFromStable``.
    """
    window = analysis.window
    try:
        requests = await provider.query_scalar(request_count_query(canary_cluster, window))
    except MetricProviderError as exc:
        return tuple(inconclusive(check, f"request count: {exc}") for check in analysis.metrics)

    async def one(check: MetricCheck) -> CheckResult:
        try:
            value_query = render(check, canary_cluster, stable_cluster, window)
            stable_query = (template_query(check.template, stable_cluster, window)
                            if check.template is not None and check.max_decrease_from_stable is not None
                            else None)
        except TemplateError as exc:
            return inconclusive(check, str(exc))
        try:
            if stable_query is None:
                value, stable_value = await provider.query_scalar(value_query), None
            else:
                value, stable_value = await asyncio.gather(provider.query_scalar(value_query),
                                                           provider.query_scalar(stable_query))
        except MetricProviderError as exc:
            return inconclusive(check, str(exc))
        return judge(check, value, stable_value, requests, analysis.min_requests)

    return tuple(await asyncio.gather(*(one(check) for check in analysis.metrics)))
