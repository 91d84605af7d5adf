"""How admin API answers look on a terminal (rich) and in scripts (JSON). No I/O, no gRPC."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from aviary.admin.v1 import admin_pb2 as pb
from aviary.metrics.envoy import REPORT_GRACE
from aviary.policy.rollout_state import traffic_text

__all__ = [
    "apply_event",
    "as_json",
    "checks_summary",
    "event_line",
    "guard_text",
    "health_line",
    "proxies_table",
    "reports_line",
    "resume_hint",
    "rollout_detail",
    "rollout_line",
    "rollouts_table",
    "watch_view",
]

_PHASE_STYLE = {
    "Stable": "green",
    "Progressing": "cyan",
    "Paused": "yellow",
    "Promoting": "blue",
    "Guarding": "magenta",
    "RolledBack": "red",
}
_OUTCOME_MARK = {"Pass": "[green]✓[/]", "Fail": "[red]✗[/]", "Inconclusive": "[yellow]?[/]"}


def to_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def as_json(value: Message | Iterable[Message]) -> str:
    """One message as an object, several as a list; field names as in admin.proto."""
    if isinstance(value, Message):
        return json.dumps(to_dict(value), sort_keys=True)
    return json.dumps([to_dict(m) for m in value], sort_keys=True)


def _number(value: float) -> str:
    return f"{value:.4g}"


def _phase(phase: str) -> Text:
    return Text(phase, style=_PHASE_STYLE.get(phase, ""))


def _step(rollout: pb.Rollout | pb.RolloutEvent, steps: int) -> str:
    if not rollout.canary_version or not steps or not rollout.HasField("step"):
        return "-"
    return f"{min(rollout.step, steps)}/{steps}"


def _weight(rollout: pb.Rollout | pb.RolloutEvent) -> str:
    return f"{rollout.weight}%" if rollout.canary_version else "-"


def _time_left(seconds: float) -> str:
    """``12m 40s``, ``1h 5m``, ``40s``: whole seconds, rounded up (a window is never over early)."""
    whole = max(0, math.ceil(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h"] if hours else []
    parts += [f"{minutes}m"] if minutes else []
    parts += [f"{secs}s"] if secs or not parts else []
    return " ".join(parts[:2])


def guard_text(r: pb.Rollout) -> str:
    """The afterPromotion window in one phrase: ``v2 promoted; v1 kept warm for 12m 40s more``;
    "" outside it. What the window waits for when its time alone does not end it."""
    if not r.kept_version:
        return ""
    head = f"{r.canary_version} promoted; {r.kept_version} kept warm"
    if not r.HasField("keep_seconds_left"):
        return f"{head} (the window waits for every proxy to ACK 100% again)"
    if r.keep_seconds_left <= 0:
        return f"{head} until a check round passes"
    return f"{head} for {_time_left(r.keep_seconds_left)} more"


def checks_summary(checks: Iterable[pb.CheckResult]) -> str:
    """``success=99.5 ✓  latency=120 ✗`` (rich markup); "-" for none."""
    parts = []
    for check in checks:
        value = _number(check.value) if check.HasField("value") else "n/a"
        parts.append(f"{check.name}={value} {_OUTCOME_MARK.get(check.outcome, check.outcome)}")
    return "  ".join(parts) or "-"


def rollouts_table(rollouts: Iterable[pb.Rollout]) -> Table:
    table = Table("ROLLOUT", "PHASE", "STABLE", "CANARY", "WEIGHT", "STEP", "LAST CHECK", box=None, pad_edge=False)
    for r in rollouts:
        canary = r.canary_version or (f"[red]{r.failed_version} (failed)[/]" if r.failed_version else "-")
        stable = f"{r.stable_version} (warm)" if r.kept_version else r.stable_version
        table.add_row(r.name, _phase(r.phase), stable, canary, _weight(r), _step(r, r.steps),
                      checks_summary(r.checks))
    return table


def _measured(check: pb.CheckResult, value: str, samples: str, missing: str) -> str:
    """A check's value (``12.5``), with its sample count when a kind compared series (``12.5 (n=40)``)."""
    text = _number(getattr(check, value)) if check.HasField(value) else missing
    if check.HasField(samples):
        count = f"n={getattr(check, samples)}"
        return f"{text} ({count})" if text != missing else count
    return text


def _thresholds(check: pb.CheckResult) -> str:
    if check.HasField("effect"):
        interval = (f" [{_number(check.effect_low)}, {_number(check.effect_high)}]"
                    if check.HasField("effect_low") and check.HasField("effect_high") else "")
        return f"effect {_number(check.effect)}{interval}"
    if check.compare_by:
        bounds = [f">= {_number(check.min)}" if check.HasField("min") else "",
                  f"<= {_number(check.max)}" if check.HasField("max") else ""]
        what = "canary / stable" if check.compare_by == "ratio" else "canary - stable"
        return f"{what} {', '.join(bound for bound in bounds if bound)}"
    limits = []
    if check.HasField("min"):
        limits.append(f"min {_number(check.min)}")
    if check.HasField("max"):
        limits.append(f"max {_number(check.max)}")
    if check.HasField("max_decrease_from_stable"):
        limits.append(f"max decrease from stable {_number(check.max_decrease_from_stable)}")
    return ", ".join(limits) or "-"


def event_line(event: pb.RolloutEvent) -> str:
    when = event.time.ToDatetime(tzinfo=UTC).astimezone().strftime("%H:%M:%S")
    source = event.from_phase or "-"
    traffic = traffic_text(event.canary_version, event.weight, event.stable_version, event.cohorts, event.mirror)
    return f"{when} {event.rollout}: {source} -> {event.to_phase}, {traffic}: {event.reason}"


def rollout_detail(r: pb.Rollout) -> Group:
    parts: list[RenderableType] = [rollouts_table([r])]
    facts = Table.grid(padding=(0, 2))
    facts.add_row("reason", r.reason or "-")
    if r.kept_version:
        window = f" (afterPromotion keep {_time_left(r.keep_seconds)})" if r.keep_seconds else ""
        facts.add_row(Text("after promotion", style="bold magenta"), guard_text(r) + window)
    envoy = envoy_lag(r)
    if envoy:
        facts.add_row(Text("at envoy", style="bold yellow"), Text(envoy, style="yellow"))
    if r.envoy_rejected:
        facts.add_row(Text("envoy rejected", style="bold red"), Text(r.envoy_rejected, style="red"))
    if r.canary_version:
        acked = f"{r.acked_weight}%" if r.HasField("acked_weight") else "not yet"
        facts.add_row("acked weight", acked)
        facts.add_row("cohorts", ", ".join(r.cohorts) or "none open")
        facts.add_row("sticky by", r.stickiness or "nothing (each request split on its own)")
        if list(r.cohorts) != list(r.acked_cohorts):
            facts.add_row("acked cohorts", ", ".join(r.acked_cohorts) or "none")
        facts.add_row("mirror", f"{r.mirror}% of the split copied to {r.canary_version}" if r.mirror else "off")
        if r.HasField("acked_mirror") and r.acked_mirror != r.mirror:
            facts.add_row("acked mirror", f"{r.acked_mirror}%" if r.acked_mirror else "off")
        facts.add_row("time in step", f"{r.seconds_in_step:.0f}s" if r.seconds_in_step else "not started")
        short = next((c for c in r.checks if c.rule == "min-samples" and not c.shown_only), None)
        if short is not None:  # the judge holds the step until every metric has its minSamples
            facts.add_row(Text("samples", style="bold yellow"), Text(short.reason.split(";")[0], style="yellow"))
    if r.plan:
        facts.add_row("plan", f"{r.plan} ({r.stage or 'stage unknown'})")
    for override in r.overrides:
        facts.add_row("override", f"{override.kind}: {override.detail}")
    if r.failed_version:
        facts.add_row("failed version", r.failed_version)
    if r.git_commit:
        facts.add_row("git commit", r.git_commit)
    if r.orphaned:
        facts.add_row("orphaned", "its policy file is gone; it keeps serving")
    if r.state_error:
        facts.add_row(Text("not saved", style="bold red"), Text(f"{r.state_error} (retrying)", style="red"))
    if r.engine_error:
        facts.add_row(Text("engine error", style="bold red"), Text(r.engine_error, style="red"))
    parts += [Text(""), facts]
    if r.checks:
        checks = Table("CHECK", "KIND", "OUTCOME", "VALUE", "STABLE", "THRESHOLDS", "REASON", box=None, pad_edge=False)
        for c in r.checks:
            checks.add_row(c.name, c.kind or "threshold", _outcome(c),
                           _measured(c, "value", "canary_samples", "n/a"),
                           _measured(c, "stable_value", "stable_samples", "-"), _thresholds(c), c.reason)
        parts += [Text(""), checks]
        sides = ("canary", "stable")
        queries = [(c.name, sides[i] if i < len(sides) else f"#{i + 1}", query)
                   for c in r.checks for i, query in enumerate(c.queries)]
        if queries:
            shown = Table.grid(padding=(0, 2))
            for name, side, query in queries:
                shown.add_row(name, side, Text(query, style="dim"))
            parts += [Text(""), Text("queries", style="bold"), shown]
    if r.events:
        parts += [Text(""), Text("recent events", style="bold")]
        parts += [Text(event_line(e)) for e in r.events[-10:]]
    return Group(*parts)


def _when(stamp: Any) -> str:
    return str(stamp.ToDatetime(tzinfo=UTC).astimezone().strftime("%H:%M:%S"))


def _short(query: str, width: int = 60) -> str:
    return query if len(query) <= width else query[: width - 1] + "…"


def _outcome(check: pb.CheckResult) -> str:
    rule = escape(f" [{check.rule}]") if check.rule else ""  # not rich markup
    counted = " (shown)" if check.shown_only else ""
    return f"{_OUTCOME_MARK.get(check.outcome, '')} {check.outcome}{rule}{counted}"


def explanation(e: pb.Explanation) -> Group:
    """``aviary explain NAME``: the decision history, one table row per check of every round (with
    the round's time, step, weight and outcome on its first row, and the transitions it caused),
    then the transitions kept. ``-o json`` carries the same, queries in full."""
    parts: list[RenderableType] = [Text(f"rollout {e.name}: {len(e.rounds)} check rounds", style="bold")]
    table = Table("TIME", "CANARY", "STEP", "WEIGHT", "ROUND", "CHECK", "KIND", "QUERY (canary)", "CANARY VALUE",
                  "STABLE VALUE", "EFFECT [INTERVAL]", "OUTCOME [RULE]", "REASON", box=None, pad_edge=False)
    for r in e.rounds:
        first = True
        for c in r.checks:
            head = ((_when(r.time), r.canary_version, str(r.step), f"{r.weight}%",
                     f"{_OUTCOME_MARK.get(r.outcome, '')} {r.outcome}") if first else ("", "", "", "", ""))
            first = False
            table.add_row(*head, c.name, c.kind or "threshold", Text(_short(c.queries[0]) if c.queries else "-",
                                                                     style="dim"),
                          _measured(c, "value", "canary_samples", "n/a"),
                          _measured(c, "stable_value", "stable_samples", "-"),
                          _thresholds(c) if c.HasField("effect") else "-", _outcome(c), c.reason)
        for transition in r.transitions:
            table.add_row("", "", "", "", "", Text("->", style="bold"), "", "", "", "", "", "",
                          Text(transition, style="bold"))
    parts += [table]
    if e.events:
        parts += [Text(""), Text("transitions", style="bold")]
        parts += [Text(event_line(event)) for event in e.events]
    return Group(*parts)


def envoy_lag(r: pb.Rollout) -> str:
    """What status says versus what the proxies ACKed, when they differ: status follows Envoy."""
    if r.canary_version and r.HasField("acked_weight") and r.acked_weight != r.weight:
        return f"weight {r.weight} % desired, Envoy still at {r.acked_weight} % (waiting for ACK)"
    if not r.canary_version and r.failed_version and r.acked_weight > 0:
        return (f"rolling back: weight 0 % desired, Envoy still at {r.acked_weight} % on {r.failed_version} "
                "(waiting for ACK)")
    return ""


def _sticky(r: pb.Rollout) -> str:
    return f", sticky by {r.stickiness}" if r.canary_version and r.stickiness else ""


def rollout_line(r: pb.Rollout) -> str:
    traffic = traffic_text(r.canary_version, r.weight, r.stable_version, r.cohorts, r.mirror)
    canary = f", {traffic}" if r.canary_version else ""
    canary += _sticky(r)
    line = f"{r.name}: {r.phase}, stable {r.stable_version}{canary}: {r.reason}"
    if r.kept_version:
        line = f"{r.name}: {r.phase}, {guard_text(r)}: {r.reason}"
    if envoy_lag(r):
        line += f" ({envoy_lag(r)})"
    if r.envoy_rejected:
        line += f" ({r.envoy_rejected})"
    if r.state_error:
        line += f" (NOT SAVED yet, retrying: {r.state_error})"
    return line


def resume_hint(r: pb.Rollout) -> str | None:
    """After set-weight: what ``aviary resume`` will do (the step's own weight, not the manual one)."""
    if not r.canary_version or not r.HasField("step") or not r.HasField("step_weight"):
        return None
    return f"automation paused; `aviary resume` returns to step {r.step}'s weight {r.step_weight}%"


def health_line(health: pb.ControlPlaneHealth) -> Text | None:
    """What keeps the control plane from working, in bold red, for the top of ``aviary status``;
    None when nothing does."""
    if health.serving and not health.state_error and not health.problems:
        return None
    if health.state_error:
        text = Text(f"STATE NOT SAVED: {health.state_error}; rollbacks still reach the proxies, "
                    "steps away from stable wait until it can be written", style="bold red")
    elif not health.serving:
        text = Text("ENGINE NOT SERVING: rollouts do not progress", style="bold red")
    else:
        text = Text("engine problems:", style="bold red")
    for problem in health.problems:
        text.append(f"\n  {problem}", style="red")
    return text


def proxies_table(proxies: Iterable[pb.Proxy]) -> Table:
    proxies = list(proxies)
    workers = any(p.xds_worker for p in proxies)  # a WORKER column with --xds-workers N > 1 only
    reporting = any(p.HasField("metrics_reported") or p.HasField("access_log_reported") for p in proxies)
    columns = ("NODE", "CLUSTER", "PEER", *(("WORKER",) if workers else ()), "CONNECTED", "ACKED", "LAST NACK",
               *(("REPORTS",) if reporting else ()))  # with analysis.provider: envoy (aviary.metrics.envoy)
    table = Table(*columns, box=None, pad_edge=False)
    now = time.time()
    for p in proxies:
        acked = ", ".join(f"{a.type_url.rsplit('.', 1)[-1]}={a.version}" for a in p.acked) or "-"
        nack = f"{p.last_nack.type_url.rsplit('.', 1)[-1]}: {p.last_nack.message}" if p.HasField("last_nack") else "-"
        since = p.connected_since.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        worker = (str(p.xds_worker),) if workers else ()
        reports = (_reports(p, now),) if reporting else ()
        table.add_row(p.node_id, p.node_cluster, p.peer, *worker, since, acked, nack, *reports)
    return table


def reports_line(proxies: Iterable[pb.Proxy], now: float | None = None) -> Text | None:
    """``Envoy reports: 1 of 2 proxies (not reporting: envoy-2)``: which proxies send their stats to
    Aviary (the ``envoy`` provider reads them); None while none ever did (no sink anywhere)."""
    proxies = list(proxies)
    if not any(p.HasField("metrics_reported") for p in proxies):
        return None
    now = time.time() if now is None else now
    silent = sorted({p.node_id for p in proxies if not p.HasField("metrics_reported")
                     or now - p.metrics_reported.ToMicroseconds() / 1e6 > REPORT_GRACE})
    nodes = {p.node_id for p in proxies}
    text = Text(f"Envoy reports: {len(nodes) - len(silent)} of {len(nodes)} proxies")
    if silent:
        text.append(f" (not reporting: {', '.join(silent)})", style="yellow")
    return text


def _reports(proxy: pb.Proxy, now: float) -> str:
    """``metrics 0.4s ago, access logs 1.2s ago``, or ``none`` for a proxy that never reported."""
    parts = [f"{what} {max(0.0, now - stamp.ToMicroseconds() / 1e6):.1f}s ago"
             for what, stamp, present in (("metrics", proxy.metrics_reported, proxy.HasField("metrics_reported")),
                                          ("access logs", proxy.access_log_reported,
                                           proxy.HasField("access_log_reported")))
             if present]
    return ", ".join(parts) or "none"


def watch_view(rollouts: Mapping[str, pb.Rollout], recent: Sequence[pb.RolloutEvent]) -> Group:
    """One bar per rollout (canary weight, step, check values), then the latest transitions."""
    grid = Table.grid(padding=(0, 1))
    for name in sorted(rollouts):
        r = rollouts[name]
        bar = ProgressBar(total=100, completed=r.weight if r.canary_version else 0, width=30)
        opened = f"cohorts {', '.join(r.cohorts)}" if r.canary_version and r.cohorts else ""
        sticky = f"sticky by {r.stickiness}" if r.canary_version and r.stickiness else ""
        where = guard_text(r).split("; ", 1)[-1] if r.kept_version else f"step {_step(r, r.steps)}"
        if r.canary_version and r.mirror:
            opened = f"{opened}, mirror {r.mirror}%" if opened else f"mirror {r.mirror}%"
        grid.add_row(Text(name, style="bold"), _phase(r.phase), bar, _weight(r).rjust(4),
                     where, checks_summary(r.checks), "  ".join(t for t in (opened, sticky) if t))
    if not rollouts:
        grid.add_row("no rollouts yet")
    lines = [Text(event_line(event), style="dim") for event in recent]
    return Group(grid, *([Text(""), *lines] if lines else []))


def apply_event(rollout: pb.Rollout | None, event: pb.RolloutEvent) -> pb.Rollout:
    """``rollout`` as ``event`` left it (a new message; fields the event does not carry are kept)."""
    updated = pb.Rollout()
    if rollout is not None:
        updated.CopyFrom(rollout)
    updated.name = event.rollout
    updated.phase = event.to_phase
    updated.weight = event.weight
    if event.HasField("step"):
        updated.step = event.step
    else:
        updated.ClearField("step")
    updated.stable_version = event.stable_version
    updated.canary_version = event.canary_version
    updated.reason = event.reason
    # The window's time left is not in an event: unknown until the listing is read again.
    updated.kept_version = event.stable_version if event.to_phase == "Guarding" else ""
    updated.ClearField("keep_seconds_left")
    if event.to_phase != "Guarding":
        updated.keep_seconds = 0.0
    del updated.cohorts[:]
    updated.cohorts.extend(event.cohorts)
    if not event.canary_version:
        updated.stickiness = ""  # no canary: nothing is split, nobody is kept anywhere
    updated.mirror = event.mirror
    if event.checks:
        del updated.checks[:]
        updated.checks.extend(event.checks)
    return updated


def policy_summary(policy: pb.PolicySource) -> Text:
    """Where policies come from; a refused commit or file in red, with file, field and reason."""
    text = Text(f"policies: {policy.source or '-'}")
    if policy.applied_commit:
        text.append(f"  applied commit {policy.applied_commit[:12]}")
    if policy.rejected_commit:
        refused = f"\nrejected commit {policy.rejected_commit[:12]} (the applied one keeps serving):"
        text.append(refused, style="bold red")
    elif policy.errors:
        text.append("\nrejected files (their last good version keeps serving):", style="bold red")
    for error in policy.errors:
        text.append(f"\n  {error.file}: {error.field}: {error.reason}", style="red")
    if policy.fetch_error:
        text.append(f"\n{fetch_failure_line(policy.fetch_error)}", style="bold red")
    return text


_FETCH_SINCE = re.compile(r"^since (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ): (.*)$", re.DOTALL)


def fetch_failure_line(fetch_error: str) -> str:
    """``git fetch failing since 16:02:11: <error>`` (local time) from ``PolicySource.fetch_error``."""
    match = _FETCH_SINCE.match(fetch_error)
    if match is None:
        return f"git fetch failing: {fetch_error}"
    since = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).astimezone()
    return f"git fetch failing since {since.strftime('%H:%M:%S')}: {match.group(2)}"
