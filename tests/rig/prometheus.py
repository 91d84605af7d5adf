"""A real Prometheus (Debian's /usr/bin/prometheus) scraping Envoy admin ports on loopback, and
optionally applications' ``/metrics`` (the demo backends' per-version business metrics)."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.rig.ports import free_port
from tests.rig.process import ManagedProcess
from tests.rig.simple_http import http_request
from tests.rig.waiting import wait_until

PROMETHEUS_BINARY = Path("/usr/bin/prometheus")
JOB_NAME = "envoy"
APP_JOB_NAME = "app"


class PrometheusProcess:
    """Scrapes ``/stats/prometheus`` of each ``host:port`` in ``scrape_targets`` (job ``envoy``) and
    ``/metrics`` of each in ``app_targets`` (job ``app``; their own labels, such as ``version``, kept).

    The listen port and the TSDB directory survive :meth:`stop`, so ``start()`` after ``stop()``
    brings back the same URL with the same data.
    """

    def __init__(self, workdir: Path, scrape_targets: list[str], scrape_interval: str = "1s",
                 app_targets: list[str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.scrape_targets = list(scrape_targets)
        self.app_targets = list(app_targets or [])
        self.scrape_interval = scrape_interval
        self.port = free_port()
        self.config_path = self.workdir / "prometheus.yml"
        self.tsdb_path = self.workdir / "prometheus-data"
        self.process = ManagedProcess(
            "prometheus",
            [
                PROMETHEUS_BINARY,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.tsdb_path}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--log.level=info",
            ],
            log_dir=self.workdir,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def render_config(self) -> dict[str, Any]:
        jobs: list[dict[str, Any]] = [{"job_name": JOB_NAME, "metrics_path": "/stats/prometheus",
                                       "static_configs": [{"targets": self.scrape_targets}]}]
        if self.app_targets:
            jobs.append({"job_name": APP_JOB_NAME, "metrics_path": "/metrics",
                         "static_configs": [{"targets": self.app_targets}]})  # fmt: skip
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,  # must not exceed the interval (default 10s)
                "evaluation_interval": self.scrape_interval,
            },
            "scrape_configs": jobs,
        }

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.render_config(), sort_keys=False))

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, wait: bool = True, timeout: float = 30.0) -> PrometheusProcess:
        self._write_config()
        self.process.start()
        if wait:
            self.wait_ready(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.process.stop(timeout)

    def kill9(self) -> None:
        self.process.kill9()

    @property
    def alive(self) -> bool:
        return self.process.alive

    def __enter__(self) -> PrometheusProcess:
        if not self.alive:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def describe(self) -> str:
        return f"prometheus at {self.url}: {self.process.describe()}"

    def set_targets(self, scrape_targets: list[str]) -> None:
        """Rewrite prometheus.yml and hot-reload it (POST /-/reload)."""
        self.scrape_targets = list(scrape_targets)
        self._write_config()
        resp = http_request(self.port, "/-/reload", method="POST")
        if resp.status != 200:
            raise RuntimeError(f"prometheus reload failed: {resp.status} {resp.body}")

    # ---- readiness and queries ---------------------------------------------------------------
    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            self.process.ensure_alive()
            return http_request(self.port, "/-/ready", timeout=1.0).status == 200

        try:
            wait_until(ready, timeout, what=f"prometheus ready on port {self.port}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe()}") from exc

    def query(self, promql: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Instant query; the ``data.result`` list ([{"metric": {...}, "value": [ts, "v"]}, ...])."""
        path = "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        resp = http_request(self.port, path, timeout=timeout)
        payload: dict[str, Any] = json.loads(resp.body)
        if payload.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {resp.status} {payload}")
        result: list[dict[str, Any]] = payload["data"]["result"]
        return result

    def query_value(self, promql: str) -> float | None:
        """The first sample's value of an instant query, or None when the result is empty."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets from /api/v1/targets (fresh for this process, unlike ``up``)."""
        payload: dict[str, Any] = json.loads(http_request(self.port, "/api/v1/targets?state=active").body)
        active: list[dict[str, Any]] = payload["data"]["activeTargets"]
        return active

    def wait_for_target_up(self, target: str | None = None, timeout: float = 30.0) -> None:
        """Poll until ``target`` (default: every target of both jobs) was scraped successfully by
        this process and ``up`` is 1 for it.

        The targets API is checked first: after a restart ``up`` still returns the samples of
        the previous run (5 min lookback). Prometheus 2.42 hands static targets to the scraper
        only after about 5 s (its discovery manager's update tick), so expect ~5 s here.
        """
        wanted = {target} if target is not None else {*self.scrape_targets, *self.app_targets}

        def all_up() -> bool:
            self.process.ensure_alive()
            health = {t["labels"].get("instance"): t.get("health") for t in self.targets()}
            if not all(health.get(t) == "up" for t in wanted):
                return False
            ups = {r["metric"].get("instance"): r["value"][1] for r in self.query("up")}
            return all(ups.get(t) == "1" for t in wanted)

        wait_until(all_up, timeout, interval=0.1, what=f"prometheus target(s) {sorted(wanted)} up")
