"""Every wire message round-trips; junk is rejected with DecodeError, never crashes."""

from __future__ import annotations

import contextlib
import typing

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from guestwarden.ipc import codec
from guestwarden.ipc import messages as m

JOB = m.Job(job_id=7, kind="save", uri="qemu:///system", uuid="u-1", name="web1",
            timeout_s=30.0, attempt=2, bypass_cache=True)
POLICY = m.GuestPolicy(chain=("save", "poweroff"), order=10, shutdown_timeout=60.0,
                       exclude=False)
GUEST = m.GuestInfo(uri="qemu:///system", uuid="u-1", name="web1", state="paused",
                    persistent=True, has_managed_save=False, memory_kib=131072, policy=POLICY)
OUTCOME = m.GuestOutcome(uri="qemu:///system", uuid="u-1", name="web1", persistent=True,
                         state_before="running", chain=("save", "poweroff"), outcome="saved",
                         ok=True, finished=True, attempts=("save: saved",),
                         durations_s={"save": 0.4})
RUN = m.RunStatus(run_id="preserve-1", kind="preserve", started_at=1.0, finished_at=2.0,
                  ok=True, guests=(OUTCOME,))
JOBSTATUS = m.JobStatus(job_id=1, kind="save", uri="u", guest="g", uuid="x", worker_id="w1",
                        attempt=1, age_s=0.5, deadline_in_s=9.0, processed_bytes=1,
                        total_bytes=2)

SAMPLES: dict[str, list[msgspec.Struct]] = {
    "ToWorker": [m.Assign(job=JOB), m.Cancel(job_id=3), m.Heartbeat(sent_at=1.5),
                 m.Stop(reason="bye")],
    "FromWorker": [
        m.Ready(worker_id="w1", pid=42), m.Heartbeat(),
        m.Progress(job_id=1, processed_bytes=10, total_bytes=100),
        m.JobDone(job_id=1, result="listed", guests=(GUEST,), started_ns=1, finished_ns=2),
        m.JobFailed(job_id=1, reason="timeout", detail="still running"),
        m.Bye(reason="stop"),
    ],
    "Request": [m.GetStatus(), m.ListJobs(), m.Preserve(), m.Restore(), m.Plan(),
                m.GetRun(run_id="r"), m.SetWorkers(count=4), m.Reload(),
                m.ShowPolicy(guest="db1"), m.ClearPolicy(guest="db1", uri="qemu:///system"),
                m.SetPolicy(guest="db1", policy=POLICY, unset=("start_delay",)),
                m.GetMetrics()],
    "Reply": [
        m.Ok(detail="x", run_id="r"), m.Error(code="busy", message="no"),
        m.Status(state="idle", pid=1, uptime_s=1.0, workers_target=2,
                 workers=(m.WorkerStatus(worker_id="w1", pid=2, state="idle"),),
                 jobs=(JOBSTATUS,), runs=(RUN,), peak_in_flight={"save": 1}),
        m.Jobs(jobs=(JOBSTATUS,), queued_jobs=3),
        m.PlanReply(guests=(m.PlannedGuest(uri="u", uuid="x", name="g", state="running",
                                           persistent=True, chain=("save",)),),
                    errors=("u: down",)),
        m.RunReply(run=RUN),
        m.PolicyReply(guest=m.PlannedGuest(
            uri="u", uuid="x", name="db1", state="running", persistent=True, chain=("save",),
            order=10, shutdown_timeout=60.0, sources={"order": "metadata"}, expected_s=1.5,
            rank=1), metadata=POLICY, detail="metadata written"),
        m.Reloaded(path="/etc/g.toml", changes=(m.SettingChange(
            key="shutdown.parallel_save", old="1", new="2", live=True),)),
        m.MetricsText(text="guestwarden_up 1\n"),
    ],
    "Event": [
        m.Subscribed(pid=7), m.RunStarted(seq=1, at=1.5, run_id="r", kind="preserve"),
        m.RunPlanned(seq=2, run_id="r", kind="preserve", guests=(OUTCOME,)),
        m.GuestActionStarted(seq=3, run_id="r", job_id=1, uri="u", uuid="x", name="g",
                             action="save", attempt=2, worker_id="w1"),
        m.GuestActionProgress(seq=4, run_id="r", job_id=1, uri="u", uuid="x", name="g",
                              action="save", processed_bytes=10, total_bytes=100),
        m.GuestActionFinished(seq=5, run_id="r", job_id=1, uri="u", uuid="x", name="g",
                              action="save", result="saved", elapsed_s=0.4),
        m.GuestActionFailed(seq=6, run_id="r", job_id=2, uri="u", uuid="x", name="g",
                            action="shutdown", reason="timeout", detail="still on"),
        m.GuestFinished(seq=7, run_id="r", guest=OUTCOME),
        m.RunFinished(seq=8, run_id="r", kind="preserve", ok=True, detail="1/1", run=RUN),
        m.WorkerSpawned(seq=9, worker_id="w2", pid=3),
        m.WorkerLost(seq=10, worker_id="w2", pid=3, reason="killed by SIGKILL"),
        m.WorkerRetired(seq=11, worker_id="w1", pid=2, reason="exited with status 0"),
        m.InhibitorChanged(seq=12, state="held", detail="logind delays shutdown"),
    ],
}
DECODERS = {
    "ToWorker": codec.decode_to_worker,
    "FromWorker": codec.decode_from_worker,
    "Request": codec.decode_request,
    "Reply": codec.decode_reply,
    "Event": codec.decode_event,
}


@pytest.mark.parametrize("union", sorted(SAMPLES))
def test_every_member_of_every_union_round_trips(union: str) -> None:
    members = set(typing.get_args(getattr(m, union)))
    assert {type(s) for s in SAMPLES[union]} == members, "a message has no sample here"
    for sample in SAMPLES[union]:
        assert DECODERS[union](codec.encode(sample)) == sample


def test_frames_are_maps_tagged_with_the_class_name() -> None:
    raw = msgspec.msgpack.decode(codec.encode(m.Cancel(job_id=3)))
    assert raw == {"type": "Cancel", "job_id": 3}


def test_a_newer_peer_with_extra_fields_is_understood() -> None:
    frame = msgspec.msgpack.encode({"type": "SetWorkers", "count": 3, "future_field": [1]})
    assert codec.decode_request(frame) == m.SetWorkers(count=3)


def test_an_older_peer_missing_a_defaulted_field_is_understood() -> None:
    frame = msgspec.msgpack.encode({"type": "Ready", "worker_id": "w1", "pid": 5})
    assert codec.decode_from_worker(frame) == m.Ready(worker_id="w1", pid=5, protocol=1)


@pytest.mark.parametrize("frame", [
    b"",
    b"\xc1",
    msgspec.msgpack.encode({"type": "Nope"}),
    msgspec.msgpack.encode({"type": "SetWorkers", "count": "three"}),
    msgspec.msgpack.encode({"type": "SetWorkers"}),
    msgspec.msgpack.encode({"count": 3}),
    msgspec.msgpack.encode([1, 2, 3]),
    msgspec.msgpack.encode({"type": "Assign", "job": {"job_id": 1}}),  # wrong union
])
def test_junk_is_rejected(frame: bytes) -> None:
    with pytest.raises(codec.DecodeError):
        codec.decode_request(frame)


@given(st.binary(max_size=256))
def test_random_bytes_never_escape_as_other_errors(frame: bytes) -> None:
    for decode in DECODERS.values():
        with contextlib.suppress(codec.DecodeError):
            decode(frame)


@given(st.dictionaries(st.sampled_from(["type", "count", "run_id", "job_id", "x"]),
                       st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1),
                                 st.text(max_size=8), st.none(),
                                 st.sampled_from(["SetWorkers", "GetRun", "Cancel"]))))
def test_random_maps_decode_or_raise_decode_error(frame: dict[str, object]) -> None:
    try:
        request = codec.decode_request(msgspec.msgpack.encode(frame))
    except codec.DecodeError:
        return
    assert type(request) in typing.get_args(m.Request)
