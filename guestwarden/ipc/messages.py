"""Every message that crosses a guestwarden socket: this file is the protocol spec.

Rules (see DESIGN.md, "Protocol"):

* Each message is a frozen msgspec Struct with ``tag=True``; the tag is the class
  name, so a frame says what it is without a schema lookup.
* Map encoding (not ``array_like``) and defaults on every field added after the
  first release, so a CLI and a daemon of different versions still understand
  each other: an unknown field is ignored, a missing one takes its default.
* Sequences are tuples: the decoded objects are immutable all the way down.

Two conversations use these messages:

* supervisor <-> worker over ``workers.sock`` (ROUTER in the supervisor, one DEALER
  per worker): ``ToWorker`` and ``FromWorker``.
* CLI <-> supervisor over ``control.sock`` (ROUTER in the supervisor, a DEALER per
  request in the CLI): ``Request`` and ``Reply``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

PROTOCOL_VERSION = 1
"""Bumped when a change would make an older peer misread a frame."""

ActionName = Literal["save", "shutdown", "poweroff"]
"""The actions of a preserve chain, tried in order until one works."""

JobKind = Literal["inventory", "save", "shutdown", "poweroff", "start", "sync_time"]

GuestState = Literal["running", "paused", "shutoff", "other"]

ShutdownMode = Literal["acpi", "agent", "agent,acpi"]


class _Message(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of every wire message: tagged by class name, immutable."""


# --------------------------------------------------------------------------- data


class GuestInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One guest as a worker's inventory saw it."""

    uri: str
    uuid: str
    name: str
    state: GuestState
    persistent: bool
    has_managed_save: bool = False
    memory_kib: int = 0


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """One unit of work for a worker: an action on a guest, or an inventory of a URI.

    ``timeout_s`` is the action's own bound (a shutdown waits at most this long for
    the guest to go off); the supervisor's deadline is ``timeout_s`` plus a grace.
    """

    job_id: int
    kind: JobKind
    uri: str
    uuid: str = ""
    name: str = ""
    timeout_s: float = 60.0
    attempt: int = 1
    bypass_cache: bool = False
    start_paused: bool = False
    expect_managed_save: bool = False
    shutdown_mode: ShutdownMode = "acpi"


# ------------------------------------------------------------- supervisor -> worker


class Assign(_Message, frozen=True, kw_only=True):
    job: Job


class Cancel(_Message, frozen=True, kw_only=True):
    """Stop the job if it can be stopped (a save is aborted with abortJob)."""

    job_id: int


class Heartbeat(_Message, frozen=True, kw_only=True):
    """Sent both ways. Any message counts as a heartbeat; this one is for quiet times."""

    sent_at: float = 0.0


class Stop(_Message, frozen=True, kw_only=True):
    """Finish the current libvirt call, then exit."""

    reason: str = ""


ToWorker = Assign | Cancel | Heartbeat | Stop


# ------------------------------------------------------------- worker -> supervisor


class Ready(_Message, frozen=True, kw_only=True):
    worker_id: str
    pid: int
    protocol: int = PROTOCOL_VERSION


class Progress(_Message, frozen=True, kw_only=True):
    """Save (or restore) progress from libvirt's job statistics."""

    job_id: int
    processed_bytes: int
    total_bytes: int


class JobDone(_Message, frozen=True, kw_only=True):
    """The job's action worked. ``result`` says how (e.g. "saved", "already-off")."""

    job_id: int
    result: str
    detail: str = ""
    started_ns: int = 0
    finished_ns: int = 0
    guests: tuple[GuestInfo, ...] = ()


class JobFailed(_Message, frozen=True, kw_only=True):
    """The job's action did not work; the guest moves to its next action.

    ``reason`` is a short machine word ("libvirt-error", "timeout", "cancelled",
    "not-found", ...); ``detail`` is for people and names guest, action and libvirt's
    message.
    """

    job_id: int
    reason: str
    detail: str = ""
    started_ns: int = 0
    finished_ns: int = 0


class Bye(_Message, frozen=True, kw_only=True):
    reason: str = ""


FromWorker = Ready | Heartbeat | Progress | JobDone | JobFailed | Bye


# --------------------------------------------------------------- CLI -> supervisor


class GetStatus(_Message, frozen=True, kw_only=True):
    pass


class ListJobs(_Message, frozen=True, kw_only=True):
    pass


class Preserve(_Message, frozen=True, kw_only=True):
    """Start a preserve run; the reply names the run to follow with GetRun."""


class Restore(_Message, frozen=True, kw_only=True):
    """Start a restore run from the journal; the reply names the run."""


class Plan(_Message, frozen=True, kw_only=True):
    """Say what preserve would do now, guest by guest, without doing it."""


class GetRun(_Message, frozen=True, kw_only=True):
    run_id: str


class SetWorkers(_Message, frozen=True, kw_only=True):
    count: int


Request = GetStatus | ListJobs | Preserve | Restore | Plan | GetRun | SetWorkers


# --------------------------------------------------------------- supervisor -> CLI

ErrorCode = Literal["bad-request", "busy", "invalid", "failed", "unavailable"]


class Ok(_Message, frozen=True, kw_only=True):
    detail: str = ""
    run_id: str = ""


class Error(_Message, frozen=True, kw_only=True):
    code: ErrorCode
    message: str


class WorkerStatus(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    pid: int
    state: str
    job_id: int | None = None
    rss_bytes: int = 0
    cpu_percent: float = 0.0
    jobs_done: int = 0


class JobStatus(msgspec.Struct, frozen=True, kw_only=True):
    job_id: int
    kind: JobKind
    uri: str
    guest: str
    uuid: str
    worker_id: str | None
    attempt: int
    age_s: float
    deadline_in_s: float | None
    processed_bytes: int = 0
    total_bytes: int = 0


class GuestOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What a run did to one guest (also the journal's record of it)."""

    uri: str
    uuid: str
    name: str
    persistent: bool
    state_before: GuestState
    chain: tuple[str, ...] = ()
    outcome: str = "pending"
    ok: bool = False
    finished: bool = False
    detail: str = ""
    attempts: tuple[str, ...] = ()
    durations_s: dict[str, float] = {}


class RunStatus(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    kind: Literal["preserve", "restore"]
    started_at: float
    finished_at: float | None = None
    ok: bool | None = None
    detail: str = ""
    guests: tuple[GuestOutcome, ...] = ()


class Status(_Message, frozen=True, kw_only=True):
    state: str
    pid: int
    uptime_s: float
    workers_target: int
    workers: tuple[WorkerStatus, ...] = ()
    jobs: tuple[JobStatus, ...] = ()
    queued_jobs: int = 0
    runs: tuple[RunStatus, ...] = ()
    boot_id: str = ""
    restored_this_boot: bool = False
    notes: tuple[str, ...] = ()
    supervisor_rss_bytes: int = 0
    peak_in_flight: dict[str, int] = {}


class Jobs(_Message, frozen=True, kw_only=True):
    jobs: tuple[JobStatus, ...] = ()
    queued_jobs: int = 0


class PlannedGuest(msgspec.Struct, frozen=True, kw_only=True):
    uri: str
    uuid: str
    name: str
    state: GuestState
    persistent: bool
    chain: tuple[str, ...]
    note: str = ""


class PlanReply(_Message, frozen=True, kw_only=True):
    guests: tuple[PlannedGuest, ...] = ()
    errors: tuple[str, ...] = ()


class RunReply(_Message, frozen=True, kw_only=True):
    run: RunStatus


Reply = Ok | Error | Status | Jobs | PlanReply | RunReply
