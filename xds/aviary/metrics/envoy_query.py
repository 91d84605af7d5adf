"""What a check asks the ``envoy`` provider: a built-in template, one cluster, one window.

For ``analysis.provider: envoy`` there is no query language: an ``Ask``'s query is this key,
written as text so that it reads like the PromQL it replaces in status and logs
(``request-success-rate{cluster="shop-v2"}[30s]``) and parsed back by the provider
(``aviary.metrics.envoy``). ``request-count`` is the request count minRequests needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aviary.metrics.templates import Side, TemplateError, promql_duration
from aviary.policy.duration import parse_duration
from aviary.policy.schema import ENVOY_TEMPLATES

__all__ = ["REQUEST_COUNT", "TEMPLATES", "EnvoyQuery", "parse"]

REQUEST_COUNT = "request-count"
TEMPLATES = (*ENVOY_TEMPLATES, REQUEST_COUNT)
_TEXT = re.compile(r'^(?P<template>[a-z0-9-]+)\{cluster="(?P<cluster>[^"]+)"(?:,weight="(?P<weight>\d+)")?\}'
                   r"\[(?P<window>[0-9a-z]+)\]$")


@dataclass(frozen=True, slots=True)
class EnvoyQuery:
    """``template`` of ``cluster`` over the last ``window`` seconds (``weight``: its percent of the split)."""

    template: str
    cluster: str
    window: float
    weight: int | None = None

    @classmethod
    def of(cls, template: str, side: Side, window: float) -> EnvoyQuery:
        """The query of a template for one side; ``TemplateError`` for what the provider cannot answer."""
        if template not in TEMPLATES:
            raise TemplateError(f"template {template} is not answered by the envoy provider "
                                f"(it answers {', '.join(ENVOY_TEMPLATES)})")
        if template == "request-rate-per-weight":
            if side.weight is None:
                raise TemplateError(f"template {template}: the weight of {side.cluster} is not known")
            if side.weight <= 0:
                raise TemplateError(f"template {template}: {side.cluster} has weight 0, nothing to divide by")
            return cls(template, side.cluster, window, side.weight)
        return cls(template, side.cluster, window)

    def text(self) -> str:
        weight = f',weight="{self.weight}"' if self.weight is not None else ""
        return f'{self.template}{{cluster="{self.cluster}"{weight}}}[{promql_duration(self.window)}]'


def parse(text: str) -> EnvoyQuery:
    """The query ``EnvoyQuery.text`` wrote; ``ValueError`` for anything else."""
    match = _TEXT.match(text)
    if match is None or match["template"] not in TEMPLATES:
        raise ValueError(f"not a query of the envoy provider: {text!r}")
    weight = int(match["weight"]) if match["weight"] is not None else None
    return EnvoyQuery(match["template"], match["cluster"], parse_duration(match["window"]), weight)
