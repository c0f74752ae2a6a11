"""Section "scale": preserve and restore of thousands of guests, against libvirt-guests.sh.

Everything runs on one private libvirtd hosting libvirt's test driver, whose guests
cost nothing to save or start: what is measured is the machinery around the actions.

* guestwarden: the real daemon (4 workers, every other setting its default: the save
  chain ``save -> shutdown -> poweroff``, ``parallel_save = 1``, ``parallel_start = 4``,
  ``sync_time = true``) preserves and then restores ``small`` and then ``large``
  running guests, ``repeat`` times each after one run not counted (``WARM_UP``); a
  row is the median.
* The clock (testbed/scale.py ``timed_run``) is the client's: from just before the
  ``Preserve``/``Restore`` request is sent until the daemon's ``RunFinished`` event
  arrives, which the daemon publishes only after the run's final journal write (the
  file and its directory fsync'ed). So it covers the request, the inventory, every
  action and the journal, with every record durable. The daemon's own
  ``finished_at - started_at`` stops before that last write; it is in the detail.
* libvirt-guests.sh: Debian's script (bench/libvirt_guests.py), ``URIS`` pointing at the
  same libvirtd, on ``script`` guests: ``stop`` then ``start`` with
  ``ON_SHUTDOWN=suspend``, then with ``ON_SHUTDOWN=shutdown`` and
  ``PARALLEL_SHUTDOWN=8``. Each runs once: a suspend sleeps at least a second per
  guest. Both are compared per guest with guestwarden's preserve of ``small`` guests.
* Every run is checked against libvirt itself (managed-save images, active guests),
  so that a run that did nothing cannot pass for a fast one.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.libvirt_guests import LibvirtGuestsScript, ScriptRun
from bench.report import Row
from guestwarden.ipc.messages import Preserve, Restore
from testbed.daemon import GuestwardenDaemon
from testbed.guests import define_guests, remove_all
from testbed.libvirtd import IsolatedLibvirtd
from testbed.scale import GuestCounts, RunFinishedListener, TimedRun, guest_counts, timed_run

SECTION = "scale"
WORKERS = 4
PRESERVE_1000_TARGET_S = 1.5
SPEEDUP_TARGET = 500.0
GROWTH_ALLOWANCE = 1.1
"""The large preserve may take this much more than linear in the guest count
(5,000 guests at most 5.5x the time of 1,000)."""
PARALLEL_SHUTDOWN = 8
WARM_UP = ("each daemon does one preserve and restore first, not counted: its workers "
           "open their libvirt connections then, as they do at the restore after boot")
CLOCK = ("client's request until the RunFinished event, published after the final "
         "journal write (file and directory fsync'ed)")
SETTINGS = (f"{WORKERS} workers; defaults otherwise: chain save, shutdown, poweroff; "
            "parallel_save 1; parallel_start 4; sync_time on")


@dataclass(frozen=True)
class Sizes:
    small: int
    large: int
    script: int
    repeat: int


FULL = Sizes(small=1000, large=5000, script=100, repeat=3)
QUICK = Sizes(small=200, large=1000, script=20, repeat=2)


@dataclass(frozen=True)
class FleetTimes:
    """guestwarden's runs on ``guests`` guests."""

    guests: int
    preserve: list[TimedRun]
    restore: list[TimedRun]


@dataclass(frozen=True)
class ScriptTimes:
    """libvirt-guests.sh ``stop`` then ``start`` on ``guests`` guests."""

    mode: str
    """"suspend", or "shutdown" with PARALLEL_SHUTDOWN."""
    guests: int
    stop: ScriptRun
    start: ScriptRun
    after_stop: GuestCounts
    after_start: GuestCounts


# --------------------------------------------------------------------------- rows


def _median(runs: list[TimedRun]) -> float:
    return statistics.median(r.wall_s for r in runs)


def _run_detail(runs: list[TimedRun]) -> dict[str, Any]:
    cpu = {key: round(statistics.median(r.cpu_s[key] for r in runs), 3)
           for key in runs[0].cpu_s}
    return {
        "guests": len(runs[0].run.guests),
        "runs_s": [round(r.wall_s, 3) for r in runs],
        "per_guest_ms": round(1000 * _median(runs) / len(runs[0].run.guests), 3),
        "daemon_clock_s": round(statistics.median(r.daemon_s for r in runs), 3),
        "cpu_s_median": cpu,
        "clock": CLOCK,
        "settings": SETTINGS,
        "warm_up": WARM_UP,
    }


def _per_guest_ms(seconds: float, guests: int) -> float:
    return 1000 * seconds / guests


def _script_detail(script: ScriptTimes) -> dict[str, Any]:
    return {
        "guests": script.guests,
        "stop_s": round(script.stop.wall_s, 2),
        "start_s": round(script.start.wall_s, 2),
        "per_guest_stop_ms": round(_per_guest_ms(script.stop.wall_s, script.guests), 1),
        "after_stop": vars(script.after_stop),
        "after_start": vars(script.after_start),
    }


def scale_rows(small: FleetTimes, large: FleetTimes, scripts: list[ScriptTimes]) -> list[Row]:
    """The section's rows from its measurements (no I/O: unit-tested)."""
    rows: list[Row] = []
    for fleet in (small, large):
        for kind, runs in (("preserve", fleet.preserve), ("restore", fleet.restore)):
            value = _median(runs)
            name = f"{kind}, {fleet.guests} guests"
            if fleet is small:
                exact = kind == "preserve" and fleet.guests == 1000
                rows.append(Row(
                    section=SECTION, name=name, value=value, unit="s",
                    target=f"≤ {PRESERVE_1000_TARGET_S:g} s" if exact else "",
                    met=value <= PRESERVE_1000_TARGET_S if exact else None,
                    detail=_run_detail(runs)))
                continue
            reference = _median(small.preserve if kind == "preserve" else small.restore)
            allowed = GROWTH_ALLOWANCE * large.guests / small.guests
            rows.append(Row(
                section=SECTION, name=name, value=value, unit="s",
                reference=f"guestwarden {kind}, {small.guests} guests",
                reference_value=reference, ratio=value / reference,
                ratio_label=f"x the time of {small.guests}",
                target=f"≤ {allowed:.1f}x" if kind == "preserve" else "",
                met=value / reference <= allowed if kind == "preserve" else None,
                detail=_run_detail(runs)))
    for script in scripts:
        rows.append(Row(
            section=SECTION,
            name=f"libvirt-guests.sh stop, {_mode(script)}, {script.guests} guests",
            value=script.stop.wall_s, unit="s", detail=_script_detail(script)))
    ours_ms = _per_guest_ms(_median(small.preserve), small.guests)
    for script in scripts:
        theirs_ms = _per_guest_ms(script.stop.wall_s, script.guests)
        targeted = script.mode == "suspend"
        rows.append(Row(
            section=SECTION, name=f"preserve per guest ({small.guests}) vs stop, {_mode(script)}",
            value=ours_ms, unit="ms/guest",
            reference=f"libvirt-guests.sh stop, {_mode(script)}, {script.guests} guests",
            reference_value=theirs_ms, ratio=theirs_ms / ours_ms,
            ratio_label="x faster per guest",
            target=f"≥ {SPEEDUP_TARGET:g}x" if targeted else "",
            met=theirs_ms / ours_ms >= SPEEDUP_TARGET if targeted else None))
    suspended = [s for s in scripts if s.mode == "suspend"]
    if suspended:
        script = suspended[0]
        ours_ms = _per_guest_ms(_median(small.restore), small.guests)
        theirs_ms = _per_guest_ms(script.start.wall_s, script.guests)
        rows.append(Row(
            section=SECTION, name=f"restore per guest ({small.guests}) vs start after suspend",
            value=ours_ms, unit="ms/guest",
            reference=f"libvirt-guests.sh start, {script.guests} guests",
            reference_value=theirs_ms, ratio=theirs_ms / ours_ms,
            ratio_label="x faster per guest"))
    return rows


def _mode(script: ScriptTimes) -> str:
    if script.mode == "suspend":
        return "suspend"
    return f"shutdown (PARALLEL_SHUTDOWN={PARALLEL_SHUTDOWN})"


# --------------------------------------------------------------------------- measuring


def _expect(what: str, counts: GuestCounts, *, active: int, managed_save: int) -> None:
    if counts.active != active or counts.managed_save != managed_save:
        raise RuntimeError(f"{what}: libvirt has {counts.active} active guests and "
                           f"{counts.managed_save} managed-save images; expected {active} "
                           f"and {managed_save}: the comparison would be meaningless")


def _preserve_and_restore(daemon: GuestwardenDaemon, listener: RunFinishedListener,
                          libvirtd: IsolatedLibvirtd, guests: int) -> tuple[TimedRun, TimedRun]:
    """One preserve and one restore, each checked against libvirt."""
    conn = libvirtd.keeper()
    assert libvirtd.pid is not None
    preserve = timed_run(daemon, Preserve(), listener, libvirtd.pid)
    saved = sum(1 for g in preserve.run.guests if g.outcome == "saved")
    if not preserve.run.ok or saved != guests:
        raise RuntimeError(f"preserve of {guests} guests: ok={preserve.run.ok}, {saved} "
                           f"saved: {preserve.run.detail}")
    _expect(f"after preserve of {guests}", guest_counts(conn), active=0, managed_save=guests)
    restore = timed_run(daemon, Restore(), listener, libvirtd.pid)
    if not restore.run.ok or len(restore.run.guests) != guests:
        raise RuntimeError(f"restore of {guests} guests: ok={restore.run.ok}: "
                           f"{restore.run.detail}")
    _expect(f"after restore of {guests}", guest_counts(conn), active=guests, managed_save=0)
    return preserve, restore


def measure_guestwarden(libvirtd: IsolatedLibvirtd, base: Path, guests: int,
                        repeat: int) -> FleetTimes:
    """A fresh daemon; one preserve and restore not counted (WARM_UP), then ``repeat``."""
    conn = libvirtd.keeper()
    remove_all(conn)
    define_guests(conn, f"gw{guests}", running=guests)
    workdir = base / f"gw{guests}"
    workdir.mkdir()
    daemon = GuestwardenDaemon(workdir, [libvirtd.test_uri], workers=WORKERS)
    listener: RunFinishedListener | None = None
    preserves: list[TimedRun] = []
    restores: list[TimedRun] = []
    try:
        daemon.start()
        listener = RunFinishedListener(daemon.runtime_dir)
        _preserve_and_restore(daemon, listener, libvirtd, guests)
        for i in range(repeat):
            preserve, restore = _preserve_and_restore(daemon, listener, libvirtd, guests)
            preserves.append(preserve)
            restores.append(restore)
            print(f"  {guests} guests, run {i + 1}/{repeat}: preserve {preserve.wall_s:.2f} s, "
                  f"restore {restore.wall_s:.2f} s", flush=True)
    finally:
        if listener is not None:
            listener.close()
        daemon.stop()
    return FleetTimes(guests, preserves, restores)


def measure_script(libvirtd: IsolatedLibvirtd, base: Path, guests: int,
                   mode: str) -> ScriptTimes:
    conn = libvirtd.keeper()
    remove_all(conn)
    define_guests(conn, f"lg-{mode}", running=guests)
    workdir = base / f"script-{mode}"
    workdir.mkdir()
    script = LibvirtGuestsScript(workdir)
    script.configure({
        "URIS": libvirtd.test_uri,
        "ON_BOOT": "start",
        "ON_SHUTDOWN": mode,
        "PARALLEL_SHUTDOWN": PARALLEL_SHUTDOWN if mode == "shutdown" else 0,
    })
    stop = script.run("stop")
    after_stop = guest_counts(conn)
    _expect(f"libvirt-guests.sh stop ({mode}, exit {stop.returncode}; output ends: "
            f"{stop.output[-300:]!r})", after_stop, active=0,
            managed_save=guests if mode == "suspend" else 0)
    start = script.run("start")
    after_start = guest_counts(conn)
    _expect(f"libvirt-guests.sh start after {mode} (exit {start.returncode})", after_start,
            active=guests, managed_save=0)
    print(f"  libvirt-guests.sh {mode}: stop {stop.wall_s:.1f} s, start {start.wall_s:.1f} s",
          flush=True)
    return ScriptTimes(mode, guests, stop, start, after_stop, after_start)


def run(args: argparse.Namespace) -> list[Row]:
    sizes = QUICK if getattr(args, "quick", False) else FULL
    base = Path(tempfile.mkdtemp(prefix="gw-bench-scale-", dir="/tmp"))
    libvirtd = IsolatedLibvirtd(base / "lv")
    try:
        libvirtd.start()
        small = measure_guestwarden(libvirtd, base, sizes.small, sizes.repeat)
        large = measure_guestwarden(libvirtd, base, sizes.large, sizes.repeat)
        scripts = [measure_script(libvirtd, base, sizes.script, mode)
                   for mode in ("suspend", "shutdown")]
    finally:
        libvirtd.stop()
        shutil.rmtree(base, ignore_errors=True)
    return scale_rows(small, large, scripts)
