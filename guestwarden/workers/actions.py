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

from guestwarden.ipc.messages import GuestInfo, GuestState, Job

log = logging.getLogger(__name__)

_T = TypeVar("_T")

POLL_INTERVAL_S = 0.1
"""How often a shutdown waits re-reads the guest's state (one cheap RPC)."""

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

    def call(self, uri: str, fn: Callable[[Any], _T], cancel: threading.Event | None = None) -> _T:
        """Run ``fn(conn)``; if the connection died under it, reconnect and run it once more."""
        conn = self.get(uri, cancel)
        try:
            return fn(conn)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in _CONNECTION_ERRORS or _alive(conn):
                raise
            log.warning("connection to %s lost (%s): reconnecting", uri, exc.get_error_message())
            self.drop(uri)
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

    def __init__(self, connections: Connections) -> None:
        self.connections = connections

    def run(self, job: Job, cancel: threading.Event) -> ActionResult:
        handler: Callable[[Job, threading.Event], ActionResult] = {
            "inventory": self.inventory,
            "save": self.save,
            "shutdown": self.shutdown,
            "poweroff": self.poweroff,
            "start": self.start,
            "sync_time": self.sync_time,
        }[job.kind]
        try:
            return handler(job, cancel)
        except libvirt.libvirtError as exc:
            raise ActionError("libvirt-error", _describe(job, exc)) from None

    # ------------------------------------------------------------------ helpers

    def _domain(self, job: Job, cancel: threading.Event) -> Any | None:
        """The guest, or None when libvirt no longer knows it (a transient guest gone)."""
        try:
            return self.connections.call(
                job.uri, lambda c: c.lookupByUUIDString(job.uuid), cancel
            )
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    @staticmethod
    def _state(dom: Any) -> GuestState:
        try:
            code = dom.state()[0]
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return "shutoff"  # a transient guest disappears when it stops
            raise
        return _STATES.get(code, "other")

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
                guests.append(GuestInfo(
                    uri=job.uri, uuid=uuid, name=dom.name(), state=state,
                    persistent=uuid not in transient, has_managed_save=uuid in saved,
                    memory_kib=memory,
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
        self._request_shutdown(dom, job)
        deadline = time.monotonic() + job.timeout_s
        while time.monotonic() < deadline:
            if self._state(dom) == "shutoff":
                return ActionResult("shut-down", f"{job.shutdown_mode} shutdown")
            if cancel.wait(POLL_INTERVAL_S):
                raise ActionError("cancelled", f"shutdown of guest {job.name} cancelled")
        raise ActionError(
            "timeout",
            f"shutdown of guest {job.name}: still running {job.timeout_s:g}s after the "
            f"{job.shutdown_mode} shutdown request",
        )

    def _request_shutdown(self, dom: Any, job: Job) -> None:
        modes = job.shutdown_mode.split(",")
        flags = 0
        for mode in modes:
            flags |= (libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT if mode == "agent"
                      else libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        if modes == ["agent"] or "agent" in modes:
            # an agent shutdown blocks until the guest is off: send it from a side
            # thread so that this worker's own wait (and deadline) stays in charge
            threading.Thread(
                target=_quiet(dom.shutdownFlags), args=(flags,), daemon=True,
                name=f"agent-shutdown-{job.name}",
            ).start()
            return
        try:
            dom.shutdownFlags(flags)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in _UNSUPPORTED:
                raise
            dom.shutdown()  # drivers without mode flags (the test driver)

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
        """Set the guest clock from the host's, retrying until its agent answers."""
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
                dom.setTime(None, libvirt.VIR_DOMAIN_TIME_SYNC)
                return ActionResult("synced", f"after {tries} tries")
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

    # ------------------------------------------------------- side-thread queries

    def progress(self, job: Job) -> tuple[int, int] | None:
        """(processed, total) bytes of the guest's running libvirt job, if it says."""
        try:
            dom = self.connections.get(job.uri).lookupByUUIDString(job.uuid)
            stats = dom.jobStats(0)
        except (libvirt.libvirtError, ActionError):
            return None
        total = int(stats.get("data_total", 0) or stats.get("memory_total", 0))
        done = int(stats.get("data_processed", 0) or stats.get("memory_processed", 0))
        return (done, total) if total else None

    def abort(self, job: Job) -> None:
        try:
            self.connections.get(job.uri).lookupByUUIDString(job.uuid).abortJob()
        except (libvirt.libvirtError, ActionError) as exc:
            log.info("abort of job=%d guest=%s: %s", job.job_id, job.name, exc)


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


def _quiet(fn: Callable[..., Any]) -> Callable[..., None]:
    def run(*args: Any) -> None:
        try:
            fn(*args)
        except libvirt.libvirtError as exc:
            log.info("agent shutdown call ended: %s", exc.get_error_message())
    return run
