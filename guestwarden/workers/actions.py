"""The libvirt calls of guestwarden: the only module that imports libvirt.

Every function here blocks and runs in a worker's action thread. Every action is
idempotent: it checks the guest's state first, so a job dispatched again after its
worker was lost never does harm (a shutdown of a guest already off succeeds at
once; a save of a guest that is off with a managed-save image succeeds at once).

A failure raises ``ActionError`` with a short machine ``reason`` and a ``detail``
for people that names the guest, the action and libvirt's own message.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt
import msgspec

from guestwarden.conf import guestpolicy
from guestwarden.ipc.messages import GuestInfo, GuestPolicy, GuestState, Job
from guestwarden.workers.shutdown import AgentFailed, GracefulShutdown, ModeUnsupported

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_STATES: dict[int, GuestState] = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",  # shutting down, but still running
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "other",
}

# errors after which the connection itself is suspect and is opened again
_CONNECTION_ERRORS = frozenset(
    {
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_INTERNAL_ERROR,
    }
)
_UNSUPPORTED = frozenset(
    {
        libvirt.VIR_ERR_NO_SUPPORT,
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
        libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
        libvirt.VIR_ERR_INVALID_ARG,
    }
)
STARTED_BY_EARLIER_ATTEMPT = "started by an earlier attempt"
"""In the detail of a re-dispatched start that found the guest started (testbed/soak.py
counts these)."""
_MAX_RERUNS = 3
"""How many times an action runs again after its connection died (Actions.run)."""
# a driver that does not know a flag at all (the test driver: "unsupported flags")
_FLAG_REJECTED = frozenset({libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG})


class ActionError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ActionResult:
    result: str
    detail: str = ""
    guests: tuple[GuestInfo, ...] = ()


def _silence_libvirt(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


libvirt.registerErrorHandler(_silence_libvirt, None)


class Connections:
    """One libvirt connection per URI, opened on first use and again when it dies.

    Opening retries with backoff for at most ``connect_timeout_s`` so that a worker
    started before libvirtd is up (at boot) waits for it instead of failing at once.
    """

    def __init__(self, connect_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self._timeout_s = connect_timeout_s
        self._clock = clock
        self._open: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, uri: str, cancel: threading.Event | None = None) -> Any:
        with self._lock:
            conn = self._open.get(uri)
            if conn is not None:
                return conn
        deadline = self._clock() + self._timeout_s
        delay = 0.1
        while True:
            try:
                conn = libvirt.open(uri)
            except libvirt.libvirtError as exc:
                if self._clock() + delay > deadline or (cancel is not None and cancel.is_set()):
                    raise ActionError(
                        "connect-failed",
                        f"cannot connect to {uri} within {self._timeout_s:g}s: "
                        f"{exc.get_error_message()}",
                    ) from None
                log.info("connecting to %s failed (%s); retrying in %.1fs",
                         uri, exc.get_error_message(), delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            with self._lock:
                self._open[uri] = conn
            return conn

    def drop(self, uri: str) -> None:
        with self._lock:
            conn = self._open.pop(uri, None)
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def close_all(self) -> None:
        for uri in list(self._open):
            self.drop(uri)

    def lost(self, uri: str, exc: libvirt.libvirtError, conn: Any = None) -> bool:
        """Whether ``exc`` means that the connection to ``uri`` died (libvirtd was
        restarted or crashed); if so it is dropped, so the next ``get`` opens a new one.
        ``conn`` is the connection the failed call used (default: the one open now)."""
        if exc.get_error_code() not in _CONNECTION_ERRORS:
            return False
        if conn is None:
            with self._lock:
                conn = self._open.get(uri)
        if conn is None or _alive(conn):
            return False
        self.drop(uri)
        return True

    def call(self, uri: str, fn: Callable[[Any], _T], cancel: threading.Event | None = None) -> _T:
        """Run ``fn(conn)``; if the connection died under it, reconnect and run it once more."""
        conn = self.get(uri, cancel)
        try:
            return fn(conn)
        except libvirt.libvirtError as exc:
            if not self.lost(uri, exc, conn):
                raise
            log.warning("connection to %s lost (%s): reconnecting", uri, exc.get_error_message())
            return fn(self.get(uri, cancel))


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _describe(job: Job, exc: libvirt.libvirtError) -> str:
    return f"{job.kind} of guest {job.name or job.uuid} on {job.uri}: {exc.get_error_message()}"


class Actions:
    """The actions a worker can run, each given a ``Job`` and a cancel flag."""

    def __init__(self, connections: Connections, queries: Connections | None = None) -> None:
        self.connections = connections
        self.queries = queries or connections
        """For ``progress`` and ``abort`` while an action runs: measured on libvirt 9.0,
        a jobStats call on the connection whose managedSave is running is answered only
        after the save ends, so progress needs a connection of its own."""

    def close_all(self) -> None:
        self.connections.close_all()
        self.queries.close_all()

    def run(self, job: Job, cancel: threading.Event) -> ActionResult:
        handler: Callable[[Job, threading.Event], ActionResult] = {
            "inventory": self.inventory,
            "save": self.save,
            "shutdown": self.shutdown,
            "poweroff": self.poweroff,
            "start": self.start,
            "sync_time": self.sync_time,
            "policy_get": self.policy_get,
            "policy_set": self.policy_set,
            "agent_wait": self.agent_wait,
        }[job.kind]
        # libvirtd going away under the action (restarted, crashed) is not the guest's
        # failure: failing would move it to the next action of its chain (a guest
        # shutting down would be powered off, a save libvirtd finished would be
        # reported as a mere "already-off"). Every action is idempotent, so it runs
        # again on a new connection (Connections.get's bounded backoff waits for
        # libvirtd) with the time it has left: a save libvirtd finished on its way down
        # is found saved, one it cancelled on its restart (the guest runs again) is
        # redone, a shutdown goes on waiting. Up to _MAX_RERUNS times: a connection
        # opened while libvirtd restarts may die too (seen in tests: one opened during a
        # restart broke at its first call); the dispatcher's deadline bounds it all.
        started = time.monotonic()
        attempt = job
        reruns = 0
        while True:
            try:
                return handler(attempt, cancel)
            except libvirt.libvirtError as exc:
                reruns += 1
                if (reruns > _MAX_RERUNS or cancel.is_set()
                        or not self.connections.lost(job.uri, exc)):
                    raise ActionError("libvirt-error", _describe(job, exc)) from None
                log.warning("job=%d %s guest=%s: connection to %s lost (%s): reconnecting "
                            "and running the action again", job.job_id, job.kind, job.name,
                            job.uri, exc.get_error_message())
            left_s = max(0.1, job.timeout_s - (time.monotonic() - started))
            attempt = msgspec.structs.replace(job, timeout_s=left_s)

    # ------------------------------------------------------------------ helpers

    def _domain(self, job: Job, cancel: threading.Event) -> Any | None:
        """The guest, or None when libvirt no longer knows it (a transient guest gone)."""
        try:
            return self.connections.call(
                job.uri, lambda c: (c.lookupByUUIDString(job.uuid) if job.uuid
                                    else c.lookupByName(job.name)), cancel
            )
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    @staticmethod
    def _state(dom: Any) -> GuestState:
        return _STATES.get(_state_code(dom), "other")

    # ------------------------------------------------------------------ actions

    def inventory(self, job: Job, cancel: threading.Event) -> ActionResult:
        def collect(conn: Any) -> tuple[GuestInfo, ...]:
            saved = {d.UUIDString() for d in conn.listAllDomains(
                libvirt.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE)}
            transient = {d.UUIDString() for d in conn.listAllDomains(
                libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)}
            guests = []
            for dom, stats in _all_stats(conn):
                uuid = dom.UUIDString()
                state = _STATES.get(int(stats.get("state.state", -1)), "other")
                memory = int(stats.get("balloon.current", 0) or stats.get("balloon.maximum", 0))
                if not memory and state in ("running", "paused"):
                    memory = int(dom.info()[2])  # drivers without balloon stats
                policy, policy_error = _read_policy(dom)
                guests.append(GuestInfo(
                    uri=job.uri, uuid=uuid, name=dom.name(), state=state,
                    persistent=uuid not in transient, has_managed_save=uuid in saved,
                    memory_kib=memory, policy=policy, policy_error=policy_error,
                ))
            return tuple(guests)

        guests = self.connections.call(job.uri, collect, cancel)
        return ActionResult("listed", f"{len(guests)} guests on {job.uri}", guests)

    def save(self, job: Job, cancel: threading.Event) -> ActionResult:
        dom = self._domain(job, cancel)
        if dom is None:
            raise ActionError("not-found", f"save of guest {job.name}: guest no longer exists")
        state = self._state(dom)
        if state == "shutoff":
            if dom.hasManagedSaveImage(0):
                return ActionResult("already-saved", "off with a managed-save image")
            return ActionResult("already-off", "off without a managed-save image")
        flags = libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE if job.bypass_cache else 0
        # no RUNNING/PAUSED flag: the image keeps the state the guest was in
        try:
            dom.managedSave(flags)
        except libvirt.libvirtError as exc:
            if cancel.is_set():
                raise ActionError("cancelled", _describe(job, exc)) from None
            raise
        return ActionResult("saved", f"managed save of {state} guest")

    def shutdown(self, job: Job, cancel: threading.Event) -> ActionResult:
        dom = self._domain(job, cancel)
        if dom is None or self._state(dom) == "shutoff":
            return ActionResult("already-off")
        if self._state(dom) == "paused":
            # a paused guest cannot see a power button or run its agent
            raise ActionError("paused", f"shutdown of guest {job.name}: guest is paused")
        report = GracefulShutdown(
            _ShutdownTarget(dom, job), job.shutdown_mode, job.timeout_s, cancel
        ).run()
        if not report.ok:
            raise ActionError(report.reason, report.detail)
        return ActionResult("shut-down", report.detail)

    def poweroff(self, job: Job, cancel: threading.Event) -> ActionResult:
        dom = self._domain(job, cancel)
        if dom is None or self._state(dom) == "shutoff":
            return ActionResult("already-off")
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            if self._state(dom) == "shutoff":
                return ActionResult("already-off")
            raise ActionError("libvirt-error", _describe(job, exc)) from None
        return ActionResult("powered-off")

    def start(self, job: Job, cancel: threading.Event) -> ActionResult:
        dom = self._domain(job, cancel)
        if dom is None:
            raise ActionError("not-found", f"start of guest {job.name}: guest is not defined")
        state = self._state(dom)
        if state in ("running", "paused") and job.attempt > 1:
            # A re-dispatch (the worker of an earlier attempt died or was killed): that
            # attempt started the guest. On drivers without START_PAUSED it may have died
            # between the start and the pause below, so finish the job rather than
            # leave a guest that was paused before preserve running.
            if job.start_paused and state == "running":
                dom.suspend()
            return ActionResult("restored" if job.expect_managed_save else "started",
                                f"now {self._state(dom)} ({STARTED_BY_EARLIER_ATTEMPT})")
        if state in ("running", "paused"):
            return ActionResult("already-running", f"guest was already {state}")
        has_image = bool(dom.hasManagedSaveImage(0))
        if job.expect_managed_save and not has_image:
            # never cold-boot a guest whose saved memory should be there
            raise ActionError(
                "image-missing",
                f"restore of guest {job.name}: its managed-save image is gone; not booting it "
                "from scratch (its memory would be lost)",
            )
        flags = 0
        if has_image and job.bypass_cache:
            flags |= libvirt.VIR_DOMAIN_START_BYPASS_CACHE
        if job.start_paused:
            flags |= libvirt.VIR_DOMAIN_START_PAUSED
        try:
            dom.createWithFlags(flags)
        except libvirt.libvirtError as exc:
            if not (flags & libvirt.VIR_DOMAIN_START_PAUSED
                    and exc.get_error_code() in _UNSUPPORTED):
                raise
            # drivers without START_PAUSED (the test driver): start, then pause below
            dom.createWithFlags(flags & ~libvirt.VIR_DOMAIN_START_PAUSED)
        if job.start_paused and self._state(dom) == "running":
            dom.suspend()  # it was paused before preserve: it comes back paused
        state = self._state(dom)
        return ActionResult("restored" if has_image else "started", f"now {state}")

    def sync_time(self, job: Job, cancel: threading.Event) -> ActionResult:
        """Set the guest clock from its RTC, retrying until its agent answers.

        A restored guest's clock stands where it was at the save; its RTC, which QEMU
        keeps on host time (plus any offset the domain's ``<clock>`` asks for), does
        not. ``VIR_DOMAIN_TIME_SYNC`` (what ``virsh domtime --sync`` and libvirt-guests
        do) sets the clock from that RTC rather than to the host's time, so a guest
        configured to run at another time keeps it. The clock's offset from the host's
        before the sync is read through the agent and reported.
        """
        dom = self._domain(job, cancel)
        if dom is None:
            raise ActionError("not-found", f"time sync of guest {job.name}: guest is gone")
        with contextlib.suppress(libvirt.libvirtError, AttributeError):
            dom.agentSetResponseTimeout(5, 0)  # bounded agent calls
        deadline = time.monotonic() + job.timeout_s
        tries = 0
        last = ""
        while True:
            tries += 1
            try:
                offset = _clock_offset_s(dom)
                dom.setTime(None, libvirt.VIR_DOMAIN_TIME_SYNC)
                return ActionResult("synced", _synced_detail(offset, tries))
            except libvirt.libvirtError as exc:
                last = exc.get_error_message()
            if time.monotonic() + 1.0 > deadline:
                raise ActionError(
                    "agent-timeout",
                    f"time sync of guest {job.name}: no answer from its guest agent within "
                    f"{job.timeout_s:g}s ({tries} tries; last error: {last})",
                )
            if cancel.wait(1.0):
                raise ActionError("cancelled", f"time sync of guest {job.name} cancelled")

    # ------------------------------------------------------------------ policy, agent

    def policy_get(self, job: Job, cancel: threading.Event) -> ActionResult:
        """The guest (by ``uuid``, else ``name``) with its metadata, as inventory sees it."""
        dom = self._domain(job, cancel)
        if dom is None:
            raise ActionError("not-found", f"no guest {job.name or job.uuid} on {job.uri}")
        return ActionResult("found", "", (_guest_info(job.uri, dom),))

    def policy_set(self, job: Job, cancel: threading.Event) -> ActionResult:
        """Write (or, with ``job.policy`` None, remove) the guest's policy element: in its
        persistent definition, so that it outlives a restart and goes with a copied
        XML, and in the running one, so that a migration carries it."""
        dom = self._domain(job, cancel)
        if dom is None:
            raise ActionError("not-found", f"no guest {job.name or job.uuid} on {job.uri}")
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0
        if dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        if job.policy is None:
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None,
                            guestpolicy.NAMESPACE, flags)
        else:
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, guestpolicy.to_xml(job.policy),
                            guestpolicy.PREFIX, guestpolicy.NAMESPACE, flags)
        return ActionResult("cleared" if job.policy is None else "set", "",
                            (_guest_info(job.uri, dom),))

    def agent_wait(self, job: Job, cancel: threading.Event) -> ActionResult:
        """Until the guest agent answers (a read of the guest's clock), at most
        ``timeout_s``: restore's ``wait_for_agents`` between order groups."""
        dom = self._domain(job, cancel)
        if dom is None:
            raise ActionError("not-found", f"agent wait for guest {job.name}: guest is gone")
        with contextlib.suppress(libvirt.libvirtError, AttributeError):
            dom.agentSetResponseTimeout(5, 0)
        deadline = time.monotonic() + job.timeout_s
        tries = 0
        while True:
            tries += 1
            try:
                dom.getTime()
                return ActionResult("answered", f"agent answered ({tries} tries)")
            except libvirt.libvirtError as exc:
                last = exc.get_error_message()
            if time.monotonic() + 0.5 > deadline:
                raise ActionError("agent-timeout", f"guest {job.name}: no answer from its "
                                  f"guest agent within {job.timeout_s:g}s (last error: {last})")
            if cancel.wait(0.5):
                raise ActionError("cancelled", f"agent wait for guest {job.name} cancelled")

    # ------------------------------------------------------- side-thread queries

    def progress(self, job: Job) -> tuple[int, int] | None:
        """(processed, total) bytes of the guest's running libvirt job, if it says."""
        # queries.call, not get: after a libvirtd restart the cached connection is dead
        try:
            stats = self.queries.call(
                job.uri, lambda c: c.lookupByUUIDString(job.uuid).jobStats(0))
        except (libvirt.libvirtError, ActionError):
            return None
        total = int(stats.get("data_total", 0) or stats.get("memory_total", 0))
        done = int(stats.get("data_processed", 0) or stats.get("memory_processed", 0))
        return (done, total) if total else None

    def abort(self, job: Job) -> None:
        try:  # call, not get: a dead connection (libvirtd restarted) is opened again
            self.queries.call(job.uri, lambda c: c.lookupByUUIDString(job.uuid).abortJob())
        except (libvirt.libvirtError, ActionError) as exc:
            log.info("abort of job=%d guest=%s: %s", job.job_id, job.name, exc)


def _read_policy(dom: Any) -> tuple[GuestPolicy | None, str]:
    """The guest's guestwarden metadata (conf/guestpolicy.py), and why it is unusable.

    None without an error when it has none, or when the driver keeps no metadata.
    """
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, guestpolicy.NAMESPACE, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN,
                                    *_UNSUPPORTED):
            return None, ""
        raise
    try:
        return guestpolicy.from_xml(text), ""
    except guestpolicy.PolicyError as exc:
        return None, f"its guestwarden metadata is not valid ({exc}); rules and defaults apply"


def _guest_info(uri: str, dom: Any) -> GuestInfo:
    """One guest as ``inventory`` describes it, with one call per fact."""
    state, _reason = dom.state()
    policy, policy_error = _read_policy(dom)
    persistent = bool(dom.isPersistent())
    return GuestInfo(
        uri=uri, uuid=dom.UUIDString(), name=dom.name(), state=_STATES.get(state, "other"),
        persistent=persistent, has_managed_save=persistent and bool(dom.hasManagedSaveImage(0)),
        memory_kib=int(dom.info()[2]), policy=policy, policy_error=policy_error,
    )


def _all_stats(conn: Any) -> list[tuple[Any, dict[str, Any]]]:
    """State and memory of every guest in one RPC where the driver supports it."""
    try:
        return list(conn.getAllDomainStats(
            libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BALLOON, 0))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in _UNSUPPORTED:
            raise
    result = []
    for dom in conn.listAllDomains(0):
        info = dom.info()
        result.append((dom, {"state.state": info[0], "balloon.current": info[2]}))
    return result


def _state_code(dom: Any) -> int:
    """libvirt's state code of the guest; a transient guest that is gone is shut off."""
    try:
        return int(dom.state()[0])
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return int(libvirt.VIR_DOMAIN_SHUTOFF)  # a transient guest disappears when it stops
        raise


STOPPING_RECHECK_S = 0.5
"""How long after the guest is first seen in libvirt's SHUTDOWN state its state is
read again every STOPPING_POLL_S (see _ShutdownTarget.state)."""
STOPPING_POLL_S = 0.01


class _ShutdownTarget:
    """A guest as ``GracefulShutdown`` sees it: its state and the ways to ask it."""

    def __init__(self, dom: Any, job: Job, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._dom = dom
        self._job = job
        self.name = job.name or job.uuid
        self._clock = clock
        self._sleep = sleep
        self._stopping_since: float | None = None

    def state(self) -> GuestState:
        """The guest's state; read again at once while libvirt is ending its QEMU.

        When the guest has powered off, libvirt's qemu driver says SHUTDOWN while it
        ends QEMU: about 0.2 s in libvirt 9.0, and a state read made then waits for
        that and still says SHUTDOWN (measured: bench/makespan.py). The wait's next
        read would come a whole poll interval (0.1 s) later, added to every graceful
        shutdown and so to every slot a bounded preserve hands on; so for a short while
        after SHUTDOWN is first seen the state is read again every STOPPING_POLL_S.
        Bounded by STOPPING_RECHECK_S for drivers that stay in SHUTDOWN longer.
        """
        while True:
            code = _state_code(self._dom)
            if code != libvirt.VIR_DOMAIN_SHUTDOWN:
                return _STATES.get(code, "other")
            now = self._clock()
            if self._stopping_since is None:
                self._stopping_since = now
            if now - self._stopping_since >= STOPPING_RECHECK_S:
                return _STATES[code]
            self._sleep(STOPPING_POLL_S)

    def press_power_button(self) -> None:
        try:
            self._dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in _UNSUPPORTED:
                raise
            raise ModeUnsupported(exc.get_error_message()) from None

    def plain_shutdown(self) -> None:
        self._dom.shutdown()

    def agent_shutdown(self) -> None:
        """Blocks until the guest is off, so it runs on a side thread, and on a
        connection of its own: libvirtd serves a client at most ``max_client_requests``
        (default 5) calls at once, so blocked calls piling up on the worker's connection
        would in the end stall the worker's own calls."""
        try:
            conn = libvirt.open(self._job.uri)
            try:
                dom = conn.lookupByUUIDString(self._job.uuid)
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
        except libvirt.libvirtError as exc:
            # "not configured" is ARGUMENT_UNSUPPORTED: an agent failure, not the driver's
            if exc.get_error_code() in _FLAG_REJECTED:
                raise ModeUnsupported(exc.get_error_message()) from None
            raise AgentFailed(exc.get_error_message()) from None


def _clock_offset_s(dom: Any) -> float | None:
    """The guest's clock minus the host's, read through the agent; None if the
    driver cannot read guest clocks."""
    try:
        before = time.time()
        guest = dom.getTime()
        host = (before + time.time()) / 2
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in _UNSUPPORTED:
            return None
        raise
    return float(guest["seconds"]) + float(guest["nseconds"]) / 1e9 - host


def _synced_detail(offset_s: float | None, tries: int) -> str:
    """``guest clock was 6.2s behind the host's; set from its RTC (2 tries)``."""
    before = ("" if offset_s is None else
              f"guest clock was {abs(offset_s):.1f}s "
              f"{'behind' if offset_s < 0 else 'ahead of'} the host's; ")
    return f"{before}set from its RTC ({tries} {'try' if tries == 1 else 'tries'})"
