"""The dispatcher with an injected clock: no sockets, no processes, no sleeps."""

from __future__ import annotations

from guestwarden.ipc.messages import (
    Assign,
    Bye,
    Cancel,
    Heartbeat,
    Job,
    JobDone,
    JobFailed,
    Progress,
    Ready,
    Stop,
)
from guestwarden.supervisor.dispatcher import Dispatcher, JobFinished, KillWorker, SendTo


def make(max_attempts: int = 2) -> Dispatcher:
    return Dispatcher(heartbeat_timeout_s=5.0, grace_s=2.0, max_attempts=max_attempts)


def job(job_id: int, kind: str = "save", timeout_s: float = 10.0) -> Job:
    return Job(job_id=job_id, kind=kind, uri="test:///x", uuid=f"u{job_id}",  # type: ignore[arg-type]
               name=f"g{job_id}", timeout_s=timeout_s)


def ready(d: Dispatcher, worker_id: str, now: float = 0.0) -> list[object]:
    d.worker_spawned(worker_id, pid=100, now=now)
    return list(d.on_message(worker_id, Ready(worker_id=worker_id, pid=100), now))


def assigned(effects: list[object]) -> list[tuple[str, int]]:
    return [(e.worker_id, e.message.job.job_id) for e in effects
            if isinstance(e, SendTo) and isinstance(e.message, Assign)]


def finished(effects: list[object]) -> list[tuple[int, str]]:
    out = []
    for e in effects:
        if isinstance(e, JobFinished):
            r = e.result
            out.append((e.job.job_id, r.result if isinstance(r, JobDone) else r.reason))
    return out


def test_job_waits_for_a_ready_worker_then_is_assigned() -> None:
    d = make()
    assert d.submit(job(1), now=0.0) == []
    d.worker_spawned("w1", pid=10, now=0.0)
    assert assigned(d.submit(job(2), now=0.1)) == []  # starting workers get nothing
    effects = d.on_message("w1", Ready(worker_id="w1", pid=10), now=0.2)
    assert assigned(effects) == [("w1", 1)]
    done = d.on_message("w1", JobDone(job_id=1, result="saved"), now=0.3)
    assert finished(done) == [(1, "saved")]
    assert assigned(done) == [("w1", 2)]


def test_idle_workers_are_used_least_recently_used_first() -> None:
    d = make()
    ready(d, "w1")
    ready(d, "w2")
    assert assigned(d.submit(job(1), 0.0)) == [("w1", 1)]
    d.on_message("w1", JobDone(job_id=1, result="saved"), 0.1)
    assert assigned(d.submit(job(2), 0.2)) == [("w2", 2)]
    assert assigned(d.submit(job(3), 0.3)) == [("w1", 3)]


def test_silent_worker_is_killed_and_its_job_redispatched_with_next_attempt() -> None:
    d = make()
    ready(d, "w1", now=0.0)
    ready(d, "w2", now=0.0)
    d.submit(job(1), 0.0)  # to w1
    d.on_message("w2", Heartbeat(), now=4.0)
    d.on_message("w1", Heartbeat(), now=1.0)
    assert d.tick(now=5.5) == []  # w1 heard 4.5 s ago: not yet
    effects = d.tick(now=6.5)
    assert KillWorker("w1", "heartbeat expired") in effects
    redone = [e.message.job for e in effects if isinstance(e, SendTo)
              and isinstance(e.message, Assign)]
    assert [(j.job_id, j.attempt) for j in redone] == [(1, 2)]
    assert d.in_flight[1].worker_id == "w2"


def test_any_frame_counts_as_heartbeat() -> None:
    d = make()
    ready(d, "w1", now=0.0)
    d.submit(job(1), 0.0)
    d.on_message("w1", Progress(job_id=1, processed_bytes=5, total_bytes=10), now=4.9)
    assert d.tick(now=9.0) == []
    assert d.job_statuses(9.0)[0].processed_bytes == 5


def test_worker_lost_too_often_fails_the_job() -> None:
    d = make(max_attempts=2)
    ready(d, "w1")
    d.submit(job(1), 0.0)
    effects = d.worker_exited("w1", now=1.0)
    assert finished(effects) == []  # re-queued (attempt 2), no worker yet
    ready(d, "w2", now=1.0)
    assert d.in_flight[1].job.attempt == 2
    effects = d.worker_exited("w2", now=2.0)
    assert finished(effects) == [(1, "worker-lost")]
    assert not d.queue and not d.in_flight


def test_deadline_sends_cancel_then_kills_and_fails_without_redispatch() -> None:
    d = make()
    ready(d, "w1")
    ready(d, "w2")
    d.submit(job(1, timeout_s=10.0), now=0.0)  # deadline = 12
    for t in (3.0, 6.0, 9.0, 12.0):
        d.on_message("w1", Heartbeat(), now=t)
        d.on_message("w2", Heartbeat(), now=t)
    effects = d.tick(now=12.0)
    assert effects == [SendTo("w1", Cancel(job_id=1))]
    assert d.tick(now=13.0) == []
    d.on_message("w1", Heartbeat(), now=13.5)
    d.on_message("w2", Heartbeat(), now=13.5)
    effects = d.tick(now=14.0)
    assert finished(effects) == [(1, "deadline")]
    assert KillWorker("w1", "job past its deadline") in effects
    assert assigned(effects) == []  # the action itself hangs: the guest moves on instead
    assert "w1" not in d.workers


def test_cancelled_job_that_answers_in_time_frees_the_worker() -> None:
    d = make()
    ready(d, "w1")
    d.submit(job(1, timeout_s=1.0), 0.0)
    d.on_message("w1", Heartbeat(), now=3.0)
    assert d.tick(now=3.0) == [SendTo("w1", Cancel(job_id=1))]
    effects = d.on_message("w1", JobFailed(job_id=1, reason="cancelled"), now=3.5)
    assert finished(effects) == [(1, "cancelled")]
    assert d.workers["w1"].state == "idle"


def test_late_result_for_a_redispatched_job_is_ignored() -> None:
    d = make()
    ready(d, "w1")
    ready(d, "w2")
    d.submit(job(1), 0.0)  # w1
    d.worker_exited("w1", now=1.0)  # re-dispatched to w2
    d.worker_spawned("w1", pid=1, now=1.0)  # same id seen again would be a bug; ignore it
    assert finished(d.on_message("w1", JobDone(job_id=1, result="saved"), now=1.1)) == []
    assert finished(d.on_message("w2", JobDone(job_id=1, result="saved"), now=1.2)) == [
        (1, "saved")]


def test_queued_job_can_be_withdrawn() -> None:
    d = make()
    d.submit(job(1), 0.0)
    assert finished(d.cancel(1, now=0.1)) == [(1, "cancelled")]
    ready(d, "w1")
    assert not d.in_flight


def test_retiring_busy_worker_stops_after_its_job() -> None:
    d = make()
    ready(d, "w1")
    d.submit(job(1), 0.0)
    assert d.retire_worker("w1") == []
    d.submit(job(2), 0.1)
    effects = d.on_message("w1", JobDone(job_id=1, result="saved"), 0.2)
    assert SendTo("w1", Stop(reason="pool shrinking")) in effects
    assert assigned(effects) == []  # job 2 waits for another worker
    effects = d.on_message("w1", Bye(reason="pool shrinking"), 0.3)
    assert "w1" not in d.workers and len(d.queue) == 1


def test_protocol_mismatch_is_refused() -> None:
    d = make()
    d.worker_spawned("w1", pid=1, now=0.0)
    effects = d.on_message("w1", Ready(worker_id="w1", pid=1, protocol=99), 0.0)
    assert effects == [KillWorker("w1", "protocol mismatch")]
    assert d.ready_count() == 0


def test_peak_in_flight_is_recorded_per_kind() -> None:
    d = make()
    for w in ("w1", "w2", "w3"):
        ready(d, w)
    d.submit(job(1, "save"), 0.0)
    d.submit(job(2, "shutdown"), 0.0)
    d.submit(job(3, "shutdown"), 0.0)
    assert d.peak_in_flight == {"save": 1, "shutdown": 2}


def test_frames_from_unknown_workers_are_dropped() -> None:
    d = make()
    assert d.on_message("ghost", JobDone(job_id=1, result="saved"), 0.0) == []
