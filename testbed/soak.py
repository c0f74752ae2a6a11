"""``make soak MINUTES=N``: preserve and restore 200 guests in a loop while workers die.

Each round records the guests' states, runs ``preserve --wait`` while a chaos thread
SIGKILLs random workers, checks that no guest is left running, runs ``restore
--wait`` (also under chaos), and checks that every guest is back in the state it
had. It reports guests lost (not back as they were, or an image left behind), left
running after preserve, and handled twice (brought back more than once in a run),
and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from guestwarden.workers.actions import STARTED_BY_EARLIER_ATTEMPT
from testbed.daemon import GuestwardenDaemon
from testbed.guests import define_guests, remove_all
from testbed.libvirtd import IsolatedLibvirtd, find_requirement_problems

STATES = {1: "running", 2: "running", 3: "paused", 5: "shutoff"}
MANAGEDSAVE = 1 << 10  # VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE


def states(conn: Any) -> dict[str, str]:
    return {d.name(): STATES.get(d.state()[0], "other") for d in conn.listAllDomains(0)}


def persistent_names(conn: Any) -> set[str]:
    return {d.name() for d in conn.listAllDomains(1 << 2)}  # VIR_CONNECT_LIST_DOMAINS_PERSISTENT


class Chaos(threading.Thread):
    """Kills a random worker of the daemon every ``period_s`` (jittered) while running."""

    def __init__(self, daemon: GuestwardenDaemon, period_s: float, seed: int) -> None:
        super().__init__(daemon=True, name="chaos")
        self.daemon_under_test = daemon
        self.period_s = period_s
        self.random = random.Random(seed)
        self.stop_event = threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.stop_event.wait(self.random.uniform(0.2, 1.8) * self.period_s):
            pids = self.daemon_under_test.worker_pids()
            if pids:
                try:
                    psutil.Process(self.random.choice(pids)).send_signal(signal.SIGKILL)
                    self.kills += 1
                except psutil.Error:
                    pass

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5.0)


def one_round(daemon: GuestwardenDaemon, conn: Any, chaos_period_s: float,
              seed: int) -> Counter[str]:
    problems: Counter[str] = Counter()
    before = states(conn)
    persistent = persistent_names(conn)
    chaos = Chaos(daemon, chaos_period_s, seed)
    chaos.start()
    try:
        preserve = daemon.cli("preserve", "--wait", timeout_s=600)
    finally:
        chaos.stop()
    problems["worker kills"] += chaos.kills
    after_preserve = states(conn)
    problems["left running"] += sum(1 for s in after_preserve.values() if s != "shutoff")
    chaos = Chaos(daemon, chaos_period_s, seed + 1)
    chaos.start()
    try:
        restore = daemon.cli("restore", "--wait", timeout_s=600)
    finally:
        chaos.stop()
    after = states(conn)
    problems["lost"] += sum(1 for n in persistent if after.get(n) != before[n])
    problems["lost"] += len(conn.listAllDomains(MANAGEDSAVE))
    journal = json.loads((daemon.state_dir / "journal.json").read_text())
    run = journal["restore"] or {"guests": []}
    names = Counter(g["name"] for g in run["guests"])
    problems["handled twice"] += sum(n - 1 for n in names.values() if n > 1)
    # a start whose worker died after libvirt started the guest is dispatched again,
    # finds it started and finishes it (actions.py): one start as far as the guest is
    # concerned, counted apart
    problems["starts re-dispatched"] += sum(
        1 for g in run["guests"]
        if STARTED_BY_EARLIER_ATTEMPT in g["detail"] and after_preserve.get(g["name"]) == "shutoff"
    )
    problems["worker kills"] += chaos.kills
    if preserve.returncode or restore.returncode:
        problems["failed runs"] += 1
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.soak")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--guests", type=int, default=200)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--chaos-period", type=float, default=0.15,
                        help="seconds between worker kills, on average")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    problems = find_requirement_problems()
    if problems:
        print("soak cannot run: " + "; ".join(problems) + " (run `make deps`)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="gw-soak-", dir="/tmp"))
    libvirtd = IsolatedLibvirtd(base / "lv")
    daemon: GuestwardenDaemon | None = None
    total: Counter[str] = Counter()
    try:
        libvirtd.start()
        conn = libvirtd.keeper()
        remove_all(conn)
        n = args.guests
        define_guests(conn, "p", running=n * 6 // 10, paused=n // 10, off=n // 10)
        define_guests(conn, "t", transient_running=n - n * 8 // 10)
        (base / "gw").mkdir()
        daemon = GuestwardenDaemon(base / "gw", [libvirtd.test_uri], workers=args.workers,
                                   shutdown={"parallel_save": 4, "parallel_shutdown": 8},
                                   advanced={"max_attempts": 5, "heartbeat_timeout": 3.0})
        daemon.start()
        deadline = time.monotonic() + args.minutes * 60
        rounds = 0
        while rounds == 0 or time.monotonic() < deadline:
            rounds += 1
            result = one_round(daemon, conn, args.chaos_period, args.seed + 2 * rounds)
            total.update(result)
            print(f"round {rounds}: " + ", ".join(f"{k} {v}" for k, v in sorted(result.items())),
                  flush=True)
            # transient guests do not come back: make new ones for the next round
            define_guests(conn, f"t{rounds}", transient_running=n - n * 8 // 10)
        info = ("worker kills", "starts re-dispatched")
        bad = {k: v for k, v in total.items() if k not in info and v}
        print(f"soak: {rounds} rounds, {total['worker kills']} workers killed; "
              + (", ".join(f"{k} {v}" for k, v in sorted(bad.items())) or "no guest lost, "
                 "none left running, none handled twice"))
        return 1 if bad else 0
    finally:
        if daemon is not None:
            daemon.stop()
        libvirtd.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
