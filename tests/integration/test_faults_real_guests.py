"""Faults under real QEMU guests: libvirtd restarted mid-preserve, a QEMU process stopped.

libvirt's test driver loses its guests when libvirtd restarts and has no QEMU to
stop, so these run on the tiny real guests of testbed/guestimage.py, in a libvirtd
of this module's own (the tests restart and kill it). Three guests, each with memory
to write (``gw.dirty_mib``, so a save lasts about a second) and a delay before it
powers off (``gw.poweroff_delay``), are booted once and shared; between tests they
are brought back by restoring their managed-save image when they have one (much
cheaper than a boot on 2 emulating cores).

The tests run in file order, chosen so that few guests need a cold boot:

1. libvirtd restarted (SIGTERM) and killed (SIGKILL) while a save runs, with the
   saves one at a time so that guests are left to do: every guest ends saved, the
   same worker processes reconnect (no worker replaced) and the report says saved.
   What libvirt does to the save in flight (measured on libvirt 9.0): on SIGTERM it
   finishes the save before exiting, on SIGKILL it cancels it on its restart and
   the guest runs again (with a partial image on disk); either way the worker's call
   fails with a broken connection, and the worker runs the action again on a new
   one, which finds the guest saved or saves it.
2. A guest whose QEMU process is stopped (SIGSTOP) before preserve: its save hangs
   in libvirt (so does abortJob: QEMU's monitor never answers), so does its shutdown
   (libvirt's job lock is held by that save); each is given up at its deadline plus
   ``job_grace`` (the worker killed and replaced), and the guest is powered off
   (libvirt's destroy kills QEMU whatever it is doing: SIGTERM, then SIGKILL after
   10 s). The other guests are saved meanwhile, not held up behind it.
3. libvirtd killed while graceful shutdowns wait for guests that take seconds to
   go off: they still end "shutdown" (off after the power button), not powered off.

Nothing asserts wall-clock speed: runs must end before generous bounds computed from
the configured timeouts; what happened comes from the journal, the CLI's report and
the daemon's log.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from testbed.daemon import CliResult, GuestwardenDaemon, wait_for
from testbed.guestimage import POWEROFF_MARKER, build_guest_image
from testbed.libvirtd import IsolatedLibvirtd
from testbed.qemuguests import (
    GuestSpec,
    QemuGuest,
    define_guests,
    qemu_pid,
    remove,
    wait_ready,
)
from tests.conftest import isolated_libvirtd, require_libvirtd
from tests.integration.conftest import DaemonFactory, started_daemons

pytestmark = pytest.mark.libvirtd

PREFIX = "gw-flt-"
DELAY_S = 3
"""Between the power button and power off: long enough to kill libvirtd in between."""
SPECS = tuple(
    GuestSpec(f"{PREFIX}{n}", f"gw.dirty_mib=192 gw.poweroff_delay={DELAY_S}", memory_mib=320)
    for n in ("a", "b", "c")
)
NAMES = tuple(spec.name for spec in SPECS)
RUN_TIMEOUT_S = 120.0



# --------------------------------------------------------------------------- fixtures


class Lab:
    """The module's libvirtd and guests; libvirt objects are looked up again after a
    restart (the connection they came from is dead then)."""

    def __init__(self, libvirtd: IsolatedLibvirtd, console_dir: Path) -> None:
        self.libvirtd = libvirtd
        self.console_dir = console_dir
        self._conn: Any = None
        self.stopped: list[int] = []
        """QEMU pids this module sent SIGSTOP: SIGCONT at teardown if still alive."""

    def conn(self) -> Any:
        if self._conn is not None:
            # a call, not isAlive(): without an event loop, isAlive() says 1 until a
            # call has failed on the dead socket
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.getLibVersion()
                return self._conn
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
        self._conn = libvirt.open(self.libvirtd.qemu_uri)
        return self._conn

    def guests(self) -> dict[str, QemuGuest]:
        conn = self.conn()
        return {s.name: QemuGuest(s, conn.lookupByName(s.name),
                                  self.console_dir / f"{s.name}.console.log") for s in SPECS}

    def run_all(self) -> None:
        """Every guest running: restored from its managed-save image if it has one,
        else cold-booted and waited for until it is ready."""
        cold = []
        for guest in self.guests().values():
            if guest.dom.isActive():
                continue
            restoring = bool(guest.dom.hasManagedSaveImage(0))
            guest.dom.create()  # restores the image when there is one
            if not restoring:
                cold.append(guest)
        wait_ready(cold)

    def qemu_pid(self, name: str) -> int | None:
        return qemu_pid(self.libvirtd.base_dir / "run", name)

    def stop_qemu(self, name: str) -> int:
        pid = self.qemu_pid(name)
        assert pid is not None, f"no QEMU process for {name}"
        self.stopped.append(pid)
        os.kill(pid, signal.SIGSTOP)
        return pid

    def close(self) -> None:
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.libvirtd.pid is None:  # a test failed with libvirtd down
            with contextlib.suppress(Exception):
                self.libvirtd.start()
        if self.libvirtd.pid is not None:
            remove(self.guests().values(), self.libvirtd.base_dir / "run")
        with contextlib.suppress(libvirt.libvirtError):
            if self._conn is not None:
                self._conn.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A libvirtd of the module's own (stopped at the end with every QEMU it ran)
    and the three guests, booted once, in parallel."""
    require_libvirtd(qemu=True)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    with isolated_libvirtd() as libvirtd:
        made = Lab(libvirtd, tmp_path_factory.mktemp("consoles"))
        try:
            define_guests(made.conn(), build_guest_image(), SPECS, made.console_dir)
            made.run_all()
            yield made
        finally:
            made.close()


@pytest.fixture
def make_daemon(lab: Lab) -> Iterator[DaemonFactory]:
    """Daemons on the module's libvirtd, on short paths, stopped by pid at teardown."""
    yield from started_daemons(lab.libvirtd.qemu_uri)


# --------------------------------------------------------------------------- helpers


def records(daemon: GuestwardenDaemon) -> dict[str, dict[str, Any]]:
    data = json.loads((daemon.state_dir / "journal.json").read_text())
    return {g["name"]: g for g in data["preserve"]["guests"]}


def line_of(output: str, name: str) -> str:
    """The guest's result line of ``preserve --wait``."""
    return next(line for line in output.splitlines()
                if line.startswith(("ok ", "FAIL ")) and f" {name} " in line)


def preserve_in_background(
    pool: concurrent.futures.Executor, daemon: GuestwardenDaemon, timeout_s: float
) -> concurrent.futures.Future[CliResult]:
    """``preserve --wait`` (its report is checked too) while the test makes trouble."""
    return pool.submit(daemon.cli, "preserve", "--wait", "--plain", "--timeout",
                       str(timeout_s), timeout_s=timeout_s + 30)


def finished(future: concurrent.futures.Future[CliResult], daemon: GuestwardenDaemon,
             timeout_s: float) -> str:
    result = future.result(timeout_s + 60)
    assert result.returncode == 0, result.stdout + result.stderr + daemon.log_tail()
    return result.stdout


def story(daemon: GuestwardenDaemon) -> str:
    """The daemon's log without its DEBUG lines: what to read when a test fails."""
    return "\n".join(line for line in daemon.log_text().splitlines() if " DEBUG " not in line)


def assert_none_running(lab: Lab) -> None:
    running = [n for n, g in lab.guests().items() if g.dom.isActive()]
    assert not running, f"still running after preserve: {running}"


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
def test_libvirtd_restarted_during_a_save(lab: Lab, make_daemon: DaemonFactory,
                                          hard: bool) -> None:
    lab.run_all()
    daemon = make_daemon(workers=2, shutdown={"parallel_save": 1})
    workers = set(daemon.worker_pids())
    assert len(workers) == 2

    guests = lab.guests()

    def save_in_progress() -> str | None:
        """A guest whose save has written less than half: far from its end (asked of
        libvirt on the test's own connection, not of the daemon's progress reports)."""
        for name, guest in guests.items():
            with contextlib.suppress(libvirt.libvirtError):
                stats = guest.dom.jobStats(0)
                if 0 < stats.get("memory_processed", 0) < stats.get("memory_total", 0) / 2:
                    return name
        return None

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = preserve_in_background(pool, daemon, RUN_TIMEOUT_S)
        in_flight = wait_for(save_in_progress, 60, "a save in progress", interval_s=0.01)
        lab.libvirtd.restart(hard=hard)
        out = finished(waiting, daemon, RUN_TIMEOUT_S)

    preserved = records(daemon)
    assert {n: r["outcome"] for n, r in preserved.items()} == dict.fromkeys(NAMES, "saved"), (
        f"{preserved}\n{story(daemon)}")
    for name, guest in lab.guests().items():
        assert guest.state() == libvirt.VIR_DOMAIN_SHUTOFF, name
        assert guest.dom.hasManagedSaveImage(0), name
        assert "-> saved" in line_of(out, name), out
    # the save in flight failed with the connection, and ran again on a new one
    log = daemon.log_text()
    assert re.search(rf"job=\d+ save guest={in_flight}: connection to \S+ lost", log), log
    assert preserved[in_flight]["attempts"] == ["save: " + (
        "saved" if hard else "already-saved")], preserved[in_flight]
    # the same two worker processes did it all: they reconnected, none was replaced
    assert set(daemon.worker_pids()) == workers


SAVE_TIMEOUT_S = 4.0
"""Comfortably more than a save of these guests takes, even with the machine busy."""
STOP_SHUTDOWN_TIMEOUT_S = 1.0
GRACE_S = 1.0


def test_stopped_qemu_cannot_stall_preserve(lab: Lab, make_daemon: DaemonFactory) -> None:
    lab.run_all()
    stuck, *others = NAMES
    daemon = make_daemon(
        workers=4,
        shutdown={"parallel_save": 3, "save_timeout": SAVE_TIMEOUT_S,
                  "shutdown_timeout": STOP_SHUTDOWN_TIMEOUT_S},
        advanced={"job_grace": GRACE_S},
    )
    poweroff_timeout_s = 60.0  # the default; a destroy of a stopped QEMU takes ~10 s
    # every action of the chain waited out (deadline, cancel, kill) plus a wide margin
    bound_s = (SAVE_TIMEOUT_S + STOP_SHUTDOWN_TIMEOUT_S + poweroff_timeout_s
               + 6 * GRACE_S + 30.0)
    pid = lab.stop_qemu(stuck)  # before preserve: its save hangs from the start

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = preserve_in_background(pool, daemon, bound_s)
        out = finished(waiting, daemon, bound_s)

    preserved = records(daemon)
    record = preserved[stuck]
    assert record["outcome"] == "poweroff" and record["ok"], record
    save, shutdown, poweroff = record["attempts"]
    assert save.startswith("save: failed (deadline): ") and "did not end by its deadline" in (
        save), record
    assert shutdown.startswith("shutdown: failed ("), record
    assert poweroff == "poweroff: powered-off", record
    line = line_of(out, stuck)
    assert "-> poweroff" in line and "before that: save: failed (deadline)" in line, out
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "the stopped QEMU to be gone")
    assert not lab.guests()[stuck].dom.hasManagedSaveImage(0)  # the partial image is gone

    # the others were saved meanwhile, before the stuck save was even given up
    log = daemon.log_text()
    given_up = re.search(rf"job=\d+ save guest={stuck} past its deadline", log)
    assert given_up, log
    for name in others:
        assert preserved[name]["outcome"] == "saved", preserved[name]
        done = log.find(f"guest={name} preserved: save: saved")
        assert 0 <= done < given_up.start(), f"{name} waited for {stuck}"
    assert_none_running(lab)

    # both hung workers were killed and replaced
    assert log.count("ignored cancel: killing it") == 2, log
    wait_for(lambda: sum(w.state == "idle" for w in daemon.status().workers) == 4, 30,
             "four idle workers again")


def test_libvirtd_killed_during_graceful_shutdowns(lab: Lab,
                                                   make_daemon: DaemonFactory) -> None:
    lab.run_all()
    daemon = make_daemon(
        workers=3,
        shutdown={"persistent": ["shutdown", "poweroff"], "shutdown_mode": "acpi",
                  "parallel_shutdown": 0, "shutdown_timeout": 30.0},
    )
    workers = set(daemon.worker_pids())

    def all_asked() -> bool:
        """Every guest got the power button and is in its delay before powering off."""
        return all(POWEROFF_MARKER in g.console() for g in lab.guests().values())

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = preserve_in_background(pool, daemon, RUN_TIMEOUT_S)
        wait_for(all_asked, 60, "every guest to get the power button")
        lab.libvirtd.restart(hard=True)
        out = finished(waiting, daemon, RUN_TIMEOUT_S)

    preserved = records(daemon)
    for name in NAMES:
        # not powered off: the worker waited on, on a new connection
        record = preserved[name]
        assert record["outcome"] == "shutdown", record
        assert record["attempts"] == ["shutdown: shut-down"], record
        assert record["detail"] == "off after the ACPI power button", record
        assert "-> shutdown" in line_of(out, name), out
    assert_none_running(lab)
    log = daemon.log_text()
    for name in NAMES:
        assert re.search(rf"job=\d+ shutdown guest={name}: connection to \S+ lost", log), log
    assert set(daemon.worker_pids()) == workers
