"""Time a preserve and a restore of many test-driver guests with the real daemon.

``python -m testbed.scale --guests 5000 --repeat 3`` starts a private libvirtd, defines
the guests (running, persistent), runs the real daemon with its workers, and then,
``--repeat`` times: ``preserve`` and ``restore``, printing how long each run took by
the daemon's own clock (``finished_at - started_at`` of the run) and the daemon's
CPU time. ``--subscribe`` keeps an event subscriber connected throughout (what
``preserve --wait`` does), so that the cost of publishing to a listener is included.
Everything it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from guestwarden.ipc.messages import GetRun, Preserve, Restore, RunReply, RunStatus
from testbed.daemon import GuestwardenDaemon, wait_for
from testbed.guests import define_guests, remove_all
from testbed.libvirtd import IsolatedLibvirtd

POLL_S = 0.25


def finished_run(daemon: GuestwardenDaemon, run_id: str, timeout_s: float) -> RunStatus:
    def done() -> RunStatus | None:
        reply = daemon.request(GetRun(run_id=run_id), timeout_s=30.0)
        assert isinstance(reply, RunReply), reply
        return reply.run if reply.run.finished_at is not None else None

    return wait_for(done, timeout_s, f"run {run_id} to finish", interval_s=POLL_S)


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def subscribe_in_background(daemon: GuestwardenDaemon, stop: threading.Event) -> list[int]:
    """Count the events of a subscriber that runs until ``stop`` (a list: [count])."""
    from guestwarden.ipc.subscriber import EventSubscriber

    counted = [0]

    def body() -> None:
        with EventSubscriber(daemon.runtime_dir) as sub:
            sub.connect()
            while not stop.is_set():
                counted[0] += len(sub.receive(0.2))

    threading.Thread(target=body, name="subscriber", daemon=True).start()
    return counted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.scale")
    parser.add_argument("--guests", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--subscribe", action="store_true",
                        help="keep an event subscriber connected (needs the events socket)")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="gw-scale-", dir="/tmp"))
    libvirtd = IsolatedLibvirtd(base / "lv")
    daemon: GuestwardenDaemon | None = None
    stop = threading.Event()
    try:
        libvirtd.start()
        conn = libvirtd.keeper()
        remove_all(conn)
        define_guests(conn, "g", running=args.guests)
        (base / "gw").mkdir()
        daemon = GuestwardenDaemon(base / "gw", [libvirtd.test_uri], workers=args.workers)
        daemon.start()
        counted = subscribe_in_background(daemon, stop) if args.subscribe else None
        times: dict[str, list[float]] = {"preserve": [], "restore": []}
        for i in range(args.repeat):
            for kind, request in (("preserve", Preserve()), ("restore", Restore())):
                cpu_before = cpu_s(daemon.pid)
                reply = daemon.request(request)
                run = finished_run(daemon, reply.run_id, 600.0)  # type: ignore[union-attr]
                assert run.finished_at is not None
                took = run.finished_at - run.started_at
                times[kind].append(took)
                print(f"{i + 1}: {kind} of {len(run.guests)} guests: {took:.2f} s, "
                      f"ok={run.ok}, supervisor CPU {cpu_s(daemon.pid) - cpu_before:.2f} s",
                      flush=True)
        for kind, values in times.items():
            print(f"{kind}: median {statistics.median(values):.2f} s, "
                  f"min {min(values):.2f} s over {len(values)} runs")
        if counted is not None:
            time.sleep(0.5)  # let the subscriber drain what is on its way
            print(f"events received by the subscriber: {counted[0]}")
        return 0
    finally:
        stop.set()
        if daemon is not None:
            daemon.stop()
        libvirtd.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
