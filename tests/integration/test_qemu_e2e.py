"""guestwarden end to end on real QEMU guests, through the real daemon and CLI.

libvirt's test driver cannot shut down slowly, ignore a power button, report save
progress or run a guest agent; the tiny guests of testbed/guestimage.py can. Four of
them are booted once for this module, in parallel, and shared by its tests:

* ``big``: 640 MiB, 512 MiB of it filled at boot, so that a managed save has
  something to write for a while (QEMU skips zero pages);
* ``slow``: waits 2 s between a shutdown request and powering off;
* ``noagent``: runs no guest agent (agent calls fail at once), and is slow too;
* ``stubborn``: ignores the ACPI power button (its agent's shutdown still works).

The tests run in file order; each arranges the guests it needs (booting those that
are off) and leaves them as they end, so that the next one boots only what it must:

1. save with progress in ``status --json``, restore, clock sync, a failed sync;
2. ACPI shutdown with ``parallel_shutdown = 2``; the stubborn guest is powered off
   after ``shutdown_timeout``; restore boots them all again;
3. ``agent,acpi``: the agent for guests that have one, the power button for the other;
4. ``agent`` with one worker: no agent fails at once; a guest that accepts but is not
   off by the deadline is powered off by that same worker while libvirt's agent call
   is still blocked.

Nothing asserts wall-clock speed: the order of events comes from the journal's
``spans_ns`` (the workers' CLOCK_MONOTONIC), what happened from the consoles and
the reports. Lower bounds that the code guarantees (a timeout waited out) are checked.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from testbed.daemon import GuestwardenDaemon, wait_for
from testbed.guestimage import (
    ACPI_IGNORED_MARKER,
    POWEROFF_MARKER,
    build_guest_image,
)
from testbed.libvirtd import IsolatedLibvirtd
from testbed.qemuguests import (
    GuestSpec,
    QemuGuest,
    boot,
    define_guests,
    power_off,
    remove,
    wait_ready,
)
from testbed.spans import max_overlap
from tests.conftest import require_libvirtd
from tests.integration.conftest import DaemonFactory, started_daemons

pytestmark = pytest.mark.libvirtd

PREFIX = "gw-e2e-"
BIG, SLOW, NOAGENT, STUBBORN = (f"{PREFIX}{n}" for n in ("big", "slow", "noagent", "stubborn"))
DELAY_S = 2
SPECS = (
    GuestSpec(BIG, "gw.dirty_mib=512", memory_mib=640),
    GuestSpec(SLOW, f"gw.poweroff_delay={DELAY_S}"),
    GuestSpec(NOAGENT, f"gw.no_agent=1 gw.poweroff_delay={DELAY_S}"),
    GuestSpec(STUBBORN, "gw.ignore_acpi=1"),
)
SHUTDOWN_TIMEOUT_S = 6.0
"""Long enough for the slow guests (DELAY_S plus the request's way through the guest)."""
DOWNTIME_S = 6.0
"""How long the guests stay saved: their clocks fall behind by that much."""
RUN_TIMEOUT_S = 120.0

Guests = dict[str, QemuGuest]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def qemu_conn(libvirtd: IsolatedLibvirtd) -> Iterator[Any]:
    require_libvirtd(qemu=True)
    if libvirtd.pid is None:  # another test stopped or broke it
        libvirtd.stop()
        libvirtd.start()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(libvirtd.qemu_uri)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def guests(
    qemu_conn: Any, libvirtd: IsolatedLibvirtd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guests]:
    """The four guests, booted once, in parallel; destroyed and undefined at the end
    (every QEMU process waited for by pid)."""
    made = define_guests(qemu_conn, build_guest_image(), SPECS,
                         tmp_path_factory.mktemp("consoles"))
    try:
        boot(made.values())
        yield made
    finally:
        remove(made.values(), libvirtd.base_dir / "run")


@pytest.fixture
def make_daemon(libvirtd: IsolatedLibvirtd) -> Iterator[DaemonFactory]:
    """Daemons on the qemu driver, on short paths, stopped by pid at teardown."""
    yield from started_daemons(libvirtd.qemu_uri)


# --------------------------------------------------------------------------- helpers


def arrange(guests: Guests, running: set[str]) -> None:
    """Exactly ``running`` run (those already running are left as they are)."""
    power_off(g for name, g in guests.items() if name not in running)
    boot(g for name, g in guests.items() if name in running)


def records(daemon: GuestwardenDaemon, kind: str) -> dict[str, dict[str, Any]]:
    data = json.loads((daemon.state_dir / "journal.json").read_text())
    return {g["name"]: g for g in data[kind]["guests"]}


def line_of(output: str, name: str) -> str:
    """The guest's result line of ``preserve --wait`` or ``restore --wait``."""
    return next(line for line in output.splitlines()
                if line.startswith(("ok ", "FAIL ")) and f" {name} " in line)


def guest_offset_s(dom: Any) -> float:
    """Guest clock minus host clock, read through the guest agent."""
    before = time.time()
    t = dom.getTime()
    return float(t["seconds"]) + float(t["nseconds"]) / 1e9 - (before + time.time()) / 2


def preserve_and_wait(daemon: GuestwardenDaemon) -> str:
    result = daemon.cli("preserve", "--wait", "--timeout", str(RUN_TIMEOUT_S))
    assert result.returncode == 0, result.stdout + result.stderr + daemon.log_tail()
    return result.stdout


# --------------------------------------------------------------------------- tests


def test_save_progress_restore_and_time_sync(
    guests: Guests, make_daemon: DaemonFactory
) -> None:
    arrange(guests, set(guests))
    daemon = make_daemon(workers=3, boot={"sync_time": True, "sync_time_timeout": 5.0},
                         advanced={"progress_interval": 0.1})
    started = daemon.cli("preserve")
    assert started.returncode == 0, started.stderr

    # progress, as `guestwarden status --json` shows it while the saves run
    seen: list[dict[str, Any]] = []

    def finished() -> bool:
        result = daemon.cli("status", "--json")
        assert result.returncode == 0, result.stderr + daemon.log_tail()
        status = json.loads(result.stdout)
        seen.extend(j for j in status["jobs"] if j["kind"] == "save" and j["total_bytes"])
        return bool(status["runs"]) and status["runs"][-1]["finished_at"] is not None

    wait_for(finished, RUN_TIMEOUT_S, "the preserve run to finish", interval_s=0.0)
    big_progress = [j for j in seen if j["guest"] == BIG]
    assert big_progress, f"no save progress of {BIG} seen in status --json: {seen}"
    memory = SPECS[0].memory_mib << 20
    for job in big_progress:
        assert 0 < job["processed_bytes"] <= job["total_bytes"], job
        assert memory * 0.9 < job["total_bytes"] < memory * 1.2, job
    assert [j["processed_bytes"] for j in big_progress] == sorted(
        j["processed_bytes"] for j in big_progress)

    preserved = records(daemon, "preserve")
    assert {n: r["outcome"] for n, r in preserved.items()} == dict.fromkeys(guests, "saved")
    for guest in guests.values():
        assert guest.state() == libvirt.VIR_DOMAIN_SHUTOFF and guest.dom.hasManagedSaveImage(0)

    # The guests must stay saved for a while: a restored guest's clock stands where
    # it was at the save, so the downtime is what the sync has to make up. Waiting is
    # the only honest way here: setting the clock wrong on purpose with an explicit
    # setTime also writes the guest's RTC (qemu-ga runs hwclock -w), and the sync
    # (VIR_DOMAIN_TIME_SYNC: qemu-ga runs hwclock -s) sets the clock from that RTC, so
    # it would bring back the wrong time, not the host's.
    saved_ns = preserved[BIG]["spans_ns"]["save"][1]
    wait_for(lambda: time.monotonic_ns() - saved_ns >= DOWNTIME_S * 1e9, DOWNTIME_S + 5,
             f"{DOWNTIME_S}s of downtime")

    result = daemon.cli("restore", "--wait", "--timeout", str(RUN_TIMEOUT_S))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr  # a failed sync is not fatal
    for name in (BIG, SLOW, STUBBORN):
        assert "-> restored, clock synced" in line_of(out, name), out
    assert "-> restored, clock sync failed (" in line_of(out, NOAGENT), out
    assert "no answer from its guest agent" in line_of(out, NOAGENT), out
    summary = [line for line in out.splitlines() if line.startswith("restore ok: ")]
    assert summary and "clock not synced on 1" in summary[0], out

    restored = records(daemon, "restore")
    for name, guest in guests.items():
        assert guest.state() == libvirt.VIR_DOMAIN_RUNNING, name
        assert restored[name]["ok"], restored[name]
    behind = re.search(r"guest clock was (\d+\.\d)s behind", restored[BIG]["detail"])
    assert behind, restored[BIG]["detail"]
    assert float(behind[1]) > 5.0, restored[BIG]["detail"]  # it had drifted ...
    for name in (BIG, SLOW, STUBBORN):
        assert abs(guest_offset_s(guests[name].dom)) <= 2.0, name  # ... and is right now


def test_acpi_shutdown_bound_and_ignored_power_button(
    guests: Guests, make_daemon: DaemonFactory
) -> None:
    arrange(guests, set(guests))
    daemon = make_daemon(
        workers=4,  # more than the bound: the bound, not the pool, must be what limits
        shutdown={"persistent": ["shutdown", "poweroff"], "shutdown_mode": "acpi",
                  "parallel_shutdown": 2, "shutdown_timeout": SHUTDOWN_TIMEOUT_S},
        boot={"sync_time": False},
    )
    out = preserve_and_wait(daemon)
    preserved = records(daemon, "preserve")

    # ACPI mode sends the power button only: a plain shutdown() would have used the
    # agents of big, slow and stubborn
    for name in (BIG, SLOW, NOAGENT):
        assert preserved[name]["outcome"] == "shutdown", preserved[name]
        assert "off after the ACPI power button" in preserved[name]["detail"]
        assert f"{POWEROFF_MARKER} source=acpi" in guests[name].console()
    assert "source=agent" not in "".join(g.console() for g in guests.values())

    # the stubborn guest ignores the button, waits out the timeout, then is powered off
    stubborn = preserved[STUBBORN]
    assert stubborn["outcome"] == "poweroff" and stubborn["ok"], stubborn
    assert stubborn["attempts"][0].startswith("shutdown: failed (timeout): "), stubborn
    assert f"still running {SHUTDOWN_TIMEOUT_S:g}s after the ACPI power button" in (
        stubborn["attempts"][0])
    assert stubborn["attempts"][1] == "poweroff: powered-off", stubborn
    assert stubborn["durations_s"]["shutdown"] >= SHUTDOWN_TIMEOUT_S
    spans = stubborn["spans_ns"]
    assert spans["shutdown"][1] <= spans["poweroff"][0]
    assert ACPI_IGNORED_MARKER in guests[STUBBORN].console()
    assert POWEROFF_MARKER not in guests[STUBBORN].console()
    line = line_of(out, STUBBORN)
    assert "-> poweroff" in line and "before that: shutdown: failed (timeout)" in line, out

    # parallel_shutdown = 2 held, and was reached, with guests taking seconds
    shutdowns = [tuple(r["spans_ns"]["shutdown"]) for r in preserved.values()]
    assert len(shutdowns) == 4
    assert max_overlap(shutdowns) == 2, shutdowns  # type: ignore[arg-type]
    assert daemon.status().peak_in_flight["shutdown"] == 2

    # restore boots them again (they were shut down, not saved)
    result = daemon.cli("restore", "--wait", "--timeout", str(RUN_TIMEOUT_S))
    assert result.returncode == 0, result.stdout + result.stderr
    restored = records(daemon, "restore")
    assert {n: r["outcome"] for n, r in restored.items()} == dict.fromkeys(guests, "started")
    wait_ready(guests.values())  # cold-booted: wait until each is ready, for the next test


def test_agent_then_acpi(guests: Guests, make_daemon: DaemonFactory) -> None:
    arrange(guests, set(guests))
    daemon = make_daemon(
        workers=5,
        shutdown={"persistent": ["shutdown", "poweroff"], "shutdown_mode": "agent,acpi",
                  "parallel_shutdown": 0, "shutdown_timeout": SHUTDOWN_TIMEOUT_S},
    )
    preserve_and_wait(daemon)
    preserved = records(daemon, "preserve")
    assert {n: r["outcome"] for n, r in preserved.items()} == dict.fromkeys(guests, "shutdown")
    for name in (BIG, SLOW, STUBBORN):  # the stubborn one too: only ACPI is ignored
        assert preserved[name]["detail"] == "off after the guest agent's shutdown request"
        assert f"{POWEROFF_MARKER} source=agent" in guests[name].console()
    assert ACPI_IGNORED_MARKER not in guests[STUBBORN].console()  # no button pressed
    detail = preserved[NOAGENT]["detail"]
    assert detail.startswith("off after the ACPI power button (the guest agent did not answer")
    assert f"{POWEROFF_MARKER} source=acpi" in guests[NOAGENT].console()


def test_agent_mode_never_holds_the_worker(guests: Guests, make_daemon: DaemonFactory) -> None:
    arrange(guests, {SLOW, NOAGENT})
    daemon = make_daemon(
        workers=1,  # the poweroff must run on the worker whose agent call still blocks
        shutdown={"persistent": ["shutdown", "poweroff"], "shutdown_mode": "agent",
                  "shutdown_timeout": DELAY_S / 2},  # off only DELAY_S after the request
    )
    preserve_and_wait(daemon)
    preserved = records(daemon, "preserve")
    assert {n: r["outcome"] for n, r in preserved.items()} == {
        SLOW: "poweroff", NOAGENT: "poweroff", BIG: "untouched", STUBBORN: "untouched"}

    # no agent: failed at once, nothing else was tried
    noagent = preserved[NOAGENT]
    assert noagent["attempts"][0].startswith("shutdown: failed (agent-failed): "), noagent
    assert POWEROFF_MARKER not in guests[NOAGENT].console()

    # the agent accepted (the guest began its delay), the deadline came first, and the
    # same worker powered it off while libvirt's agent call was still waiting
    slow = preserved[SLOW]
    assert slow["attempts"][0].startswith("shutdown: failed (timeout): "), slow
    assert "after the guest agent's shutdown request" in slow["attempts"][0]
    assert f"{POWEROFF_MARKER} source=agent" in guests[SLOW].console()
    assert slow["spans_ns"]["shutdown"][1] <= slow["spans_ns"]["poweroff"][0]
    returned = f"guest={SLOW} agent shutdown call"
    log = wait_for(lambda: returned in daemon.log_text() and daemon.log_text(), 20,
                   "libvirt's agent shutdown call to end")
    workers = set(re.findall(r"worker=(w\d+) job=\d+ \w+ guest=gw-e2e-", log))
    assert workers == {"w1"}, workers
    poweroff = re.search(rf"job=\d+ poweroff guest={SLOW} attempt=\d+ started", log)
    assert poweroff, log
    assert poweroff.start() < log.index(returned), "the worker waited for the agent call"
    assert daemon.stop() == 0
    assert "did not stop in time" not in daemon.log_text()
