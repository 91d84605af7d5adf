"""Wires one control plane together: policy source -> rollouts -> director -> cache -> streams.

Nothing here decides weights or speaks xDS; it owns lifetimes (start, stop, signals) and hands
values from one stage to the next, in the one direction drawn in ARCHITECTURE.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc

from aviary.discovery.cache import SnapshotCache
from aviary.discovery.director import Placement, TrafficDirector
from aviary.discovery.proxy_status import ProxyStatus
from aviary.discovery.server import AggregatedDiscoveryService, start_xds_server
from aviary.policy.schema import PolicyError, PolicySet, Rollout
from aviary.policy.watcher import DirectoryWatcher
from aviary.traffic import Backend, DesiredTraffic

log = logging.getLogger("aviary")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    policies: Path
    xds_address: str = "127.0.0.1:18000"
    poll_interval: float = 1.0


def placement_of(rollout: Rollout) -> Placement:
    spec = rollout.spec
    return Placement(listener=spec.listener, hosts=spec.hosts, proxy_cluster=spec.proxy_cluster)


def backend_of(rollout: Rollout) -> Backend:
    return Backend(rollout.spec.version, rollout.spec.endpoints)


class ControlPlane:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.cache = SnapshotCache()
        self.proxies = ProxyStatus()
        self.director = TrafficDirector(self.cache, self.proxies)
        self.ads = AggregatedDiscoveryService(self.cache, self.proxies.apply)
        self.watcher = DirectoryWatcher(config.policies, self.apply_policies, config.poll_interval)
        self.xds_port = 0
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.load()
        await self.serve()

    async def load(self) -> None:
        """Everything that decides what to serve, before any proxy can connect."""
        policy_set = await self.watcher.load_once()
        await self.apply_policies(policy_set, [])

    async def serve(self) -> None:
        """Listen: the first proxy to connect gets the full configuration decided by `load()`."""
        self._server, self.xds_port = await start_xds_server(self.config.xds_address, self.ads)
        log.info("xDS (ADS) listening on %s", self.config.xds_address.rsplit(":", 1)[0] + f":{self.xds_port}")
        self._tasks.append(asyncio.create_task(self.watcher.run(), name="policy-watcher"))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.watcher.reload)

    async def stop(self, grace: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGHUP)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def apply_policies(self, policy_set: PolicySet, errors: list[PolicyError]) -> None:
        """Bring the director in line with the policy files that are valid now."""
        for name in set(self.director.rollout_names()) - set(policy_set.rollouts):
            log.info("rollout %s removed from policies", name)
            self.director.remove_rollout(name)
        for name, rollout in sorted(policy_set.rollouts.items()):
            self.director.set_rollout(name, placement_of(rollout), self._traffic_for(rollout))

    def _traffic_for(self, rollout: Rollout) -> DesiredTraffic:
        """Without a strategy, the file's version is the one that runs: switch at once."""
        wanted = backend_of(rollout)
        current = self.director.desired(rollout.name)
        if current is not None and current.canary is not None and current.canary.version == wanted.version:
            return DesiredTraffic(current.stable, wanted, current.canary_weight)
        if current is not None and current.canary is not None and current.stable.version == wanted.version:
            return DesiredTraffic(wanted, current.canary, current.canary_weight)
        return DesiredTraffic(wanted)

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
