"""``make demo``: the real daemon against a private libvirtd, a preserve and a restore.

Starts an isolated libvirtd (nothing of the host's libvirt is touched), defines a few
dozen guests in libvirt's test driver, runs ``guestwarden daemon`` with a worker pool,
and shows ``status``, ``plan``, ``preserve --wait`` and ``restore --wait`` exactly as a
user would type them. Everything it started is stopped at the end, also on Ctrl-C.
With ``--guests qemu`` the guests are a few tiny real QEMU guests (testbed/qemudemo.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from testbed import qemudemo
from testbed.daemon import GuestwardenDaemon
from testbed.guests import define_guests
from testbed.libvirtd import IsolatedLibvirtd, find_requirement_problems

STATE_NAMES = {1: "running", 2: "running", 3: "paused", 5: "off"}


def summary(conn: Any) -> str:
    counts = Counter(STATE_NAMES.get(d.state()[0], "other") for d in conn.listAllDomains(0))
    images = len(conn.listAllDomains(1 << 8))  # VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE
    return (", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
            + f"; {images} with a managed-save image")


def banner(text: str) -> None:
    print(f"\n\033[1m=== {text}\033[0m", flush=True)


def show(daemon: GuestwardenDaemon, *args: str) -> int:
    print(f"$ guestwarden {' '.join(args)}", flush=True)
    result = daemon.cli(*args)
    sys.stdout.write(result.stdout)
    sys.stdout.write(result.stderr)
    sys.stdout.flush()
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.demo")
    parser.add_argument("--guests", choices=["test", "qemu"], default="test",
                        help="test: libvirt's test driver guests in the private libvirtd; "
                        "qemu: three tiny real QEMU guests there")
    args = parser.parse_args(argv)
    qemu = args.guests == "qemu"
    problems = find_requirement_problems(qemu=qemu)
    if problems:
        print("demo cannot run: " + "; ".join(problems) + " (run `make deps`)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="gw-demo-", dir="/tmp"))
    libvirtd = IsolatedLibvirtd(base / "lv")
    daemon: GuestwardenDaemon | None = None
    try:
        banner(f"starting a private libvirtd under {base} ({args.guests} guests)")
        libvirtd.start()
        if qemu:
            conn = qemudemo.start_guests(libvirtd, base)
        else:
            conn = libvirtd.keeper()
            for dom in conn.listAllDomains(0):  # the test driver's sample guest
                dom.destroy()
                dom.undefine()
            define_guests(conn, "web", running=16)
            define_guests(conn, "db", running=6, paused=2)
            define_guests(conn, "idle", off=4)
            define_guests(conn, "ci", transient_running=6)
        print(f"guests: {summary(conn)}")

        banner("starting the guestwarden daemon (4 workers)")
        (base / "gw").mkdir()
        if qemu:
            daemon = GuestwardenDaemon(base / "gw", [libvirtd.qemu_uri],
                                       **qemudemo.DAEMON_OPTIONS)
        else:
            daemon = GuestwardenDaemon(base / "gw", [libvirtd.test_uri], workers=4,
                                       shutdown={"parallel_save": 2, "parallel_shutdown": 4})
        daemon.start()
        print(f"config: {daemon.config}")
        print(daemon.config.read_text())
        show(daemon, "status")

        banner("what a host shutdown would do")
        show(daemon, "plan")

        banner("preserve (what the host shutdown runs)")
        watcher = qemudemo.StatusDuringSaves(daemon) if qemu else None
        rc = show(daemon, "preserve", "--wait")
        print(f"exit status {rc}; guests now: {summary(conn)}")
        if watcher is not None and watcher.finish():
            print("\n`guestwarden status` while the saves ran:")
            sys.stdout.write(watcher.seen)

        banner("restore (what the next boot runs)")
        rc2 = show(daemon, "restore", "--wait")
        print(f"exit status {rc2}; guests now: {summary(conn)}")
        if qemu:
            print("\nwhat the restore says about each guest:")
            for line in qemudemo.restore_details(daemon):
                print(f"  {line}")
        show(daemon, "status")
        return 0 if rc == rc2 == 0 else 1
    finally:
        banner("stopping everything the demo started")
        if daemon is not None:
            print(f"daemon stopped with status {daemon.stop()}")
        libvirtd.stop()
        print("libvirtd stopped")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
