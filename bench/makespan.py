"""Section "makespan": graceful shutdown of guests with known delays, 4 at a time.

Ten tiny real QEMU guests (eight with ``--quick``) each wait a fixed number of seconds
between the ACPI power button and powering off (``gw.poweroff_delay``): integers in
[1, 10] from ``random.Random(SEED)``, the seed chosen before anything was measured
and kept. With at most ``SLOTS`` shutdowns at once, the best any scheduler could do
is the optimal makespan of those delays on ``SLOTS`` parallel slots (P||Cmax,
computed exactly by bench/schedule.py): the lower bound.

Compared, in the same run and on the same guests (every guest cold-booted and READY
on its console before each round):

* guestwarden run 1: a fresh journal, nothing learned: every guest is priced at its
  whole ``shutdown_timeout`` (it might ignore the button), so they go out by name;
* guestwarden run 2: the same daemon, with the durations run 1 learned (journal):
  longest first (supervisor/ordering.py);
* Debian's libvirt-guests.sh ``stop`` with ``ON_SHUTDOWN=shutdown
  PARALLEL_SHUTDOWN=4``: it hands guests out in ``virsh list`` order and polls every
  second (``sleep 1``), so its hand-outs and its end are quantised to about 1 s.

The guests run no guest agent (``gw.no_agent=1``): both tools then press the power
button (libvirt-guests' plain ``virsh shutdown`` uses the agent only when one
answers), and the comparison is about scheduling, not about the way of asking.

Makespan (the headline figure): from just before the preserve request (or the
script's start) to the moment the last guest's QEMU process is gone, seen by a
thread that polls the QEMU pids every 20 ms. Each row's detail also gives when the
tool itself said it was done (the run's ``finished_at``, the script's exit).

What is physics and what is ours: one more guest, with no delay at all, is shut down
alone through libvirt a few times while the others idle (power button to QEMU gone,
and to libvirt saying shut off: the earliest any libvirt client can reuse the slot).
That fixed per-guest cost, added to every delay, gives a second bound ("lower bound
+ measured per-guest overhead", in the lower bound's detail). The headline ratio is
against the delays-only bound. Each guestwarden round's detail splits every guest's
time beyond its delay into the guest's reaction, its poweroff, libvirt noticing (plus
the worker's poll) and the supervisor's hand-out, and gives the CPU seconds of the
daemon and its workers (of the script and its virsh processes for libvirt-guests).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import resource
import shutil
import statistics
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import psutil

from bench.libvirt_guests import LibvirtGuestsScript
from bench.qemufleet import Fleet, qemu_fleet
from bench.report import Row
from bench.schedule import (
    list_makespan,
    lpt_makespan,
    optimal_makespan,
    optimal_makespan_with_overhead,
)
from guestwarden.ipc.messages import RunStatus
from testbed.daemon import wait_for
from testbed.guestimage import POWEROFF_MARKER
from testbed.qemuguests import GuestSpec, QemuGuest, boot, process_runs, qemu_pid

SECTION = "makespan"
SEED = 8
"""Chosen before the first measurement and never changed (delays 4 6 7 3 4 1 2 3 4 9)."""
SLOTS = 4
GUESTS, QUICK_GUESTS = 10, 8
REPEATS, QUICK_REPEATS = 2, 1
"""Rounds of (guestwarden run 1, run 2, libvirt-guests), each on a fresh journal."""
ZERO_SAMPLES, QUICK_ZERO_SAMPLES = 3, 2
TARGET = 1.10
PREFIX = "gw-mk-"
ZERO = f"{PREFIX}zero"
SHUTDOWN_TIMEOUT_S = 60.0
"""Far above every delay: no guest is ever powered off by the fallback."""
OFF_TIMEOUT_S = 120.0
POLL_S = 0.02
WORKERS = SLOTS + 1
"""What ``workers = "auto"`` resolves to for parallel_shutdown = 4 on this host."""
SHUTDOWN_CONFIG: dict[str, Any] = {
    "persistent": ["shutdown", "poweroff"],
    "transient": ["shutdown", "poweroff"],
    "parallel_shutdown": SLOTS,
    "shutdown_mode": "acpi",
    "shutdown_timeout": SHUTDOWN_TIMEOUT_S,
}


def delays(count: int) -> list[int]:
    """The guests' shutdown delays in seconds, in guest-name order."""
    rng = random.Random(SEED)
    return [rng.randint(1, 10) for _ in range(count)]


def guest_name(i: int) -> str:
    return f"{PREFIX}{i:02d}"


@dataclass(frozen=True)
class Round:
    tool: str
    makespan_s: float
    """Start of the request to the last guest's QEMU gone."""
    done_s: float
    """Start of the request to the tool saying it is done."""
    off_s: dict[str, float]
    """Per guest: when its QEMU was gone, from the start."""
    handed_out: list[str]
    """Guest names in the order their shutdowns were requested."""
    cpu_busy_pct: float
    """The host's CPU use (all cores) during the round."""
    tool_cpu_s: float
    """CPU seconds of the tool itself: the daemon and its workers, or the script and
    every virsh it ran."""
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- watching


class OffWatcher:
    """When each QEMU process ends, seen by a thread polling ``/proc`` every POLL_S, and
    when each guest reacted to the power button (its console's POWEROFF line, printed
    before its delay), for the guests whose console is given.

    QEMU ends when the guest powers off; libvirt says the guest is shut off 0.05-0.35 s
    later (measured here: its state turns SHUTDOWN, then SHUTOFF, after the process is
    gone). Polling ``/proc`` and the console files costs no libvirt call, so it does not
    load libvirtd while the tools under test talk to it.
    """

    def __init__(self, pids: Mapping[str, int],
                 consoles: Mapping[str, Path] | None = None) -> None:
        self._pids = dict(pids)
        self._consoles = dict(consoles or {})
        self.off: dict[str, float] = {}
        self.reacted: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="off-watcher", daemon=True)

    def __enter__(self) -> OffWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _poll(self) -> None:
        while self._pids and not self._stop.is_set():
            now = time.monotonic()
            for name, console in list(self._consoles.items()):
                with contextlib.suppress(OSError):
                    if POWEROFF_MARKER.encode() in console.read_bytes():
                        self.reacted[name] = now
                        del self._consoles[name]
            for name, pid in list(self._pids.items()):
                if not process_runs(pid):
                    self.off[name] = now
                    del self._pids[name]
            self._stop.wait(POLL_S)

    def wait_all(self, timeout_s: float) -> dict[str, float]:
        wait_for(lambda: not self._pids, timeout_s, "every guest's QEMU to end", interval_s=0.05)
        return dict(self.off)


def _tree_cpu_s(process: psutil.Process) -> float:
    """CPU seconds of a process and its children now (the daemon and its workers)."""
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def _qemu_pids(fleet: Fleet, names: Iterable[str]) -> dict[str, int]:
    pids = {}
    for name in names:
        pid = qemu_pid(fleet.libvirtd.base_dir / "run", name)
        if pid is None:
            raise RuntimeError(f"guest {name} has no QEMU process after booting")
        pids[name] = pid
    return pids


# --------------------------------------------------------------------------- rounds


def _guestwarden_round(fleet: Fleet, names: list[str], tool: str) -> Round:
    boot(fleet.guests[n] for n in names)
    pids = _qemu_pids(fleet, names)
    daemon = psutil.Process(fleet.daemon.pid)
    tool_cpu = _tree_cpu_s(daemon)
    psutil.cpu_percent(None)
    with OffWatcher(pids, {n: fleet.guests[n].console_log for n in names}) as watcher:
        started_wall, started = time.time(), time.monotonic()
        run = fleet.finished_run(fleet.start_preserve())
        off = watcher.wait_all(OFF_TIMEOUT_S)
    cpu = psutil.cpu_percent(None)
    tool_cpu = _tree_cpu_s(daemon) - tool_cpu
    _check_shut_down(run, names, tool)
    assert run.finished_at is not None
    spans = {g.name: g.spans_ns["shutdown"] for g in run.guests if g.name in names}
    order = sorted(spans, key=lambda n: spans[n][0])
    start_ns = int(started * 1e9)
    return Round(
        tool=tool,
        makespan_s=max(off.values()) - started,
        done_s=run.finished_at - started_wall,
        off_s={n: t - started for n, t in off.items()},
        handed_out=order,
        cpu_busy_pct=cpu,
        tool_cpu_s=tool_cpu,
        extra={
            "requested_s": {n: (spans[n][0] - start_ns) / 1e9 for n in order},
            "span_s": {n: (spans[n][1] - spans[n][0]) / 1e9 for n in order},
            "seen_off_s": {n: spans[n][1] / 1e9 - started for n in order},
            "reacted_s": {n: t - started for n, t in watcher.reacted.items()},
        },
    )


def _check_shut_down(run: RunStatus, names: list[str], tool: str) -> None:
    """Every guest went off by its graceful shutdown (else the round measured something
    else: a poweroff after a timeout, or a guest that was not running)."""
    outcomes = {g.name: g.outcome for g in run.guests if g.name in names}
    wrong = {n: o for n, o in outcomes.items() if o != "shutdown"}
    if wrong or len(outcomes) != len(names):
        raise RuntimeError(f"{tool}: expected every guest shut down, got {outcomes}; "
                           f"run detail: {run.detail}")


_STARTING = re.compile(r"^Starting shutdown on guest: (\S+)", re.MULTILINE)


def _libvirt_guests_round(fleet: Fleet, script: LibvirtGuestsScript, names: list[str]) -> Round:
    boot(fleet.guests[n] for n in names)
    pids = _qemu_pids(fleet, names)
    script.list_file.unlink(missing_ok=True)  # a stale list file makes stop do nothing
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    psutil.cpu_percent(None)
    with OffWatcher(pids) as watcher:
        started = time.monotonic()
        result = script.run("stop", timeout_s=OFF_TIMEOUT_S + 60)
        off = watcher.wait_all(OFF_TIMEOUT_S)
    cpu = psutil.cpu_percent(None)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"libvirt-guests.sh stop failed ({result.returncode}):\n"
                           + result.output)
    return Round(
        tool="libvirt-guests",
        makespan_s=max(off.values()) - started,
        done_s=result.wall_s,
        off_s={n: t - started for n, t in off.items()},
        handed_out=_STARTING.findall(result.output),
        cpu_busy_pct=cpu,
        # the script and the virsh processes it waited for (sh waits for each one)
        tool_cpu_s=(after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime),
    )


@dataclass(frozen=True)
class ZeroDelay:
    """A guest with no delay, shut down alone through libvirt: the per-guest cost."""

    gone_s: list[float]
    """ACPI power button to its QEMU process gone."""
    shutoff_s: list[float]
    """ACPI power button to libvirt saying the guest is shut off: the earliest a libvirt
    client can know that a slot is free. libvirt 9.0 ends QEMU on its SHUTDOWN event and
    then polls for the process every 200 ms (virProcessKillPainfully), so this is about
    0.2 s after the QEMU process is gone."""


def _zero_delay_overhead(fleet: Fleet, samples: int) -> ZeroDelay:
    """Measured through libvirt directly (no guestwarden involved), with the benchmark's
    other guests running idle, as they do while the tools shut guests down; the guest's
    state is polled every 5 ms (one guest: a load libvirtd does not notice)."""
    guest: QemuGuest = fleet.guests[ZERO]
    gone, shutoff = [], []
    for _ in range(samples):
        boot([guest])
        pid = _qemu_pids(fleet, [ZERO])[ZERO]
        with OffWatcher({ZERO: pid}) as watcher:
            started = time.monotonic()
            guest.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            try:
                wait_for(lambda: guest.state() == libvirt.VIR_DOMAIN_SHUTOFF, 30.0,
                         f"{ZERO} to be shut off", interval_s=0.005)
            except TimeoutError as exc:
                tail = "\n".join(guest.console().splitlines()[-10:])
                raise TimeoutError(f"{exc}; its console ends:\n{tail}") from None
            shutoff.append(time.monotonic() - started)
            gone.append(watcher.wait_all(30.0)[ZERO] - started)
    return ZeroDelay(gone, shutoff)


def _forget(fleet: Fleet) -> None:
    """Make the daemon one that has learned nothing: stopped, its journal removed, started."""
    daemon = fleet.daemon
    daemon.stop()
    shutil.rmtree(daemon.state_dir)  # the daemon makes it again
    daemon.start(timeout_s=60.0)


# --------------------------------------------------------------------------- report


def _delays_in(order: Sequence[str], delay_of: Mapping[str, int]) -> list[int]:
    return [delay_of[n] for n in order]


def _describe(r: Round, delay_of: Mapping[str, int]) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "makespan_s": round(r.makespan_s, 3),
        "tool_done_s": round(r.done_s, 3),
        "delays_in_hand_out_order": _delays_in(r.handed_out, delay_of),
        "note": f"the first {SLOTS} are handed out together",
        **({"requested_at_s": [round(r.extra["requested_s"][n], 3) for n in r.handed_out]}
           if "requested_s" in r.extra else {}),
        "host_cpu_busy_pct": round(r.cpu_busy_pct, 1),
        "tool_cpu_s": round(r.tool_cpu_s, 3),
    }
    if "span_s" in r.extra:
        detail["per_guest_s"] = _breakdown(r, delay_of)
    return detail


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"mean": round(statistics.mean(values), 3), "max": round(max(values), 3)}


def _breakdown(r: Round, delay_of: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """Where each guest's time went beyond its delay, in the order things happen.

    * the button to the guest's reaction (its console's POWEROFF line): guest;
    * that line to QEMU gone, minus the delay: the guest's sleep and poweroff, QEMU's exit;
    * QEMU gone to the worker seeing the guest off: libvirt (it notices QEMU's end
      0.05-0.35 s later) and the worker's state poll (every 0.1 s);
    * the worker seeing a guest off to the next request on the freed slot: the
      supervisor's hand-out (JobDone, next Assign, the worker's libvirt call).
    """
    span, requested = r.extra["span_s"], r.extra["requested_s"]
    seen_off, reacted = r.extra["seen_off_s"], r.extra["reacted_s"]
    both = [n for n in span if n in reacted]
    later = sorted(requested.values())[SLOTS:]
    return {
        "shutdown_minus_delay": _stats([span[n] - delay_of[n] for n in span]),
        "button_to_guest_reaction": _stats([reacted[n] - requested[n] for n in both]),
        "reaction_to_qemu_gone_minus_delay": _stats(
            [r.off_s[n] - reacted[n] - delay_of[n] for n in both]),
        "qemu_gone_to_worker_seeing_off": _stats([seen_off[n] - r.off_s[n] for n in span]),
        "worker_off_to_next_request": _stats(
            [a - b for a, b in zip(later, sorted(seen_off.values()), strict=False)]),
    }


def _mean(rounds: Sequence[Round]) -> float:
    return statistics.mean(r.makespan_s for r in rounds)


def _rows(
    by_tool: Mapping[str, list[Round]], delay_of: Mapping[str, int], zero: ZeroDelay
) -> list[Row]:
    values = list(delay_of.values())
    bound = optimal_makespan([float(d) for d in values], SLOTS)
    bound_plus = optimal_makespan_with_overhead(
        [float(d) for d in values], SLOTS, statistics.median(zero.shutoff_s),
        statistics.median(zero.gone_s))
    reference = f"lower bound (optimal schedule of the delays on {SLOTS} slots)"
    rows = []
    specs = (
        ("guestwarden run 1", "graceful shutdown, guestwarden run 1 (nothing learned)", False),
        ("guestwarden run 2", "graceful shutdown, guestwarden run 2 (learned, longest first)",
         True),
        ("libvirt-guests", f"graceful shutdown, libvirt-guests.sh PARALLEL_SHUTDOWN={SLOTS}",
         False),
    )
    for tool, name, targeted in specs:
        rounds = by_tool[tool]
        value = _mean(rounds)
        ratio = value / bound
        detail: dict[str, Any] = {
            "rounds": [_describe(r, delay_of) for r in rounds],
            "ratio_to_bound_plus_overhead": round(value / bound_plus, 3),
        }
        if tool != "guestwarden run 2":
            detail["ratio_to_guestwarden_run_2"] = round(
                value / _mean(by_tool["guestwarden run 2"]), 3)
        rows.append(Row(
            section=SECTION, name=name, value=round(value, 3), unit="s",
            reference=reference, reference_value=bound, ratio=round(ratio, 3),
            ratio_label="x lower bound",
            target=f"≤ {TARGET:.2f}x lower bound" if targeted else "",
            met=(ratio <= TARGET) if targeted else None, detail=detail,
        ))
    names = list(delay_of)
    rows.append(Row(
        section=SECTION, name=f"lower bound, {len(values)} guests, {SLOTS} at once",
        value=bound, unit="s",
        detail={
            "seed": SEED, "delays_s": dict(delay_of), "slots": SLOTS,
            "lpt_makespan_s": lpt_makespan([float(d) for d in values], SLOTS),
            "name_order_makespan_s": list_makespan([float(delay_of[n]) for n in names], SLOTS),
            "zero_delay_qemu_gone_s": [round(v, 3) for v in zero.gone_s],
            "zero_delay_libvirt_shutoff_s": [round(v, 3) for v in zero.shutoff_s],
            "lower_bound_plus_overhead_s": round(bound_plus, 3),
            "note": "P||Cmax of the delays alone, exact (bench/schedule.py); "
                    "lower_bound_plus_overhead_s adds to every delay the median cost of a "
                    "zero-delay ACPI shutdown of one guest through libvirt (button to "
                    "libvirt saying shut off; the last guest of a slot only to QEMU gone)",
        },
    ))
    return rows


# --------------------------------------------------------------------------- section


def run(args: argparse.Namespace) -> list[Row]:
    quick = bool(getattr(args, "quick", False))
    count = QUICK_GUESTS if quick else GUESTS
    repeats = QUICK_REPEATS if quick else REPEATS
    names = [guest_name(i) for i in range(count)]
    delay_of = dict(zip(names, delays(count), strict=True))
    specs = [GuestSpec(n, f"gw.poweroff_delay={d} gw.no_agent=1") for n, d in delay_of.items()]
    specs.append(GuestSpec(ZERO, "gw.poweroff_delay=0 gw.no_agent=1"))
    by_tool: dict[str, list[Round]] = {"guestwarden run 1": [], "guestwarden run 2": [],
                                       "libvirt-guests": []}
    with qemu_fleet("gw-mk-", specs, workers=WORKERS, shutdown=SHUTDOWN_CONFIG) as fleet:
        zero = _zero_delay_overhead(fleet, QUICK_ZERO_SAMPLES if quick else ZERO_SAMPLES)
        print(f"  zero-delay ACPI shutdown: QEMU gone after {_secs(zero.gone_s)}, "
              f"libvirt says shut off after {_secs(zero.shutoff_s)}", flush=True)
        script = LibvirtGuestsScript(fleet.base / "libvirt-guests")
        script.configure({"URIS": fleet.libvirtd.qemu_uri, "ON_BOOT": "ignore",
                          "ON_SHUTDOWN": "shutdown", "PARALLEL_SHUTDOWN": SLOTS,
                          "SHUTDOWN_TIMEOUT": int(OFF_TIMEOUT_S)})
        for repeat in range(repeats):
            if repeat:
                _forget(fleet)
            for tool in ("guestwarden run 1", "guestwarden run 2"):
                r = _guestwarden_round(fleet, names, tool)
                by_tool[tool].append(r)
                _progress(r, delay_of)
            r = _libvirt_guests_round(fleet, script, names)
            by_tool["libvirt-guests"].append(r)
            _progress(r, delay_of)
    return _rows(by_tool, delay_of, zero)


def _secs(values: Iterable[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) + " s"


def _progress(r: Round, delay_of: Mapping[str, int]) -> None:
    print(f"  {r.tool}: makespan {r.makespan_s:.2f} s (tool done {r.done_s:.2f} s), "
          f"delays in hand-out order {_delays_in(r.handed_out, delay_of)}, "
          f"CPU {r.cpu_busy_pct:.0f}%", flush=True)
