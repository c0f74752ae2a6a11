"""Restore: bring back exactly the guests that the last preserve found running or paused.

Guests that were off stay off; a paused guest comes back paused (its managed-save
image says so, or it is started paused). Starts are spaced by ``start_delay`` and at
most ``parallel_start`` run at once. A guest whose image should be there but is not
is reported and never cold-booted. Each guest is brought back at most once per
preserve (``JournalData.restored``). Then, with ``sync_time``, each running guest's
clock is set through its agent; a failed sync is reported, not fatal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from guestwarden.conf.settings import Settings
from guestwarden.ipc.messages import GuestOutcome, JobDone
from guestwarden.supervisor.journal import Journal, JournalData, guest_key
from guestwarden.supervisor.runs import JobService, Run

log = logging.getLogger(__name__)

RESTORABLE_OUTCOMES = frozenset(
    {"saved", "shutdown", "poweroff", "off", "pending", "interrupted", "failed"})
"""Preserve outcomes after which a guest that was active is started again. ``pending``,
``interrupted`` and ``failed`` are there because start is idempotent: a guest still
running is left as it is, and one that a crashed preserve did stop is brought back."""


class StartPacer:
    """Spaces successive starts by ``delay_s`` (libvirt-guests' START_DELAY)."""

    def __init__(self, delay_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.delay_s = delay_s
        self.clock = clock
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait_turn(self) -> None:
        async with self._lock:
            wait = self._next - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next = self.clock() + self.delay_s


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


class RestoreRun(Run):
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
        super().__init__(jobs, wall_clock)
        self.settings = settings
        self.journal = journal
        self.journal_data = journal_data
        self.boot_id = boot_id
        self.automatic = automatic
        self.on_journal: Callable[[JournalData], None] = lambda _data: None

    def write_journal(self) -> None:
        data = self.journal_data()
        brought_back = {k for k, g in self.guests.items() if g.finished and g.ok}
        data = JournalData(
            preserve=data.preserve,
            preserve_boot_id=data.preserve_boot_id,
            restore=self.status(),
            restored=tuple(sorted(set(data.restored) | brought_back)),
            restore_boot_id=self.boot_id if self.automatic else data.restore_boot_id,
        )
        self.journal.save(data)
        self.on_journal(data)

    async def execute(self) -> None:
        for g in restore_candidates(self.journal_data()):
            self.guests[guest_key(g.uri, g.uuid)] = GuestOutcome(
                uri=g.uri, uuid=g.uuid, name=g.name, persistent=g.persistent,
                state_before=g.state_before, chain=("start",), outcome="pending",
                detail=f"preserved as {g.outcome}",
            )
        self.write_journal()
        # the preserve outcome decides whether an image must exist
        preserved = {guest_key(g.uri, g.uuid): g.outcome
                     for g in restore_candidates(self.journal_data())}
        boot = self.settings.boot
        starts = asyncio.Semaphore(boot.parallel_start)
        pacer = StartPacer(boot.start_delay)
        await asyncio.gather(*(
            self._bring_back(key, preserved.get(key, ""), starts, pacer) for key in self.guests
        ))
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
        self, key: str, preserved_as: str, starts: asyncio.Semaphore, pacer: StartPacer
    ) -> None:
        record = self.guests[key]
        boot = self.settings.boot
        async with starts:
            await pacer.wait_turn()
            started = time.monotonic()
            result = await self.jobs.run(self.jobs.new_job(
                "start", record.uri, uuid=record.uuid, name=record.name,
                timeout_s=boot.start_timeout,
                start_paused=record.state_before == "paused",
                expect_managed_save=preserved_as == "saved",
                bypass_cache=self.settings.shutdown.bypass_cache,
            ))
            elapsed = round(time.monotonic() - started, 3)
        if not isinstance(result, JobDone):
            if result.reason == "not-found" and not record.persistent:
                # libvirt forgets a transient guest once it is off: nothing to start
                self.update(key, outcome="gone", ok=True, finished=True,
                            detail="transient guest no longer defined",
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
        if boot.sync_time and record.state_before == "running":
            sync = await self.jobs.run(self.jobs.new_job(
                "sync_time", record.uri, uuid=record.uuid, name=record.name,
                timeout_s=boot.sync_time_timeout,
            ))
            if isinstance(sync, JobDone):
                outcome += ", clock synced"
            else:
                outcome += ", clock sync failed"
                detail = sync.detail or sync.reason
                log.warning("guest=%s time sync failed: %s", record.name, detail)
        self.update(key, outcome=outcome, ok=True, finished=True, detail=detail,
                    durations_s={"start": elapsed})
