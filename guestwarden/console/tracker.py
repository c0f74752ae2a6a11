"""What a follower knows of one run: a row per guest, built from events and snapshots.

Events make it live; snapshots (GetRun, the RunFinished record) make it right: PUB/SUB
may lose events (a subscription not yet in effect, a reader too slow), so every
snapshot overwrites what the events said about finished guests. Times are the
daemon's wall-clock times (``Event.at``), so that elapsed times do not depend on when
the follower heard of something.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from guestwarden.ipc.messages import (
    Event,
    GuestActionFailed,
    GuestActionFinished,
    GuestActionProgress,
    GuestActionStarted,
    GuestFinished,
    GuestOutcome,
    JobStatus,
    RunPlanned,
    RunStarted,
    RunStatus,
)


def key_of(uri: str, uuid: str) -> str:
    return f"{uri} {uuid}"


@dataclass
class GuestRow:
    name: str
    record: GuestOutcome | None = None
    """The daemon's record of the guest in this run (from RunPlanned, GuestFinished or a
    snapshot): the truth about its outcome."""
    action: str = ""
    """The action a worker runs for it now ("" when none)."""
    attempt: int = 1
    action_since: float | None = None
    first_start: float | None = None
    processed_bytes: int = 0
    total_bytes: int = 0
    rate_bps: float = 0.0
    finished_at: float | None = None
    _last_progress: tuple[float, int] | None = field(default=None, repr=False)

    @property
    def acting(self) -> bool:
        """The run does something to this guest (guests left alone have no chain)."""
        return self.record is None or bool(self.record.chain)

    @property
    def finished(self) -> bool:
        return self.record is not None and self.record.finished

    @property
    def failed(self) -> bool:
        return self.finished and self.record is not None and not self.record.ok

    def elapsed_s(self, now: float) -> float | None:
        if self.first_start is None:
            if self.record is not None and self.record.finished and self.record.durations_s:
                return sum(self.record.durations_s.values())
            return None
        return (self.finished_at or now) - self.first_start


class RunTracker:
    def __init__(self, run_id: str, kind: str = "") -> None:
        self.run_id = run_id
        self.kind = kind
        self.started_at: float | None = None
        self.final: RunStatus | None = None
        self.rows: dict[str, GuestRow] = {}

    # ------------------------------------------------------------------ input

    def apply(self, event: Event) -> bool:
        """Take in an event; False when it is about another run (or no run)."""
        if getattr(event, "run_id", None) != self.run_id:
            return False
        match event:
            case RunStarted(kind=kind, at=at):
                self.kind, self.started_at = kind, at
            case RunPlanned(kind=kind, guests=guests):
                self.kind = kind
                for record in guests:
                    self._row(record.uri, record.uuid, record.name).record = record
            case GuestActionStarted():
                row = self._row(event.uri, event.uuid, event.name)
                row.action, row.attempt, row.action_since = event.action, event.attempt, event.at
                row.processed_bytes = row.total_bytes = 0
                row.rate_bps, row._last_progress = 0.0, None
                if row.first_start is None:
                    row.first_start = event.at
            case GuestActionProgress():
                row = self._row(event.uri, event.uuid, event.name)
                if row._last_progress is not None and event.at > row._last_progress[0]:
                    at, done = row._last_progress
                    row.rate_bps = max(0.0, (event.processed_bytes - done) / (event.at - at))
                row._last_progress = (event.at, event.processed_bytes)
                row.processed_bytes, row.total_bytes = event.processed_bytes, event.total_bytes
            case GuestActionFinished() | GuestActionFailed():
                row = self._row(event.uri, event.uuid, event.name)
                row.action, row.action_since = "", None
            case GuestFinished(guest=record, at=at):
                row = self._row(record.uri, record.uuid, record.name)
                row.record, row.finished_at, row.action = record, at, ""
            case _:  # RunFinished: its record goes to apply_snapshot
                pass
        return True

    def apply_snapshot(self, run: RunStatus, jobs: tuple[JobStatus, ...] = ()) -> list[GuestRow]:
        """Take in the daemon's record; return the rows that it newly shows finished."""
        self.kind = run.kind
        if self.started_at is None:
            self.started_at = run.started_at
        newly = []
        for record in run.guests:
            row = self._row(record.uri, record.uuid, record.name)
            if record.finished and not row.finished:
                newly.append(row)
                row.action = ""
                if row.finished_at is None and run.finished_at is not None:
                    row.finished_at = run.finished_at
            row.record = record
        for job in jobs:  # what runs now (a snapshot of a run going on)
            busy = self.rows.get(key_of(job.uri, job.uuid))
            if busy is not None and not busy.finished and job.kind != "inventory":
                busy.action, busy.attempt = job.kind, job.attempt
                busy.processed_bytes, busy.total_bytes = job.processed_bytes, job.total_bytes
        if run.finished_at is not None:
            self.final = run
        return newly

    def _row(self, uri: str, uuid: str, name: str) -> GuestRow:
        key = key_of(uri, uuid)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = GuestRow(name=name)
        return row

    # ------------------------------------------------------------------ views

    def counts(self) -> tuple[int, int, int]:
        """(finished, total, failed) among the guests the run acts on."""
        acting = [r for r in self.rows.values() if r.acting]
        return (sum(1 for r in acting if r.finished), len(acting),
                sum(1 for r in acting if r.failed))

    def eta_s(self, now: float) -> float | None:
        """Time left, from the pace so far: elapsed x remaining / finished guests.

        Crude on purpose: it needs nothing but what the run did, and it settles as
        guests finish. None until one guest has finished.
        """
        done, total, _ = self.counts()
        if self.started_at is None or not done or self.final is not None:
            return None if self.final is None else 0.0
        return (now - self.started_at) * (total - done) / done
