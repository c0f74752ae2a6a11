"""What the supervisor shows of itself: events, metrics and the metrics textfile.

``Telemetry`` sits beside the app's wiring so that app.py only tells it what
happened (a job was assigned or finished, a worker came or went, a run began) in a
line each. It keeps the bookkeeping that events need and the dispatcher does not:
which run a job belongs to, when a worker took it, each worker's pid, and the last
finished run of each kind (for the ``guestwarden_last_run_*`` metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

from guestwarden.ipc.messages import (
    Assign,
    Event,
    Job,
    JobDone,
    JobFailed,
    JobKind,
    Progress,
    RunFinished,
    RunStatus,
    Status,
)
from guestwarden.ipc.sockets import EVENTS_SOCKET
from guestwarden.supervisor.dispatcher import Effect, InFlight, JobFinished, SendTo
from guestwarden.supervisor.events import EventPublisher
from guestwarden.supervisor.metrics import (
    Metrics,
    last_run_families,
    live_families,
    render,
    write_textfile,
)
from guestwarden.supervisor.pool import describe_exit
from guestwarden.supervisor.runs import JobService, Run

log = logging.getLogger(__name__)


class _RunJobs:
    """The run's JobService, noting which run each new job belongs to."""

    def __init__(self, inner: JobService, run_id: str, owners: dict[int, str]) -> None:
        self._inner = inner
        self._run_id = run_id
        self._owners = owners

    def new_job(self, kind: JobKind, uri: str, **fields: object) -> Job:
        job = self._inner.new_job(kind, uri, **fields)
        self._owners[job.job_id] = self._run_id
        return job

    async def run(self, job: Job) -> JobDone | JobFailed:
        return await self._inner.run(job)


class Telemetry:
    def __init__(
        self,
        ctx: zmq.Context[Any],
        runtime_dir: Path,
        *,
        textfile: Callable[[], str] = lambda: "",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.textfile = textfile
        """``metrics_textfile`` as configured now ("" = none): a reload may change it."""
        self.metrics = Metrics(wall_clock)
        # a plain (not asyncio) socket on the same ZeroMQ context: sends never wait
        self.events = EventPublisher(zmq.Context.shadow(ctx.underlying),
                                     runtime_dir / EVENTS_SOCKET,
                                     observers=(self.metrics.observe, self._on_event),
                                     wall_clock=wall_clock)
        self._owners: dict[int, str] = {}
        self._assigned_at: dict[int, float] = {}
        self._pids: dict[str, int] = {}
        self._last: dict[str, RunStatus] = {}
        self._inhibitor = ""
        self._textfile_error = ""

    # ------------------------------------------------------------------ life

    def open(self, loop: asyncio.AbstractEventLoop, *journaled: RunStatus | None) -> None:
        """Bind events.sock. The journal's runs count as the last ones until new ones end."""
        for record in journaled:
            if record is not None and record.finished_at is not None:
                self._last[record.kind] = record
        self.events.bind()
        self.events.attach(loop)

    def close(self) -> None:
        self.events.close()

    def tick(self, inhibitor_state: str, inhibitor_detail: str) -> None:
        """Every loop turn: read subscription notices; publish an inhibitor change."""
        self.events.drain()
        if inhibitor_state and inhibitor_state != self._inhibitor:
            self._inhibitor = inhibitor_state
            self.events.inhibitor(inhibitor_state, inhibitor_detail)

    # ------------------------------------------------------------------ jobs and workers

    def effects(self, effects: Sequence[Effect]) -> None:
        """The dispatcher's effects, as the app is about to apply them."""
        for effect in effects:
            if isinstance(effect, SendTo) and isinstance(effect.message, Assign):
                job = effect.message.job
                self._assigned_at[job.job_id] = self.clock()
                if job.uuid:  # not an inventory
                    self.events.action_started(self._owners.get(job.job_id, ""), job,
                                               effect.worker_id)
            elif isinstance(effect, JobFinished):
                job = effect.job
                started = self._assigned_at.pop(job.job_id, None)
                run_id = self._owners.pop(job.job_id, "")
                if job.uuid:
                    elapsed = 0.0 if started is None else self.clock() - started
                    self.events.action_ended(run_id, job, effect.result, elapsed)

    def progress(self, flight: InFlight | None, worker_id: str, message: Progress) -> None:
        if flight is not None and flight.worker_id == worker_id:
            self.events.action_progress(self._owners.get(flight.job.job_id, ""), flight.job,
                                        message.processed_bytes, message.total_bytes)

    def worker_spawned(self, worker_id: str, pid: int) -> None:
        self._pids[worker_id] = pid
        self.events.worker_spawned(worker_id, pid)

    def worker_exited(self, worker_id: str, returncode: int, *, stopping: bool) -> None:
        """A worker exits 0 only after it was asked to stop (Stop, SIGTERM): anything
        else while the daemon is not stopping is a lost worker."""
        lost = returncode != 0 and not stopping
        self.events.worker_exited(worker_id, self._pids.pop(worker_id, 0),
                                  describe_exit(returncode), lost=lost)

    # ------------------------------------------------------------------ runs and metrics

    def run_launched(self, run: Run) -> None:
        run.observer = self.events
        run.jobs = _RunJobs(run.jobs, run.run_id, self._owners)

    def last_runs(self) -> list[RunStatus]:
        """The last finished run of each kind (this daemon's, else the journal's)."""
        return [self._last[k] for k in ("preserve", "restore") if k in self._last]

    def metrics_text(self, status: Status) -> str:
        return render([*live_families(status, self.events.subscribers),
                       *last_run_families(self.last_runs()), *self.metrics.families()])

    def _on_event(self, event: Event) -> None:
        """After every run, the textfile: written before the RunFinished frame is sent,
        so that a client that saw the run end finds the file up to date."""
        if isinstance(event, RunFinished) and event.run is not None:
            self._last[event.run.kind] = event.run
            self.write_textfile()

    def write_textfile(self) -> None:
        path = self.textfile()
        if not path:
            return
        text = render([*last_run_families(self.last_runs()), *self.metrics.families()])
        try:
            write_textfile(Path(path), text)
        except OSError as exc:
            error = (f"metrics_textfile: cannot write {path}: {exc.strerror or exc} "
                     f"(is its directory there and writable?)")
            if error != self._textfile_error:
                log.warning("%s", error)
            self._textfile_error = error
            return
        if self._textfile_error:
            log.info("metrics_textfile: %s written again", path)
        self._textfile_error = ""
        log.debug("metrics_textfile: %s written", path)
