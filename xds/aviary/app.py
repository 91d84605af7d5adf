"""Wires one control plane together: policy source -> rollouts -> director -> cache -> streams.

Nothing here decides weights or speaks xDS; it owns lifetimes (start, stop, signals) and hands
values from one stage to the next, in one direction (docs/CONTRACTS.md draws it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import grpc

from aviary.admin.server import AdminConfig, AdminServer, load_admin_token, start_admin_server
from aviary.admin.service import AdminService
from aviary.discovery import typeurls
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import TrafficDirector
from aviary.discovery.proxy_events import ProxyConnected, ProxyEvent
from aviary.discovery.proxy_status import ProxyStatus, ProxyView
from aviary.discovery.server import AggregatedDiscoveryService, start_xds_server
from aviary.discovery.workers import XdsWorkers
from aviary.observability import ControlPlaneMetrics
from aviary.policy.git import redact
from aviary.policy.git_source import GitPolicySource, is_git_repository
from aviary.policy.schema import PolicyError, PolicySet
from aviary.policy.server_rules import refuse_unserviceable
from aviary.policy.source import PolicyState
from aviary.policy.watcher import DirectoryWatcher
from aviary.reports.ingest import report_handlers
from aviary.runner import EngineHealth, RolloutRunner
from aviary.store.sqlite import StateStore, StateWriteError
from aviary.tls import ServerTls, server_credentials

log = logging.getLogger("aviary")

HEARTBEAT_SECONDS = 1.0
RESTART_SECONDS = 1.0  # a long-lived task that ended is started again after this
HEALTH_POLL_SECONDS = 0.2  # how soon the gRPC health service follows the engine's health
STOP_GRACE_SECONDS = 1.0  # calls in flight may finish within this at shutdown; then they are cancelled


@dataclass(frozen=True, slots=True)
class ServeConfig:
    policies: Path | str  # a directory, or a git repository (URL or local path)
    _: KW_ONLY  # everything else by name: a positional address once landed in git_branch
    git_branch: str | None = None  # default: the remote's default branch
    git_path: str = ""  # sub-folder of the repository holding the policy files
    git_poll: float = 10.0
    state_dir: Path | None = None  # where the git working copy lives; None: a temporary directory
    xds_address: str = "127.0.0.1:18000"
    poll_interval: float = 1.0
    prometheus_url: str | None = None
    state_path: Path | None = None  # None: nothing persisted (tests, experiments)
    reset_state: bool = False
    prune: bool = False
    metrics_address: str | None = None  # HOST:PORT for /metrics; None: not served
    reconnect_grace: float = 30.0  # after a restart, how long gates wait for the proxies served before
    # -- admin API and TLS
    admin: AdminConfig | None = None  # None: no admin API
    xds_tls: ServerTls | None = None
    # 1: streams in this process; N > 1: N worker processes (discovery/workers.py). `aviary serve`
    # defaults to one per usable core (workers.usable_cores); a ControlPlane built in code, to 1.
    xds_workers: int = 1


def expected_reporters(proxies: Iterable[ProxyView]) -> list[tuple[str, str, float]]:
    """The connected proxies that should send Aviary their stats (the ``envoy`` provider): (node id,
    node cluster, connected at). Envoys, i.e. proxies that take every listener (LDS wildcard);
    proxyless gRPC clients ask for their listeners by name and have no stats sink."""
    return [(proxy.node_id, proxy.node_cluster, proxy.connected_at) for proxy in proxies
            if proxy.subscription(typeurls.LISTENER).wildcard]


class ControlPlane:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.cache = SnapshotCache()
        self.proxies = ProxyStatus()
        self.director = TrafficDirector(self.cache, self.proxies)
        self.store = StateStore(config.state_path, reset=config.reset_state) if config.state_path else None
        self.runner = RolloutRunner(
            self.director, default_prometheus=config.prometheus_url, store=self.store, prune=config.prune,
            reporters=lambda: expected_reporters(self.proxies),
        )
        self.envoy_reports = self.runner.envoy_reports  # fed by the report services on the xDS address
        self.ads = AggregatedDiscoveryService(self.cache, self.proxies.apply)
        self._recorded_proxies: set[str] = set()  # the node ids the last heartbeat saved
        self._new_proxy = asyncio.Event()
        self.proxies.subscribe(self._note_new_proxy)
        self.metrics = ControlPlaneMetrics(self.proxies, self.runner)
        self.metrics_port = 0
        self.watcher = self._policy_source(config)
        self.policy_errors: list[PolicyError] = []  # before the collector below reads policy_state()
        self.unserviceable: list[PolicyError] = []  # valid files this server cannot run (server_rules)
        self.metrics.observe_policy_source(self.policy_state)
        self.xds_port = 0
        # -- TLS and admin API: bad files, or an exposed admin address without a token, fail here
        self._xds_credentials = server_credentials(config.xds_tls) if config.xds_tls else None
        if config.admin is not None:
            load_admin_token(config.admin)
        self.admin_port = 0
        self._admin: AdminServer | None = None
        self._server: grpc.aio.Server | None = None
        self.xds_workers: XdsWorkers | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._down: set[str] = set()  # supervised tasks that ended and wait for their restart
        self.restarts: Counter[str] = Counter()

    def _policy_source(self, config: ServeConfig) -> DirectoryWatcher | GitPolicySource:
        if not is_git_repository(config.policies):
            return DirectoryWatcher(Path(config.policies), self.apply_policies, config.poll_interval)
        workdir = config.state_dir / "git" if config.state_dir else Path(tempfile.mkdtemp(prefix="aviary-git-"))
        return GitPolicySource(
            str(config.policies), workdir, self.apply_policies, config.git_branch, config.git_path, config.git_poll
        )

    def policy_state(self) -> PolicyState:
        """Where policies come from, which commit serves, and what was refused (for status)."""
        source = self.watcher
        if isinstance(source, GitPolicySource):
            rejection = source.last_rejection
            return PolicyState(
                source=redact(str(self.config.policies)),
                applied_commit=source.current.revision,
                rejected_commit=rejection.sha if rejection else None,
                errors=(tuple(rejection.errors) if rejection else ()) + tuple(self.unserviceable)
                + tuple(self.runner.refusals()),
                fetch_error=source.fetch_error,
                fetch_failing_since=source.fetch_failing_since,
                fetch_failures=source.fetch_failures,
            )
        return PolicyState(source=str(self.config.policies), errors=tuple(self.policy_errors))

    async def start(self) -> None:
        await self.load()
        await self.serve()

    async def load(self) -> None:
        """Everything that decides what to serve, before any proxy can connect."""
        if self.store is not None:
            last_alive, proxies = self.store.last_alive()
            self.director.expect_proxies(proxies, self.config.reconnect_grace)
            self.runner.restore(self.store.load(), last_alive)
        policy_set = await self.watcher.load_once()
        errors = self.watcher.errors if isinstance(self.watcher, DirectoryWatcher) else []
        await self.apply_policies(policy_set, errors)

    async def serve(self) -> None:
        """Listen: the first proxy to connect gets the full configuration decided by `load()`."""
        if self.config.metrics_address:
            self.metrics_port = self.metrics.serve(self.config.metrics_address)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics_address.rpartition(":")[0],
                     self.metrics_port)
        if self.config.xds_workers > 1:
            self.xds_workers = XdsWorkers(self.cache, self.proxies.apply, self.config.xds_address,
                                          self.config.xds_workers, self.config.xds_tls, reports=self.envoy_reports)
            self.xds_port = await self.xds_workers.start()
            pool = self.xds_workers
            self.metrics.observe_xds_workers(pool.streams, lambda: pool.restarts)
        else:
            self._server, self.xds_port = await start_xds_server(
                self.config.xds_address, self.ads, self._xds_credentials,
                extra_handlers=report_handlers(self.envoy_reports),
            )
        workers = f" ({self.config.xds_workers} worker processes)" if self.xds_workers is not None else ""
        host = self.config.xds_address.rsplit(":", 1)[0]
        log.info("xDS (ADS and per-type services) listening on %s%s", f"{host}:{self.xds_port}", workers)
        self._tasks.append(asyncio.create_task(self._supervised("policy watcher", self.watcher.run),
                                               name="policy-watcher"))
        self._tasks.append(asyncio.create_task(self._supervised("rollout engine", self.runner.run),
                                               name="rollout-engine"))
        if self.store is not None:
            store = self.store
            self._tasks.append(asyncio.create_task(self._supervised("state heartbeat", lambda: self._keep_alive(store)),
                                                   name="state-heartbeat"))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._reload_on_sighup)
        if self.config.admin is not None:
            service = AdminService(self.runner, self.proxies, self.policy_state, health=self.health,
                                   default_prometheus=self.config.prometheus_url)
            self._admin = await start_admin_server(self.config.admin, service)
            self.admin_port = self._admin.port
            admin = self._admin
            health_report = self._supervised("health report", lambda: self._report_health(admin))
            self._tasks.append(asyncio.create_task(health_report, name="health-report"))

    def _reload_on_sighup(self) -> None:
        """One line per SIGHUP: an operator who sent it sees it arrived (the reload logs only changes)."""
        log.info("reloading policies (SIGHUP)")
        self.watcher.reload()

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        if self.xds_workers is not None:
            self.xds_workers.closing()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGHUP)
        if self._admin is not None:
            await self._admin.stop(grace)
            self._admin = None
        self.director.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._server is not None:
            self.ads.close()  # streams end cleanly; proxies keep their config and reconnect later
            await self._server.stop(grace)
            self._server = None
        if self.xds_workers is not None:
            await self.xds_workers.stop(grace)  # their streams end cleanly too
            self.xds_workers = None
        self.metrics.stop()
        if self.store is not None:
            self.store.close()
            self.store = None

    async def _keep_alive(self, store: StateStore) -> None:
        """Once a second: when we were last alive and whom we served, for the next restart.

        A write that fails (disk full, read-only) is logged when it starts failing and when it
        works again, and counts against the state's health; the heartbeat goes on either way.
        """
        writes = self.runner.state_writes
        while True:
            self._new_proxy.clear()
            try:
                served = {proxy.node_id for proxy in self.proxies} | self.director.awaited_proxies()
                store.mark_alive(time.time(), served)
                self._recorded_proxies = served
            except StateWriteError as exc:
                if writes.failed("heartbeat", str(exc)):
                    log.error("state heartbeat not saved: %s; a restart now would credit steps with less time "
                              "than they ran", exc)
            else:
                if writes.succeeded("heartbeat"):
                    log.info("state heartbeat saved again")
            with contextlib.suppress(TimeoutError):  # early when a proxy the file does not name connects
                await asyncio.wait_for(self._new_proxy.wait(), HEARTBEAT_SECONDS)

    def _note_new_proxy(self, event: ProxyEvent) -> None:
        """A proxy the state file does not name yet is recorded at once, not up to a second later: a
        crash in between would let the next start retire clusters that proxy may still route to."""
        if isinstance(event, ProxyConnected) and event.node_id not in self._recorded_proxies:
            self._new_proxy.set()

    async def _supervised(self, what: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run a long-lived task; if it ever ends (it should not), log why and start it again."""
        while True:
            self._down.discard(what)
            try:
                await run()
                log.error("%s ended by itself; starting it again in %.0fs", what, RESTART_SECONDS)
            except Exception:
                log.exception("%s failed; starting it again in %.0fs", what, RESTART_SECONDS)
            self._down.add(what)
            self.restarts[what] += 1
            await asyncio.sleep(RESTART_SECONDS)

    def health(self) -> EngineHealth:
        """The engine's health, and any long-lived task that is down (between a failure and its restart)."""
        engine = self.runner.health()
        if not self._down:
            return engine
        down = tuple(f"{what} is not running (restarting)" for what in sorted(self._down))
        return EngineHealth(False, engine.state_error, down + engine.problems)

    async def _report_health(self, admin: AdminServer) -> None:
        """Keep the gRPC health service in step with ``health()``: NOT_SERVING while the engine cannot
        make progress (a task down, or the state cannot be written)."""
        serving = True  # as the admin server starts
        while True:
            health = self.health()
            if health.serving != serving:
                serving = health.serving
                why = "; ".join(filter(None, (health.state_error, *health.problems)))
                if serving:
                    log.info("health: SERVING")
                else:
                    log.error("health: NOT_SERVING: %s", why)
                await admin.set_serving(serving)
            await asyncio.sleep(HEALTH_POLL_SECONDS)

    async def apply_policies(self, policy_set: PolicySet, errors: list[PolicyError]) -> None:
        """Hand the policy files that are valid now to the rollout engine.

        First the rules of this server (aviary.policy.server_rules: analysis needs a Prometheus): a
        file that breaks one is refused like an invalid file, its running version keeps serving.
        """
        policy_set, unserviceable = refuse_unserviceable(policy_set, self.config.prometheus_url, self.runner.rollout)
        for error in unserviceable:
            if error not in self.unserviceable:
                log.error("policy refused: %s", error)
        self.unserviceable = unserviceable
        refused = self.runner.apply_policies(policy_set)  # hosts an orphaned rollout still serves
        self.policy_errors = list(errors) + unserviceable + refused
        self.metrics.policies_applied(self.policy_errors)

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
