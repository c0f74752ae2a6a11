"""What a preserve or restore run shares: its record of guests, its journal writes.

A run keeps one ``GuestOutcome`` per guest and replaces it (the Structs are frozen)
as the guest moves through its actions. The journal is written when the guests are
known, at most every ``JOURNAL_INTERVAL_S`` while the run goes on (off the loop, on
the journal's thread), and at the end, always before the run reports that it is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Literal, Protocol

import msgspec

from guestwarden.conf.settings import Settings
from guestwarden.ipc.messages import GuestOutcome, Job, JobDone, JobFailed, JobKind, RunStatus
from guestwarden.supervisor.journal import Journal, JournalData

log = logging.getLogger(__name__)

JOURNAL_INTERVAL_S = 0.5


class JobService(Protocol):
    """How a run gets work done: the supervisor's dispatcher behind it."""

    def new_job(self, kind: JobKind, uri: str, **fields: object) -> Job: ...

    async def run(self, job: Job) -> JobDone | JobFailed: ...


class RunObserver(Protocol):
    """Who hears of a run's milestones (the event publisher, supervisor/events.py)."""

    def run_started(self, run: Run) -> None: ...

    def run_planned(self, run: Run) -> None: ...

    def guest_finished(self, run: Run, record: GuestOutcome) -> None: ...

    def run_finished(self, run: Run) -> None: ...


def new_run_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


class Run:
    """The record of one run; subclasses do the work in ``execute``."""

    kind: Literal["preserve", "restore"]

    def __init__(self, jobs: JobService, wall_clock: Callable[[], float] = time.time) -> None:
        self.jobs = jobs
        self.wall_clock = wall_clock
        self.run_id = new_run_id(self.kind)
        self.started_at = wall_clock()
        self.finished_at: float | None = None
        self.ok: bool | None = None
        self.detail = ""
        self.guests: dict[str, GuestOutcome] = {}
        self._dirty = False
        self.finished = asyncio.Event()
        self.observer: RunObserver | None = None

    def status(self) -> RunStatus:
        return RunStatus(
            run_id=self.run_id,
            kind=self.kind,
            started_at=self.started_at,
            finished_at=self.finished_at,
            ok=self.ok,
            detail=self.detail,
            guests=tuple(self.guests.values()),
        )

    def update(self, key: str, **changes: object) -> GuestOutcome:
        before = self.guests[key]
        record = msgspec.structs.replace(before, **changes)
        self.guests[key] = record
        self._dirty = True
        if record.finished and not before.finished and self.observer is not None:
            self.observer.guest_finished(self, record)
        return record

    def planned(self) -> None:
        """Subclasses call this once ``guests`` holds every guest of the run."""
        if self.observer is not None:
            self.observer.run_planned(self)

    def counts(self) -> tuple[int, int]:
        """(finished, total) guests that this run acts on."""
        acting = [g for g in self.guests.values() if g.chain]
        return sum(1 for g in acting if g.finished), len(acting)

    def write_journal(self) -> None:
        raise NotImplementedError

    async def flush_journal(self) -> None:
        """The periodic write while the run goes on (JournaledRun: off the loop)."""
        self.write_journal()

    async def execute(self) -> None:
        raise NotImplementedError

    async def run(self) -> RunStatus:
        if self.observer is not None:
            self.observer.run_started(self)
        flusher = asyncio.create_task(self._flush_periodically())
        try:
            await self.execute()
        except Exception as exc:  # the record must say so; the daemon must live on
            log.exception("%s run %s failed", self.kind, self.run_id)
            self.ok = False
            self.detail = f"internal error: {exc!r}"
        finally:
            flusher.cancel()
            self.finished_at = self.wall_clock()
            if self.ok is None:
                self.ok = False
                self.detail = self.detail or "cancelled"
            self.write_journal()
            if self.observer is not None:
                self.observer.run_finished(self)
            self.finished.set()
        log.info("%s run=%s finished ok=%s %s", self.kind, self.run_id, self.ok, self.detail)
        return self.status()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(JOURNAL_INTERVAL_S)
            if self._dirty:
                self._dirty = False
                await self.flush_journal()


def describe_result(result: JobDone | JobFailed) -> str:
    if isinstance(result, JobDone):
        return result.result
    return f"failed ({result.reason})" + (f": {result.detail}" if result.detail else "")


class JournaledRun(Run):
    """A run that records itself in the journal: preserve and restore."""

    def __init__(
        self,
        jobs: JobService,
        settings: Settings,
        journal: Journal,
        journal_data: Callable[[], JournalData],
        boot_id: str,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(jobs, wall_clock)
        self.settings = settings
        self.journal = journal
        self.journal_data = journal_data
        self.boot_id = boot_id
        self.on_journal: Callable[[JournalData], None] = lambda _data: None

    def journal_record(self) -> JournalData:
        """The journal as it should be now: the last one with this run written in."""
        raise NotImplementedError

    def write_journal(self) -> None:
        data = self.journal_record()
        self.journal.save(data)
        self.on_journal(data)

    async def flush_journal(self) -> None:
        # the record is taken here, on the loop; the Structs are frozen, so the
        # journal's thread encodes a consistent snapshot while the run goes on
        data = self.journal_record()
        await asyncio.wrap_future(self.journal.save_in_background(data))
        self.on_journal(data)
