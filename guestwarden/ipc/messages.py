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

And the supervisor publishes ``Event`` on ``events.sock`` (XPUB; anyone may SUB).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

PROTOCOL_VERSION = 1
"""Bumped when a change would make an older peer misread a frame."""

ActionName = Literal["save", "shutdown", "poweroff"]
"""The actions of a preserve chain, tried in order until one works."""

JobKind = Literal["inventory", "save", "shutdown", "poweroff", "start", "sync_time",
                  "policy_get", "policy_set", "agent_wait"]

GuestState = Literal["running", "paused", "shutoff", "other"]

ShutdownMode = Literal["acpi", "agent", "agent,acpi"]


class _Message(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of every wire message: tagged by class name, immutable."""


# --------------------------------------------------------------------------- data


PolicyChain = Annotated[tuple[ActionName, ...], Meta(min_length=1, max_length=3)]
Order = Annotated[int, Meta(ge=-10000, le=10000)]


class GuestPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """What a guest asks for itself, each field unset (None) unless given.

    Kept in the guest's own libvirt metadata (conf/guestpolicy.py has the XML), so it
    travels with the guest; ``[[rules]]`` in the config are the same fields plus a
    name pattern. Unset fields fall through: metadata, then the first matching rule
    that sets the field, then the defaults (supervisor/policy.py).
    """

    chain: PolicyChain | None = None
    order: Order | None = None
    """Preserve handles order groups from the highest to the lowest, restore from the
    lowest to the highest, with a barrier between groups."""
    shutdown_timeout: Annotated[float, Meta(gt=0, le=86400)] | None = None
    start_delay: Annotated[float, Meta(ge=0, le=86400)] | None = None
    """Seconds from this guest's start to the next start."""
    exclude: bool | None = None
    """True: preserve and restore leave the guest alone (e.g. a cluster manager's)."""

    def __post_init__(self) -> None:
        if self.chain is not None and len(set(self.chain)) != len(self.chain):
            raise ValueError(
                f"chain: an action may appear only once in a chain, got {list(self.chain)}")


class GuestInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One guest as a worker's inventory saw it."""

    uri: str
    uuid: str
    name: str
    state: GuestState
    persistent: bool
    has_managed_save: bool = False
    memory_kib: int = 0
    policy: GuestPolicy | None = None
    """The guest's guestwarden metadata; None when it has none."""
    policy_error: str = ""
    """Why the guest's guestwarden metadata could not be used (it is then ignored)."""


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
    policy: GuestPolicy | None = None
    """policy_set: the metadata to write (None: remove it). ``uuid`` or else ``name``
    names the guest for policy_get and policy_set."""


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


class Reload(_Message, frozen=True, kw_only=True):
    """Re-read the daemon's config file (as SIGHUP does); the reply says what changed."""


class ShowPolicy(_Message, frozen=True, kw_only=True):
    """A guest's metadata and effective policy. ``guest``: name or UUID; ``uri`` may be
    left empty when only one configured URI has the guest."""

    guest: str
    uri: str = ""


class SetPolicy(_Message, frozen=True, kw_only=True):
    """Change the given fields of a guest's metadata; ``unset`` names fields to remove."""

    guest: str
    uri: str = ""
    policy: GuestPolicy = GuestPolicy()
    unset: tuple[str, ...] = ()


class ClearPolicy(_Message, frozen=True, kw_only=True):
    """Remove the guest's guestwarden metadata altogether."""

    guest: str
    uri: str = ""


class GetMetrics(_Message, frozen=True, kw_only=True):
    """The daemon's metrics now, in the Prometheus text format (``guestwarden metrics``)."""


Request = (GetStatus | ListJobs | Preserve | Restore | Plan | GetRun | SetWorkers | Reload
           | ShowPolicy | SetPolicy | ClearPolicy | GetMetrics)


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
    spans_ns: dict[str, tuple[int, int]] = {}
    """Per action, when the worker started and ended its last attempt (the worker's
    ``time.monotonic_ns()``: CLOCK_MONOTONIC, comparable across the processes of one
    host and boot), so that a reader can order events across guests."""
    order: int = 0
    """The guest's order group when preserved; restore brings groups back lowest first."""
    start_delay_s: float | None = None
    """Seconds from this guest's start to the next start (None: ``[boot] start_delay``)."""
    memory_kib: int = 0
    """The guest's memory as the preserve's inventory saw it (about what a save writes)."""


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
    inhibitor: str = ""
    """logind's delay inhibitor: "held", "released" or "unavailable" ("" from old daemons)."""
    inhibitor_detail: str = ""
    inhibit_delay_max_s: float | None = None
    """logind's InhibitDelayMaxUSec in seconds; None when unknown."""
    preserve_estimate_s: float | None = None
    """How long preserving the guests running now is expected to take; None: not known."""
    warnings: tuple[str, ...] = ()
    dueling: tuple[str, ...] = ()
    """Why something else on the host would also act on guests (libvirt-guests enabled,
    libvirt's auto-shutdown on); while not empty and allow_dueling is false, the daemon
    refuses to preserve and restore. Also in ``notes``."""
    refusing_guests: bool = False
    """True while the daemon refuses to preserve and restore because of ``dueling``."""


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
    order: int = 0
    shutdown_timeout: float = 0.0
    start_delay: float = 0.0
    exclude: bool = False
    sources: dict[str, str] = {}
    """Where each of chain, order, shutdown_timeout, start_delay and exclude came from:
    "metadata", "rule N (PATTERN)" (N counts ``[[rules]]`` from 1) or "default"."""
    policy_error: str = ""
    """Why the guest's own metadata was ignored, if it was."""
    expected_s: float | None = None
    """How long the first action of the chain is expected to take (learned, else
    estimated); None for guests left alone."""
    rank: int = 0
    """Position in which preserve hands the guest out (1 first); 0: left alone."""


class PlanReply(_Message, frozen=True, kw_only=True):
    guests: tuple[PlannedGuest, ...] = ()
    errors: tuple[str, ...] = ()
    estimate_s: float | None = None
    """How long preserving these guests is expected to take (supervisor/forecast.py)."""
    estimate_basis: str = ""
    warnings: tuple[str, ...] = ()
    inhibit_delay_max_s: float | None = None
    stop_budget_s: float | None = None


class PolicyReply(_Message, frozen=True, kw_only=True):
    guest: PlannedGuest
    """The effective values and where each came from, as ``plan`` shows them."""
    metadata: GuestPolicy | None = None
    """What the guest's own metadata says (None: none)."""
    detail: str = ""


class RunReply(_Message, frozen=True, kw_only=True):
    run: RunStatus


class SettingChange(msgspec.Struct, frozen=True, kw_only=True):
    """One config key that a reload found changed; values as TOML/JSON text."""

    key: str
    old: str
    new: str
    live: bool
    """True: in effect now. False: needs a restart; the old value stays until then."""


class Reloaded(_Message, frozen=True, kw_only=True):
    path: str
    changes: tuple[SettingChange, ...] = ()


class MetricsText(_Message, frozen=True, kw_only=True):
    """The answer to GetMetrics: Prometheus text exposition format, version 0.0.4."""

    text: str


Reply = (Ok | Error | Status | Jobs | PlanReply | RunReply | Reloaded | PolicyReply
         | MetricsText)


# ------------------------------------------------------- supervisor -> subscribers
#
# Published on ``events.sock`` (an XPUB socket in the supervisor; any ZeroMQ SUB
# socket may listen): one frame per event, no topics (subscribe to b""). ``seq``
# counts the daemon's events from 1, so that a subscriber notices a gap (one that
# reads too slowly loses events past the high-water mark); ``at`` is the wall-clock
# time (``time.time()``). PUB/SUB delivers nothing sent before a subscription took
# effect: a follower reads a snapshot (GetRun, GetStatus) and then applies events,
# as guestwarden's own CLI does.


class _Event(_Message, frozen=True, kw_only=True):
    seq: int = 0
    at: float = 0.0


class Subscribed(_Event, frozen=True, kw_only=True):
    """The first frame of every subscriber (the XPUB welcome): events reach it from now."""

    pid: int = 0
    protocol: int = PROTOCOL_VERSION


RunKind = Literal["preserve", "restore"]


class RunStarted(_Event, frozen=True, kw_only=True):
    run_id: str
    kind: RunKind


class RunPlanned(_Event, frozen=True, kw_only=True):
    """The run knows its guests (after the inventory): one record each, as GetRun shows."""

    run_id: str
    kind: RunKind
    guests: tuple[GuestOutcome, ...] = ()


class _GuestAction(_Event, frozen=True, kw_only=True):
    run_id: str = ""
    """The run the job belongs to ("" for a job of no run, e.g. a plan's inventory)."""
    job_id: int
    uri: str
    uuid: str
    name: str
    action: JobKind


class GuestActionStarted(_GuestAction, frozen=True, kw_only=True):
    """A worker was given the job (``attempt`` > 1: again, after a worker was lost)."""

    attempt: int = 1
    worker_id: str = ""


class GuestActionProgress(_GuestAction, frozen=True, kw_only=True):
    processed_bytes: int
    total_bytes: int


class GuestActionFinished(_GuestAction, frozen=True, kw_only=True):
    """The action worked; ``result`` says how (as in JobDone)."""

    result: str
    detail: str = ""
    elapsed_s: float = 0.0


class GuestActionFailed(_GuestAction, frozen=True, kw_only=True):
    """The action did not work; the guest moves to its next action (as in JobFailed)."""

    reason: str
    detail: str = ""
    elapsed_s: float = 0.0


class GuestFinished(_Event, frozen=True, kw_only=True):
    """The guest's record in the run is final (as the journal keeps it)."""

    run_id: str
    guest: GuestOutcome


class RunFinished(_Event, frozen=True, kw_only=True):
    run_id: str
    kind: RunKind
    ok: bool
    detail: str = ""
    run: RunStatus | None = None
    """The whole record, as GetRun and the journal have it."""


class WorkerSpawned(_Event, frozen=True, kw_only=True):
    worker_id: str
    pid: int


class WorkerLost(_Event, frozen=True, kw_only=True):
    """A worker died or was killed (its job, if any, is re-queued or failed)."""

    worker_id: str
    pid: int = 0
    reason: str = ""


class WorkerRetired(_Event, frozen=True, kw_only=True):
    """A worker stopped because it was asked to (pool shrinking, daemon stopping)."""

    worker_id: str
    pid: int = 0
    reason: str = ""


class InhibitorChanged(_Event, frozen=True, kw_only=True):
    """logind's delay inhibitor: ``state`` is "held", "released" or "unavailable"."""

    state: str
    detail: str = ""


Event = (Subscribed | RunStarted | RunPlanned | GuestActionStarted | GuestActionProgress
         | GuestActionFinished | GuestActionFailed | GuestFinished | RunFinished
         | WorkerSpawned | WorkerLost | WorkerRetired | InhibitorChanged)
