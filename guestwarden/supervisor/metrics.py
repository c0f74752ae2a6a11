"""Metrics in the Prometheus text format: for node_exporter's textfile collector and
``guestwarden metrics``.

Two kinds of numbers:

* **The last run of each kind** (``guestwarden_last_run_*``), computed from the run's
  record (``RunStatus``). The journal keeps that record across restarts, so the
  numbers of the preserve that ran at shutdown are still right after the reboot.
  These are what a fleet alerts on: did the last preserve work, how long did it
  take, how many guests fell through to poweroff.
* **Counters since the daemon started** (``guestwarden_*_total``), fed by every event
  (``Metrics.observe`` is an observer of the event publisher).

``guestwarden metrics`` adds live gauges (workers, jobs, the run going on, the
inhibitor); the textfile has no live gauges, as they would be stale the moment the
file is written. Label values never include guest names: a fleet's time series
must not grow with its guests.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from guestwarden.ipc.messages import (
    Event,
    GuestActionFailed,
    GuestActionFinished,
    GuestFinished,
    GuestOutcome,
    RunFinished,
    RunStatus,
    Status,
    WorkerLost,
    WorkerSpawned,
)

PREFIX = "guestwarden_"
Labels = tuple[tuple[str, str], ...]


def base_outcome(outcome: str) -> str:
    """``restored, clock synced`` -> ``restored``: the clock sync has metrics of its own."""
    return outcome.split(",", 1)[0].strip() or "unknown"


def action_results(guest: GuestOutcome) -> list[tuple[str, bool]]:
    """(action, worked) for each action the run tried on the guest."""
    if guest.attempts:  # preserve: "save: saved", "save: failed (timeout): ..."
        out = []
        for attempt in guest.attempts:
            action, _, result = attempt.partition(":")
            out.append((action.strip(), not result.strip().startswith("failed")))
        return out
    results = []  # restore: the actions it timed, judged by the outcome
    for action in guest.durations_s:
        failed = ((action == "start" and base_outcome(guest.outcome) == "failed")
                  or (action == "sync_time" and guest.outcome.endswith("sync failed")))
        results.append((action, not failed))
    return results


def saved_bytes(guest: GuestOutcome) -> int:
    """What a save of this guest wrote, about: its memory (0 unless it was saved now)."""
    return guest.memory_kib * 1024 if "save: saved" in guest.attempts else 0


@dataclass
class Family:
    name: str
    kind: str  # gauge, counter, summary
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append((suffix, tuple(sorted(labels.items())), value))

    def render(self) -> str:
        lines = [f"# HELP {PREFIX}{self.name} {self.help}",
                 f"# TYPE {PREFIX}{self.name} {self.kind}"]
        for suffix, labels, value in self.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{PREFIX}{self.name}{suffix}{{{text}}} {_number(value)}"
                         if text else f"{PREFIX}{self.name}{suffix} {_number(value)}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def last_run_families(runs: Iterable[RunStatus]) -> list[Family]:
    """``guestwarden_last_run_*`` for each finished run given (one per kind)."""
    fams = {f.name: f for f in (
        Family("last_run_timestamp_seconds", "gauge", "When the last run of this kind ended "
               "(Unix time)."),
        Family("last_run_start_timestamp_seconds", "gauge", "When the last run of this kind "
               "started (Unix time)."),
        Family("last_run_duration_seconds", "gauge", "How long the last run took."),
        Family("last_run_success", "gauge", "1 if every guest of the last run ended as its "
               "chain allows, else 0."),
        Family("last_run_guests", "gauge", "Guests of the last run by outcome."),
        Family("last_run_actions", "gauge", "Actions tried in the last run, by action and "
               "result (ok or failed)."),
        Family("last_run_action_duration_seconds", "summary", "Time the guests' actions "
               "took in the last run."),
        Family("last_run_action_duration_max_seconds", "gauge", "The longest action of each "
               "kind in the last run."),
        Family("last_run_saved_bytes", "gauge", "Memory of the guests the last preserve "
               "saved (about what the managed saves wrote)."),
        Family("last_run_clock_sync_failures", "gauge", "Restored guests whose clock could "
               "not be set through the guest agent."),
    )}
    for run in runs:
        if run.finished_at is None:
            continue
        kind = run.kind
        fams["last_run_timestamp_seconds"].add(run.finished_at, kind=kind)
        fams["last_run_start_timestamp_seconds"].add(run.started_at, kind=kind)
        fams["last_run_duration_seconds"].add(round(run.finished_at - run.started_at, 3),
                                              kind=kind)
        fams["last_run_success"].add(1 if run.ok else 0, kind=kind)
        outcomes = Counter(base_outcome(g.outcome) for g in run.guests)
        for outcome, count in sorted(outcomes.items()):
            fams["last_run_guests"].add(count, kind=kind, outcome=outcome)
        actions: Counter[tuple[str, bool]] = Counter()
        seconds: dict[str, list[float]] = {}
        for guest in run.guests:
            actions.update(action_results(guest))
            for action, took in guest.durations_s.items():
                seconds.setdefault(action, []).append(took)
        for (action, worked), count in sorted(actions.items()):
            fams["last_run_actions"].add(count, kind=kind, action=action,
                                         result="ok" if worked else "failed")
        for action, values in sorted(seconds.items()):
            summary = fams["last_run_action_duration_seconds"]
            summary.add(round(sum(values), 3), "_sum", kind=kind, action=action)
            summary.add(len(values), "_count", kind=kind, action=action)
            fams["last_run_action_duration_max_seconds"].add(max(values), kind=kind,
                                                             action=action)
        if kind == "preserve":
            fams["last_run_saved_bytes"].add(sum(saved_bytes(g) for g in run.guests),
                                             kind=kind)
        else:
            fams["last_run_clock_sync_failures"].add(
                sum(1 for g in run.guests if g.outcome.endswith("sync failed")), kind=kind)
    return [f for f in fams.values() if f.samples]


class Metrics:
    """Counters since the daemon started, fed with every event."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self.started_at = wall_clock()
        self.runs: Counter[tuple[str, str]] = Counter()
        self.guests: Counter[tuple[str, str]] = Counter()
        self.actions: Counter[tuple[str, str]] = Counter()
        self.action_seconds: dict[str, float] = {}
        self.saved_bytes = 0
        self.worker_spawns = 0
        self.worker_losses = 0
        self.events = 0

    def observe(self, event: Event) -> None:
        self.events += 1
        match event:
            case GuestActionFinished(action=action, elapsed_s=elapsed):
                self.actions[action, "ok"] += 1
                self.action_seconds[action] = self.action_seconds.get(action, 0.0) + elapsed
            case GuestActionFailed(action=action, elapsed_s=elapsed):
                self.actions[action, "failed"] += 1
                self.action_seconds[action] = self.action_seconds.get(action, 0.0) + elapsed
            case GuestFinished(guest=guest):
                self.saved_bytes += saved_bytes(guest)
            case RunFinished(kind=kind, ok=ok, run=run):
                self.runs[kind, "ok" if ok else "failed"] += 1
                for guest in run.guests if run is not None else ():
                    self.guests[kind, base_outcome(guest.outcome)] += 1
            case WorkerSpawned():
                self.worker_spawns += 1
            case WorkerLost():
                self.worker_losses += 1
            case _:
                pass

    def families(self) -> list[Family]:
        start = Family("start_time_seconds", "gauge", "When the daemon started (Unix time).")
        start.add(round(self.started_at, 3))
        runs = Family("runs_total", "counter", "Runs since the daemon started, by kind and "
                      "result.")
        for (kind, result), n in sorted(self.runs.items()):
            runs.add(n, kind=kind, result=result)
        guests = Family("guests_total", "counter", "Guests handled by finished runs since the "
                        "daemon started, by kind of run and outcome.")
        for (kind, outcome), n in sorted(self.guests.items()):
            guests.add(n, kind=kind, outcome=outcome)
        actions = Family("actions_total", "counter", "Guest actions since the daemon "
                         "started, by action and result.")
        for (action, result), n in sorted(self.actions.items()):
            actions.add(n, action=action, result=result)
        seconds = Family("action_seconds_total", "counter", "Time spent in guest actions "
                         "since the daemon started, by action.")
        for action, total in sorted(self.action_seconds.items()):
            seconds.add(round(total, 3), action=action)
        saved = Family("saved_bytes_total", "counter", "Memory of the guests saved since the "
                       "daemon started (about what the managed saves wrote).")
        saved.add(self.saved_bytes)
        spawns = Family("worker_spawns_total", "counter", "Worker processes started.")
        spawns.add(self.worker_spawns)
        losses = Family("worker_losses_total", "counter", "Workers that died or were killed "
                        "(not counting those asked to stop).")
        losses.add(self.worker_losses)
        events = Family("events_total", "counter", "Events published on events.sock.")
        events.add(self.events)
        return [start, runs, guests, actions, seconds, saved, spawns, losses, events]


def live_families(status: Status, subscribers: int) -> list[Family]:
    """What the daemon is doing now, from the same record ``guestwarden status`` shows."""
    up = Family("up", "gauge", "1: the daemon answers.")
    up.add(1)
    workers = Family("workers", "gauge", "Worker processes by state.")
    for state, n in sorted(Counter(w.state for w in status.workers).items()):
        workers.add(n, state=state)
    target = Family("workers_target", "gauge", "Worker processes the pool aims for.")
    target.add(status.workers_target)
    jobs = Family("jobs_in_flight", "gauge", "Jobs running on workers now, by action.")
    for action, n in sorted(Counter(j.kind for j in status.jobs).items()):
        jobs.add(n, action=action)
    queued = Family("jobs_queued", "gauge", "Jobs waiting for a free worker.")
    queued.add(status.queued_jobs)
    running = Family("run_in_progress", "gauge", "1 while a run of this kind is going on.")
    guests = Family("run_guests", "gauge", "Guests of the run going on: total and finished.")
    for kind in ("preserve", "restore"):
        current = [r for r in status.runs if r.kind == kind and r.finished_at is None]
        running.add(1 if current else 0, kind=kind)
        for run in current:
            acting = [g for g in run.guests if g.chain]
            guests.add(len(acting), kind=kind, state="total")
            guests.add(sum(1 for g in acting if g.finished), kind=kind, state="finished")
    inhibitor = Family("inhibitor_held", "gauge", "1 while logind's delay inhibitor is held.")
    inhibitor.add(1 if status.inhibitor == "held" else 0)
    subs = Family("event_subscribers", "gauge", "Clients subscribed to events.sock.")
    subs.add(subscribers)
    rss = Family("supervisor_resident_bytes", "gauge", "The supervisor's resident memory.")
    rss.add(status.supervisor_rss_bytes)
    return [f for f in (up, workers, target, jobs, queued, running, guests, inhibitor, subs,
                        rss) if f.samples]


def render(families: Iterable[Family]) -> str:
    return "".join(f.render() for f in families)


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` atomically: a temp file in the same directory, fsync, rename.

    node_exporter may read the file at any moment and must never see half of it; and
    the preserve at shutdown writes it just before the power goes, hence the fsyncs.
    Mode 0644: node_exporter runs as its own user; nothing in it is secret.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # whatever the umask
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
