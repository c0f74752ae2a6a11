"""Time a preserve and a restore of many test-driver guests with the real daemon.

``python -m testbed.scale --guests 5000 --repeat 3`` starts a private libvirtd, defines
the guests (running, persistent), runs the real daemon with its workers, and then,
``--repeat`` times: ``preserve`` and ``restore``, printing how long each run took and
the CPU time of the supervisor, its workers and libvirtd. ``--subscribe`` keeps an
event subscriber connected throughout (what ``preserve --wait`` does), so that the
cost of publishing to a listener is included. Everything it started is stopped at
the end.

The pieces are shared with the benchmark (bench/scale.py): :class:`RunFinishedListener`
and :func:`timed_run` say what the clock covers, :func:`guest_counts` checks that the
guests really are where the run says it put them.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import psutil
import zmq

from guestwarden.ipc import codec
from guestwarden.ipc.messages import (
    Ok,
    Preserve,
    Restore,
    RunFinished,
    RunStatus,
    Subscribed,
)
from guestwarden.ipc.sockets import EVENTS_SOCKET
from guestwarden.ipc.subscriber import MAX_EVENT_BYTES
from testbed.daemon import GuestwardenDaemon
from testbed.guests import define_guests, remove_all
from testbed.libvirtd import IsolatedLibvirtd


def _tag_prefix(sample: RunFinished | Subscribed) -> bytes:
    """The leading bytes that every encoded event of ``sample``'s type starts with: the
    msgpack map header and the ``type`` tag (msgspec writes the tag first)."""
    frame = codec.encode(sample)
    tag = type(sample).__name__.encode()
    return frame[: frame.index(tag) + len(tag)]


_RUN_FINISHED = _tag_prefix(RunFinished(run_id="", kind="preserve", ok=False))
_SUBSCRIBED = _tag_prefix(Subscribed())


class RunFinishedListener:
    """A subscriber of ``events.sock`` that receives ``RunFinished`` events and nothing else.

    The daemon publishes ``RunFinished`` after the run's last journal write (file and
    directory fsync'ed, supervisor/runs.py), so receiving it means the run is durably
    finished. The subscription is a topic prefix: the daemon's XPUB socket drops every
    other event (15,000 for a preserve of 5,000 guests) before sending, so listening
    costs the daemon next to nothing, unlike polling ``GetRun``, whose every answer
    carries the whole run.
    """

    def __init__(self, runtime_dir: Path, timeout_s: float = 5.0) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_EVENT_BYTES)
        sock.setsockopt(zmq.SUBSCRIBE, _RUN_FINISHED)
        sock.setsockopt(zmq.SUBSCRIBE, _SUBSCRIBED)
        sock.connect(f"ipc://{runtime_dir / EVENTS_SOCKET}")
        self._sock = sock
        # the daemon's welcome: the connection is up, so is our subscription
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            sock.close(linger=0)
            raise TimeoutError(f"no welcome from {runtime_dir / EVENTS_SOCKET} in {timeout_s:g}s")
        sock.recv()

    def wait(self, run_id: str, timeout_s: float) -> RunStatus:
        """Block until ``run_id`` has finished; return its record."""
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._sock.poll(left_ms, zmq.POLLIN):
                raise TimeoutError(f"run {run_id} did not finish within {timeout_s:g}s")
            event = codec.decode_event(self._sock.recv())
            if isinstance(event, RunFinished) and event.run_id == run_id:
                assert event.run is not None, "RunFinished carries the run"
                return event.run

    def close(self) -> None:
        self._sock.close(linger=0)


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process (0 once it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


@dataclass(frozen=True)
class TimedRun:
    run: RunStatus
    wall_s: float
    """Client's clock: from just before the request is sent until the ``RunFinished``
    event arrives, i.e. until every record of the run is on disk (see
    :class:`RunFinishedListener`): request, inventory, every action, journal."""
    daemon_s: float
    """The daemon's own ``finished_at - started_at``: it ends *before* the final
    journal write (runs.py sets ``finished_at`` first, as the journal records it)."""
    cpu_s: dict[str, float]
    """CPU seconds used during the run by "supervisor", "workers" and "libvirtd"."""


def timed_run(daemon: GuestwardenDaemon, request: Preserve | Restore,
              listener: RunFinishedListener, libvirtd_pid: int,
              timeout_s: float = 600.0) -> TimedRun:
    """Start a run with ``request``, wait until it is durably finished, and time it."""
    pids = {"supervisor": [daemon.pid], "workers": daemon.worker_pids(),
            "libvirtd": [libvirtd_pid]}
    before = {k: sum(cpu_s(p) for p in ps) for k, ps in pids.items()}
    started = time.monotonic()
    reply = daemon.request(request)
    if not isinstance(reply, Ok) or not reply.run_id:
        raise RuntimeError(f"{type(request).__name__} refused: {reply}")
    run = listener.wait(reply.run_id, timeout_s)
    wall = time.monotonic() - started
    used = {k: round(sum(cpu_s(p) for p in ps) - before[k], 3) for k, ps in pids.items()}
    assert run.finished_at is not None
    return TimedRun(run, wall, run.finished_at - run.started_at, used)


@dataclass(frozen=True)
class GuestCounts:
    total: int
    active: int
    managed_save: int


def guest_counts(conn: Any) -> GuestCounts:
    """How many guests libvirt has, how many run or are paused, how many have an image."""
    return GuestCounts(
        total=len(conn.listAllDomains(0)),
        active=len(conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)),
        managed_save=len(conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE)),
    )


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
    listener: RunFinishedListener | None = None
    stop = threading.Event()
    try:
        libvirtd.start()
        conn = libvirtd.keeper()
        remove_all(conn)
        define_guests(conn, "g", running=args.guests)
        (base / "gw").mkdir()
        daemon = GuestwardenDaemon(base / "gw", [libvirtd.test_uri], workers=args.workers)
        daemon.start()
        assert libvirtd.pid is not None
        listener = RunFinishedListener(daemon.runtime_dir)
        counted = subscribe_in_background(daemon, stop) if args.subscribe else None
        times: dict[str, list[float]] = {"preserve": [], "restore": []}
        for i in range(args.repeat):
            for kind, request in (("preserve", Preserve()), ("restore", Restore())):
                timed = timed_run(daemon, request, listener, libvirtd.pid)
                times[kind].append(timed.wall_s)
                cpu = ", ".join(f"{k} {v:.2f}" for k, v in timed.cpu_s.items())
                print(f"{i + 1}: {kind} of {len(timed.run.guests)} guests: {timed.wall_s:.2f} s "
                      f"(daemon's clock {timed.daemon_s:.2f} s), ok={timed.run.ok}, "
                      f"CPU s: {cpu}", flush=True)
        for kind, values in times.items():
            print(f"{kind}: median {statistics.median(values):.2f} s, "
                  f"min {min(values):.2f} s over {len(values)} runs")
        if counted is not None:
            time.sleep(0.5)  # let the subscriber drain what is on its way
            print(f"events received by the subscriber: {counted[0]}")
        return 0
    finally:
        stop.set()
        if listener is not None:
            listener.close()
        if daemon is not None:
            daemon.stop()
        libvirtd.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
