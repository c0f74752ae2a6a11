"""Following the daemon: ``preserve --wait``, ``restore --wait`` and ``watch``.

Events (``events.sock``) make the output live; the control socket keeps it right.
The follower subscribes *before* it asks for a run (the daemon's welcome says the
subscription is in effect), applies events as they come, and reads a snapshot
(GetRun, GetStatus) whenever it may have missed something: a gap in ``seq``, a
daemon restart, or a second without events. So a lost event delays a line, never
loses it, and the exit status always comes from the daemon's own record of the run.
Against a daemon without ``events.sock`` (an older version) ``--wait`` falls back to
polling GetRun, as it did before.

Three outputs: ``live`` (a terminal: screen.py), ``plain`` (one line per event:
lines.py) and ``json`` (one JSON object per event).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

from guestwarden.console.lines import event_line, guest_line, summary_line
from guestwarden.console.screen import LiveScreen
from guestwarden.console.tracker import GuestRow, RunTracker, key_of
from guestwarden.ipc.client import Unreachable
from guestwarden.ipc.codec import JSON_ENCODER
from guestwarden.ipc.messages import (
    Event,
    GetRun,
    GetStatus,
    GuestActionProgress,
    InhibitorChanged,
    JobStatus,
    Ok,
    Reply,
    Request,
    RunFinished,
    RunReply,
    RunStarted,
    RunStatus,
    Status,
    Subscribed,
    WorkerLost,
    WorkerRetired,
    WorkerSpawned,
)
from guestwarden.ipc.subscriber import EventSubscriber

Mode = Literal["live", "plain", "json"]
Ask = Callable[[Request], Reply]
"""Sends a request to the daemon; raises on an Error reply (the CLI's ``ask``)."""

TICK_S = 0.1
"""How long a receive waits: the live view redraws at most this often."""
QUIET_SYNC_S = 1.0
"""A snapshot after this long without events (something may have been missed)."""
POLL_S = 0.2
RUN_STATES = {"preserve": "preserving", "restore": "restoring"}
"""Without events.sock: GetRun this often (what --wait always did before events)."""


class Timeout(Exception):
    """``--timeout`` ran out before the run ended."""


def choose_mode(*, plain: bool, json: bool, out: TextIO) -> Mode:
    if json:
        return "json"
    if plain or not out.isatty():
        return "plain"
    return "live"


@dataclass
class DaemonView:
    """What the footer shows of the daemon, kept current by events and snapshots."""

    workers: dict[str, int] = field(default_factory=dict)
    inhibitor: str = ""
    state: str = ""

    def apply(self, event: Event) -> None:
        match event:
            case WorkerSpawned(worker_id=wid, pid=pid):
                self.workers[wid] = pid
            case WorkerLost(worker_id=wid) | WorkerRetired(worker_id=wid):
                self.workers.pop(wid, None)
            case InhibitorChanged(state=state):
                self.inhibitor = state
            case RunStarted(kind=kind):
                self.state = RUN_STATES[kind]
            case RunFinished():
                self.state = "idle"
            case _:
                pass

    def take(self, status: Status) -> None:
        self.workers = {w.worker_id: w.pid for w in status.workers}
        self.inhibitor, self.state = status.inhibitor, status.state

    def footer(self, hint: str) -> str:
        parts = [f"daemon {self.state}" if self.state else "",
                 f"workers {len(self.workers)}" if self.workers else "",
                 f"inhibitor {self.inhibitor}" if self.inhibitor else "", hint]
        return "   ".join(p for p in parts if p)


class Follower:
    def __init__(self, ask: Ask, runtime_dir: str | Path, mode: Mode, out: TextIO, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ask = ask
        self.runtime_dir = runtime_dir
        self.mode = mode
        self.out = out
        self.clock = clock
        self.screen = LiveScreen(out) if mode == "live" else None
        self.daemon = DaemonView()
        self.tracker: RunTracker | None = None
        self.one_run = False
        """True: --wait (one run, its events only); False: watch (everything)."""
        self.sub: EventSubscriber | None = None
        self._last_seq: int | None = None
        self._stale = False
        self._last_event = clock()
        self._last_sync = clock()
        self._last_draw = 0.0

    # ------------------------------------------------------------------ the two commands

    def follow_run(self, request: Request, timeout_s: float = 0.0) -> RunStatus:
        """Start a run, follow it to its end, return the daemon's record of it."""
        self.one_run = True
        self.sub = self._subscribe(required=False)  # before the run starts: see it all
        try:
            reply = self.ask(request)
            assert isinstance(reply, Ok), reply
            self.tracker = RunTracker(reply.run_id)
            deadline = self.clock() + timeout_s if timeout_s else None
            self._sync()
            while self.tracker.final is None:
                self._turn(hint="")
                if deadline is not None and self.clock() > deadline:
                    raise Timeout(f"run {reply.run_id} still running after {timeout_s:g}s")
            final = self.tracker.final
            if self.screen is not None:
                self._draw(force=True)
                for guest in final.guests:  # the rows are cut to the width: say it all
                    if guest.chain and not guest.ok:
                        self._write(guest_line(guest))
            if self.mode != "json":
                self._write(summary_line(final.kind, final.ok, final.detail))
            return final
        finally:
            self.close()

    def watch(self) -> None:
        """Follow everything until interrupted (KeyboardInterrupt is the caller's)."""
        self.sub = self._subscribe(required=True)
        try:
            self._sync()
            while True:
                self._turn(hint="Ctrl-C to stop")
        finally:
            self.close()

    def close(self) -> None:
        if self.screen is not None:
            self.screen.close()
        if self.sub is not None:
            self.sub.close()

    # ------------------------------------------------------------------ the loop

    def _subscribe(self, *, required: bool) -> EventSubscriber | None:
        sub = EventSubscriber(self.runtime_dir)
        try:
            sub.connect()
        except Unreachable:
            sub.close()
            if required:
                raise
            return None  # an older daemon: poll
        return sub

    def _turn(self, hint: str) -> None:
        if self.sub is None:
            time.sleep(POLL_S)
            self._sync()
            return
        events = self.sub.receive(TICK_S)
        for event in events:
            self._take(event)
        now = self.clock()
        if events:
            self._last_event = now
        if self._stale or (now - self._last_event >= QUIET_SYNC_S
                           and now - self._last_sync >= QUIET_SYNC_S):
            self._sync()
        if self.screen is not None:
            self._draw(hint=hint)

    def _take(self, event: Event) -> None:
        if isinstance(event, Subscribed) or (
                self._last_seq is not None and event.seq != self._last_seq + 1):
            self._stale = True  # a new daemon, or events lost: read a snapshot
        self._last_seq = 0 if isinstance(event, Subscribed) else event.seq
        self.daemon.apply(event)
        if isinstance(event, RunStarted) and not self.one_run and (
                self.tracker is None or event.run_id != self.tracker.run_id):
            self.tracker = RunTracker(event.run_id, event.kind)  # watch: follow the new run
        ours = self.tracker is not None and self.tracker.apply(event)
        if self.one_run and (isinstance(event, Subscribed) or (
                not ours and hasattr(event, "run_id"))):
            return  # --wait: another run's event, or a job of no run (a plan's)
        if isinstance(event, RunFinished) and ours and event.run is not None:
            self._finished(event.run)
        if self.mode == "json":
            self._write(JSON_ENCODER.encode(event).decode())
        elif self.mode == "plain" and not (self.one_run and isinstance(event, RunFinished)):
            rate = 0.0
            if isinstance(event, GuestActionProgress) and self.tracker is not None:
                row = self.tracker.rows.get(key_of(event.uri, event.uuid))
                rate = row.rate_bps if row is not None else 0.0
            line = event_line(event, rate)
            if line is not None:
                self._write(line)

    def _finished(self, run: RunStatus) -> None:
        """The run's final record: lines for guests whose GuestFinished was missed."""
        assert self.tracker is not None
        self._guest_lines(self.tracker.apply_snapshot(run))

    def _guest_lines(self, rows: list[GuestRow]) -> None:
        if self.mode == "plain":
            for row in rows:
                if row.record is not None and row.record.chain:
                    self._write(guest_line(row.record))

    def _sync(self) -> None:
        """Read the daemon's record: of the run followed, or (watch) of the latest run."""
        self._stale = False
        self._last_sync = self.clock()
        if self.one_run:
            self._sync_run()
            return
        status = self.ask(GetStatus())
        assert isinstance(status, Status), status
        self.daemon.take(status)
        if not status.runs:
            return
        latest = status.runs[-1]
        if self.tracker is None or self.tracker.run_id != latest.run_id:
            self.tracker = RunTracker(latest.run_id, latest.kind)  # a RunStarted missed
        was_final = self.tracker.final is not None
        self.tracker.apply_snapshot(latest, status.jobs)
        if self.tracker.final is not None and not was_final and self.mode == "plain":
            self._write(summary_line(latest.kind, latest.ok, latest.detail))

    def _sync_run(self) -> None:
        tracker = self.tracker
        assert tracker is not None
        if tracker.final is not None:
            return
        jobs: tuple[JobStatus, ...] = ()
        if self.screen is not None:  # the live view also shows the workers and the jobs
            status = self.ask(GetStatus())
            assert isinstance(status, Status), status
            self.daemon.take(status)
            jobs = status.jobs
        reply = self.ask(GetRun(run_id=tracker.run_id))
        assert isinstance(reply, RunReply), reply
        self._guest_lines(tracker.apply_snapshot(reply.run, jobs))
        run = reply.run
        if run.finished_at is not None and self.mode == "json":
            # its RunFinished was missed: say it the same way (seq 0: from a snapshot)
            self._write(JSON_ENCODER.encode(RunFinished(
                run_id=run.run_id, kind=run.kind, ok=bool(run.ok), detail=run.detail,
                at=run.finished_at or 0.0, run=run)).decode())

    def _draw(self, *, hint: str = "", force: bool = False) -> None:
        assert self.screen is not None
        now = self.clock()
        if force or now - self._last_draw >= TICK_S:
            self._last_draw = now
            self.screen.draw(self.tracker, self.daemon.footer(hint))

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

