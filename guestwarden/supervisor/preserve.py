"""Preserve: every running or paused guest through its action chain, within bounds.

Inventory of every URI (a worker job each) -> one task per guest that walks its
chain (save -> shutdown -> poweroff by default), taking a slot of the action's bound
for each attempt -> a guest whose action fails or times out moves to the next one
-> the journal says what happened to every guest before the run reports done.

Each guest's chain, order group and shutdown timeout come from its metadata, the
config's rules and the defaults (policy.py). Groups go from the highest order to the
lowest with a barrier between them; within a group the guest expected to take
longest is handed out first (ordering.py). At the end, what the run measured is
added to the journal's learned durations (learned.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

import msgspec

from guestwarden.conf.settings import Settings, save_ceiling
from guestwarden.ipc.messages import ActionName, GuestInfo, GuestOutcome, JobDone, JobFailed
from guestwarden.supervisor.journal import Journal, JournalData, guest_key
from guestwarden.supervisor.learned import Learned, learn
from guestwarden.supervisor.ordering import Handout, handout, preserve_groups
from guestwarden.supervisor.plan import ActionBounds, action_timeout_s
from guestwarden.supervisor.policy import EffectivePolicy, resolve_policy
from guestwarden.supervisor.recovery import remembered
from guestwarden.supervisor.runs import JobService, JournaledRun, describe_result
from guestwarden.supervisor.space import SpaceBudget

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


class PreserveRun(JournaledRun):
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
        workers: int = 0,
    ) -> None:
        super().__init__(jobs, settings, journal, journal_data, boot_id, wall_clock)
        self.clock = clock
        self.workers = workers
        """The pool's size (0: unknown): how far ``parallel_save = "auto"`` may climb."""
        self.policies: dict[str, EffectivePolicy] = {}
        self.learned: Learned | None = None
        shutdown = settings.shutdown
        self.space = SpaceBudget(shutdown.save_dir, shutdown.save_space_reserve)
        self.memory_bytes: dict[str, int] = {}

    def journal_record(self) -> JournalData:
        data = self.journal_data()
        return msgspec.structs.replace(
            data,
            preserve=self.status(),
            preserve_boot_id=self.boot_id,
            restored=(),  # a new preserve: everything in it may be restored once
            learned=self.learned or data.learned,
        )

    async def execute(self) -> None:
        guests, errors = await take_inventory(self.jobs, self.settings)
        earlier = self.journal_data()
        for guest in guests:
            key = guest_key(guest.uri, guest.uuid)
            self.memory_bytes[key] = guest.memory_kib * 1024
            policy = self.policies[key] = resolve_policy(guest, self.settings)
            if guest.policy_error:
                log.warning("guest=%s metadata ignored: %s", guest.name, guest.policy_error)
            self.guests[key] = remembered(earlier, guest) or GuestOutcome(
                uri=guest.uri, uuid=guest.uuid, name=guest.name,
                persistent=guest.persistent, state_before=guest.state,
                chain=policy.chain, outcome="pending", order=policy.order,
                start_delay_s=policy.start_delay, memory_kib=guest.memory_kib,
            )
        self.planned()
        for key, record in self.guests.items():
            if not record.chain and not record.finished:
                excluded = self.policies[key].exclude
                self.update(key, outcome="excluded" if excluded else "untouched", ok=True,
                            finished=True, detail=self.policies[key].note if excluded
                            else f"was {record.state_before}")
        self.write_journal()
        bounds = ActionBounds(self.settings, self.workers)
        plan = preserve_groups(self._handout(key) for key, g in self.guests.items()
                               if not g.finished)
        for order, group in plan:
            if len(plan) > 1:
                log.info("preserve: order group %d: %d guests", order, len(group))
            await asyncio.gather(*(self._walk_chain(h.key, bounds) for h in group))
        save_parallel = (bounds.adaptive_saves.limit if bounds.adaptive_saves
                         else save_ceiling(self.settings, self.workers))
        self.learned = learn(earlier.learned, self.status(), self.wall_clock(),
                             self.memory_bytes, save_parallel)
        failed = [g for g in self.guests.values() if not g.ok]
        done, total = self.counts()
        self.ok = not failed and not errors
        parts = [f"{done}/{total} guests handled"]
        if failed:
            parts.append(f"{len(failed)} failed: " + ", ".join(g.name for g in failed[:10]))
        parts.extend(errors)
        self.detail = "; ".join(parts)

    def _handout(self, key: str) -> Handout:
        return handout(key, self.guests[key].name, self.policies[key],
                       self.memory_bytes.get(key, 0), self.journal_data().learned)

    async def _walk_chain(self, key: str, bounds: ActionBounds) -> None:
        record = self.guests[key]
        attempts: list[str] = []
        durations: dict[str, float] = {}
        spans: dict[str, tuple[int, int]] = {}
        last_detail = ""
        for action in record.chain:
            result, elapsed = await self._attempt(key, record, cast(ActionName, action), bounds)
            # the slot is free: the guest waiting for it hands its job out first, and this
            # guest's record, events and log line are written while that job runs
            await asyncio.sleep(0)
            durations[action] = round(elapsed, 3)
            if result.started_ns and result.finished_ns:  # 0: decided without a worker
                spans[action] = (result.started_ns, result.finished_ns)
            attempts.append(f"{action}: {describe_result(result)}")
            if isinstance(result, JobDone):
                self.update(key, outcome=_OUTCOMES.get(result.result, result.result), ok=True,
                            finished=True, detail=result.detail, attempts=tuple(attempts),
                            durations_s=durations, spans_ns=spans)
                log.info("guest=%s preserved: %s", record.name, attempts[-1])
                return
            last_detail = result.detail or result.reason
            log.warning("guest=%s %s failed (%s): moving on", record.name, action, last_detail)
            self.update(key, attempts=tuple(attempts), durations_s=dict(durations),
                        detail=last_detail, spans_ns=dict(spans))
        self.update(key, outcome="failed", ok=False, finished=True,
                    detail=f"every action failed; last: {last_detail}")
        log.error("guest=%s could not be preserved: %s", record.name, "; ".join(attempts))

    async def _attempt(
        self, key: str, record: GuestOutcome, action: ActionName, bounds: ActionBounds
    ) -> tuple[JobDone | JobFailed, float]:
        async with bounds.slot(action):
            if action == "save":  # checked with the slot held: only running saves count
                no_room = self.space.try_reserve(key, record.uri, self.memory_bytes.get(key, 0))
                if no_room:
                    return JobFailed(job_id=0, reason="no-space", detail=no_room), 0.0
            try:
                result, elapsed = await self._run_action(record, action)
            finally:
                self.space.release(key)
            saves = bounds.adaptive_saves
            if saves is not None and isinstance(result, JobDone) and result.result == "saved":
                now = self.clock()
                saves.finished(self.memory_bytes.get(key, 0), now - elapsed, now)
            return result, elapsed

    async def _run_action(
        self, record: GuestOutcome, action: ActionName
    ) -> tuple[JobDone | JobFailed, float]:
        shutdown = self.settings.shutdown
        policy = self.policies.get(guest_key(record.uri, record.uuid))
        timeout_s = (policy.shutdown_timeout if action == "shutdown" and policy
                     else action_timeout_s(action, self.settings))
        started = self.clock()
        result = await self.jobs.run(self.jobs.new_job(
            action, record.uri, uuid=record.uuid, name=record.name, timeout_s=timeout_s,
            bypass_cache=shutdown.bypass_cache, shutdown_mode=shutdown.shutdown_mode,
        ))
        return result, self.clock() - started
