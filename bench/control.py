"""Section "control": the control plane while jobs run, and what the daemon costs in memory.

Eight real QEMU guests (software emulated) that ignore the ACPI power button
(``gw.ignore_acpi=1``) are preserved with the chain ``shutdown -> poweroff``,
``parallel_shutdown = 8`` and a long ``shutdown_timeout``: eight shutdown jobs are in
flight, each holding a worker that polls its guest's state every 0.1 s and heartbeats,
for as long as the section needs them. While they run:

* ``status`` latency: N ``GetStatus`` requests, one after another, over the real
  control socket with ``guestwarden.ipc.client.ControlClient`` (what the CLI uses: a
  new DEALER socket per request), timed from before the connect to the decoded reply.
  Each reply is checked to still show every job in flight.
* ``guestwarden status`` as a whole process (interpreter start, imports, request,
  printing), a few times; against ``virsh list`` on the same libvirtd, also as a whole
  process: what a libvirt-guests user runs to see what is going on (libvirt-guests
  itself has no control plane).
* RSS (psutil) of the supervisor (the daemon's pid) and of each worker process.

At the end the guests are destroyed (the jobs then end at once: the guest is off) and
everything is stopped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from bench.qemufleet import Fleet, qemu_fleet
from bench.report import Row
from guestwarden.ipc.client import ControlClient
from guestwarden.ipc.messages import GetStatus, Status
from testbed.daemon import wait_for
from testbed.qemuguests import GuestSpec, power_off
from testbed.scale import cpu_s

SECTION = "control"
P99_TARGET_MS = 10.0
SUPERVISOR_RSS_TARGET_MB = 60.0
MB = 1e6


@dataclass(frozen=True)
class Sizes:
    guests: int
    requests: int
    processes: int
    """How many times each whole-process command (CLI, virsh) is run."""


FULL = Sizes(guests=8, requests=500, processes=7)
QUICK = Sizes(guests=4, requests=100, processes=3)


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was really measured."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _in_flight(status: Status) -> int:
    return sum(1 for job in status.jobs if job.kind == "shutdown" and job.worker_id)


def _status_latencies(client: ControlClient, count: int) -> tuple[list[float], int]:
    """Seconds per request, and the fewest shutdown jobs in flight any reply showed."""
    took = []
    fewest = 1 << 30
    for _ in range(count):
        started = time.perf_counter()
        reply = client.request(GetStatus())
        took.append(time.perf_counter() - started)
        if not isinstance(reply, Status):
            raise RuntimeError(f"status answered {reply}")
        fewest = min(fewest, _in_flight(reply))
    return took, fewest


def _process_times(argv: Sequence[str], count: int) -> list[float]:
    took = []
    for _ in range(count):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=60)
        took.append(time.perf_counter() - started)
    return took


def _cli_argv(fleet: Fleet) -> list[str]:
    """The installed ``guestwarden`` entry point next to this interpreter, as a user
    runs it (``python -m guestwarden`` if there is none)."""
    script = os.path.join(os.path.dirname(sys.executable), "guestwarden")
    head = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "guestwarden"]
    return [*head, "--config", str(fleet.daemon.config), "status"]


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _measure(fleet: Fleet, sizes: Sizes) -> dict[str, Any]:
    client = ControlClient(fleet.daemon.runtime_dir, timeout_s=10.0)
    idle, _ = _status_latencies(client, min(100, sizes.requests))
    run_id = fleet.start_preserve()

    def all_in_flight() -> bool:
        return _in_flight(fleet.daemon.status()) >= sizes.guests

    wait_for(all_in_flight, 60.0, f"{sizes.guests} shutdown jobs in flight", interval_s=0.05)
    time.sleep(1.0)  # let the workers settle into their polling (measured, not synced on)
    supervisor = fleet.daemon.pid
    workers = fleet.daemon.worker_pids()
    supervisor_rss = _rss(supervisor)
    worker_rss = [_rss(pid) for pid in workers]
    cpu_before, wall_before = cpu_s(supervisor), time.monotonic()
    time.sleep(2.0)  # what the supervisor costs with the jobs running and nobody asking
    idle_cpu = (cpu_s(supervisor) - cpu_before) / (time.monotonic() - wall_before)
    cpu_before, wall_before = cpu_s(supervisor), time.monotonic()
    busy, fewest = _status_latencies(client, sizes.requests)
    busy_wall = time.monotonic() - wall_before
    busy_cpu_s = cpu_s(supervisor) - cpu_before
    cli = _process_times(_cli_argv(fleet), sizes.processes)
    virsh = _process_times(["virsh", "-c", fleet.libvirtd.qemu_uri, "list"], sizes.processes)
    still = _in_flight(fleet.daemon.status())
    supervisor_rss_after = _rss(supervisor)
    # end the jobs: a guest that is off ends its shutdown job at once
    power_off(fleet.guests.values())
    run = fleet.finished_run(run_id, timeout_s=120.0)
    return {
        "idle": idle, "busy": busy, "fewest_in_flight": min(fewest, still),
        "supervisor_rss": max(supervisor_rss, supervisor_rss_after),
        "worker_rss": worker_rss, "idle_cpu": idle_cpu,
        "busy_cpu_per_request_ms": _ms(busy_cpu_s / len(busy)),
        "busy_wall_s": busy_wall, "cli": cli, "virsh": virsh,
        "run_outcomes": sorted({g.outcome for g in run.guests}),
    }


def _rows(m: dict[str, Any], sizes: Sizes) -> list[Row]:
    busy: list[float] = m["busy"]
    idle: list[float] = m["idle"]
    jobs = f"{sizes.guests} jobs running"
    common = {"requests": len(busy), "jobs_in_flight_min": m["fewest_in_flight"]}
    p99 = _ms(_percentile(busy, 99))
    worker_rss: list[int] = m["worker_rss"]
    cli_p50 = statistics.median(m["cli"])
    virsh_p50 = statistics.median(m["virsh"])
    return [
        Row(section=SECTION, name=f"status latency p50, {jobs}", value=_ms(_percentile(busy, 50)),
            unit="ms", detail={**common, "p90_ms": _ms(_percentile(busy, 90)),
                               "max_ms": _ms(max(busy)), "mean_ms": _ms(statistics.mean(busy)),
                               "no_jobs_p50_ms": _ms(_percentile(idle, 50)),
                               "no_jobs_p99_ms": _ms(_percentile(idle, 99)),
                               "supervisor_cpu_ms_per_request": m["busy_cpu_per_request_ms"]}),
        Row(section=SECTION, name=f"status latency p99, {jobs}", value=p99, unit="ms",
            target=f"≤ {P99_TARGET_MS:g} ms", met=p99 <= P99_TARGET_MS,
            detail={**common, "max_ms": _ms(max(busy))}),
        Row(section=SECTION, name="guestwarden status, whole CLI process (median)",
            value=_ms(cli_p50), unit="ms", reference="virsh list, whole process (median)",
            reference_value=_ms(virsh_p50), ratio=round(cli_p50 / virsh_p50, 2),
            ratio_label="x virsh's time",
            detail={"runs": len(m["cli"]), "cli_ms": [_ms(t) for t in m["cli"]],
                    "virsh_ms": [_ms(t) for t in m["virsh"]]}),
        Row(section=SECTION, name=f"supervisor RSS, {jobs}",
            value=round(m["supervisor_rss"] / MB, 1), unit="MB",
            target=f"≤ {SUPERVISOR_RSS_TARGET_MB:g} MB",
            met=m["supervisor_rss"] / MB <= SUPERVISOR_RSS_TARGET_MB,
            detail={"supervisor_cpu_percent_while_jobs_run": round(100 * m["idle_cpu"], 2)}),
        Row(section=SECTION, name=f"worker RSS, max of {len(worker_rss)}",
            value=round(max(worker_rss) / MB, 1), unit="MB",
            detail={"each_mb": [round(r / MB, 1) for r in sorted(worker_rss)]}),
        Row(section=SECTION, name=f"worker RSS, sum of {len(worker_rss)}",
            value=round(sum(worker_rss) / MB, 1), unit="MB"),
    ]


def run(args: argparse.Namespace) -> list[Row]:
    sizes = QUICK if getattr(args, "quick", False) else FULL
    if shutil.which("virsh") is None:
        raise RuntimeError("virsh not found (package libvirt-clients; make deps installs it)")
    specs = [GuestSpec(f"cp{i}", "gw.ignore_acpi=1") for i in range(sizes.guests)]
    with qemu_fleet("gw-cp-", specs, workers=sizes.guests + 1, shutdown={
        "persistent": ["shutdown", "poweroff"],
        "parallel_shutdown": sizes.guests,
        "shutdown_mode": "acpi",
        "shutdown_timeout": 900.0,
    }) as fleet:
        try:
            measured = _measure(fleet, sizes)
        finally:
            # whatever happened: guests that are off end their jobs, so that stopping
            # the daemon does not wait for a preserve that waits for them
            power_off(fleet.guests.values())
    print(f"  status p50 {_ms(_percentile(measured['busy'], 50))} ms, p99 "
          f"{_ms(_percentile(measured['busy'], 99))} ms over {len(measured['busy'])} requests; "
          f"jobs in flight throughout: {measured['fewest_in_flight']}; run ended with "
          f"{measured['run_outcomes']}", flush=True)
    return _rows(measured, sizes)
