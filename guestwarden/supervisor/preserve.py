"""Preserve: every running or paused guest through its action chain, within bounds.

Inventory of every URI (a worker job each) -> one task per guest that walks its
chain (save -> shutdown -> poweroff by default), taking a slot of the action's bound
for each attempt -> a guest whose action fails or times out moves to the next one
-> the journal says what happened to every guest before the run reports done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

from guestwarden.conf.settings import Settings
from guestwarden.ipc.messages import ActionName, GuestInfo, GuestOutcome, JobDone, JobFailed
from guestwarden.supervisor.journal import Journal, JournalData, guest_key
from guestwarden.supervisor.plan import ActionBounds, action_timeout_s, chain_for
from guestwarden.supervisor.recovery import remembered
from guestwarden.supervisor.runs import JobService, Run, describe_result

log = logging.getLogger(__name__)

# result of a worker's action -> what the guest's state is now
_OUTCOMES: dict[str, str] = {
    "saved": "saved",
    "already-saved": "saved",
    "already-off": "off",
    "shut-down": "shutdown",
    "powered-off": "poweroff",
}


async def take_inventory(
    jobs: JobService, settings: Settings
) -> tuple[list[GuestInfo], list[str]]:
    """Every guest on every URI, and an error line per URI that could not be listed."""
    timeout_s = settings.advanced.connect_timeout + 60.0
    results = await asyncio.gather(
        *(jobs.run(jobs.new_job("inventory", uri, timeout_s=timeout_s)) for uri in settings.uris)
    )
    guests: list[GuestInfo] = []
    errors: list[str] = []
    for uri, result in zip(settings.uris, results, strict=True):
        if isinstance(result, JobDone):
            guests.extend(result.guests)
        else:
            errors.append(f"{uri}: cannot list guests: {result.detail or result.reason}")
    return guests, errors


class PreserveRun(Run):
    kind = "preserve"

    def __init__(
        self,
        jobs: JobService,
        settings: Settings,
        journal: Journal,
        journal_data: Callable[[], JournalData],
        boot_id: str,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(jobs, wall_clock)
        self.settings = settings
        self.journal = journal
        self.journal_data = journal_data
        self.boot_id = boot_id
        self.clock = clock
        self.on_journal: Callable[[JournalData], None] = lambda _data: None

    def write_journal(self) -> None:
        data = self.journal_data()
        data = JournalData(
            preserve=self.status(),
            preserve_boot_id=self.boot_id,
            restore=data.restore,
            restored=(),  # a new preserve: everything in it may be restored once
            restore_boot_id=data.restore_boot_id,
        )
        self.journal.save(data)
        self.on_journal(data)

    async def execute(self) -> None:
        guests, errors = await take_inventory(self.jobs, self.settings)
        earlier = self.journal_data()
        for guest in guests:
            self.guests[guest_key(guest.uri, guest.uuid)] = remembered(earlier, guest) or (
                GuestOutcome(
                    uri=guest.uri, uuid=guest.uuid, name=guest.name,
                    persistent=guest.persistent, state_before=guest.state,
                    chain=chain_for(guest, self.settings), outcome="pending",
                ))
        for key, record in self.guests.items():
            if not record.chain and not record.finished:
                self.update(key, outcome="untouched", ok=True, finished=True,
                            detail=f"was {record.state_before}")
        self.write_journal()
        bounds = ActionBounds(self.settings)
        await asyncio.gather(*(
            self._walk_chain(key, bounds) for key, g in self.guests.items() if not g.finished
        ))
        failed = [g for g in self.guests.values() if not g.ok]
        done, total = self.counts()
        self.ok = not failed and not errors
        parts = [f"{done}/{total} guests handled"]
        if failed:
            parts.append(f"{len(failed)} failed: " + ", ".join(g.name for g in failed[:10]))
        parts.extend(errors)
        self.detail = "; ".join(parts)

    async def _walk_chain(self, key: str, bounds: ActionBounds) -> None:
        record = self.guests[key]
        attempts: list[str] = []
        durations: dict[str, float] = {}
        last_detail = ""
        for action in record.chain:
            result, elapsed = await self._attempt(record, cast(ActionName, action), bounds)
            durations[action] = round(elapsed, 3)
            attempts.append(f"{action}: {describe_result(result)}")
            if isinstance(result, JobDone):
                self.update(key, outcome=_OUTCOMES.get(result.result, result.result), ok=True,
                            finished=True, detail=result.detail, attempts=tuple(attempts),
                            durations_s=durations)
                log.info("guest=%s preserved: %s", record.name, attempts[-1])
                return
            last_detail = result.detail or result.reason
            log.warning("guest=%s %s failed (%s): moving on", record.name, action, last_detail)
            self.update(key, attempts=tuple(attempts), durations_s=dict(durations),
                        detail=last_detail)
        self.update(key, outcome="failed", ok=False, finished=True,
                    detail=f"every action failed; last: {last_detail}")
        log.error("guest=%s could not be preserved: %s", record.name, "; ".join(attempts))

    async def _attempt(
        self, record: GuestOutcome, action: ActionName, bounds: ActionBounds
    ) -> tuple[JobDone | JobFailed, float]:
        shutdown = self.settings.shutdown
        async with bounds.slot(action):
            started = self.clock()
            result = await self.jobs.run(self.jobs.new_job(
                action, record.uri, uuid=record.uuid, name=record.name,
                timeout_s=action_timeout_s(action, self.settings),
                bypass_cache=shutdown.bypass_cache, shutdown_mode=shutdown.shutdown_mode,
            ))
            return result, self.clock() - started
