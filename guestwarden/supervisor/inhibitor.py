"""logind's delay inhibitor: the host's shutdown waits until guestwarden has preserved.

At start the ``Inhibitor`` connects to the system bus (``$DBUS_SYSTEM_BUS_ADDRESS``
when set, as tests do, else the standard socket) with dbus-fast, subscribes to
logind's ``PrepareForShutdown`` signal *first*, then calls ``Inhibit("shutdown",
"guestwarden", WHY, "delay")`` and keeps the file descriptor logind returns: while it
is open, logind holds the shutdown for up to ``InhibitDelayMaxUSec`` (read and kept
as ``delay_max_s``).

* ``PrepareForShutdown(true)``: ``on_shutdown()`` (the supervisor's preserve) is run
  and awaited, and only then is the fd closed, which lets logind go on.
* ``PrepareForShutdown(false)`` (shutdown cancelled): a new inhibitor is taken (after
  the preserve, if one is still running).
* No bus, bus lost, or logind gone or restarted: the daemon keeps working without an
  inhibitor, logs it once, shows ``unavailable`` in status, and reconnects with backoff
  (``BACKOFF_FIRST_S`` doubling to ``BACKOFF_MAX_S``), taking the inhibitor again.

The fd comes in through ``recvmsg`` without ``MSG_CMSG_CLOEXEC``, i.e. inheritable:
it is made close-on-exec at once, and workers are started with ``close_fds`` too. A
worker holding it would keep the host's shutdown waiting for as long as it lives.

Only signals from logind's current unique bus name count: any local process may send
a signal to us on the system bus, and a forged ``PrepareForShutdown`` would otherwise
make us save every guest.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError

log = logging.getLogger(__name__)

LOGIND = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_MANAGER = "org.freedesktop.login1.Manager"
WHO = "guestwarden"
WHY = ("guests are being protected: running virtual machines are saved or shut down "
       "before the host goes down")
CALL_TIMEOUT_S = 10.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0

InhibitorState = Literal["held", "released", "unavailable"]


def method_call(destination: str, path: str, interface: str, member: str,
                signature: str = "", body: list[Any] | None = None) -> Message:
    return Message(destination=destination, path=path, interface=interface, member=member,
                   signature=signature, body=body or [])


def get_property(destination: str, path: str, interface: str, name: str) -> Message:
    return method_call(destination, path, "org.freedesktop.DBus.Properties", "Get", "ss",
                       [interface, name])


def _bus_call(member: str, signature: str, body: list[Any]) -> Message:
    return method_call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                       member, signature, body)


_SIGNAL_MATCH = (f"type='signal',sender='{LOGIND}',interface='{LOGIND_MANAGER}',"
                 f"member='PrepareForShutdown',path='{LOGIND_PATH}'")
_OWNER_MATCH = ("type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                f"member='NameOwnerChanged',arg0='{LOGIND}'")


class Inhibitor:
    """Holds logind's delay lock for the daemon and runs preserve when logind says so."""

    def __init__(
        self,
        on_shutdown: Callable[[], Awaitable[object]],
        *,
        backoff_first_s: float = BACKOFF_FIRST_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.on_shutdown = on_shutdown
        self.backoff_first_s = backoff_first_s
        self.backoff_max_s = backoff_max_s
        self.state: InhibitorState = "unavailable"
        self.detail = "not connected to the system bus yet"
        self.delay_max_s: float | None = None
        self.shutdown_seen = False
        """logind said PrepareForShutdown(true) and has not cancelled it since."""
        self.preserved = False
        """The preserve for that shutdown has finished (reset when a shutdown is cancelled)."""
        self._fd: int | None = None
        self._bus: MessageBus | None = None
        self._logind_owner = ""
        self._logind_changed = asyncio.Event()
        self._told_unavailable = False
        self._preserve_task: asyncio.Task[None] | None = None
        self._retake_task: asyncio.Task[None] | None = None

    @property
    def fd(self) -> int | None:
        return self._fd

    @property
    def preserving(self) -> bool:
        return self._preserve_task is not None and not self._preserve_task.done()

    # ------------------------------------------------------------------ life

    async def run(self) -> None:
        """Connect, inhibit, wait until the bus or logind goes away; again, with backoff."""
        delay = self.backoff_first_s
        while True:
            try:
                bus = await self._connect()
            except Exception as exc:  # any failure means: no inhibitor, try again later
                self._unavailable(f"cannot take logind's inhibitor: {_describe(exc)}")
                log.debug("next attempt in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            delay = self.backoff_first_s
            try:
                reason = await self._wait_until_lost(bus)
            finally:
                self._bus = None
                bus.disconnect()
            self._unavailable(reason)
            await asyncio.sleep(delay)

    def close(self) -> None:
        """At daemon exit: leave the bus and let go of the lock (preserve is over by now)."""
        for task in (self._preserve_task, self._retake_task):
            if task is not None:
                task.cancel()
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None
        self._release("daemon stopped")

    async def ask(self, message: Message) -> Message | None:
        """A call on the system bus for the supervisor's other questions; None if no answer."""
        bus = self._bus
        if bus is None:
            return None
        try:
            return await self._call(bus, message)
        except Exception as exc:
            log.info("no answer from %s.%s on the system bus: %s", message.interface,
                     message.member, _describe(exc))
            return None

    # ------------------------------------------------------------------ connection

    async def _connect(self) -> MessageBus:
        bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        await asyncio.wait_for(bus.connect(), CALL_TIMEOUT_S)
        try:
            self._logind_changed.clear()
            bus.add_message_handler(self._on_message)
            await self._call(bus, _bus_call("AddMatch", "s", [_SIGNAL_MATCH]))  # before Inhibit
            await self._call(bus, _bus_call("AddMatch", "s", [_OWNER_MATCH]))
            owner = await self._call(bus, _bus_call("GetNameOwner", "s", [LOGIND]))
            self._logind_owner = str(owner.body[0])
            self.delay_max_s = await self._read_delay_max(bus)
            if self.preserving:  # the lock taken before the bus went is still ours
                self._set("held", "preserving guests for the host's shutdown")
            elif self.shutdown_seen:
                self._set("released", "this shutdown is handled; no new inhibitor")
            else:
                await self._take(bus)
        except BaseException:
            bus.disconnect()
            raise
        self._bus = bus
        return bus

    async def _wait_until_lost(self, bus: MessageBus) -> str:
        lost = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        changed = asyncio.ensure_future(self._logind_changed.wait())
        try:
            await asyncio.wait({lost, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            lost.cancel()
        error = lost.exception() if lost.done() and not lost.cancelled() else None
        if changed.done() and not changed.cancelled():
            return "logind left the system bus or was restarted"
        return "lost the system bus" + (f": {_describe(error)}" if error else "")

    async def _call(self, bus: MessageBus, message: Message) -> Message:
        reply = await asyncio.wait_for(bus.call(message), CALL_TIMEOUT_S)
        if reply.message_type is MessageType.ERROR:
            for fd in reply.unix_fds:
                os.close(fd)
            text = str(reply.body[0]) if reply.body else ""
            raise DBusError(reply.error_name or "org.freedesktop.DBus.Error.Failed", text, reply)
        return reply

    async def _read_delay_max(self, bus: MessageBus) -> float | None:
        message = get_property(LOGIND, LOGIND_PATH, LOGIND_MANAGER, "InhibitDelayMaxUSec")
        try:
            reply = await self._call(bus, message)
        except DBusError as exc:
            log.warning("cannot read logind's InhibitDelayMaxUSec (%s): the shutdown delay "
                        "limit is unknown", exc.text)
            return None
        seconds = int(reply.body[0].value) / 1_000_000
        if seconds != self.delay_max_s:
            log.info("logind waits at most %.0fs for delay inhibitors (InhibitDelayMaxUSec)",
                     seconds)
        return seconds

    async def _take(self, bus: MessageBus) -> None:
        reply = await self._call(bus, method_call(
            LOGIND, LOGIND_PATH, LOGIND_MANAGER, "Inhibit", "ssss",
            ["shutdown", WHO, WHY, "delay"]))
        fds = list(reply.unix_fds)
        index = reply.body[0] if reply.body else -1
        if not isinstance(index, int) or not 0 <= index < len(fds):
            for fd in fds:
                os.close(fd)
            raise DBusError("org.freedesktop.DBus.Error.InvalidArgs",
                            f"Inhibit returned no file descriptor ({reply.body!r}, fds {fds})")
        fd = fds.pop(index)
        os.set_inheritable(fd, False)  # recvmsg gave it to us without FD_CLOEXEC
        for other in fds:
            os.close(other)
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)  # after the new one is held: no gap in protection
        self._set("held", "logind delays shutdown until guests are preserved")

    # ------------------------------------------------------------------ events

    def _on_message(self, message: Message) -> None:
        if message.message_type is not MessageType.SIGNAL:
            return
        if (message.member == "PrepareForShutdown" and message.interface == LOGIND_MANAGER
                and message.path == LOGIND_PATH):
            if message.sender != self._logind_owner:
                log.warning("PrepareForShutdown from %s, which is not logind (%s): ignored",
                            message.sender, self._logind_owner)
                return
            self._prepare_for_shutdown(bool(message.body[0]))
        elif (message.member == "NameOwnerChanged" and message.sender == "org.freedesktop.DBus"
              and message.body and message.body[0] == LOGIND
              and message.body[2] != self._logind_owner):
            self._logind_changed.set()

    def _prepare_for_shutdown(self, active: bool) -> None:
        if active:
            if self.shutdown_seen:  # a second preserve would add nothing, and mislead the journal
                log.info("logind: PrepareForShutdown(true) again: this shutdown is being or "
                         "has been handled")
                return
            self.shutdown_seen = True
            log.info("logind: the host is shutting down: preserving guests; the inhibitor "
                     "is held until that is done")
            self.preserved = False
            self._preserve_task = asyncio.create_task(self._preserve_then_release())
            return
        self.shutdown_seen = False
        self.preserved = False
        if self.preserving:
            log.info("logind: shutdown cancelled; a new inhibitor is taken once preserve ends")
            return
        log.info("logind: shutdown cancelled; taking a new inhibitor")
        self._retake_task = asyncio.create_task(self._take_again())

    async def _preserve_then_release(self) -> None:
        try:
            await self.on_shutdown()
            self.preserved = self.shutdown_seen
        except Exception:
            log.exception("preserve for the host's shutdown failed")
        finally:
            self._release("preserve finished: logind may go on with the shutdown")
        if not self.shutdown_seen:  # cancelled meanwhile
            await self._take_again()

    async def _take_again(self) -> None:
        bus = self._bus
        if bus is None or self._fd is not None:
            return  # the reconnect loop takes it when the bus is back
        try:
            await self._take(bus)
        except Exception as exc:
            self._unavailable(f"cannot take a new inhibitor: {_describe(exc)}")
            bus.disconnect()  # the run loop reconnects with backoff

    def _release(self, why: str) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        self._set("released", why)

    def _unavailable(self, reason: str) -> None:
        if not self._told_unavailable:  # once per outage; the retries only at debug level
            log.warning("logind inhibitor unavailable: %s; the daemon works on without it "
                        "and retries with backoff (up to %gs apart)", reason, self.backoff_max_s)
            self._told_unavailable = True
        else:
            log.debug("logind inhibitor still unavailable: %s", reason)
        self._set("unavailable", reason)

    def _set(self, state: InhibitorState, detail: str) -> None:
        if state != self.state and state != "unavailable":
            log.info("inhibitor %s: %s", state, detail)
        if state == "held":
            self._told_unavailable = False
        self.state = state
        self.detail = detail


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no reason given"
    if isinstance(exc, DBusError):
        return f"{exc.type}: {exc.text}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {CALL_TIMEOUT_S:g}s"
    return str(exc) or type(exc).__name__
