"""Section "throughput": bytes of managed-save images written per second of preserve.

Real QEMU guests (software emulated) whose memory is filled with non-zero data at
boot (``gw.dirty_mib``: QEMU skips zero pages, so an idle guest's image would be
small and quick whatever its size) are preserved by the real daemon with the save
chain, once per ``parallel_save`` (1, 2, 4, ``auto``) and caching mode
(``bypass_cache`` false and true); between runs they are restored from their images
through libvirt, so every run saves the same memory.

* Bytes: the sizes of the managed-save images the run wrote, stat'ed in the isolated
  libvirtd's ``/var/lib/libvirt/qemu/save`` (where libvirt 9.0's qemu driver writes
  them; the daemon's ``save_dir`` points there for its free-space check).
* Seconds: the preserve run's wall time by the daemon's clock (inventory, hand-out and
  every save: what a host shutdown waits for).
* Reference, measured into the same directory just before and just after each run:
  ``dd`` writing the same number of bytes, ``bs=1M``, from a file in /dev/shm holding
  the same kind of data (1 MiB of random bytes repeated, as the guests' memory is),
  with the same caching as libvirt's save (both dd runs taken together, so that a
  drift of the disk's speed weighs on both sides alike):

  - ``bypass_cache = false``: libvirt 9.0 writes the image through its iohelper, which
    ends with ``fdatasync`` (seen with strace: ``fdatasync(1)`` in libvirt_iohelper
    before it exits): so ``dd conv=fdatasync``, not a bare dd that would stop when the
    data is in the page cache;
  - ``bypass_cache = true``: libvirt opens the image ``O_DIRECT`` for iohelper, which
    also ends with fdatasync: ``dd oflag=direct conv=fdatasync``.

The headline row per caching mode is the ``parallel_save`` with the highest
throughput against the median of that mode's dd runs. Each row's detail says where
the time went: the saves' spans from the journal (worker clocks), how long QEMU
streamed each guest's memory (libvirt's completed-job stats) and the rest of each
save, and the CPU seconds of QEMU, libvirtd with iohelper and the daemon.

What limits one save at a time (strace of libvirtd, libvirt 9.0, 440 MB image): QEMU
streams the memory in ~0.27 s; iohelper's fdatasync takes ~0.1 s more with the page
cache (nothing with O_DIRECT); then libvirt stops QEMU with SIGTERM and polls for it
every 200 ms (virProcessKillPainfully), so every save ends with a ~0.2 s wait in which
nothing is written. Several saves at once overlap those waits with other saves'
writing: that is what ``parallel_save`` buys on a single disk. Guests of several GiB
make the fixed 0.2 s small.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import psutil

from bench.qemufleet import Fleet, qemu_fleet
from bench.report import Row
from guestwarden.ipc.messages import RunStatus
from testbed.qemuguests import GuestSpec
from testbed.spans import max_overlap

SECTION = "throughput"
MIB = 1 << 20
SEED_BYTES = MIB
TARGET_RATIO = 0.8
LEVELS: tuple[int | str, ...] = (1, 2, 4, "auto")


@dataclass(frozen=True)
class Sizes:
    guests: int
    memory_mib: int
    dirty_mib: int
    levels: tuple[int | str, ...]
    modes: tuple[bool, ...]
    """bypass_cache values to measure."""


FULL = Sizes(guests=6, memory_mib=448, dirty_mib=340, levels=LEVELS, modes=(False, True))
QUICK = Sizes(guests=3, memory_mib=256, dirty_mib=150, levels=(1, 2), modes=(False,))


@dataclass(frozen=True)
class Measured:
    bypass_cache: bool
    level: int | str
    bytes: int
    preserve_s: float
    dd_rate: float
    """Bytes per second of the dd runs next to it, taken together."""
    detail: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.bytes / self.preserve_s


def _mb(bytes_per_s: float) -> float:
    return round(bytes_per_s / 1e6, 1)


def _cpu_s(pids: Sequence[int], *, children: bool = False) -> float:
    """User+system CPU seconds of the processes (with their reaped children if asked)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
        if children:
            total += t.children_user + t.children_system
    return total


class CpuMeter:
    """CPU seconds used by each part of the save path while a run goes on.

    The QEMU processes exit at the end of their save, so a thread samples them every
    ``interval_s`` and keeps the last reading of each (what one used in its last
    interval may be missed: it is idle then, its memory already written). libvirt's
    iohelper, which copies from QEMU's pipe into the image, is libvirtd's child: its
    CPU shows in libvirtd's children once reaped.
    """

    def __init__(self, fleet: Fleet, interval_s: float = 0.1) -> None:
        self.fleet = fleet
        self.interval_s = interval_s
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._others: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="cpu-meter", daemon=True)

    def _others_now(self) -> dict[str, float]:
        libvirtd = [self.fleet.libvirtd.pid] if self.fleet.libvirtd.pid else []
        return {
            "libvirtd_and_iohelper": _cpu_s(libvirtd, children=True),
            "guestwarden": _cpu_s([self.fleet.daemon.pid, *self.fleet.daemon.worker_pids()]),
        }

    def _sample(self) -> None:
        pids = self.fleet.qemu_pids()
        while True:
            for pid in pids:
                try:
                    t = psutil.Process(pid).cpu_times()
                except psutil.Error:
                    continue
                self._first.setdefault(pid, t.user + t.system)
                self._last[pid] = t.user + t.system
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> None:
        self._others = self._others_now()
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        now = self._others_now()
        used = {k: round(now[k] - self._others[k], 2) for k in now}
        used["qemu"] = round(sum(self._last[p] - self._first[p] for p in self._last), 2)
        return used


def _migration_s(fleet: Fleet) -> dict[str, float]:
    """How long QEMU took to stream each guest's memory (libvirt's completed-job stats,
    kept after the save): the part of a save that is QEMU copying memory into the pipe
    to iohelper. The rest of a save is libvirt's: pausing the guest and setting up the
    migration, iohelper's final fdatasync, the image header, stopping QEMU."""
    out = {}
    for name, guest in fleet.guests.items():
        try:
            stats = guest.dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        except libvirt.libvirtError:
            continue
        if "time_elapsed" in stats:
            out[name] = stats["time_elapsed"] / 1000
    return out


def _image_bytes(fleet: Fleet) -> dict[str, int]:
    out = {}
    for name in fleet.guests:
        path = fleet.save_dir / f"{name}.save"
        if path.exists():
            out[name] = path.stat().st_size
    return out


def _save_spans(run: RunStatus) -> list[tuple[int, int]]:
    return [g.spans_ns["save"] for g in run.guests if "save" in g.spans_ns]


def _covered_s(spans: list[tuple[int, int]]) -> float:
    """Seconds during which at least one save ran (the union of the spans)."""
    covered, end_so_far = 0, None
    for start, end in sorted(spans):
        if end_so_far is None or start > end_so_far:
            covered += end - start
            end_so_far = end
        elif end > end_so_far:
            covered += end - end_so_far
            end_so_far = end
    return covered / 1e9


def _make_source(path: Path, size: int) -> None:
    """``size`` bytes of 1 MiB of random data repeated, in tmpfs (no disk reads)."""
    seed = os.urandom(SEED_BYTES)
    with path.open("wb") as f:
        for _ in range(-(-size // SEED_BYTES)):
            f.write(seed)


def _dd(source: Path, target: Path, nbytes: int, *, direct: bool) -> float:
    """Seconds for dd to write ``nbytes`` into ``target`` with libvirt's caching."""
    oflag = ["oflag=direct"] if direct else []
    argv = ["dd", f"if={source}", f"of={target}", "bs=1M", "iflag=count_bytes",
            f"count={nbytes}", "conv=fdatasync", *oflag, "status=none"]
    os.sync()
    started = time.monotonic()
    subprocess.run(argv, check=True)
    took = time.monotonic() - started
    target.unlink()
    return took


def _restore(fleet: Fleet) -> None:
    """Start every guest again from its image (libvirt's own restore, not timed)."""
    def start(dom: Any) -> None:
        if not dom.isActive():
            dom.create()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(start, [g.dom for g in fleet.guests.values()]))
    for guest in fleet.guests.values():
        if guest.dom.hasManagedSaveImage(0):
            raise RuntimeError(f"{guest.name}: image still there after restore")


def _measure(fleet: Fleet, source: Path, *, bypass_cache: bool, level: int | str,
             expected_bytes: int = 0) -> Measured:
    """One preserve of every guest, with dd just before (``expected_bytes``, the
    previous run's image bytes; skipped when 0) and just after it (this run's bytes):
    their combined rate is the reference, so that a drift of the disk's speed during
    the run weighs on both sides alike."""
    fleet.reconfigure(shutdown={"parallel_save": level, "bypass_cache": bypass_cache})
    _restore(fleet)
    target = fleet.save_dir / "gw-bench-dd.tmp"
    dd = [(expected_bytes, _dd(source, target, expected_bytes, direct=bypass_cache))] \
        if expected_bytes else []
    os.sync()
    meter = CpuMeter(fleet)
    meter.start()
    run = fleet.finished_run(fleet.start_preserve())
    cpu = meter.stop()
    assert run.finished_at is not None
    bad = [f"{g.name}: {g.outcome} {g.detail}" for g in run.guests if g.outcome != "saved"]
    if bad:
        raise RuntimeError(f"preserve did not save every guest: {bad}")
    migration_s = _migration_s(fleet)
    total = sum(_image_bytes(fleet).values())
    dd.append((total, _dd(source, target, total, direct=bypass_cache)))
    dd_rate = sum(b for b, _ in dd) / sum(t for _, t in dd)
    preserve_s = run.finished_at - run.started_at
    spans = _save_spans(run)
    save_s = {g.name: (g.spans_ns["save"][1] - g.spans_ns["save"][0]) / 1e9
              for g in run.guests if "save" in g.spans_ns}
    rest_s = [save_s[name] - migration_s[name] for name in save_s if name in migration_s]
    detail = {
        "guests": len(spans),
        "image_bytes": total,
        "preserve_s": round(preserve_s, 3),
        "dd_mb_s_before_after": [_mb(b / t) for b, t in dd],
        "saves_span_s": round((max(e for _, e in spans) - min(s for s, _ in spans)) / 1e9, 3),
        # per guest: its save (worker's span) and the part of it QEMU spent streaming
        "save_and_stream_s": {name: [round(t, 3), round(migration_s.get(name, 0.0), 3)]
                              for name, t in sorted(save_s.items())},
        "saves_at_once_max": max_overlap(spans),
        # the part of the run in which no save was running: inventory, hand-out, journal
        "no_save_running_s": round(preserve_s - _covered_s(spans), 3),
        "per_save_mb_s": _mb(total / sum(save_s.values())),
        "qemu_stream_mb_s": _mb(total / sum(migration_s.values())) if migration_s else None,
        "per_save_rest_s_mean": round(statistics.mean(rest_s), 3) if rest_s else None,
        "cpu_s_during_preserve": cpu,
        "cpu_capacity_s": round(preserve_s * (os.cpu_count() or 1), 2),
    }
    return Measured(bypass_cache, level, total, preserve_s, dd_rate, detail)


def _mode_name(bypass_cache: bool) -> str:
    return "bypass_cache" if bypass_cache else "page cache"


def _dd_name(bypass_cache: bool) -> str:
    return ("dd oflag=direct conv=fdatasync" if bypass_cache else "dd conv=fdatasync") + \
        ", same bytes, same dir"


def _rows(results: list[Measured]) -> list[Row]:
    rows = []
    for mode in sorted({m.bypass_cache for m in results}):
        mine = [m for m in results if m.bypass_cache == mode]
        for m in mine:
            rows.append(Row(
                section=SECTION,
                name=f"save throughput, parallel_save={m.level} ({_mode_name(mode)})",
                value=_mb(m.rate), unit="MB/s", reference=_dd_name(mode),
                reference_value=_mb(m.dd_rate), ratio=round(m.rate / m.dd_rate, 2),
                ratio_label="x of dd", detail=m.detail,
            ))
        # the best level by its own throughput (not by its ratio, which a slow dd next
        # to it would flatter), against the median of this mode's dd runs
        best = max(mine, key=lambda m: m.rate)
        dd_rate = statistics.median(m.dd_rate for m in mine)
        ratio = best.rate / dd_rate
        rows.append(Row(
            section=SECTION,
            name=f"save throughput, best: parallel_save={best.level} ({_mode_name(mode)})",
            value=_mb(best.rate), unit="MB/s", reference=_dd_name(mode) + " (median)",
            reference_value=_mb(dd_rate), ratio=round(ratio, 2), ratio_label="x of dd",
            target=f"≥ {TARGET_RATIO}x dd", met=ratio >= TARGET_RATIO,
            detail={"mb_s": {str(m.level): _mb(m.rate) for m in mine},
                    "dd_mb_s": {str(m.level): _mb(m.dd_rate) for m in mine},
                    # where one save's time goes: QEMU streaming vs the rest (libvirt)
                    "qemu_stream_mb_s": {str(m.level): m.detail["qemu_stream_mb_s"]
                                         for m in mine},
                    "per_save_rest_s_mean": {str(m.level): m.detail["per_save_rest_s_mean"]
                                             for m in mine}},
        ))
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    sizes = QUICK if getattr(args, "quick", False) else FULL
    specs = [GuestSpec(f"tp{i}", f"gw.dirty_mib={sizes.dirty_mib}", memory_mib=sizes.memory_mib)
             for i in range(sizes.guests)]
    # one save at a time needs 1 worker; auto may climb to workers - 1
    workers = min(9, sizes.guests + 1)
    source = Path("/dev/shm") / f"gw-bench-dd-{os.getpid()}"
    results: list[Measured] = []
    try:
        with qemu_fleet("gw-tp-", specs, workers=workers,
                        shutdown={"persistent": ["save", "poweroff"]}) as fleet:
            _make_source(source, sizes.guests * (sizes.memory_mib + 16) * MIB)
            # Untimed first round: on this (virtual) machine, page-cache pages never used
            # before are slow to get (a first dd of 1 GiB ran at ~400 MB/s, the next ones
            # at ~2 GB/s); whichever of save or dd came first would pay for it.
            warmup = _measure(fleet, source, bypass_cache=False, level=2)
            print(f"  warm-up (not counted): {_mb(warmup.rate)} MB/s, dd "
                  f"{_mb(warmup.dd_rate)} MB/s", flush=True)
            for bypass_cache in sizes.modes:
                for level in sizes.levels:
                    m = _measure(fleet, source, bypass_cache=bypass_cache, level=level,
                                 expected_bytes=warmup.bytes)
                    print(f"  parallel_save={level} {_mode_name(bypass_cache)}: "
                          f"{_mb(m.rate)} MB/s in {m.preserve_s:.2f} s; dd {_mb(m.dd_rate)} "
                          f"MB/s", flush=True)
                    results.append(m)
    finally:
        source.unlink(missing_ok=True)
    return _rows(results)
