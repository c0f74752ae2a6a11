"""A private system bus with a mock logind (and systemd), and a fake NOTIFY_SOCKET, for tests.

See /work/shared/TESTBED.md, "logind and D-Bus in tests" and "systemd notify in tests".

* ``PrivateSystemBus(base_dir)``: a ``dbus-daemon`` of type system listening on
  ``base_dir/system_bus_socket``; ``address`` goes into ``DBUS_SYSTEM_BUS_ADDRESS``.
  ``stop()`` and ``start()`` again reuse the same address (the daemon under test must
  reconnect by itself).
* ``LogindMock(bus)``: python-dbusmock's ``logind`` template plus what it lacks:
  ``InhibitDelayMaxUSec``. ``Inhibit`` returns a real pipe fd and ``ListInhibitors``
  drops the entry when that fd is closed; ``prepare_for_shutdown(active)`` emits the
  signal. The mock exits by itself when its bus goes away.
* ``SystemdMock(bus)``: dbusmock's ``systemd`` template plus ``ListJobs``.
* ``NotifyCollector(path)``: an AF_UNIX datagram socket with ``SO_PASSCRED``; every
  ``KEY=VALUE`` line received is kept with the sender's pid.

Every process is started with Popen and stopped by its pid (SIGTERM, then SIGKILL).
The test side talks D-Bus through dbus-python (blocking calls, no main loop needed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dbus

from testbed.daemon import wait_for

MOCK_IFACE = "org.freedesktop.DBus.Mock"
LOGIND = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_MANAGER = "org.freedesktop.login1.Manager"
SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <keep_umask/>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def stop_process(process: subprocess.Popen[Any] | None, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, by pid; reaps it."""
    if process is None:
        return
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(grace_s)


class PrivateSystemBus:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.socket_path = base_dir / "system_bus_socket"
        self.config_path = base_dir / "system-bus.conf"
        self.config_path.write_text(_CONFIG.format(socket=self.socket_path))
        self.process: subprocess.Popen[bytes] | None = None
        self._conn: Any = None

    @property
    def address(self) -> str:
        return f"unix:path={self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, timeout_s: float = 10.0) -> None:
        self.socket_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            ["dbus-daemon", f"--config-file={self.config_path}", "--nofork", "--nopidfile"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self._connectable, timeout_s, f"dbus-daemon on {self.socket_path}")

    def _connectable(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"dbus-daemon exited with {self.process.returncode}")
        try:
            self._conn = dbus.bus.BusConnection(self.address)
        except dbus.exceptions.DBusException:
            return False
        return True

    def stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(dbus.exceptions.DBusException):
                self._conn.close()
            self._conn = None
        stop_process(self.process)
        self.process = None

    def connection(self) -> Any:
        assert self._conn is not None, "the bus is not running"
        return self._conn

    def has_owner(self, name: str) -> bool:
        return bool(self.connection().name_has_owner(name))


class DBusMock:
    """One ``python -m dbusmock --system -t TEMPLATE`` process on a PrivateSystemBus."""

    template = ""
    name = ""
    path = ""

    def __init__(self, bus: PrivateSystemBus) -> None:
        self.bus = bus
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = bus.base_dir / f"{self.template}-mock.log"

    def start(self, timeout_s: float = 20.0) -> None:
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus.address}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dbusmock", "--system", "-t", self.template],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        wait_for(lambda: self._running() and self.bus.has_owner(self.name), timeout_s,
                 f"the {self.template} mock on the bus")
        self.setup()

    def _running(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.template} mock exited: {self.log_path.read_text()}")
        return True

    def setup(self) -> None:
        """Add what the template lacks."""

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    @property
    def obj(self) -> Any:
        return self.bus.connection().get_object(self.name, self.path)

    def mock(self, method: str, *args: Any) -> Any:
        return getattr(self.obj, method)(*args, dbus_interface=MOCK_IFACE)


class LogindMock(DBusMock):
    template = "logind"
    name = LOGIND
    path = LOGIND_PATH

    def __init__(self, bus: PrivateSystemBus, delay_max_s: float = 600.0) -> None:
        super().__init__(bus)
        self.delay_max_s = delay_max_s

    def setup(self) -> None:
        usec = dbus.UInt64(int(self.delay_max_s * 1_000_000))
        self.mock("AddProperty", LOGIND_MANAGER, "InhibitDelayMaxUSec", usec)

    def inhibitors(self) -> list[tuple[str, str, str, str, int, int]]:
        reply = self.obj.ListInhibitors(dbus_interface=LOGIND_MANAGER)
        return [(str(w), str(who), str(why), str(mode), int(uid), int(pid))
                for w, who, why, mode, uid, pid in reply]

    def ours(self) -> list[tuple[str, str, str, str, int, int]]:
        return [i for i in self.inhibitors() if i[1] == "guestwarden"]

    def prepare_for_shutdown(self, active: bool) -> None:
        self.mock("EmitSignal", LOGIND_MANAGER, "PrepareForShutdown", "b", [dbus.Boolean(active)])

    def set_preparing_for_shutdown(self, value: bool) -> None:
        self.mock("UpdateProperties", LOGIND_MANAGER, {"PreparingForShutdown": dbus.Boolean(value)})


class SystemdMock(DBusMock):
    template = "systemd"
    name = SYSTEMD
    path = SYSTEMD_PATH

    def setup(self) -> None:
        self.set_jobs([])

    def set_jobs(self, jobs: list[tuple[int, str, str, str]]) -> None:
        """What ``ListJobs`` returns: (id, unit, type, state) each."""
        rows = [(job_id, unit, job_type, state, f"{SYSTEMD_PATH}/job/{job_id}",
                 f"{SYSTEMD_PATH}/unit/{unit.replace('.', '_2e')}")
                for job_id, unit, job_type, state in jobs]
        self.mock("AddMethod", SYSTEMD_MANAGER, "ListJobs", "", "a(usssoo)", f"ret = {rows!r}")


@contextlib.contextmanager
def system_bus_with_logind(delay_max_s: float = 600.0) -> Iterator[tuple[PrivateSystemBus,
                                                                          LogindMock]]:
    """A started bus (in a fresh short temp dir) and mock logind; both stopped afterwards."""
    base = Path(tempfile.mkdtemp(prefix="gwbus-", dir="/tmp"))
    bus = PrivateSystemBus(base)
    logind = LogindMock(bus, delay_max_s=delay_max_s)
    try:
        bus.start()
        logind.start()
        yield bus, logind
    finally:
        logind.stop()
        bus.stop()
        shutil.rmtree(base, ignore_errors=True)


@dataclass(frozen=True)
class Notification:
    seq: int
    pid: int
    key: str
    value: str


class NotifyCollector:
    """Stands in for systemd's notify socket; ``drain()`` reads what has arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.received: list[Notification] = []

    def drain(self) -> list[Notification]:
        creds = struct.calcsize("3i")
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(creds))
            except BlockingIOError:
                return self.received
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:creds])[0]
            for line in data.decode("utf-8", errors="replace").split("\n"):
                key, sep, value = line.partition("=")
                if sep:
                    self.received.append(Notification(len(self.received), pid, key, value))

    def find(self, key: str, value: str | None = None) -> list[Notification]:
        return [n for n in self.drain() if n.key == key and (value is None or n.value == value)]

    def wait(self, key: str, value: str | None = None, *, count: int = 1,
             after: int = -1, timeout_s: float = 20.0) -> list[Notification]:
        """Wait for ``count`` notifications ``key`` (=``value``) with seq > ``after``."""

        def enough() -> list[Notification] | None:
            found = [n for n in self.find(key, value) if n.seq > after]
            return found if len(found) >= count else None

        return wait_for(enough, timeout_s, f"{count} x {key}={value or '*'} on {self.path}")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
