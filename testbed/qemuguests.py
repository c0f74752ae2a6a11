"""A few tiny real QEMU guests (testbed/guestimage.py) in an isolated libvirtd.

For the end-to-end tests on real guests and ``make demo GUESTS=qemu``: define and
start several guests at once (each ``create()`` returns as soon as QEMU runs, so the
guests boot in parallel), wait until each says it is ready on its serial console,
and at the end destroy and undefine them, waiting (by pid) until every QEMU process
is gone.

Guests always run under software emulation (``<domain type='qemu'>``): KVM does not
work on these machines (TESTBED.md), and it is never chosen by itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from testbed.guestimage import (
    DEFAULT_MEMORY_MIB,
    READY_MARKER,
    GuestImage,
    domain_xml,
    wait_for_console,
)

BOOT_TIMEOUT_S = 180.0
"""Generous: boots are CPU bound (~1.7 s each on a free core, far more when loaded)."""


@dataclass(frozen=True)
class GuestSpec:
    name: str
    cmdline_extra: str = ""
    """Kernel switches of testbed/guestimage.py, e.g. ``gw.poweroff_delay=2``."""
    memory_mib: int = DEFAULT_MEMORY_MIB


@dataclass(frozen=True)
class QemuGuest:
    spec: GuestSpec
    dom: Any
    console_log: Path

    @property
    def name(self) -> str:
        return self.spec.name

    def console(self) -> str:
        """The serial console since QEMU last started (a restore empties it too)."""
        try:
            return self.console_log.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def state(self) -> int:
        return int(self.dom.state()[0])


def define_guests(
    conn: Any, image: GuestImage, specs: Sequence[GuestSpec], console_dir: Path
) -> dict[str, QemuGuest]:
    """Define (not start) one guest per spec; its console goes to ``console_dir``."""
    guests = {}
    for spec in specs:
        log = console_dir / f"{spec.name}.console.log"
        xml = domain_xml(spec.name, image, memory_mib=spec.memory_mib,
                         cmdline_extra=spec.cmdline_extra, console_log=log)
        guests[spec.name] = QemuGuest(spec, conn.defineXML(xml), log)
    return guests


def boot(guests: Iterable[QemuGuest], timeout_s: float = BOOT_TIMEOUT_S) -> None:
    """Cold-boot guests that are off, all at once, and wait until each is ready.

    A leftover managed-save image is discarded first: a restored guest prints nothing
    on its (emptied) console, so only a cold boot can be waited for this way.
    """
    started = []
    for guest in guests:
        if guest.dom.isActive():
            continue
        if guest.dom.hasManagedSaveImage(0):
            guest.dom.managedSaveRemove(0)
        guest.dom.create()
        started.append(guest)
    wait_ready(started, timeout_s)


def wait_ready(guests: Iterable[QemuGuest], timeout_s: float = BOOT_TIMEOUT_S) -> None:
    """Wait until each guest, cold-booted since QEMU last started, says it is ready
    (modules loaded, acpid and the agent up). Not for restored guests: they print
    nothing after a restore."""
    deadline = time.monotonic() + timeout_s
    for guest in guests:
        wait_for_console(guest.console_log, READY_MARKER, max(0.0, deadline - time.monotonic()))


def power_off(guests: Iterable[QemuGuest]) -> None:
    """Destroy the guests that run (a hard power off, as a test's arrangement)."""
    for guest in guests:
        with contextlib.suppress(libvirt.libvirtError):
            if guest.dom.isActive():
                guest.dom.destroy()


def qemu_pid(run_dir: Path, name: str) -> int | None:
    """A running guest's QEMU pid, from libvirt's pid file (``run_dir`` is what the
    isolated libvirtd sees as /run/libvirt)."""
    try:
        pid = int((run_dir / "qemu" / f"{name}.pid").read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text()
    except (OSError, ValueError):
        return None
    return pid if comm.startswith("qemu-system") else None


def process_runs(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: PID 1 reaps orphans slowly here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while process_runs(pid):
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout_s
        time.sleep(0.01)


def remove(guests: Iterable[QemuGuest], run_dir: Path, timeout_s: float = 10.0) -> None:
    """Destroy, forget the images of and undefine each guest; wait until its QEMU is gone.

    Each step is tried whatever happened to the one before: teardown must not leave
    a QEMU process behind because an earlier step failed.
    """
    pids = []
    for guest in guests:
        pid = qemu_pid(run_dir, guest.name)
        with contextlib.suppress(libvirt.libvirtError):
            if guest.dom.isActive():
                guest.dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            if guest.dom.hasManagedSaveImage(0):
                guest.dom.managedSaveRemove(0)
        with contextlib.suppress(libvirt.libvirtError):
            guest.dom.undefine()
        if pid is not None:
            pids.append(pid)
    with concurrent.futures.ThreadPoolExecutor() as pool:
        list(pool.map(lambda pid: _wait_gone(pid, timeout_s), pids))
