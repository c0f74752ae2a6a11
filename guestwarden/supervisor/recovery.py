"""What the journal says after a crash, and guests an earlier preserve must not forget.

Two situations, both about never losing a guest:

* The supervisor died during a run (SIGKILL, power loss): the journal holds a run
  without ``finished_at``. At the next start the run is closed as *interrupted*: its
  unfinished guests are marked so, reported in status, and stay restorable — restore
  starts them, and start is idempotent (a guest still running is left alone, one that
  was saved is restored from its image).
* A preserve ran and its guests were never restored (the shutdown was cancelled, or
  the supervisor died and preserve was run again): a new preserve sees those guests
  off and would record them as "untouched", and the next restore would forget them.
  So a guest that is off now, and that an unrestored earlier preserve found running
  or paused, keeps that earlier record.
"""

from __future__ import annotations

import logging

import msgspec

from guestwarden.ipc.messages import GuestInfo, GuestOutcome, RunStatus
from guestwarden.supervisor.journal import JournalData, guest_key

log = logging.getLogger(__name__)

ACTIVE = frozenset({"running", "paused"})


def close_interrupted(data: JournalData, now: float) -> tuple[JournalData, list[str]]:
    """Mark runs that never finished as interrupted; return the new data and notes."""
    notes: list[str] = []
    preserve, restore = data.preserve, data.restore
    if preserve is not None and preserve.finished_at is None:
        preserve = _close(preserve, now)
        notes.append(_note(preserve))
    if restore is not None and restore.finished_at is None:
        restore = _close(restore, now)
        notes.append(_note(restore))
    for note in notes:
        log.error(note)
    return msgspec.structs.replace(data, preserve=preserve, restore=restore), notes


def _close(run: RunStatus, now: float) -> RunStatus:
    guests = tuple(
        g if g.finished else msgspec.structs.replace(
            g, outcome="interrupted", ok=False, finished=True,
            detail=(g.detail + "; " if g.detail else "") + "the supervisor stopped mid-run")
        for g in run.guests
    )
    unfinished = sum(1 for old in run.guests if not old.finished)
    return msgspec.structs.replace(
        run, guests=guests, finished_at=now, ok=False,
        detail=f"interrupted: the supervisor stopped during this {run.kind} "
               f"with {unfinished} guests unfinished",
    )


def _note(run: RunStatus) -> str:
    names = [g.name for g in run.guests if g.outcome == "interrupted"]
    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
    return f"{run.kind} run {run.run_id} was interrupted; unfinished guests: {shown or 'none'}"


def remembered(data: JournalData, guest: GuestInfo) -> GuestOutcome | None:
    """The earlier preserve's record of a guest that is off now and was never restored."""
    if data.preserve is None or guest.state != "shutoff":
        return None
    key = guest_key(guest.uri, guest.uuid)
    if key in set(data.restored):
        return None
    for old in data.preserve.guests:
        if guest_key(old.uri, old.uuid) == key and old.state_before in ACTIVE:
            outcome = "saved" if guest.has_managed_save else (
                old.outcome if old.outcome in ("shutdown", "poweroff", "off") else "off")
            return msgspec.structs.replace(
                old, name=guest.name, chain=(), outcome=outcome, ok=True, finished=True,
                detail=f"stopped by preserve {data.preserve.run_id} and not restored since",
            )
    return None
