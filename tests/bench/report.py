"""The benchmark's results as a markdown table and PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:g}x"


def machine_busy(row: dict[str, Any], cores: int) -> int:
    """Server plus client CPU of a change over what the machine's cores offer during its p50 time.

    Near 100 %, the machine (not one client process, see the busiest client's share) is the limit.
    """
    cpu = float(row["server_cpu_ms_per_change"]) + float(row["client_cpu_ms_per_change"])
    return round(100 * cpu / (cores * max(float(row["change_ms"]["p50"]), 1e-3)))


def markdown(results: dict[str, Any]) -> str:
    """One table row per (N, server) for fan-out; Aviary's rows carry its ratios to both baselines."""
    env = results["environment"]
    lines = [
        f"Load average at start {env['load_average_start']}, at end {env['load_average_end']} "
        f"({env['cores']} cores shared with other work: indicative numbers). Aviary: {env['aviary_mode']}.",
        "",
        "| N | server | served | first route, all (s) | change p50 / p99 / max (ms) | server CPU / change (ms) "
        "| RSS / stream (KB) | client CPU / change (ms), busiest client | machine busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["fanout"]:
        workers = run["workers"]
        bases = ["bare_1"] + ([f"bare_{workers}"] if workers != 1 else [])
        for label in ("aviary", *bases):
            row = run[label]
            change = row["change_ms"]
            lines.append(
                f"| {run['streams']:,} | {label} ({row['processes']} proc) | {row['clients_served']:,} "
                f"| {row['time_to_first_route_all_s']} | {change['p50']} / {change['p99']} / {change['max']} "
                f"| {row['server_cpu_ms_per_change']} | {row['rss_kb_per_stream']} "
                f"| {row['client_cpu_ms_per_change']}, {int(row['client_busiest_process_cpu_share'] * 100)} % "
                f"| {machine_busy(row, env['cores'])} % |"
            )
        for base in bases:
            r = run[f"ratio_to_{base}"]
            lines.append(
                f"| {run['streams']:,} | aviary ÷ {base} | {_ratio(r['clients_served'])} "
                f"| {_ratio(r['time_to_first_route_all'])} | {_ratio(r['change_p50'])} / {_ratio(r['change_p99'])} "
                f"/ {_ratio(r['change_max'])} | {_ratio(r['server_cpu_per_change'])} "
                f"| {_ratio(r['rss_per_stream'])} | | |"
            )
    lines += delta_rows(results.get("fanout_delta", []), env["cores"])
    lines += ["", "| Real Envoy: RDS push → ACK | p50 (ms) | p99 (ms) | max (ms) |", "|---|---|---|---|"]
    for run in results["envoy_push_ack"]:
        lines.append(f"| {run['envoys']} Envoy(s), {run['pushes']} pushes | {run['p50_ms']} | {run['p99_ms']} "
                     f"| {run['max_ms']} |")  # fmt: skip
    lines.append("")
    for engine in filter(None, (results.get("engine"), results.get("engine_every_second"))):
        phases = engine.get("phases_after_window")
        lines.append(
            f"Engine: {engine['rollouts_under_analysis']:,} rollouts under analysis "
            f"(checkEvery {engine.get('check_every_s', 1)}s, stub Prometheus, "
            f"{engine['prometheus_queries_per_s']} queries/s"
            + (f", {engine['check_rounds_per_s']} of {engine['check_rounds_per_s_wanted']:,} check rounds/s wanted"
               if "check_rounds_per_s" in engine else "")
            + f"): {engine['engine_cpu_s_per_10s']} CPU s per 10 s ({engine['engine_cpu_cores']} core"
            + (f", {per_round} ms per round" if (per_round := engine.get("engine_cpu_ms_per_check_round")) else "")
            + (f"; phases after the window: {phases}" if phases else "")
            + "); failing answer → rollback push "
            + (
                f"{engine['failing_answer_to_rollback_push_ms']} ms."
                if engine.get("failing_answer_to_rollback_push_ms") is not None
                else f"not measured ({engine.get('rollback_error', 'no push')})."
            )
        )
    reaction = results.get("reaction")
    if reaction:
        rb = reaction["rollback_first_5xx_to_envoy_0_s"]
        lines.append(
            f"Rollback through real Envoy and Prometheus (1 s scrape, checkEvery 1s): first 5xx → 0 % at Envoy "
            f"p50 {rb['median']} s over {rb['runs']} runs ({rb['min']} to {rb['max']} s)."
        )
    detection = results.get("detection")
    if detection:
        by = detection["first_5xx_to_envoy_0_s"]
        prom, envoy = by["prometheus"], by["envoy"]
        lines.append(
            f"First failed request → 0 % at Envoy, same Envoy, alternating runs: Prometheus provider p50 "
            f"{prom['p50']} s ({prom['min']} to {prom['max']} s), Envoy provider p50 {envoy['p50']} s "
            f"({envoy['min']} to {envoy['max']} s), {prom['runs']} runs each."
        )
    reports = results.get("envoy_reports")
    for run in reports["runs"] if reports else ():
        lines.append(
            f"Envoy reports, {run['proxies']} proxies flushing every second, --xds-workers {run['xds_workers']}: "
            f"control plane {run['control_plane_cores']} cores, RSS {run['control_plane_rss_mb']} MB "
            f"({run['control_plane_rss_idle_mb']} MB idle), {run['reports_per_s']} reports/s taken in; "
            f"senders {run['senders_cores']} cores."
        )
    return "\n".join(lines) + "\n"


def delta_rows(runs: list[dict[str, Any]], cores: int) -> list[str]:
    """SotW against delta: one row per (N, change kind, protocol), then delta ÷ SotW."""
    if not runs:
        return []
    lines = [
        "",
        "| N | change | protocol | bytes / stream | change p50 / p99 / max (ms) | server CPU / change (ms) "
        "| client CPU / change (ms), busiest client | machine busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for kind in ("weight", "new canary"):
            for protocol in ("sotw", "delta"):
                row = run[protocol][kind]
                change = row["change_ms"]
                lines.append(
                    f"| {run['streams']:,} | {kind} x{row['changes']} | {protocol} | {row['bytes_per_stream']:,} "
                    f"| {change['p50']} / {change['p99']} / {change['max']} | {row['server_cpu_ms_per_change']} "
                    f"| {row['client_cpu_ms_per_change']}, {int(row['client_busiest_process_cpu_share'] * 100)} % "
                    f"| {machine_busy(row, cores)} % |"
                )
            r = run["delta_over_sotw"][kind]
            lines.append(
                f"| {run['streams']:,} | {kind} | delta ÷ sotw | {_ratio(r['bytes_per_stream'])} "
                f"| {_ratio(r['change_p50'])} / {_ratio(r['change_p99'])} | {_ratio(r['server_cpu_per_change'])} "
                "| | |"
            )
    return lines


def plots(results: dict[str, Any], out: Path, prefix: str = "") -> list[Path]:
    """Change time and RSS per stream against N, one line per server kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["fanout"]
    if not runs:
        return []
    out.mkdir(parents=True, exist_ok=True)
    workers = runs[0]["workers"]
    labels = ["aviary", "bare_1"] + ([f"bare_{workers}"] if workers != 1 else [])
    xs = [run["streams"] for run in runs]
    written = []
    for name, title, pick in (
        ("fanout_time.png", "weight change → all streams (ms)",
         lambda row: (row["change_ms"]["p50"], row["change_ms"]["p99"])),
        ("fanout_memory.png", "server RSS per stream (KB)", lambda row: (row["rss_kb_per_stream"], None)),
        ("fanout_first_route.png", "time to first route, all streams (s)",
         lambda row: (row["time_to_first_route_all_s"], None)),
    ):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in labels:
            values = [pick(run[label]) for run in runs]
            line = ax.plot(xs, [v[0] for v in values], marker="o", label=f"{label} p50" if values[0][1] else label)
            if values[0][1] is not None:
                ax.plot(xs, [float(v[1] or 0) for v in values], marker="x", linestyle="--", color=line[0].get_color(),
                        label=f"{label} p99")  # fmt: skip
        ax.set_xlabel("N (ADS streams)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{prefix}{name}", dpi=100)
        plt.close(fig)
        written.append(out / f"{prefix}{name}")
    return written
