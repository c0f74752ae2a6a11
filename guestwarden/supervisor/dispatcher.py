"""The job table: queue, in-flight jobs, idle workers, heartbeats and deadlines.

Pure bookkeeping in the Paranoid Pirate style: nothing here touches a socket, a
process or the clock. The app feeds it what happened (a frame from a worker, a
worker's exit, the time) and applies the ``Effect`` values it returns (send a frame,
kill a worker, finish a job). Time is passed in, so the tests drive heartbeat expiry
and deadlines without sleeping.

Rules:

* Any frame from a worker counts as a heartbeat. A worker silent for
  ``heartbeat_timeout_s`` is lost, like one that exited.
* A lost worker's job goes back to the front of the queue with ``attempt + 1``
  (every action is idempotent), or fails with reason ``worker-lost`` once
  ``max_attempts`` is used up, so the guest moves on to its next action.
* A job has a deadline: its own ``timeout_s`` plus ``grace_s``. Past it the worker
  is sent ``Cancel``; if it has not answered ``grace_s`` later, it is killed and the
  job fails with reason ``deadline`` (not re-dispatched: the action itself hangs).
* Idle workers are used least recently used first.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from guestwarden.ipc.messages import (
    PROTOCOL_VERSION,
    Assign,
    Bye,
    Cancel,
    FromWorker,
    Heartbeat,
    Job,
    JobDone,
    JobFailed,
    JobStatus,
    Progress,
    Ready,
    Stop,
    ToWorker,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendTo:
    worker_id: str
    message: ToWorker


@dataclass(frozen=True)
class KillWorker:
    worker_id: str
    reason: str


@dataclass(frozen=True)
class JobFinished:
    job: Job
    result: JobDone | JobFailed


Effect = SendTo | KillWorker | JobFinished

WorkerState = Literal["starting", "idle", "busy", "retiring"]


@dataclass
class WorkerSlot:
    worker_id: str
    pid: int = 0
    state: WorkerState = "starting"
    job_id: int | None = None
    last_seen: float = 0.0
    jobs_done: int = 0
    retire_reason: str = ""


@dataclass
class InFlight:
    job: Job
    worker_id: str
    started_at: float
    deadline: float
    cancel_sent_at: float | None = None
    processed_bytes: int = 0
    total_bytes: int = 0


@dataclass
class Dispatcher:
    """Matches queued jobs with idle workers and watches both."""

    heartbeat_timeout_s: float
    grace_s: float
    max_attempts: int
    workers: dict[str, WorkerSlot] = field(default_factory=dict)
    queue: deque[tuple[Job, float]] = field(default_factory=deque)
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    idle: OrderedDict[str, None] = field(default_factory=OrderedDict)
    peak_in_flight: Counter[str] = field(default_factory=Counter)

    # ------------------------------------------------------------------ workers

    def worker_spawned(self, worker_id: str, pid: int, now: float) -> None:
        self.workers[worker_id] = WorkerSlot(worker_id=worker_id, pid=pid, last_seen=now)

    def worker_exited(self, worker_id: str, now: float) -> list[Effect]:
        """The pool saw the process end (or killed it)."""
        return self._lose(worker_id, now, reason="worker exited")

    def retire_worker(self, worker_id: str, reason: str = "pool shrinking") -> list[Effect]:
        """Take a worker out of service; it stops after its current job."""
        slot = self.workers.get(worker_id)
        if slot is None:
            return []
        self.idle.pop(worker_id, None)
        if slot.state == "busy":
            slot.state = "retiring"
            slot.retire_reason = reason
            return []
        slot.state = "retiring"
        slot.retire_reason = reason
        return [SendTo(worker_id, Stop(reason=reason))]

    def ready_count(self) -> int:
        return sum(1 for s in self.workers.values() if s.state in ("idle", "busy"))

    # ------------------------------------------------------------------ jobs

    def submit(self, job: Job, now: float) -> list[Effect]:
        self.queue.append((job, now))
        return self._assign(now)

    def cancel(self, job_id: int, now: float) -> list[Effect]:
        """Withdraw a job: dropped if queued, cancelled at the worker if running."""
        for i, (job, _) in enumerate(self.queue):
            if job.job_id == job_id:
                del self.queue[i]
                return [JobFinished(job, JobFailed(job_id=job_id, reason="cancelled"))]
        flight = self.in_flight.get(job_id)
        if flight is not None and flight.cancel_sent_at is None:
            flight.cancel_sent_at = now
            return [SendTo(flight.worker_id, Cancel(job_id=job_id))]
        return []

    # ------------------------------------------------------------------ input

    def on_message(self, worker_id: str, message: FromWorker, now: float) -> list[Effect]:
        slot = self.workers.get(worker_id)
        if slot is None:
            log.warning("frame from unknown worker=%s dropped", worker_id)
            return []
        slot.last_seen = now
        effects: list[Effect] = []
        match message:
            case Ready(protocol=protocol, pid=pid):
                if protocol != PROTOCOL_VERSION:
                    log.error(
                        "worker=%s speaks protocol %d, expected %d: stopping it",
                        worker_id, protocol, PROTOCOL_VERSION,
                    )
                    slot.state = "retiring"
                    return [KillWorker(worker_id, "protocol mismatch")]
                slot.pid = pid or slot.pid
                if slot.state == "starting":
                    slot.state = "idle"
                    self.idle[worker_id] = None
                    log.info("worker=%s pid=%d ready", worker_id, slot.pid)
                    effects += self._assign(now)
            case Heartbeat():
                pass
            case Progress(job_id=job_id):
                flight = self.in_flight.get(job_id)
                if flight is not None and flight.worker_id == worker_id:
                    flight.processed_bytes = message.processed_bytes
                    flight.total_bytes = message.total_bytes
            case JobDone(job_id=job_id) | JobFailed(job_id=job_id):
                effects += self._finish(worker_id, job_id, message, now)
            case Bye(reason=reason):
                log.info("worker=%s says goodbye: %s", worker_id, reason)
                effects += self._lose(worker_id, now, reason=f"worker left: {reason}")
        return effects

    def tick(self, now: float) -> list[Effect]:
        """Expire silent workers and overdue jobs; called every loop turn."""
        effects: list[Effect] = []
        for slot in list(self.workers.values()):
            if now - slot.last_seen > self.heartbeat_timeout_s:
                log.warning(
                    "worker=%s silent for %.1fs: lost", slot.worker_id, now - slot.last_seen
                )
                effects.append(KillWorker(slot.worker_id, "heartbeat expired"))
                effects += self._lose(slot.worker_id, now, reason="heartbeat expired")
        for flight in list(self.in_flight.values()):
            if flight.cancel_sent_at is None and now >= flight.deadline:
                log.warning(
                    "job=%d %s guest=%s past its deadline on worker=%s: cancelling",
                    flight.job.job_id, flight.job.kind, flight.job.name, flight.worker_id,
                )
                flight.cancel_sent_at = now
                effects.append(SendTo(flight.worker_id, Cancel(job_id=flight.job.job_id)))
            elif flight.cancel_sent_at is not None and now >= flight.cancel_sent_at + self.grace_s:
                log.error(
                    "job=%d guest=%s: worker=%s ignored cancel: killing it",
                    flight.job.job_id, flight.job.name, flight.worker_id,
                )
                job = flight.job
                del self.in_flight[job.job_id]
                failed = JobFailed(
                    job_id=job.job_id,
                    reason="deadline",
                    detail=f"{job.kind} of {job.name or job.uri} did not end by its deadline",
                )
                effects.append(JobFinished(job, failed))
                effects.append(KillWorker(flight.worker_id, "job past its deadline"))
                effects += self._lose(flight.worker_id, now, reason="killed after deadline")
        return effects

    # ------------------------------------------------------------------ views

    def job_statuses(self, now: float) -> tuple[JobStatus, ...]:
        return tuple(
            JobStatus(
                job_id=f.job.job_id,
                kind=f.job.kind,
                uri=f.job.uri,
                guest=f.job.name,
                uuid=f.job.uuid,
                worker_id=f.worker_id,
                attempt=f.job.attempt,
                age_s=round(now - f.started_at, 3),
                deadline_in_s=round(f.deadline - now, 3),
                processed_bytes=f.processed_bytes,
                total_bytes=f.total_bytes,
            )
            for f in self.in_flight.values()
        )

    # ------------------------------------------------------------------ internals

    def _assign(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        while self.queue and self.idle:
            worker_id, _ = self.idle.popitem(last=False)
            job, _queued_at = self.queue.popleft()
            slot = self.workers[worker_id]
            slot.state = "busy"
            slot.job_id = job.job_id
            self.in_flight[job.job_id] = InFlight(
                job=job,
                worker_id=worker_id,
                started_at=now,
                deadline=now + job.timeout_s + self.grace_s,
            )
            kinds = Counter(f.job.kind for f in self.in_flight.values())
            if kinds[job.kind] > self.peak_in_flight[job.kind]:
                self.peak_in_flight[job.kind] = kinds[job.kind]
            effects.append(SendTo(worker_id, Assign(job=job)))
        return effects

    def _finish(
        self, worker_id: str, job_id: int, result: JobDone | JobFailed, now: float
    ) -> list[Effect]:
        flight = self.in_flight.get(job_id)
        slot = self.workers[worker_id]
        if flight is None or flight.worker_id != worker_id:
            # a late answer for a job already expired or re-dispatched: ignore
            log.info("late result for job=%d from worker=%s ignored", job_id, worker_id)
            return []
        del self.in_flight[job_id]
        slot.job_id = None
        slot.jobs_done += 1
        effects: list[Effect] = [JobFinished(flight.job, result)]
        if slot.state == "retiring":
            effects.append(SendTo(worker_id, Stop(reason=slot.retire_reason)))
        else:
            slot.state = "idle"
            self.idle[worker_id] = None
            effects += self._assign(now)
        return effects

    def _lose(self, worker_id: str, now: float, *, reason: str) -> list[Effect]:
        slot = self.workers.pop(worker_id, None)
        self.idle.pop(worker_id, None)
        if slot is None:
            return []
        effects: list[Effect] = []
        for flight in [f for f in self.in_flight.values() if f.worker_id == worker_id]:
            job = flight.job
            del self.in_flight[job.job_id]
            if flight.cancel_sent_at is None and job.attempt < self.max_attempts:
                log.warning(
                    "job=%d %s guest=%s lost with worker=%s (%s): re-queued as attempt %d",
                    job.job_id, job.kind, job.name, worker_id, reason, job.attempt + 1,
                )
                self.queue.appendleft((msgspec.structs.replace(job, attempt=job.attempt + 1), now))
            else:
                failed = JobFailed(
                    job_id=job.job_id,
                    reason="worker-lost",
                    detail=f"{job.kind} of {job.name or job.uri}: worker lost ({reason}) "
                    f"on attempt {job.attempt}",
                )
                effects.append(JobFinished(job, failed))
        return effects + self._assign(now)
