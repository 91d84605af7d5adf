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
from dataclasses import dataclass
from pathlib import Path

import grpc

from aviary.admin.server import AdminConfig, AdminServer, load_admin_token, start_admin_server
from aviary.admin.service import AdminService
from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.server import AggregatedDiscoveryService, start_xds_server
from aviary.observability import ControlPlaneMetrics
from aviary.policy.git import redact
from aviary.policy.git_source import GitPolicySource, is_git_repository
from aviary.policy.schema import PolicyError, PolicySet
from aviary.policy.source import PolicyState
from aviary.policy.watcher import DirectoryWatcher
from aviary.runner import RolloutRunner
from aviary.store.sqlite import StateStore
from aviary.tls import ServerTls, server_credentials

log = logging.getLogger("aviary")

HEARTBEAT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class ServeConfig:
    policies: Path | str  # a directory, or a git repository (URL or local path)
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


class ControlPlane:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.cache = SnapshotCache()
        self.proxies = ProxyStatus()
        self.director = TrafficDirector(self.cache, self.proxies)
        self.store = StateStore(config.state_path, reset=config.reset_state) if config.state_path else None
        self.runner = RolloutRunner(
            self.director, default_prometheus=config.prometheus_url, store=self.store, prune=config.prune
        )
        self.ads = AggregatedDiscoveryService(self.cache, self.proxies.apply)
        self.metrics = ControlPlaneMetrics(self.proxies, self.runner)
        self.metrics_port = 0
        self.watcher = self._policy_source(config)
        self.policy_errors: list[PolicyError] = []
        self.xds_port = 0
        # -- TLS and admin API: bad files, or an exposed admin address without a token, fail here
        self._xds_credentials = server_credentials(config.xds_tls) if config.xds_tls else None
        if config.admin is not None:
            load_admin_token(config.admin)
        self.admin_port = 0
        self._admin: AdminServer | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

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
                errors=tuple(rejection.errors) if rejection else (),
                fetch_error=source.fetch_error,
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
        self._server, self.xds_port = await start_xds_server(
            self.config.xds_address, self.ads, self._xds_credentials
        )
        log.info("xDS (ADS) listening on %s", self.config.xds_address.rsplit(":", 1)[0] + f":{self.xds_port}")
        self._tasks.append(asyncio.create_task(self.watcher.run(), name="policy-watcher"))
        self._tasks.append(asyncio.create_task(self.runner.run(), name="rollout-engine"))
        if self.store is not None:
            self._tasks.append(asyncio.create_task(self._keep_alive(self.store), name="state-heartbeat"))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.watcher.reload)
        if self.config.admin is not None:
            service = AdminService(self.runner, self.proxies, self.policy_state)
            self._admin = await start_admin_server(self.config.admin, service)
            self.admin_port = self._admin.port

    async def stop(self, grace: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGHUP)
        if self._admin is not None:
            await self._admin.stop(grace)
            self._admin = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        self.metrics.stop()
        if self.store is not None:
            self.store.close()
            self.store = None

    async def _keep_alive(self, store: StateStore) -> None:
        """Once a second: when we were last alive and whom we served, for the next restart."""
        while True:
            store.mark_alive(time.time(), (proxy.node_id for proxy in self.proxies))
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def apply_policies(self, policy_set: PolicySet, errors: list[PolicyError]) -> None:
        """Hand the policy files that are valid now to the rollout engine."""
        self.policy_errors = list(errors)
        self.metrics.policies_applied(errors)
        self.runner.apply_policies(policy_set)

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
