"""The statistical judge by simulation: false rollbacks under continuous monitoring, and detection speed.

    python -m tests.bench.judge_simulation [--runs 1000] [--runs-3 500] [--seed 1] [--quick] [--extra-runs 3000]

Both boundaries of ``aviary.policy.sequential`` side by side: the horizon boundary (the judge's
default when the canary's planned length is known; ``horizon N`` below is in samples per side) and
the normal mixture (no horizon). Every simulated canary is judged by ``aviary.policy.judge.judge``
itself, once per round, on the cumulative samples (``--batch`` new samples per side per round), as
the check pipeline would call it:

- A/A: canary and stable draw from the same log-normal latency distribution for ``--rounds``
  rounds; a run is "wrongly rolled back" when any round FAILs (``failureLimit: 0``, the default).
  Reported with a binomial upper confidence bound, next to what a fixed-horizon one-sided
  Mann-Whitney test at 5 % repeated every round would have done (the peeking problem);
- detection: the canary is 30 % slower (every latency x 1.3). The number of samples per side at
  the first failing round, against the samples a single fixed-horizon one-sided Mann-Whitney test
  at the same alpha needs for the same power (simulated with scipy, and Noether's formula).

Not a pass/fail test (tests/unit/test_judge.py runs a light A/A version with an assertion).
Prints a table and writes tests/bench/judge_results.json (``--quick``: tests/bench/out/, ignored by git).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from aviary.policy.analysis import CheckOutcome
from aviary.policy.judge import Allowed, Direction, JudgeConfig, JudgeMetric, JudgeState, MetricSamples, judge

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SIGMA = 0.5  # log-sd of the latencies: a p99 about 3.2x the median
SLOWER = 1.3


def latency_config(alpha: float = 0.05, allowed: str = "0", horizon: int | None = None) -> JudgeConfig:
    return JudgeConfig((JudgeMetric("latency", Direction.INCREASE, Allowed.parse(allowed), critical=True),),
                       alpha=alpha, horizon=horizon)


def spec_config(alpha: float = 0.05, horizon: int | None = None) -> JudgeConfig:
    """The issue's example: latency (critical, 10 %), errors, orders (decrease), score bands 95/75."""
    return JudgeConfig((
        JudgeMetric("latency", Direction.INCREASE, Allowed.parse("10%"), critical=True),
        JudgeMetric("errors", Direction.INCREASE),
        JudgeMetric("orders", Direction.DECREASE, must_have_data=True),
    ), alpha=alpha, horizon=horizon)


def _draw(rng: np.random.Generator, name: str, size: int, factor: float) -> list[float]:
    if name == "errors":  # a 5xx ratio per scrape: mostly exactly 0 (ties), sometimes a few errors
        return list(rng.binomial(200, 0.002, size) / 200.0)
    if name == "orders":  # orders per scrape: counts, many ties
        return list(rng.poisson(20.0, size).astype(float))
    return list(rng.lognormal(0.0, SIGMA, size) * factor)


@dataclass
class Run:
    failed_at: int | None  # samples per side at the first failing round, None: never failed
    naive_failed: bool  # a fixed-horizon 5 % one-sided Mann-Whitney test, repeated every round, fired


def simulate(config: JudgeConfig, rng: np.random.Generator, rounds: int, batch: int, slower: float = 1.0,
             stop_on_fail: bool = True) -> Run:
    """One canary judged every round; ``slower`` multiplies the canary's latencies."""
    canary: dict[str, list[float]] = {m.name: [] for m in config.metrics}
    stable: dict[str, list[float]] = {m.name: [] for m in config.metrics}
    state = JudgeState()
    failed_at: int | None = None
    naive = False
    for round_ in range(1, rounds + 1):
        for name in canary:
            canary[name] += _draw(rng, name, batch, slower)
            stable[name] += _draw(rng, name, batch, 1.0)
        samples = {name: MetricSamples(canary[name], stable[name]) for name in canary}
        verdict, state = judge(state, samples, config)
        naive = naive or any(m.stats is not None and m.stats.z >= 1.6448536269514722 for m in verdict.metrics)
        if verdict.outcome is CheckOutcome.FAIL and failed_at is None:
            failed_at = round_ * batch
            if stop_on_fail:
                break
    return Run(failed_at, naive)


def upper_bound(failures: int, runs: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a rate from ``failures`` in ``runs``."""
    if failures >= runs:
        return 1.0
    return float(scipy_stats.beta.ppf(confidence, failures + 1, runs - failures))


def brownian_crossing(alpha: float, horizon: int, first: int, batch: int, last: int, seed: int,
                      reps: int = 200_000) -> float:
    """What the horizon boundary's chance of a false alarm would be if the rank statistic were exactly
    Brownian motion, looked at on the simulation's schedule (every ``batch`` samples from the first
    judged round to ``last``; past the horizon the look repeats): the reference for the A/A rates."""
    rng = np.random.default_rng(seed)
    c = float(scipy_stats.norm.ppf(1 - alpha / 2))
    looks = [n for n in range(batch, last + 1, batch) if n >= first]
    looks = sorted({min(n, horizon) for n in looks})
    score = np.zeros(reps)
    crossed = np.zeros(reps, dtype=bool)
    previous = 0
    for n in looks:  # S = z sqrt(I), I = n / 2 with n a side: independent normal increments
        score += rng.normal(0.0, math.sqrt((n - previous) / 2.0), reps)
        previous = n
        crossed |= score >= c * math.sqrt(horizon / 2.0)
    return float(crossed.mean())


def a_a(config: JudgeConfig, runs: int, rounds: int, batch: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    started = time.process_time()
    results = [simulate(config, rng, rounds, batch, stop_on_fail=False) for _ in range(runs)]
    wrong = sum(r.failed_at is not None for r in results)
    naive = sum(r.naive_failed for r in results)
    return {
        "runs": runs, "rounds": rounds, "batch": batch, "max_samples_per_side": rounds * batch,
        "metrics": [m.name for m in config.metrics], "alpha": config.alpha, "horizon": config.horizon,
        "wrongly_rolled_back": wrong, "rate": wrong / runs, "rate_upper_95": upper_bound(wrong, runs),
        "naive_repeated_fixed_test_rate": naive / runs,
        "cpu_seconds": round(time.process_time() - started, 1),
        "brownian_motion_rate": (
            round(brownian_crossing(config.metric_alpha, config.horizon, config.min_samples, batch, rounds * batch,
                                    seed), 4) if config.horizon is not None and len(config.metrics) == 1 else None),
    }


def fixed_horizon_power(n: int, alpha: float, reps: int, rng: np.random.Generator, allowed: float = 0.0) -> float:
    """Power of one one-sided Mann-Whitney test after n samples per side (canary 30 % slower)."""
    canary = rng.lognormal(0.0, SIGMA, (reps, n)) * SLOWER
    stable = rng.lognormal(0.0, SIGMA, (reps, n))
    shift = allowed * np.median(stable, axis=1, keepdims=True)
    p = scipy_stats.mannwhitneyu(canary - shift, stable, alternative="greater", axis=1, method="asymptotic").pvalue
    return float(np.mean(p < alpha))


@functools.lru_cache(maxsize=64)
def fixed_horizon_n(power: float, alpha: float, reps: int, seed: int, allowed: float = 0.0) -> int:
    """Smallest n per side (simulated) where the fixed-horizon test reaches ``power``."""
    low, high = 2, 4
    while fixed_horizon_power(high, alpha, reps, np.random.default_rng(seed), allowed) < power:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if fixed_horizon_power(middle, alpha, reps, np.random.default_rng(seed), allowed) >= power:
            high = middle
        else:
            low = middle
    return high


def noether_n(power: float, alpha: float) -> int:
    """Noether's (1987) sample size per side for a one-sided Mann-Whitney test, equal allocation."""
    p = float(scipy_stats.norm.cdf(math.log(SLOWER) / (SIGMA * math.sqrt(2.0))))  # P(canary > stable)
    z = float(scipy_stats.norm.ppf(1 - alpha) + scipy_stats.norm.ppf(power))
    return math.ceil(z * z / (6.0 * (p - 0.5) ** 2))


def detection(config: JudgeConfig, runs: int, batch: int, cap: int, seed: int, reps: int,
              allowed: float = 0.0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    started = time.process_time()
    stops = [simulate(config, rng, cap // batch, batch, slower=SLOWER).failed_at for _ in range(runs)]
    cpu = time.process_time() - started
    caught = sorted(s for s in stops if s is not None)
    out: dict[str, Any] = {
        "runs": runs, "batch": batch, "cap_per_side": cap, "horizon": config.horizon, "caught": len(caught),
        "slower": SLOWER, "sigma": SIGMA,
        "allowed": allowed,
        "median_samples_to_catch": float(np.median([s if s is not None else math.inf for s in stops])),
        "mean_samples_to_catch_if_caught": round(float(np.mean(caught)), 1) if caught else None,
        "cpu_seconds": round(cpu, 1),
        "by_power": [],
    }
    for power in (0.5, 0.8, 0.9):
        index = math.ceil(power * runs) - 1
        sequential = caught[index] if index < len(caught) else None
        out["by_power"].append({
            "power": power,
            "sequential_samples": sequential,  # per side: caught in `power` of the runs by then
            "fixed_horizon_samples": fixed_horizon_n(power, config.metric_alpha, reps, seed, allowed),
            "noether_samples": noether_n(power, config.metric_alpha) if allowed == 0 else None,
        })
    return out


def table(results: dict[str, Any]) -> str:
    lines = ["A/A (canary = stable), judged every round on cumulative samples:"]
    for name, run in results["a_a"].items():
        lines.append(
            f"  {name}: {run['wrongly_rolled_back']}/{run['runs']} wrongly rolled back = {run['rate']:.1%}"
            f" (95% upper bound {run['rate_upper_95']:.1%}; alpha {run['alpha']:.0%}), {run['rounds']} rounds x"
            f" {run['batch']} samples"
            + (f" (Brownian motion on these looks: {run['brownian_motion_rate']:.1%})"
               if run.get("brownian_motion_rate") is not None else "")
            + "; a fixed 5% test repeated every round:"
            f" {run['naive_repeated_fixed_test_rate']:.1%}; {run['cpu_seconds']} CPU s")
    for name, det in results["detection"].items():
        lines.append(f"Detection, canary {det['slower']}x slower (log-normal sigma {det['sigma']}), {name}:\n   "
                     f" caught {det['caught']}/{det['runs']} within {det['cap_per_side']} samples/side;"
                     f" median {det['median_samples_to_catch']:g}, mean {det['mean_samples_to_catch_if_caught']};"
                     f" {det['cpu_seconds']} CPU s")
        for row in det["by_power"]:
            noether = f" (Noether {row['noether_samples']})" if row["noether_samples"] else ""
            lines.append(f"  power {row['power']:.0%}: sequential {row['sequential_samples']} samples/side vs"
                         f" fixed-horizon {row['fixed_horizon_samples']}{noether}")
    return "\n".join(lines)


PAST_HORIZON = "horizon 100, latency only, 2 samples a round, 60 rounds (20 past the horizon)"


def extra(runs: int, seed: int) -> None:
    """More runs of the case with the most looks, to narrow its rate's interval."""
    target = HERE / "judge_results.json"
    results = json.loads(target.read_text())
    results["a_a_extra"] = {PAST_HORIZON: a_a(latency_config(horizon=100), runs, 60, 2, seed)}
    target.write_text(json.dumps(results, indent=2) + "\n")
    print(table({"a_a": results["a_a_extra"], "detection": {}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--runs-3", type=int, default=500, help="A/A runs with the issue's 3 metrics (slowest)")
    parser.add_argument("--rounds", type=int, default=50, help="A/A rounds per canary")
    parser.add_argument("--batch", type=int, default=10, help="new samples per side per round")
    parser.add_argument("--cap", type=int, default=1000, help="detection: samples per side before giving up")
    parser.add_argument("--reps", type=int, default=4000, help="fixed-horizon power: simulated tests per n")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="200 runs, for a smoke test")
    parser.add_argument("--extra-runs", type=int, default=0,
                        help="only rerun the past-horizon A/A with this many runs (seed + 98) and add it to the"
                             " results file as a_a_extra")
    args = parser.parse_args()
    if args.extra_runs:
        extra(args.extra_runs, args.seed + 98)
        return
    runs = 200 if args.quick else args.runs
    runs_3 = 200 if args.quick else args.runs_3
    rounds, batch, seed, cap, reps = args.rounds, args.batch, args.seed, args.cap, args.reps
    whole = rounds * batch  # the A/A canary's length: its horizon when planned to the end
    started, wall = time.process_time(), time.perf_counter()
    results: dict[str, Any] = {"load_average_start": [round(x, 2) for x in os.getloadavg()]}
    results["a_a"] = {
        f"horizon {whole}, latency only": a_a(latency_config(horizon=whole), runs, rounds, batch, seed),
        PAST_HORIZON: a_a(latency_config(horizon=100), runs, 60, 2, seed + 4),
        f"horizon {whole}, issue's 3 metrics": a_a(spec_config(horizon=whole), runs_3, rounds, batch, seed + 1),
        "mixture, latency only": a_a(latency_config(), runs, rounds, batch, seed),
    }
    # Detection: horizons near the fixed test's 80 %-power size (48), twice that, and the A/A's.
    results["detection"] = {
        f"horizon {h}, allowed 0": detection(latency_config(horizon=h), runs, batch, h, seed + 2, reps)
        for h in (50, 60, 100, whole)
    }
    results["detection"]["mixture, allowed 0"] = detection(latency_config(), runs, batch, cap, seed + 2, reps)
    results["detection"]["horizon 130, allowed 10%"] = detection(  # the fixed test's 80 % size: 119
        latency_config(allowed="10%", horizon=130), runs, batch, 130, seed + 3, reps, allowed=0.1)
    results["detection"]["mixture, allowed 10%"] = detection(
        latency_config(allowed="10%"), runs, batch, cap, seed + 3, reps, allowed=0.1)
    results["cpu_seconds"] = round(time.process_time() - started, 1)
    results["wall_seconds"] = round(time.perf_counter() - wall, 1)
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    target = OUT / "judge_results-quick.json" if args.quick else HERE / "judge_results.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"total {results['cpu_seconds']} CPU s, {results['wall_seconds']} s wall,"
          f" load {results['load_average_start']} -> {results['load_average_end']}")


if __name__ == "__main__":
    main()
