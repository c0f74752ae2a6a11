"""The follower's pieces without a daemon: the tracker, the plain lines, the live frame."""

from __future__ import annotations

import io
import os
import re
from typing import Any

from guestwarden.console.follow import Follower
from guestwarden.console.lines import event_line, guest_line, progress_text, size
from guestwarden.console.screen import LiveScreen
from guestwarden.console.tracker import RunTracker
from guestwarden.ipc import messages as m

URI = "qemu:///system"


def record(name: str, **fields: object) -> m.GuestOutcome:
    base: dict[str, object] = {"uri": URI, "uuid": f"u-{name}", "name": name,
                               "persistent": True, "state_before": "running",
                               "chain": ("save", "poweroff")}
    return m.GuestOutcome(**{**base, **fields})  # type: ignore[arg-type]


def action(cls: Any, name: str, at: float, **fields: Any) -> m.Event:
    event: m.Event = cls(run_id="r1", job_id=1, uri=URI, uuid=f"u-{name}", name=name,
                         action="save", at=at, **fields)
    return event


def run_with_progress() -> RunTracker:
    tracker = RunTracker("r1")
    events: list[m.Event] = [
        m.RunStarted(run_id="r1", kind="preserve", at=100.0),
        m.RunPlanned(run_id="r1", kind="preserve", at=100.5, guests=(
            record("web1"), record("web2"), record("db1"),
            record("idle", chain=(), state_before="shutoff"))),
        action(m.GuestActionStarted, "web1", 101.0, attempt=1, worker_id="w1"),
        action(m.GuestActionProgress, "web1", 102.0, processed_bytes=100 << 20,
               total_bytes=400 << 20),
        action(m.GuestActionProgress, "web1", 104.0, processed_bytes=300 << 20,
               total_bytes=400 << 20),
        action(m.GuestActionStarted, "db1", 101.0, attempt=1, worker_id="w2"),
        action(m.GuestActionFinished, "db1", 103.0, result="saved", elapsed_s=2.0),
        m.GuestFinished(run_id="r1", at=103.0, guest=record(
            "db1", outcome="saved", ok=True, finished=True, durations_s={"save": 2.0})),
        m.WorkerSpawned(worker_id="w3", pid=9),  # no run: not the tracker's
        m.RunStarted(run_id="other", kind="restore", at=1.0),  # another run
    ]
    applied = [tracker.apply(e) for e in events]
    assert applied == [True] * 8 + [False, False]
    return tracker


def test_tracker_follows_actions_progress_and_rate() -> None:
    tracker = run_with_progress()
    web1 = tracker.rows[f"{URI} u-web1"]
    assert (web1.action, web1.processed_bytes, web1.total_bytes) == ("save", 300 << 20,
                                                                     400 << 20)
    assert web1.rate_bps == 100 << 20  # 200 MiB in 2 s
    assert web1.elapsed_s(105.0) == 4.0
    assert tracker.counts() == (1, 3, 0)  # "idle" is left alone: not counted
    assert tracker.eta_s(106.0) == 12.0  # 6 s for 1 guest, 2 to go


def test_snapshot_names_the_guests_whose_events_were_missed() -> None:
    tracker = run_with_progress()
    final = m.RunStatus(run_id="r1", kind="preserve", started_at=100.0, finished_at=110.0,
                        ok=False, guests=(
                            record("web1", outcome="saved", ok=True, finished=True),
                            record("web2", outcome="failed", ok=False, finished=True,
                                   detail="every action failed"),
                            record("db1", outcome="saved", ok=True, finished=True)))
    newly = tracker.apply_snapshot(final)
    assert sorted(r.name for r in newly) == ["web1", "web2"]  # db1's event was seen
    assert tracker.final is final and tracker.counts() == (3, 3, 1)
    assert tracker.eta_s(200.0) == 0.0


def test_plain_lines_keep_the_old_guest_and_summary_format() -> None:
    done = record("web1", outcome="saved", ok=True, finished=True, durations_s={"save": 1.5})
    assert event_line(m.GuestFinished(run_id="r", guest=done)) == guest_line(done)
    assert guest_line(done).startswith("ok   web1 ")
    left_alone = record("idle", chain=(), outcome="untouched", ok=True, finished=True)
    assert event_line(m.GuestFinished(run_id="r", guest=left_alone)) is None
    assert event_line(m.RunFinished(run_id="r", kind="preserve", ok=True, detail="2/2")) == \
        "preserve ok: 2/2"
    lines = [event_line(e) for e in (
        action(m.GuestActionStarted, "web1", 1.0, attempt=2, worker_id="w1"),
        action(m.GuestActionFailed, "web1", 1.0, reason="timeout", detail="still on"),
        m.WorkerLost(worker_id="w1", pid=5, reason="killed by SIGKILL", at=1.0),
        m.InhibitorChanged(state="held", at=1.0))]
    for line in lines:  # never mistaken for a guest line or a summary
        assert line is not None and re.match(r"\d\d:\d\d:\d\d ", line), line
    assert "attempt 2" in str(lines[0]) and "timeout: still on" in str(lines[1])


def test_progress_text() -> None:
    assert size(1536) == "1.5 KiB" and size(3 << 30) == "3.0 GiB" and size(12) == "12 B"
    assert progress_text(0, 0) == ""
    assert progress_text(1 << 29, 1 << 30, 256 << 20) == " 50% 512.0 MiB of 1.0 GiB, 256.0 MiB/s"


def test_live_frame_shows_rows_progress_bar_and_time_left() -> None:
    out = io.StringIO()
    screen = LiveScreen(out, size=lambda: os.terminal_size((100, 30)),
                        wall_clock=lambda: 106.0, color=False)
    lines = screen.frame(run_with_progress(), "workers 2")
    assert lines[0].startswith("guestwarden preserve r1  running  1/3 guests done")
    assert re.match(r"\[#+\.+\] 1/3  elapsed 0:06  left ~0:12", lines[1])
    rows = {line.split()[0]: line for line in lines[4:-1]}
    assert set(rows) == {"web1", "web2", "db1"}  # in name order, "idle" left out
    assert "save" in rows["web1"] and "75% 300.0 MiB of 400.0 MiB, 100.0 MiB/s" in rows["web1"]
    assert "waiting" in rows["web2"]
    assert rows["db1"].endswith("ok   saved")
    assert lines[-1] == "workers 2"
    assert all(len(line) < 100 for line in lines)


def test_live_frame_fits_a_small_terminal_busy_rows_first() -> None:
    tracker = RunTracker("r1")
    tracker.apply(m.RunPlanned(run_id="r1", kind="preserve", at=1.0,
                               guests=tuple(record(f"g{i:02}") for i in range(40))))
    tracker.apply(action(m.GuestActionStarted, "g39", 2.0, attempt=1, worker_id="w1"))
    screen = LiveScreen(io.StringIO(), size=lambda: os.terminal_size((60, 12)),
                        wall_clock=lambda: 3.0, color=False)
    lines = screen.frame(tracker, "footer")
    assert len(lines) <= 11 and all(len(line) < 60 for line in lines)
    assert lines[4].startswith("g39")  # the busy one first
    assert lines[-2].startswith("... and 35 more (0 done, 35 not done)")


def test_redraw_moves_back_over_the_previous_frame_only() -> None:
    out = io.StringIO()
    screen = LiveScreen(out, size=lambda: os.terminal_size((80, 24)), wall_clock=lambda: 1.0,
                        color=False)
    tracker = run_with_progress()
    screen.draw(tracker)
    first = out.getvalue()
    screen.draw(tracker)
    second = out.getvalue()[len(first):]
    height = first.count("\n")
    assert "\x1b[?25l" in first and not re.search(r"\x1b\[\d+F", first)  # nothing above
    assert second.startswith(f"\x1b[{height}F")
    screen.close()
    assert out.getvalue().endswith("\x1b[?25h")


class ScriptedDaemon:
    """The control socket's answers, as a follower asks for them."""

    def __init__(self, runs: list[m.RunStatus]) -> None:
        self.runs = runs  # GetRun answers in turn; the last one repeats
        self.asked: list[str] = []

    def ask(self, request: m.Request) -> m.Reply:
        self.asked.append(type(request).__name__)
        if isinstance(request, m.Preserve):
            return m.Ok(run_id="r1")
        if isinstance(request, m.GetRun):
            return m.RunReply(run=self.runs.pop(0) if len(self.runs) > 1 else self.runs[0])
        return m.Status(state="preserving", pid=1, uptime_s=1.0, workers_target=2)


def snapshot(finished: int, *, final: bool = False) -> m.RunStatus:
    guests = tuple(record(f"g{i}", outcome="saved" if i < finished else "pending", ok=i < finished,
                          finished=i < finished) for i in range(3))
    return m.RunStatus(run_id="r1", kind="preserve", started_at=1.0, guests=guests,
                       finished_at=2.0 if final else None, ok=True if final else None,
                       detail="3/3 guests handled" if final else "")


def test_without_events_socket_the_follower_polls_and_prints_each_guest_once(
    tmp_path: Any,
) -> None:
    daemon = ScriptedDaemon([snapshot(0), snapshot(2), snapshot(3, final=True)])
    out = io.StringIO()
    follower = Follower(daemon.ask, tmp_path, "plain", out)  # no events.sock there
    run = follower.follow_run(m.Preserve())
    assert run.ok and follower.sub is None
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["g0", "g1", "g2"]
    assert all(line.startswith("ok   ") for line in lines[:-1])
    assert lines[-1] == "preserve ok: 3/3 guests handled"


def test_a_gap_in_the_events_makes_the_follower_read_the_run_again(tmp_path: Any) -> None:
    daemon = ScriptedDaemon([snapshot(2)])
    out = io.StringIO()
    follower = Follower(daemon.ask, tmp_path, "plain", out)
    follower.one_run, follower.tracker = True, RunTracker("r1")
    def stale() -> bool:
        return follower._stale

    follower._take(m.RunStarted(seq=5, run_id="r1", kind="preserve", at=1.0))
    assert not stale()
    follower._take(m.WorkerSpawned(seq=9, worker_id="w3", pid=3, at=1.0))  # 6..8 lost
    assert stale()
    follower._sync()
    assert daemon.asked == ["GetRun"] and not stale()
    guest_lines = [line for line in out.getvalue().splitlines() if line.startswith("ok ")]
    assert [line.split()[1] for line in guest_lines] == ["g0", "g1"]
