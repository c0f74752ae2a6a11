"""The tiny test guest of testbed/guestimage.py, on real QEMU (TCG) under a real libvirtd.

Three guests boot once for the whole module, in parallel:

* ``plain``: agent, ACPI and no delay: agent time calls, managed save/restore, ACPI
  power-off;
* ``slow``: ``gw.poweroff_delay=3 gw.no_agent=1``: agent calls fail at once, shutdown()
  falls back to ACPI and takes the delay longer;
* ``stubborn``: ``gw.ignore_acpi=1``: the power button is ignored, the agent's
  shutdown still works.

The tests of one guest run in file order and build on each other's state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from testbed.guestimage import (
    ACPI_IGNORED_MARKER,
    POWEROFF_MARKER,
    READY_MARKER,
    GuestImage,
    build_guest_image,
    domain_xml,
    wait_for_console,
)
from testbed.libvirtd import IsolatedLibvirtd
from tests.conftest import require_libvirtd

pytestmark = pytest.mark.libvirtd

BOOT_TIMEOUT_S = 60.0
STATE_TIMEOUT_S = 20.0
DELAY_S = 3
NAME_PREFIX = "gw-image-"
SAVED_FOR_S = 3.0

GUESTS = {
    "plain": "",
    "slow": f"gw.poweroff_delay={DELAY_S} gw.no_agent=1",
    "stubborn": "gw.ignore_acpi=1",
}

TIMINGS: dict[str, float] = {}


# --------------------------------------------------------------------------- libvirtd


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _qemu_pid(daemon: IsolatedLibvirtd, name: str) -> int | None:
    """The pid of a running guest's QEMU, from libvirt's pid file (/run/libvirt/qemu)."""
    try:
        pid = int((daemon.base_dir / "run" / "qemu" / f"{name}.pid").read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text()
    except (OSError, ValueError):
        return None
    return pid if comm.startswith("qemu-system") else None


def _stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """Wait for ``pid`` to end; SIGKILL it at the deadline."""
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout_s
        time.sleep(0.01)


@pytest.fixture(scope="module")
def conn(libvirtd: IsolatedLibvirtd) -> Iterator[Any]:
    """A connection to the session libvirtd's QEMU driver; at teardown every guest of
    this module is destroyed and undefined, and its QEMU process is seen gone (by pid)."""
    require_libvirtd(qemu=True)
    if libvirtd.pid is None:  # another test stopped or broke it
        libvirtd.stop()
        libvirtd.start()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no stderr noise
    connection = libvirt.open(libvirtd.qemu_uri)
    try:
        yield connection
    finally:
        for dom in connection.listAllDomains():
            if not dom.name().startswith(NAME_PREFIX):
                continue
            pid = _qemu_pid(libvirtd, dom.name())
            if dom.isActive():
                dom.destroy()
            if pid is not None:
                _stop_pid(pid)
            if dom.hasManagedSaveImage():
                dom.managedSaveRemove()
            dom.undefine()
        connection.close()


# --------------------------------------------------------------------------- guests


@dataclasses.dataclass
class Guest:
    name: str
    dom: Any
    console_log: Path


@pytest.fixture(scope="module")
def image() -> GuestImage:
    start = time.monotonic()
    img = build_guest_image()
    TIMINGS["image build (maybe cached)"] = time.monotonic() - start
    return img


@pytest.fixture(scope="module")
def guests(
    conn: Any, image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Guest]:
    logs = tmp_path_factory.mktemp("consoles")
    result: dict[str, Guest] = {}
    start = time.monotonic()
    for name, extra in GUESTS.items():
        log = logs / f"{name}.log"
        xml = domain_xml(f"{NAME_PREFIX}{name}", image, cmdline_extra=extra, console_log=log)
        dom = conn.defineXML(xml)
        dom.create()
        result[name] = Guest(name, dom, log)
    for guest in result.values():
        remaining = BOOT_TIMEOUT_S - (time.monotonic() - start)
        wait_for_console(guest.console_log, READY_MARKER, remaining)
        TIMINGS[f"boot to ready ({guest.name}, {len(GUESTS)} in parallel)"] = (
            time.monotonic() - start
        )
    return result


def _state(dom: Any) -> int:
    return int(dom.state()[0])


def _wait_state(dom: Any, state: int, timeout_s: float = STATE_TIMEOUT_S) -> float:
    """Poll until the domain is in ``state``; returns the time it took."""
    start = time.monotonic()
    deadline = start + timeout_s
    while _state(dom) != state:
        assert time.monotonic() < deadline, f"{dom.name()} not in state {state} after {timeout_s}s"
        time.sleep(0.01)
    return time.monotonic() - start


def _with_watchdog(uri: str, name: str, timeout_s: float, call: Callable[[], object]) -> float:
    """Run a blocking libvirt ``call``; destroy the domain from another connection if it
    has not returned by the deadline (which then fails the test). Returns the duration."""
    fired = threading.Event()

    def destroy() -> None:
        fired.set()
        other = libvirt.open(uri)
        try:
            other.lookupByName(name).destroy()
        finally:
            other.close()

    timer = threading.Timer(timeout_s, destroy)
    timer.start()
    start = time.monotonic()
    try:
        call()
    finally:
        timer.cancel()
    assert not fired.is_set(), f"{name}: call did not return within {timeout_s}s"
    return time.monotonic() - start


def _host_offset(dom: Any) -> float:
    t = dom.getTime()
    return abs(float(t["seconds"]) + float(t["nseconds"]) / 1e9 - time.time())


# --------------------------------------------------------------------------- tests


def test_image_is_cached_and_small(image: GuestImage) -> None:
    assert image.kernel.is_file() and image.initramfs.is_file()
    assert image.initramfs.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert image.initramfs.stat().st_size < 16 * 2**20
    start = time.monotonic()
    assert build_guest_image() == image
    assert time.monotonic() - start < 1.0


def test_all_guests_boot_to_ready(guests: dict[str, Guest]) -> None:
    ready = {
        name: next(line for line in g.console_log.read_text().splitlines() if READY_MARKER in line)
        for name, g in guests.items()
    }
    assert "agent=/dev/vport" in ready["plain"]
    assert "agent=disabled" in ready["slow"] and f"poweroff_delay={DELAY_S}" in ready["slow"]
    assert "ignore_acpi=1" in ready["stubborn"] and "agent=/dev/vport" in ready["stubborn"]
    for g in guests.values():
        assert "GUESTWARDEN-ERROR" not in g.console_log.read_text()
        assert _state(g.dom) == libvirt.VIR_DOMAIN_RUNNING


def test_agent_get_time(guests: dict[str, Guest]) -> None:
    start = time.monotonic()
    assert _host_offset(guests["plain"].dom) < 10.0
    TIMINGS["agent getTime"] = time.monotonic() - start


def test_agent_set_time(guests: dict[str, Guest]) -> None:
    """An explicit time goes to the system clock and, through /sbin/hwclock -w, the RTC."""
    dom = guests["plain"].dom
    start = time.monotonic()
    dom.setTime({"seconds": int(time.time()) - 100, "nseconds": 0})
    TIMINGS["agent setTime(explicit)"] = time.monotonic() - start
    assert 99.0 < _host_offset(dom) < 102.0
    now = time.time()
    dom.setTime({"seconds": int(now), "nseconds": int(now % 1 * 1e9)})
    assert _host_offset(dom) < 1.0


def test_no_agent_calls_fail_fast(guests: dict[str, Guest]) -> None:
    dom = guests["slow"].dom
    for call in (dom.getTime, lambda: dom.setTime(flags=libvirt.VIR_DOMAIN_TIME_SYNC)):
        start = time.monotonic()
        with pytest.raises(libvirt.libvirtError) as err:
            call()
        assert time.monotonic() - start < 2.0
        assert err.value.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE


def test_managed_save_restore_and_time_sync(guests: dict[str, Guest]) -> None:
    """After a restore the agent answers, the guest clock is behind by the downtime and
    setTime(SYNC) (guest-set-time without a time: hwclock -s) sets it from the RTC,
    which QEMU keeps on host time."""
    dom = guests["plain"].dom
    start = time.monotonic()
    dom.managedSave()
    TIMINGS["managedSave"] = time.monotonic() - start
    assert _state(dom) == libvirt.VIR_DOMAIN_SHUTOFF and dom.hasManagedSaveImage()
    # stay saved for a while on purpose: the downtime is what the clock falls behind by
    while time.monotonic() < start + SAVED_FOR_S:
        time.sleep(0.05)
    start = time.monotonic()
    dom.create()
    TIMINGS["restore (create)"] = time.monotonic() - start
    assert _state(dom) == libvirt.VIR_DOMAIN_RUNNING and not dom.hasManagedSaveImage()
    start = time.monotonic()
    behind = _host_offset(dom)
    TIMINGS["agent getTime after restore"] = time.monotonic() - start
    assert SAVED_FOR_S - 0.5 < behind < SAVED_FOR_S + 10.0
    start = time.monotonic()
    dom.setTime(flags=libvirt.VIR_DOMAIN_TIME_SYNC)
    TIMINGS["agent setTime(SYNC)"] = time.monotonic() - start
    after = _host_offset(dom)
    TIMINGS["guest clock off, before SYNC"] = behind
    TIMINGS["guest clock off, after SYNC"] = after
    assert after < 1.5


def test_acpi_shutdown_powers_off(guests: dict[str, Guest]) -> None:
    g = guests["plain"]
    start = time.monotonic()
    g.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    _wait_state(g.dom, libvirt.VIR_DOMAIN_SHUTOFF)
    TIMINGS["ACPI shutdown"] = time.monotonic() - start
    assert f"{POWEROFF_MARKER} source=acpi action=poweroff delay=0" in g.console_log.read_text()


def test_poweroff_delay_and_shutdown_falls_back_to_acpi(guests: dict[str, Guest]) -> None:
    g = guests["slow"]
    start = time.monotonic()
    g.dom.shutdown()  # no agent: libvirt falls back to the power button
    wait_for_console(g.console_log, f"{POWEROFF_MARKER} source=acpi", STATE_TIMEOUT_S)
    assert _state(g.dom) == libvirt.VIR_DOMAIN_RUNNING  # still waiting for the delay
    _wait_state(g.dom, libvirt.VIR_DOMAIN_SHUTOFF)
    elapsed = time.monotonic() - start
    TIMINGS[f"ACPI shutdown with gw.poweroff_delay={DELAY_S}"] = elapsed
    assert DELAY_S <= elapsed < DELAY_S + 3.0


def test_ignore_acpi_keeps_running(guests: dict[str, Guest]) -> None:
    g = guests["stubborn"]
    g.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    wait_for_console(g.console_log, ACPI_IGNORED_MARKER, STATE_TIMEOUT_S)
    assert _state(g.dom) == libvirt.VIR_DOMAIN_RUNNING
    assert POWEROFF_MARKER not in g.console_log.read_text()


def test_agent_shutdown_powers_off(guests: dict[str, Guest], libvirtd: IsolatedLibvirtd) -> None:
    g = guests["stubborn"]
    assert _state(g.dom) == libvirt.VIR_DOMAIN_RUNNING

    def agent_shutdown() -> None:
        g.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        _wait_state(g.dom, libvirt.VIR_DOMAIN_SHUTOFF)

    elapsed = _with_watchdog(libvirtd.qemu_uri, g.dom.name(), STATE_TIMEOUT_S, agent_shutdown)
    TIMINGS["agent shutdown"] = elapsed
    assert f"{POWEROFF_MARKER} source=agent action=poweroff" in g.console_log.read_text()


def test_report_timings() -> None:
    for what, seconds in TIMINGS.items():
        print(f"{what}: {seconds:.2f} s")
