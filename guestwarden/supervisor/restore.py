"""Restore: bring back exactly the guests that the last preserve found running or paused.

Guests that were off stay off; a paused guest comes back paused (its managed-save
image says so, or it is started paused). Starts are spaced by ``start_delay`` and at
most ``parallel_start`` run at once. A guest whose image should be there but is not
is reported and never cold-booted. Each guest is brought back at most once per
preserve (``JournalData.restored``). Then, with ``sync_time``, each running guest's
clock is set through its agent; a failed sync is reported, not fatal.

Order groups (the ``order`` each guest had when preserved, ordering.py) come back
from the lowest to the highest: a group starts once every start of the group before
it has returned, and, with ``wait_for_agents``, once the guest agents of its running
guests answer (or that long has passed). Clock syncs do not hold up the next group.
Each guest's own ``start_delay`` spaces its start from the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec

from guestwarden.conf.libvirt_guests_list import TAKEN_OVER
from guestwarden.conf.settings import Settings
from guestwarden.ipc.messages import GuestOutcome, JobDone
from guestwarden.supervisor.journal import Journal, JournalData, guest_key
from guestwarden.supervisor.learned import Learned, learn
from guestwarden.supervisor.ordering import groups
from guestwarden.supervisor.runs import JobService, JournaledRun

log = logging.getLogger(__name__)

RESTORABLE_OUTCOMES = frozenset(
    {"saved", "shutdown", "poweroff", "off", "pending", "interrupted", "failed", TAKEN_OVER})
"""Preserve outcomes after which a guest that was active is started again. ``pending``,
``interrupted`` and ``failed`` are there because start is idempotent: a guest still
running is left as it is, and one that a crashed preserve did stop is brought back.
``TAKEN_OVER``: listed by libvirt-guests (conf/libvirt_guests_list.py); it may or may
not have an image, so none is expected, and one libvirt no longer knows is gone."""


class StartPacer:
    """Spaces successive starts by ``delay_s`` (libvirt-guests' START_DELAY)."""

    def __init__(self, delay_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.delay_s = delay_s
        self.clock = clock
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait_turn(self, delay_s: float | None = None) -> None:
        """Wait for this start's turn; the next start comes ``delay_s`` after it (the
        guest's own ``start_delay``; None: the pacer's)."""
        async with self._lock:
            wait = self._next - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next = self.clock() + (self.delay_s if delay_s is None else delay_s)

    @property
    def next_start_at(self) -> float:
        """The earliest time (of ``clock``) at which the next start may go."""
        return self._next


def restore_candidates(data: JournalData) -> list[GuestOutcome]:
    if data.preserve is None:
        return []
    done = set(data.restored)
    return [
        g for g in data.preserve.guests
        if g.state_before in ("running", "paused")
        and g.outcome in RESTORABLE_OUTCOMES
        and guest_key(g.uri, g.uuid) not in done
    ]


class RestoreRun(JournaledRun):
    kind = "restore"

    def __init__(
        self,
        jobs: JobService,
        settings: Settings,
        journal: Journal,
        journal_data: Callable[[], JournalData],
        boot_id: str,
        *,
        automatic: bool = False,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(jobs, settings, journal, journal_data, boot_id, wall_clock)
        self.automatic = automatic
        self.learned: Learned | None = None

    def journal_record(self) -> JournalData:
        data = self.journal_data()
        brought_back = {k for k, g in self.guests.items() if g.finished and g.ok}
        return msgspec.structs.replace(
            data,
            restore=self.status(),
            restored=tuple(sorted(set(data.restored) | brought_back)),
            restore_boot_id=self.boot_id if self.automatic else data.restore_boot_id,
            learned=self.learned or data.learned,
        )

    async def execute(self) -> None:
        for g in restore_candidates(self.journal_data()):
            self.guests[guest_key(g.uri, g.uuid)] = GuestOutcome(
                uri=g.uri, uuid=g.uuid, name=g.name, persistent=g.persistent,
                state_before=g.state_before, chain=("start",), outcome="pending",
                detail=f"preserved as {g.outcome}", order=g.order, start_delay_s=g.start_delay_s,
            )
        self.planned()
        self.write_journal()
        # the preserve outcome decides whether an image must exist
        preserved = {guest_key(g.uri, g.uuid): g.outcome
                     for g in restore_candidates(self.journal_data())}
        boot = self.settings.boot
        starts = asyncio.Semaphore(boot.parallel_start)
        pacer = StartPacer(boot.start_delay)
        plan = groups(list(self.guests), lambda k: self.guests[k].order, descending=False)
        tasks: list[asyncio.Task[None]] = []
        try:
            for number, (order, keys) in enumerate(plan, 1):
                if len(plan) > 1:
                    log.info("restore: order group %d: %d guests", order, len(keys))
                started = [asyncio.Event() for _ in keys]
                tasks += [asyncio.create_task(self._bring_back(
                    key, preserved.get(key, ""), starts, pacer, event))
                    for key, event in zip(keys, started, strict=True)]
                await asyncio.gather(*(event.wait() for event in started))  # the barrier
                if boot.wait_for_agents and number < len(plan):
                    await self._wait_for_agents(keys)
            await asyncio.gather(*tasks)
        finally:
            # a restore cancelled (the host is going down) starts nothing more: its
            # guests' tasks go with it, as they did when they were children of a gather
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.learned = learn(self.journal_data().learned, self.status(), self.wall_clock())
        failed = [g for g in self.guests.values() if not g.ok]
        unsynced = [g for g in self.guests.values() if g.outcome.endswith("sync failed")]
        self.ok = not failed
        parts = [f"{len(self.guests) - len(failed)}/{len(self.guests)} guests brought back"]
        if failed:
            parts.append(f"{len(failed)} failed: " + ", ".join(g.name for g in failed[:10]))
        if unsynced:
            parts.append(f"clock not synced on {len(unsynced)}")
        self.detail = "; ".join(parts)

    async def _bring_back(
        self, key: str, preserved_as: str, starts: asyncio.Semaphore, pacer: StartPacer,
        start_returned: asyncio.Event,
    ) -> None:
        record = self.guests[key]
        boot = self.settings.boot
        try:
            async with starts:
                await pacer.wait_turn(record.start_delay_s)
                started = time.monotonic()
                result = await self.jobs.run(self.jobs.new_job(
                    "start", record.uri, uuid=record.uuid, name=record.name,
                    timeout_s=boot.start_timeout,
                    start_paused=record.state_before == "paused",
                    expect_managed_save=preserved_as == "saved",
                    bypass_cache=self.settings.shutdown.bypass_cache,
                ))
                elapsed = round(time.monotonic() - started, 3)
        finally:
            start_returned.set()  # the group's barrier counts it, whatever happened
        if result.started_ns and result.finished_ns:
            self._add_span(key, "start", (result.started_ns, result.finished_ns))
        if not isinstance(result, JobDone):
            if result.reason == "not-found" and (not record.persistent
                                                 or preserved_as == TAKEN_OVER):
                # libvirt forgets a transient guest once it is off: nothing to start
                self.update(key, outcome="gone", ok=True, finished=True,
                            detail="transient guest no longer defined"
                            if preserved_as != TAKEN_OVER else "no longer defined",
                            durations_s={"start": elapsed})
                return
            self.update(key, outcome="failed", ok=False, finished=True,
                        detail=result.detail or result.reason, durations_s={"start": elapsed})
            log.error("guest=%s restore failed: %s", record.name, result.detail)
            return
        outcome = result.result  # restored | started | already-running
        detail = result.detail
        self.update(key, outcome=outcome, detail=detail, durations_s={"start": elapsed})
        log.info("guest=%s %s", record.name, outcome)
        durations = {"start": elapsed}
        if boot.sync_time and record.state_before == "running":
            sync_started = time.monotonic()
            sync = await self.jobs.run(self.jobs.new_job(
                "sync_time", record.uri, uuid=record.uuid, name=record.name,
                timeout_s=boot.sync_time_timeout,
            ))
            durations["sync_time"] = round(time.monotonic() - sync_started, 3)
            if isinstance(sync, JobDone):
                outcome += ", clock synced"
                detail = f"{detail}; {sync.detail}" if detail and sync.detail else (
                    detail or sync.detail)
            else:
                outcome += ", clock sync failed"
                detail = sync.detail or sync.reason
                log.warning("guest=%s time sync failed: %s", record.name, detail)
        self.update(key, outcome=outcome, ok=True, finished=True, detail=detail,
                    durations_s=durations)

    def _add_span(self, key: str, what: str, span: tuple[int, int]) -> None:
        self.update(key, spans_ns={**self.guests[key].spans_ns, what: span})

    async def _wait_for_agents(self, keys: list[str]) -> None:
        """Until the agents of the group's started running guests answer, or at most
        ``wait_for_agents``: the next group may need the services in this one."""
        timeout_s = self.settings.boot.wait_for_agents
        waiting = [k for k in keys if self.guests[k].state_before == "running"
                   and self.guests[k].outcome.startswith(("restored", "started"))]

        async def one(key: str) -> None:
            record = self.guests[key]
            result = await self.jobs.run(self.jobs.new_job(
                "agent_wait", record.uri, uuid=record.uuid, name=record.name,
                timeout_s=timeout_s))
            if result.started_ns and result.finished_ns:
                self._add_span(key, "agent_wait", (result.started_ns, result.finished_ns))
            if isinstance(result, JobDone):
                log.info("guest=%s agent answered: %s", record.name, result.detail)
            else:
                log.warning("guest=%s agent did not answer (%s): the next group starts "
                            "anyway", record.name, result.detail or result.reason)

        await asyncio.gather(*(one(key) for key in waiting))
