"""The thin async loop around the pure rollout engine.

It gathers observations (policy files, proxy ACKs and NACKs, check results, admin commands, the
clock), feeds them one at a time to `aviary.policy.rollout.step`, records the new status, and
carries out the actions: `SetTraffic` goes to the traffic director, `RecordEvent` to the log and
the in-memory event history. Wake-ups are computed from the stored status (`next_wakeup`), not
from timers held in memory, so a restarted loop continues from whatever status it is handed.

Everything runs on one event loop task; callbacks from the director only enqueue events, so the
engine never re-enters itself. Each turn of the loop handles what is queued and what is due as one
batch (``_one_batch``): its saves commit in one transaction, then the director publishes once.

Faults never end the loop. An exception while handling an event, a wake-up or a check round is
logged (with its traceback, once per distinct error), counted, shown on the rollout
(``engine_error``) until the rollout next steps successfully, and the rollout's wake-ups back off
by ``RETRY_SECONDS``. A save that fails (disk full, read-only state file) fails safe:

- a move away from stable (a step up, a promotion, a new canary, a new stable version) is not
  carried out: status and traffic stay as they were, and it is tried again every ``RETRY_SECONDS``
  (a check round whose pass would step up is dropped and taken again; an admin command gets
  ``NotSaved``);
- a move toward stable (a rollback, an abort, a lower weight) or one that changes no traffic (an
  ACK, a check count) is carried out at once and saved later, every ``RETRY_SECONDS`` until it is.
  Should the process die before that save, the restart restores the last saved (higher) weight;
  that is the price of never holding back a rollback for want of disk space. The restored step
  waits for its ACK and a fresh passing round (``stopped_for_restart``) and the failure counters
  are kept, so a canary that failed fails its next round again and is rolled back again;
- a policy file that could not be applied stays pending (not recorded as applied) and is applied
  on a later retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

from aviary.discovery.director import Placement, PublishedState, RolloutNack, TrafficDirector
from aviary.discovery.resources import cluster_name
from aviary.metrics.checks import check_round
from aviary.metrics.envoy import EnvoyProvider, Reporter
from aviary.metrics.envoy_reports import DEFAULT_SAMPLES_PER_SECOND, EnvoyReports
from aviary.metrics.kinds import ENVOY, PROMETHEUS, WEB, checks_of
from aviary.metrics.prometheus import PrometheusProvider
from aviary.metrics.provider import MetricProvider
from aviary.metrics.templates import Side
from aviary.metrics.web import WebProvider
from aviary.policy.analysis import CheckOutcome, CheckResult, round_outcome
from aviary.policy.loader import orphan_conflicts
from aviary.policy.rollout import (
    Action,
    ChecksCompleted,
    Event,
    ProxyNacked,
    RecordEvent,
    Rejected,
    RolloutStatus,
    SetTraffic,
    SpecObserved,
    Tick,
    TransitionEvent,
    WeightAcked,
    analysis_for,
    checks_due,
    next_wakeup,
    step,
    traffic_plan,
)
from aviary.policy.rollout_state import CheckRound, traffic_text
from aviary.policy.schema import PolicyError, PolicySet, Rollout
from aviary.policy.server_rules import PROMETHEUS_NEEDED
from aviary.store.sqlite import SavedPublished, SavedRollout, StateStore, StateWriteError
from aviary.store.writes import StateWrites
from aviary.traffic import TrafficPlan
from aviary.wake_schedule import WakeSchedule

log = logging.getLogger("aviary.engine")

EVENT_HISTORY = 200
ROUND_HISTORY = 500
"""Check rounds kept per rollout for ``aviary explain`` (in memory)."""
LOOP = ""  # the key of errors of the engine loop itself, outside any one rollout
RETRY_SECONDS = 1.0  # how often a failed save, a pending policy or a failing rollout is tried again
ProviderFactory = Callable[[str], MetricProvider]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class CommandRefused(Exception):
    rollout: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rollout}: {self.reason}"


@dataclass(frozen=True, slots=True)
class NotSaved(Exception):
    """A move away from stable was not carried out because it could not be saved; ``error`` names
    the state file and the OS error. Nothing changed; the engine tries it again by itself."""

    rollout: str
    error: str

    def __str__(self) -> str:
        return f"{self.rollout}: {self.error}"


@dataclass(frozen=True, slots=True)
class EngineHealth:
    """Whether the engine can make progress, for the health service and ``aviary status``."""

    serving: bool
    state_error: str | None = None
    problems: tuple[str, ...] = ()


_WRITE_ERRORS = (StateWriteError, sqlite3.Error, OSError)


def moves_away_from_stable(before: RolloutStatus | None, after: RolloutStatus) -> bool:
    """True when ``after`` gives a version other than ``before``'s stable one more traffic than
    ``before`` did, or names a version ``before`` did not route to at all (a new canary, even at
    0 %, or a new stable version). A rollback, an abort or a lower weight is not; neither is the
    end of a promotion (the canary already had 100 %). Opening a cohort is a move away (its requests
    reach the canary), and so is mirroring more (the canary gets copies it did not get, and what it
    does with them, writes included, happens for real). First sight counts as a move away."""
    if before is None:
        return True
    old = {before.stable.version: 100 - before.weight}
    if before.canary is not None:
        old[before.canary.version] = before.weight
    new = {after.stable.version: 100 - after.weight}
    if after.canary is not None:
        new[after.canary.version] = after.weight
    same_canary = after.canary is not None and before.canary == after.canary
    opened = same_canary and bool(set(after.cohorts) - set(before.cohorts))
    mirrors_more = same_canary and after.mirror > before.mirror
    return opened or mirrors_more or any(
        version != before.stable.version and (version not in old or weight > old[version])
        for version, weight in new.items()
    )


@dataclass(frozen=True, slots=True)
class Resumption:
    """How far a step had run before a restart, to credit once its weight is ACKed again."""

    elapsed: float
    step_index: int
    canary_version: str | None


def stopped_for_restart(status: RolloutStatus, last_alive: float) -> tuple[RolloutStatus, Resumption | None]:
    """A persisted status to continue from after a restart, `last_alive` being when the old process
    was last seen alive.

    The step's clock is stopped, exactly as while a step's weight waits for its ACK: nothing is
    time-driven until every proxy has confirmed the restored weight, so a step cannot end (and a
    canary cannot be promoted) while Envoy is still reconnecting. The time the step had run before
    the crash is returned, to be credited when the ACK comes. The analysis starts afresh: the step
    needs a new passing round over a window that begins after the restart. Counters are kept, and
    so are the judged metrics that failed (``judge_failed``); the judge's samples start again at
    the restored step's ACK (``canary_started_at`` was on the old process' clock).
    """
    stopped = replace(status, step_started_at=None, step_outcome=None, step_checked_at=None,
                      canary_started_at=None)
    if status.step_started_at is None:
        return stopped, None
    elapsed = max(0.0, last_alive - status.step_started_at)
    return stopped, Resumption(elapsed, status.step_index, status.canary.version if status.canary else None)


@dataclass(slots=True)
class _Save:
    """A save deferred to the end of the batch: the latest status, and every event not saved yet."""

    status: RolloutStatus
    rollout: Rollout
    revision: str | None
    events: list[TransitionEvent]


def _placement_of(rollout: Rollout) -> Placement:
    spec = rollout.spec
    reports = spec.analysis is not None and spec.analysis.provider == ENVOY
    samples = spec.analysis.samples_per_second if spec.analysis is not None else DEFAULT_SAMPLES_PER_SECOND
    return Placement(spec.listener, spec.hosts, spec.proxy_cluster, access_log=reports, samples_per_second=samples)


def _summary(status: RolloutStatus) -> str:
    canary = f", canary {status.canary.version} at {status.weight}%" if status.canary else ""
    return f"{status.phase.value}, stable {status.stable.version}{canary}"


class RolloutRunner:
    def __init__(
        self,
        director: TrafficDirector,
        default_prometheus: str | None = None,
        provider_factory: ProviderFactory = PrometheusProvider,
        clock: Clock = time.time,
        envoy_reports: EnvoyReports | None = None,
        reporters: Callable[[], Iterable[tuple[str, str, float]]] = lambda: (),
        web_factory: Callable[[], MetricProvider] = WebProvider,
        store: StateStore | None = None,
        prune: bool = False,
        round_history: int = ROUND_HISTORY,
    ) -> None:
        self._director = director
        # What the proxies report themselves (analysis.provider: envoy); `reporters`: the connected
        # proxies as (node id, node cluster, connected at on `clock`), the ones that should report.
        self.envoy_reports = envoy_reports if envoy_reports is not None else EnvoyReports(clock)
        self._reporters = reporters
        self._store = store
        self._prune = prune
        self._orphaned: set[str] = set()
        self._revision: str | None = None
        self._default_prometheus = default_prometheus
        self._provider_factory = provider_factory
        self._providers: dict[str, MetricProvider] = {}  # Prometheus by URL
        self._web_factory = web_factory
        self._web: MetricProvider | None = None  # one for every web check, made at the first
        self._clock = clock
        self._rollouts: dict[str, Rollout] = {}
        self._status: dict[str, RolloutStatus] = {}
        self._placements: dict[str, Placement] = {}
        self._saved_revision: dict[str, str | None] = {}
        self._applied_revision: dict[str, str | None] = {}
        self._resuming: dict[str, Resumption] = {}
        self._history: dict[str, deque[TransitionEvent]] = {}
        self._rounds: dict[str, deque[CheckRound]] = {}
        self._round_history = round_history
        self._inbox: asyncio.Queue[tuple[str, Event]] = asyncio.Queue()
        self._checks: dict[str, asyncio.Task[None]] = {}
        self._listeners: list[Callable[[TransitionEvent], None]] = []
        # -- faults: what could not be saved or applied yet, and what failed
        self.state_writes = StateWrites()
        self._pending: dict[str, tuple[Rollout, str | None]] = {}  # policy seen, not applied yet
        self._unsaved: dict[str, list[TransitionEvent]] = {}  # carried out, not saved yet (and its events)
        self._undeleted: set[str] = set()  # pruned, not deleted from the state file yet
        self._held_until: dict[str, float] = {}  # no wake-up before this (a held step, a failing rollout)
        self._retry_at: float | None = None
        self._engine_errors: dict[str, str] = {}
        self._provider_trouble: dict[str, str] = {}  # rollout -> why its provider fails (logged once)
        self._engine_error_counts: Counter[str] = Counter()
        self._wakes = WakeSchedule(self._wake_time)
        self._deferred: dict[str, _Save] | None = None  # saves of this batch, committed at its end
        director.on_traffic_acked(self._on_traffic_acked)
        director.on_nack(self._on_nack)
        director.on_published(self._on_published)
        self._refused: list[PolicyError] = []  # policies refused against orphans, from the last apply
        self._published_unsaved: set[str] = set()

    # ---- reads ---------------------------------------------------------------------------

    def status(self, name: str) -> RolloutStatus | None:
        return self._status.get(name)

    def statuses(self) -> dict[str, RolloutStatus]:
        return dict(self._status)

    def history(self, name: str) -> list[TransitionEvent]:
        return list(self._history.get(name, ()))

    def rounds(self, name: str) -> list[CheckRound]:
        """The check rounds the engine took for ``name`` (the latest ``ROUND_HISTORY``, since this
        process started: unlike transitions, rounds are not saved)."""
        return list(self._rounds.get(name, ()))

    def rollout(self, name: str) -> Rollout | None:
        return self._rollouts.get(name)

    def on_transition(self, listener: Callable[[TransitionEvent], None]) -> None:
        self._listeners.append(listener)

    def off_transition(self, listener: Callable[[TransitionEvent], None]) -> None:
        """Stop calling ``listener`` (registered with ``on_transition``); unknown ones are ignored."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def now(self) -> float:
        """The engine's clock: the time base of statuses and transition events."""
        return self._clock()

    def orphaned(self, name: str) -> bool:
        """Its policy file is gone, and without --prune it keeps serving as it was."""
        return name in self._orphaned

    def applied_revision(self, name: str) -> str | None:
        """The git commit this rollout's policy was last applied from (kept while it is orphaned)."""
        return self._applied_revision.get(name)

    @property
    def revision(self) -> str | None:
        """The git commit of the policies applied last (None for a directory)."""
        return self._revision

    def engine_error(self, name: str) -> str | None:
        """The last error the engine hit on this rollout; None once it stepped successfully."""
        return self._engine_errors.get(name)

    def engine_error_counts(self) -> dict[str, int]:
        """Errors the engine hit, by rollout ("" for the loop itself), since start."""
        return dict(self._engine_error_counts)

    def state_error(self, name: str) -> str | None:
        """Why this rollout's latest decision (or a move it holds back) is not saved; None if saved."""
        return self.state_writes.error(_writer(name))

    def pending(self) -> list[str]:
        """Rollouts whose latest policy file is not applied yet (it is retried)."""
        return sorted(self._pending)

    def health(self) -> EngineHealth:
        """Serving while every write succeeds; the problems, one line each, for status."""
        problems = [f"{'engine loop' if name == LOOP else f'rollout {name}'}: {error}"
                    for name, error in sorted(self._engine_errors.items())]
        problems += [f"rollout {name}: policy change not applied yet, retrying" for name in sorted(self._pending)]
        state_error = self.state_writes.state_error
        return EngineHealth(self.state_writes.writable, state_error, tuple(problems))

    # ---- restart -------------------------------------------------------------------------

    def restore(self, saved: Mapping[str, SavedRollout], last_alive: float | None = None) -> None:
        """Continue from persisted state: call before the first policies and before serving.

        Each rollout's traffic is published exactly as persisted, so reconnecting proxies are never
        sent an older weight than they have. A running step waits for the proxies to ACK that weight
        again, then continues with the time it had already spent; its analysis starts afresh.
        """
        published = self._store.load_published() if self._store is not None else {}
        with self._one_batch():  # one publish for all, not one partial snapshot per rollout
            self._restore_each(saved, published, last_alive)

    def _restore_each(self, saved: Mapping[str, SavedRollout], published: Mapping[str, SavedPublished],
                      last_alive: float | None) -> None:
        for name, entry in saved.items():
            if name in published:  # clusters a proxy's route may still name, retiring ones included
                state = published[name]
                self._director.restore_published(name, PublishedState(
                    state.route, state.clusters, state.cohorts, state.stickiness, state.mirror))
            status, resumption = stopped_for_restart(entry.status, max(entry.saved_at, last_alive or 0.0))
            if resumption is not None:
                self._resuming[name] = resumption
            self._status[name] = status
            self._rollouts[name] = entry.rollout
            self._applied_revision[name] = entry.git_commit
            self._history[name] = deque(entry.events, maxlen=EVENT_HISTORY)
            self._wakes.mark(name)
            self._publish(entry.rollout, traffic_plan(entry.rollout.spec, status))
            log.info("rollout %s restored: %s", name, _summary(status))

    # ---- inputs --------------------------------------------------------------------------

    def apply_policies(self, policy_set: PolicySet) -> list[PolicyError]:
        """A new set of valid policy files: observe each spec; removed ones orphan or prune.

        Returns the policies refused because an orphaned rollout still serves one of their hosts
        (`refusals()` keeps them): publishing both would put the host twice in one route
        configuration, which Envoy rejects as a whole, freezing every rollout on that listener. A
        refused file that was serving keeps its previous version. A rename therefore needs the old
        rollout gone: run with --prune (then a rename in one commit works), or restart with --prune.
        Everything is handed to the director as one batch, so a host moved from one file to another
        in one commit is never published twice.
        """
        self._revision = policy_set.revision
        with self._one_batch():
            for name in sorted(set(self._rollouts) - set(policy_set.rollouts)):
                if self._prune:
                    log.info("rollout %s removed from policies; pruning it", name)
                    self._forget(name)
                elif name not in self._orphaned:
                    log.warning("rollout %s removed from policies; it keeps serving as orphaned (no --prune)", name)
                    self._orphaned.add(name)
            orphans = {name: self._rollouts[name] for name in self._orphaned if name not in policy_set.rollouts}
            kept: dict[str, Rollout] = {}  # refused, so their previous version keeps its hosts: check again
            refused: list[PolicyError] = []
            refused_names: set[str] = set()
            while True:
                errors = orphan_conflicts(policy_set, orphans, kept)
                files = {error.file for error in errors}
                names = {name for name, file in policy_set.files.items() if file in files} - refused_names
                refused += [error for error in errors if error not in refused]
                refused_names |= names
                newly = {name: self._rollouts[name] for name in names if name in self._rollouts}
                if not newly:
                    break
                kept.update(newly)
            if refused != self._refused:
                for error in refused:
                    log.error("policy refused: %s", error)
            self._refused = refused
            for name in set(self._pending) - set(policy_set.rollouts):
                del self._pending[name]  # gone again before it could be applied
            for name, rollout in sorted(policy_set.rollouts.items()):
                if name in refused_names:
                    self._pending.pop(name, None)
                    continue
                self._orphaned.discard(name)
                self._pending[name] = (rollout, policy_set.revision)
            self._apply_pending()
        return list(refused)

    def plan(self, name: str) -> TrafficPlan | None:
        """The traffic plan this rollout asks the proxies to serve (None: not placed yet)."""
        return self._director.desired(name)

    def stage(self, name: str) -> str | None:
        """Where publishing that plan is (adding, shifting, retiring, removing, settled); None: unknown."""
        stage = self._director.stage(name)
        return stage.value if stage is not None else None

    def envoy_weights(self, name: str) -> dict[str, int] | None:
        """Version -> weight the proxies ACKed for this rollout (None: unknown); see the director."""
        return self._director.envoy_weights(name)

    def refusals(self) -> list[PolicyError]:
        """Policies the last apply refused because an orphaned rollout still serves their hosts."""
        return list(self._refused)

    def blocked(self, name: str) -> str | None:
        """Why Envoy does not get this rollout's latest content: a NACK that froze its resources
        ("Envoy rejected route ..."), or content the director held back because Envoy would reject
        it. None when Envoy has been sent what status shows."""
        rejected = self._director.rejected(name)
        held = self._director.blocked(name)
        if held is not None:
            held = f"not published (Envoy would reject it): {held}"
        return "; ".join(r for r in (rejected, held) if r) or None

    def _apply_pending(self) -> None:
        """Apply each policy not applied yet; one that cannot be (not saved, an error) stays pending."""
        for name, (rollout, revision) in sorted(self._pending.items()):
            try:
                self._apply_policy(rollout, revision)
            except NotSaved:
                continue  # counted and shown where the save failed
            except Exception as exc:
                self._engine_failed(name, exc, "applying its policy file")
                continue
            del self._pending[name]
        if self._pending:
            self._schedule_retry()

    def _apply_policy(self, rollout: Rollout, revision: str | None) -> None:
        name = rollout.name
        previous = self._rollouts.get(name)
        if previous is None or previous.spec != rollout.spec or name not in self._status:
            self._step(rollout, revision, SpecObserved(rollout.spec))
            return
        self._rollouts[name] = rollout
        self._applied_revision[name] = revision
        self._wakes.mark(name)
        if self._store is not None and self._saved_revision.get(name) != revision:
            self._save_later_if_failed(name)

    def submit(self, name: str, event: Event) -> None:
        """Queue an event for the loop (safe from callbacks that run inside the engine)."""
        self._inbox.put_nowait((name, event))

    def command(self, name: str, event: Event) -> RolloutStatus:
        """Apply an admin command now; raise CommandRefused with the engine's reason if refused, or
        NotSaved when it moves away from stable and cannot be saved (then nothing changed)."""
        if name not in self._rollouts:
            raise KeyError(name)
        actions = self.handle(name, event)
        # The loop waits with the timeout it planned before the command (none at all while a
        # rollout was paused): wake it to plan again, or a resumed rollout with nothing else
        # pending would wait for an unrelated event to take its next step.
        self._inbox.put_nowait(("", Tick(self._clock())))
        for action in actions:
            if isinstance(action, Rejected):
                raise CommandRefused(name, action.reason)
        return self._status[name]

    def handle(self, name: str, event: Event) -> list[Action]:
        """One step of the engine for one rollout, with its actions carried out.

        Raises NotSaved, with nothing changed, when the step moves away from stable and cannot be
        saved; the loop tries it again (see the module docstring).
        """
        rollout = self._rollouts.get(name)
        if rollout is None:
            return []  # an ACK or check result for a rollout removed meanwhile
        return self._step(rollout, self._applied_revision.get(name), event)

    def _step(self, rollout: Rollout, revision: str | None, event: Event) -> list[Action]:
        """Step ``rollout`` as of ``revision``; both count as applied only once this succeeds."""
        name = rollout.name
        previous = self._status.get(name)
        status, actions = step(rollout.spec, previous, event, self._clock(), rollout=name)
        status, resumed = self._credit_restored_step(name, status)
        saved_as_is = rollout == self._rollouts.get(name) and revision == self._saved_revision.get(name, revision)
        if status != previous or not saved_as_is:
            # Persist before anything is pushed: after a crash we must not serve an older weight
            # (nor the hosts or listener of a file since edited, which an orphan would keep serving).
            events = [a.event for a in actions if isinstance(a, RecordEvent)]
            self._save_or_hold(previous, status, rollout, revision, events)
        if resumed:
            del self._resuming[name]
        records = [a.event for a in actions if isinstance(a, RecordEvent)]
        taken = status.last_checks is event.results or any(r.checks is event.results for r in records) \
            if isinstance(event, ChecksCompleted) else False
        if isinstance(event, ChecksCompleted) and taken and previous is not None and previous.canary is not None:
            transitions = tuple(record.reason for record in records)
            self._rounds.setdefault(name, deque(maxlen=self._round_history)).append(CheckRound(
                name, event.at, previous.canary.version, previous.step_index, previous.weight,
                round_outcome(event.results), event.results, transitions))
        self._rollouts[name] = rollout
        self._applied_revision[name] = revision
        self._status[name] = status
        self._wakes.mark(name)
        self._engine_recovered(name)
        self._execute(rollout, actions)
        return actions

    def _credit_restored_step(self, name: str, status: RolloutStatus) -> tuple[RolloutStatus, bool]:
        """Once a restored step's weight is ACKed again, count the time it ran before the restart.
        True: the resumption is used up (dropped once the step is carried out)."""
        resumption = self._resuming.get(name)
        if resumption is None:
            return status, False
        canary = status.canary.version if status.canary else None
        if (canary, status.step_index) != (resumption.canary_version, resumption.step_index):
            return status, True  # another step or canary now: nothing to carry over
        if status.step_started_at is not None:
            return replace(status, step_started_at=status.step_started_at - resumption.elapsed), True
        return status, False

    # ---- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Wait for an event or the next wake-up, then handle everything queued and everything due
        as one batch (see ``_one_batch``), and let the rest of the process (the admin API, the
        streams) have the event loop before the next batch."""
        try:
            while True:
                try:
                    timeout = self._until_next_wakeup()
                    first: tuple[str, Event] | None = None
                    with contextlib.suppress(TimeoutError):
                        first = await asyncio.wait_for(self._inbox.get(), timeout)
                    with self._one_batch():
                        if first is not None:
                            self._handle_safely(*first)
                        self.process_queued()
                        self._wake_due()
                    self._engine_recovered(LOOP)
                    await asyncio.sleep(0)  # a batch never runs back to back with the next one
                except Exception as exc:  # a bug outside any one rollout: log it, pause, go on
                    self._engine_failed(LOOP, exc, "the engine loop")
                    await asyncio.sleep(RETRY_SECONDS)
        finally:
            for task in self._checks.values():
                task.cancel()
            self._checks.clear()
            for provider in [*self._providers.values(), *([self._web] if self._web is not None else [])]:
                close = getattr(provider, "close", None)
                if close is not None:
                    close()  # its threads and HTTP session; a hanging query is abandoned, not awaited
            self._providers.clear()
            self._web = None

    def wake_due(self) -> None:
        """Do what is due now, as the loop does when it wakes (for driving the runner by hand):
        start the check rounds that are due, step the rollouts whose time has come."""
        with self._one_batch():
            self._wake_due()

    def next_wakeup_at(self) -> float | None:
        """When something is next due on the engine's clock (None: nothing is time-driven now)."""
        times = [t for t in (self._wakes.next_time(), self._retry_at) if t is not None]
        return min(times, default=None)

    async def rounds_finished(self) -> bool:
        """Wait for the check rounds running now; True if there were any (their results are queued)."""
        running = list(self._checks.values())
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        return bool(running)

    def process_queued(self) -> None:
        """Handle every event queued so far, as the loop does (for driving the runner by hand):
        in batches, until the publish that ends one queues nothing more (with no proxy connected,
        the director reports each publish ACKed at once)."""
        while not self._inbox.empty():
            with self._one_batch():
                while not self._inbox.empty():
                    name, event = self._inbox.get_nowait()
                    self._handle_safely(name, event)
            if self._deferred is not None:
                return  # inside the loop's batch: what its publish queues is for the next turn

    @contextlib.contextmanager
    def _one_batch(self) -> Iterator[None]:
        """Handle several events as one: the saves commit in one transaction and the director
        publishes once, when the block ends (the saves first: persist before pushing).

        With 1,000 rollouts checked every second, one transaction and one snapshot per event made
        each round of checks cost O(R) commits and O(R) full snapshots. Nothing waits to gather a
        batch: it is whatever was queued or due when the loop woke, so a rollback is delayed by at
        most the time it takes to handle the events queued before it. A move away from stable still
        commits at once (with whatever the batch deferred so far), so that a failed save can hold it
        back before it is carried out (see the module docstring)."""
        if self._deferred is not None:  # nested: the outer batch commits and publishes
            with self._director.batch():
                yield
            return
        with self._director.batch():
            self._deferred = {}
            try:
                yield
            finally:
                self._flush_deferred()

    def _handle_safely(self, name: str, event: Event) -> None:
        try:
            self.handle(name, event)
        except NotSaved:
            pass  # counted and shown where the save failed; the move is tried again
        except Exception as exc:
            self._engine_failed(name, exc, f"handling {type(event).__name__}")

    def _wake_time(self, name: str) -> float | None:
        """When the loop should next look at ``name`` (None: nothing is time-driven for it now)."""
        status, rollout = self._status.get(name), self._rollouts.get(name)
        if status is None or rollout is None or name in self._checks:
            return None  # a running round's result arrives through the inbox
        wake = next_wakeup(rollout.spec, status)
        if wake is None:
            return None
        return max(wake, self._held_until.get(name, wake))  # it backs off after a failure

    def _until_next_wakeup(self) -> float | None:
        at = self.next_wakeup_at()
        return None if at is None else max(0.0, at - self._clock())

    def _wake_due(self) -> None:
        now = self._clock()
        if self._retry_at is not None and now >= self._retry_at:
            self.retry()
        for name in self._wakes.due(now):
            self._wakes.mark(name)  # whatever happens to it now, its next time is computed again
            status = self._status.get(name)
            if status is None or name in self._checks or self._held_until.get(name, now) > now:
                continue
            try:
                spec = self._rollouts[name].spec
                wake = next_wakeup(spec, status)
                if wake is None or wake > now:
                    continue
                if checks_due(spec, status, now):
                    self._start_checks(name, status)
                else:
                    self.handle(name, Tick(now))
            except NotSaved:
                pass
            except Exception as exc:
                self._engine_failed(name, exc, "a wake-up")

    def retry(self) -> None:
        """Try again what failed: saves of decisions already carried out (and of rollouts whose
        moves wait for a save), deletions of pruned rollouts, policies not applied yet. The loop
        calls this every ``RETRY_SECONDS`` while anything is left."""
        self._retry_at = None
        for name in sorted(self._undeleted):
            self._delete(name)
        for name in sorted(self._published_unsaved):
            self._on_published(name, self._director.published_state(name))
        waiting = {w.removeprefix("rollout ") for w in self.state_writes.failing() if w.startswith("rollout ")}
        for name in sorted((set(self._unsaved) | waiting) & set(self._status)):
            if self._save_later_if_failed(name):
                self._held_until.pop(name, None)  # a step held back for the save may go now
                self._wakes.mark(name)
        self._apply_pending()

    def _schedule_retry(self) -> None:
        if self._retry_at is None:
            self._retry_at = self._clock() + RETRY_SECONDS
            self._inbox.put_nowait(("", Tick(self._retry_at)))  # wake the loop to re-plan its timeout

    # ---- faults --------------------------------------------------------------------------

    def _engine_failed(self, name: str, exc: BaseException, during: str) -> None:
        """Log (with the traceback, once per distinct error), count and show an engine error; the
        rollout's wake-ups back off, so a persistent error is retried, not spun on."""
        text = f"{type(exc).__name__}: {exc}"
        self._engine_error_counts[name] += 1
        if self._engine_errors.get(name) != text:
            log.error("rollout %s: engine error while %s: %s", name or "-", during, text, exc_info=exc)
        self._engine_errors[name] = text
        if name:
            self._held_until[name] = self._clock() + RETRY_SECONDS
            self._wakes.mark(name)
            self._schedule_retry()

    def _engine_recovered(self, name: str) -> None:
        if self._engine_errors.pop(name, None) is not None:
            log.info("%s: the engine steps it again", f"rollout {name}" if name != LOOP else "engine loop")
            self._held_until.pop(name, None)
            self._wakes.mark(name)

    def _start_checks(self, name: str, status: RolloutStatus) -> None:
        spec = self._rollouts[name].spec
        analysis = analysis_for(spec, status)  # during the afterPromotion window: no stable comparison
        canary = status.canary
        if analysis is None or canary is None:
            return
        url = analysis.prometheus or self._default_prometheus
        canary_version = canary.version
        providers: dict[str, MetricProvider] = {}
        if analysis.provider == ENVOY:
            providers[ENVOY] = self._envoy_provider(spec.proxy_cluster)
            for version in (canary_version, status.stable.version):
                self.envoy_reports.keep(cluster_name(name, version), analysis.samples_per_second)
        elif url is None:  # a policy restored from state, applied when the server had a --prometheus-url
            results = tuple(result for check in checks_of(analysis) for result in check.unanswered(PROMETHEUS_NEEDED))
            if self._provider_trouble.get(name) != PROMETHEUS_NEEDED:
                log.warning("rollout %s: checks inconclusive: %s", name, PROMETHEUS_NEEDED)
                self._provider_trouble[name] = PROMETHEUS_NEEDED
            self.handle(name, ChecksCompleted(results, self._clock(), canary_version))
            return
        else:
            provider = self._providers.get(url)
            if provider is None:
                provider = self._providers[url] = self._provider_factory(url)
            providers[PROMETHEUS] = provider
        if any(metric.web is not None for metric in analysis.metrics):
            if self._web is None:
                self._web = self._web_factory()
            providers[WEB] = self._web
        stable_version = status.stable.version
        canary_side = Side(cluster_name(name, canary_version), canary_version, status.weight)
        started_at = status.canary_started_at
        since = self._clock() - started_at if started_at is not None else None
        stable_side = Side(cluster_name(name, stable_version), stable_version, 100 - status.weight)

        async def round_of_checks() -> None:
            try:
                # Stamped with when its queries ran (its start), not when the answers came back.
                started, results = await check_round(providers, analysis, canary_side, stable_side, self._clock,
                                                     since=since, judge_failed=status.judge_failed)
                self._report_provider_trouble(name, providers, results)
                self.submit(name, ChecksCompleted(results, started, canary_version))
            except Exception as exc:  # not a check's outcome (those are results): a fault of ours
                self._engine_failed(name, exc, "a check round")
            finally:
                self._checks.pop(name, None)
                self._wakes.mark(name)

        self._checks[name] = asyncio.create_task(round_of_checks(), name=f"checks-{name}")
        self._wakes.mark(name)

    def _envoy_provider(self, proxy_cluster: str | None) -> EnvoyProvider:
        """The ``envoy`` provider for one round: the proxies that serve the rollout (its
        ``proxyCluster``, or every one) must all be reporting."""
        reporters = self._reporters

        def expected() -> list[Reporter]:
            return [(node_id, connected_at) for node_id, node_cluster, connected_at in reporters()
                    if proxy_cluster is None or node_cluster == proxy_cluster]

        return EnvoyProvider(self.envoy_reports, expected)

    def _report_provider_trouble(self, name: str, providers: Mapping[str, MetricProvider],
                                 results: Iterable[CheckResult]) -> None:
        """Log once per rollout when one of its metrics providers starts failing (or the cause
        changes), and once when it answers again: status shows every round, the log only the changes."""
        sources = [repr(provider) for provider in providers.values()]
        cause = next((r.reason for r in results if r.outcome is CheckOutcome.INCONCLUSIVE
                      and any(source in r.reason for source in sources)), None)
        previous = self._provider_trouble.get(name)
        if cause == previous:
            return
        if cause is not None:
            log.warning("rollout %s: checks inconclusive: %s", name, cause)
            self._provider_trouble[name] = cause
        elif previous is not None:
            source = next((source for source in sources if source in previous), sources[0])
            log.info("rollout %s: %s answers again", name, source)
            del self._provider_trouble[name]

    # ---- actions and callbacks -----------------------------------------------------------

    def _save_or_hold(
        self,
        previous: RolloutStatus | None,
        status: RolloutStatus,
        rollout: Rollout,
        revision: str | None,
        events: list[TransitionEvent],
    ) -> None:
        """Save a new status before it is carried out. When that fails: raise NotSaved for a move
        away from stable (nothing happens; retried after RETRY_SECONDS), or let any other move go
        ahead and keep it, with its events, to be saved by ``retry``."""
        name = status.rollout
        away = moves_away_from_stable(previous, status)
        try:
            self._write(status, rollout, revision, events, defer=not away)
        except _WRITE_ERRORS as exc:
            held = "waits for the save" if away else "carried out, its save is retried"
            error = self._write_failed(name, exc, f"{_summary(status)} {held}")
            if away:
                self._held_until[name] = self._clock() + RETRY_SECONDS
                self._wakes.mark(name)
                self._schedule_retry()
                raise NotSaved(name, error) from exc
            self._unsaved.setdefault(name, []).extend(events)
            self._schedule_retry()

    def _save_later_if_failed(self, name: str) -> bool:
        """Save the current status of ``name`` (with events not saved yet); True when saved."""
        try:
            self._write(self._status[name], self._rollouts[name], self._applied_revision.get(name), [], defer=False)
        except _WRITE_ERRORS as exc:
            self._write_failed(name, exc, f"{_summary(self._status[name])} not saved yet")
            self._schedule_retry()
            return False
        return True

    def _write(self, status: RolloutStatus, rollout: Rollout, revision: str | None,
               events: list[TransitionEvent], *, defer: bool = True) -> None:
        """One save; on success, whatever was waiting to be saved for this rollout is saved too.

        In a batch (``_one_batch``) the save is deferred to the batch's transaction, unless ``defer``
        is False: then it commits now, together with what the batch deferred so far, and raises
        if that fails (the deferred ones are then carried out and saved later, like any move that
        is not away from stable)."""
        name = status.rollout
        if self._store is None:
            return
        save = _Save(status, rollout, revision, list(events))
        if self._deferred is None:
            self._commit({name: save})
            return
        earlier = self._deferred.get(name)
        if defer:
            if earlier is not None:
                save.events[:0] = earlier.events
            self._deferred[name] = save
            return
        pending, self._deferred = self._deferred, {}
        saves = {**pending, name: replace(save, events=[*(earlier.events if earlier else ()), *save.events])}
        try:
            self._commit(saves)
        except _WRITE_ERRORS as exc:
            self._deferred_failed(pending, exc)  # ``name``'s earlier events too: they were carried out
            raise

    def _commit(self, saves: Mapping[str, _Save]) -> None:
        """Commit ``saves`` in one transaction (raises if it fails), with each rollout's unsaved events."""
        assert self._store is not None
        self._store.save_many([(save.status, save.rollout, [*self._unsaved.get(name, ()), *save.events], save.revision)
                               for name, save in saves.items()])
        for name, save in saves.items():
            self._saved_revision[name] = save.revision
            self._undeleted.discard(name)  # saved again after a prune: its pending deletion is void
            if self._unsaved.pop(name, None) is not None or self.state_writes.error(_writer(name)):
                log.info("rollout %s: saved again: %s", name, _summary(save.status))
            self.state_writes.succeeded(_writer(name))

    def _flush_deferred(self) -> None:
        """Commit the saves of the batch that ends (before its publish); a failure leaves them to
        ``retry``: they were moves that may be carried out before they are saved."""
        pending, self._deferred = self._deferred or {}, None
        if not pending:
            return
        try:
            self._commit(pending)
        except _WRITE_ERRORS as exc:
            self._deferred_failed(pending, exc)
        except Exception as exc:  # a bug, not the disk: still, what was carried out is retried
            self._deferred_failed(pending, exc)
            raise

    def _deferred_failed(self, pending: Mapping[str, _Save], exc: BaseException) -> None:
        for name, save in pending.items():
            self._unsaved.setdefault(name, []).extend(save.events)
            self._write_failed(name, exc, f"{_summary(save.status)} carried out, its save is retried")
        if pending:
            self._schedule_retry()

    def _write_failed(self, name: str, exc: BaseException, what: str) -> str:
        """Count a failed write and log it once per rollout and error; returns the error text."""
        error = str(exc)
        if not isinstance(exc, StateWriteError):
            error = f"state file {getattr(self._store, 'path', '?')} cannot be written: {exc}"
        if self.state_writes.failed(_writer(name), error):
            log.error("rollout %s: %s: %s", name, what, error)
        return error

    def _delete(self, name: str) -> None:
        if self._store is None:
            return
        if self._deferred is not None:
            self._deferred.pop(name, None)  # committed after the deletion, it would bring the row back
        try:
            self._store.delete(name)
        except _WRITE_ERRORS as exc:
            self._undeleted.add(name)
            self._write_failed(name, exc, "pruned, its deletion from the state file is retried")
            self._schedule_retry()
            return
        self._undeleted.discard(name)
        self.state_writes.forget(_writer(name))

    def _publish(self, rollout: Rollout, traffic: TrafficPlan) -> None:
        placement = _placement_of(rollout)
        self._placements[rollout.name] = placement
        self._director.set_rollout(rollout.name, placement, traffic)

    def _execute(self, rollout: Rollout, actions: Iterable[Action]) -> None:
        traffic = None
        for action in actions:
            if isinstance(action, SetTraffic):
                traffic = action.traffic
            elif isinstance(action, RecordEvent):
                self._record(action.event)
        desired = self._director.desired(rollout.name)
        if traffic is None and desired is not None and rollout.name in self._status:
            # The engine emits a plan when the status changes; an edit of an opened cohort's
            # conditions or of the stickiness changes the plan but not the status: caught here.
            plan = traffic_plan(rollout.spec, self._status[rollout.name])
            edited = replace(desired, cohorts=plan.cohorts, stickiness=plan.stickiness)
            if desired.canary == plan.canary and edited != desired:
                traffic = edited
        if traffic is None and self._placements.get(rollout.name) != _placement_of(rollout):
            # The file moved the rollout (listener, hosts) without changing its traffic.
            traffic = self._director.desired(rollout.name) or traffic_plan(rollout.spec, self._status[rollout.name])
        if traffic is not None:
            self._publish(rollout, traffic)

    def _record(self, event: TransitionEvent) -> None:
        history = self._history.setdefault(event.rollout, deque(maxlen=EVENT_HISTORY))
        history.append(event)
        checks = ", ".join(f"{c.name}={c.value}" for c in event.checks)
        traffic = traffic_text(event.canary_version, event.weight, event.stable_version, event.cohorts, event.mirror)
        log.info(
            "rollout %s: %s -> %s, %s: %s%s",
            event.rollout,
            event.from_phase.value if event.from_phase else "-",
            event.to_phase.value,
            traffic,
            event.reason,
            f" checks: {checks}" if checks else "",
        )
        for listener in list(self._listeners):  # a listener may unsubscribe meanwhile
            try:
                listener(event)
            except Exception:  # a watcher's fault must not stop the traffic change behind it
                log.exception("rollout %s: a transition listener failed", event.rollout)

    def _on_traffic_acked(self, name: str, traffic: TrafficPlan) -> None:
        version = traffic.canary.version if traffic.canary else traffic.stable.version
        weight = traffic.canary_weight if traffic.canary else 100
        self.submit(name, WeightAcked(version, weight, self._clock(), traffic.cohort_names, traffic.mirror))

    def _on_nack(self, nack: RolloutNack) -> None:
        # The engine ignores a NACK once there is no canary, so a NACK of the snapshot that carries
        # the rollback itself (or of a later one still holding the rejected content) ends there.
        self.submit(nack.rollout, ProxyNacked(nack.node_id, nack.message))

    def _on_published(self, name: str, state: PublishedState | None) -> None:
        """Persist what the director published, so a restart keeps clusters routes still name."""
        if self._store is None:
            return
        writer = f"published {name}"
        try:
            saved = None if state is None else SavedPublished(
                state.route, state.clusters, state.cohorts, state.stickiness, state.mirror)
            self._store.save_published(name, saved)
        except _WRITE_ERRORS as exc:
            # Counted like any failed write (health, metric) and retried: a restart must not bring
            # back a route the proxies were already moved away from (say, a rolled-back canary's).
            if self.state_writes.failed(writer, str(exc)):
                log.error("rollout %s: what was published is not saved yet (retrying): %s", name, exc)
            self._published_unsaved.add(name)
            self._schedule_retry()
        else:
            self._published_unsaved.discard(name)
            self.state_writes.succeeded(writer)

    def _forget(self, name: str) -> None:
        self._orphaned.discard(name)
        self._delete(name)  # a failed delete is retried; a restart meanwhile prunes it again
        for faults in (self._unsaved, self._held_until, self._engine_errors, self._pending):
            faults.pop(name, None)
        self._rollouts.pop(name, None)
        self._status.pop(name, None)
        self._placements.pop(name, None)
        task = self._checks.pop(name, None)
        if task is not None:
            task.cancel()
        self._wakes.mark(name)
        self._director.remove_rollout(name)


def _writer(name: str) -> str:
    """The name a rollout's saves go by in ``StateWrites``."""
    return f"rollout {name}"
