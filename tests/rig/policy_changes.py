"""Waiting on a policy source (DirectoryWatcher, GitPolicySource) in unit tests, with deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aviary.policy.schema import PolicyError, PolicySet


class PolicyRecorder:
    """The source's ``on_change`` callback: queues every (PolicySet, errors) it is called with."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.changes: asyncio.Queue[tuple[PolicySet, list[PolicyError]]] = asyncio.Queue()

    async def __call__(self, policy_set: PolicySet, errors: list[PolicyError]) -> None:
        await self.changes.put((policy_set, errors))

    async def next(self) -> tuple[PolicySet, list[PolicyError]]:
        """The next change; TimeoutError if none comes within the deadline."""
        return await asyncio.wait_for(self.changes.get(), self.deadline)


async def poll_until(condition: Callable[[], bool], deadline: float, interval: float) -> None:
    """Poll with a deadline: for facts that have no event to wait on. An exception in ``condition``
    propagates; AssertionError when ``deadline`` seconds pass first."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not condition():
        assert loop.time() < end, "condition not reached before the deadline"
        await asyncio.sleep(interval)
