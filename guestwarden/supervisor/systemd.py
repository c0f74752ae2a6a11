"""systemd's notify protocol: READY, WATCHDOG, STATUS, EXTEND_TIMEOUT_USEC, STOPPING, RELOADING.

``SystemdNotifier`` wraps ``sdnotify`` and fixes what it does silently:

* sdnotify swallows every error unless made with ``debug=True``; here it is, and each
  failure is logged (once per run of failures, and once when it works again).
* sdnotify encodes as latin-1 and drops a message it cannot encode; systemd in turn
  ignores a ``STATUS=`` that is not UTF-8, so even latin-1 bytes above 0x7f would be
  lost. ``status_text`` therefore makes every STATUS plain ASCII: accents are stripped
  (``é`` -> ``e``), anything else is escaped (``\\u65e5``), and control characters
  (a newline would start a new ``KEY=`` line) become spaces.
* ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read when the notifier
  is made, not at import.
* The datagram socket gets a send timeout, so a systemd that does not read cannot
  block the supervisor's loop for long.

The watchdog is a coroutine on the supervisor's loop, not a thread: when the loop
is stuck, the pings stop and systemd (``WatchdogSec=``) kills and restarts us.
Without ``NOTIFY_SOCKET`` (not run by systemd, or ``Type=simple``) every call is a
no-op that returns False.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import unicodedata
from collections.abc import Callable, Mapping

import sdnotify

log = logging.getLogger(__name__)

EXTEND_USEC = 30_000_000
"""Each EXTEND_TIMEOUT_USEC gives systemd this long (µs) before it may kill us..."""
EXTEND_INTERVAL_S = 10.0
"""...and another is sent this often while a preserve runs: three chances per window."""
STATUS_INTERVAL_S = 1.0
SEND_TIMEOUT_S = 1.0
STATUS_MAX_CHARS = 400


def status_text(text: str) -> str:
    """One line of printable ASCII that systemd will show as the service's status."""
    out: list[str] = []
    for char in unicodedata.normalize("NFKD", text):
        if unicodedata.combining(char):
            continue  # the accent of a decomposed letter
        if char.isascii():
            out.append(char if char.isprintable() else " ")
        else:
            out.append(char.encode("ascii", "backslashreplace").decode("ascii"))
    line = "".join(out)
    return line if len(line) <= STATUS_MAX_CHARS else line[: STATUS_MAX_CHARS - 3] + "..."


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of ``WATCHDOG_USEC``, or None when the watchdog is off or meant for another pid."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(pid):
        log.info("systemd watchdog is for pid %s, not ours (%d): not pinging", watchdog_pid, pid)
        return None
    try:
        value = int(usec)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning("WATCHDOG_USEC=%r is not a positive integer: not pinging", usec)
        return None
    return value / 2 / 1_000_000


class SystemdNotifier:
    """The daemon's line to systemd (the main pid must send: ``NotifyAccess=main``)."""

    def __init__(
        self,
        *,
        pid: int | None = None,
        extend_usec: int = EXTEND_USEC,
        extend_interval_s: float = EXTEND_INTERVAL_S,
    ) -> None:
        environ = os.environ
        self.socket_path = environ.get("NOTIFY_SOCKET", "")
        self.watchdog_interval_s = watchdog_interval_s(environ, os.getpid() if pid is None
                                                       else pid)
        self.extend_usec = extend_usec
        self.extend_interval_s = extend_interval_s
        self.last_status = ""
        self._failing = False
        self._sd: sdnotify.SystemdNotifier | None = None
        if self.socket_path:
            try:
                self._sd = sdnotify.SystemdNotifier(debug=True)
                self._sd.socket.settimeout(SEND_TIMEOUT_S)
            except (OSError, ValueError) as exc:
                log.error("cannot reach systemd's notify socket %s (%s): systemd will not "
                          "hear READY, WATCHDOG or STATUS from this daemon", self.socket_path, exc)
                self._sd = None

    @property
    def enabled(self) -> bool:
        return self._sd is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; log (once) when that fails."""
        if self._sd is None:
            return False
        try:
            self._sd.notify("\n".join(fields))
        except (OSError, UnicodeEncodeError) as exc:
            if not self._failing:
                log.error("systemd notify (%s) failed: %s", fields[0], exc)
                self._failing = True
            return False
        if self._failing:
            log.info("systemd notify works again")
            self._failing = False
        return True

    def ready(self, status: str = "") -> bool:
        fields = ["READY=1"]
        if status:
            self.last_status = status_text(status)
            fields.append(f"STATUS={self.last_status}")
        return self.notify(*fields)

    def reloading(self) -> bool:
        """``RELOADING=1`` (with the ``MONOTONIC_USEC`` that Type=notify-reload wants)."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def stopping(self, status: str = "") -> bool:
        fields = ["STOPPING=1"]
        if status:
            self.last_status = status_text(status)
            fields.append(f"STATUS={self.last_status}")
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        """``STATUS=text``, only when it differs from the last one sent."""
        line = status_text(text)
        if line == self.last_status:
            return False
        self.last_status = line
        return self.notify(f"STATUS={line}")

    def extend_timeout(self) -> bool:
        return self.notify(f"EXTEND_TIMEOUT_USEC={self.extend_usec}")

    # ------------------------------------------------------------------ coroutines

    async def run_watchdog(self) -> None:
        """``WATCHDOG=1`` every half ``WATCHDOG_USEC``, from this loop (so a stuck loop is seen)."""
        interval = self.watchdog_interval_s
        if interval is None or self._sd is None:
            return
        log.info("systemd watchdog on: pinging every %.2fs", interval)
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def run_status(self, text: Callable[[], str],
                         interval_s: float = STATUS_INTERVAL_S) -> None:
        """Keep ``STATUS=`` up to date with ``text()``, sending only changes."""
        if self._sd is None:
            return
        while True:
            self.status(text())
            await asyncio.sleep(interval_s)

    async def extend_until(self, done: asyncio.Event) -> None:
        """``EXTEND_TIMEOUT_USEC`` now and every ``extend_interval_s`` until ``done`` is set."""
        if self._sd is None:
            return
        while not done.is_set():
            self.extend_timeout()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.extend_interval_s)
