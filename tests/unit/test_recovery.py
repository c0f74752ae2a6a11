"""Closing runs a dead supervisor left open; remembering guests an earlier preserve stopped."""

from __future__ import annotations

from guestwarden.ipc.messages import GuestInfo, GuestOutcome, GuestState, RunStatus
from guestwarden.supervisor.journal import JournalData, guest_key
from guestwarden.supervisor.recovery import close_interrupted, remembered


def outcome(name: str, state: GuestState, result: str, finished: bool = True) -> GuestOutcome:
    return GuestOutcome(uri="u", uuid=name, name=name, persistent=True, state_before=state,
                        chain=("save",) if state != "shutoff" else (), outcome=result,
                        ok=finished and result != "failed", finished=finished)


def run(*guests: GuestOutcome, finished: bool = True) -> RunStatus:
    return RunStatus(run_id="preserve-1", kind="preserve", started_at=1.0,
                     finished_at=2.0 if finished else None, ok=finished, guests=guests)


def info(name: str, state: GuestState, image: bool = False) -> GuestInfo:
    return GuestInfo(uri="u", uuid=name, name=name, state=state, persistent=True,
                     has_managed_save=image)


def test_an_open_run_is_closed_with_its_unfinished_guests_interrupted() -> None:
    data = JournalData(preserve=run(outcome("a", "running", "saved"),
                                    outcome("b", "running", "pending", finished=False),
                                    finished=False))
    closed, notes = close_interrupted(data, now=9.0)
    assert closed.preserve is not None and closed.preserve.finished_at == 9.0
    assert closed.preserve.ok is False and "1 guests unfinished" in closed.preserve.detail
    assert [g.outcome for g in closed.preserve.guests] == ["saved", "interrupted"]
    assert len(notes) == 1 and "b" in notes[0]


def test_a_finished_journal_is_left_alone() -> None:
    data = JournalData(preserve=run(outcome("a", "running", "saved")))
    assert close_interrupted(data, now=9.0) == (data, [])


def test_guests_stopped_by_an_unrestored_preserve_are_remembered() -> None:
    data = JournalData(preserve=run(outcome("a", "running", "pending", finished=False),
                                    outcome("b", "paused", "poweroff"),
                                    outcome("c", "shutoff", "untouched"),
                                    outcome("d", "running", "saved")),
                       restored=(guest_key("u", "d"),))
    a = remembered(data, info("a", "shutoff", image=True))
    assert a is not None and a.outcome == "saved" and a.state_before == "running"
    b = remembered(data, info("b", "shutoff"))
    assert b is not None and b.outcome == "poweroff" and b.state_before == "paused"
    assert remembered(data, info("c", "shutoff")) is None  # it was off already
    assert remembered(data, info("d", "shutoff", image=True)) is None  # restored since
    assert remembered(data, info("a", "running")) is None  # running again: a new record
    assert remembered(JournalData(), info("a", "shutoff")) is None
