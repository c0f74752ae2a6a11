"""The real-guest part of ``make demo GUESTS=qemu`` (testbed/demo.py runs the show).

Three tiny QEMU guests (testbed/guestimage.py, software emulation) in the demo's
private libvirtd: ``web-1`` (plain), ``db-1`` (256 MiB of its memory filled, so its
save takes long enough for ``guestwarden status`` to show progress) and ``legacy-1``
(no guest agent: its clock cannot be synced after the restore, which is reported).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import libvirt

from testbed.daemon import GuestwardenDaemon
from testbed.guestimage import build_guest_image
from testbed.libvirtd import IsolatedLibvirtd
from testbed.qemuguests import GuestSpec, boot, define_guests

SPECS = (
    GuestSpec("web-1"),
    GuestSpec("db-1", "gw.dirty_mib=256", memory_mib=384),
    GuestSpec("legacy-1", "gw.no_agent=1"),
)
DAEMON_OPTIONS: dict[str, Any] = {
    "workers": 4,
    "shutdown": {"parallel_save": 2, "parallel_shutdown": 4},
    "boot": {"sync_time_timeout": 5.0},
    "advanced": {"progress_interval": 0.2},
}


def start_guests(libvirtd: IsolatedLibvirtd, console_dir: Path) -> Any:
    """Define and boot the guests (in parallel); the connection to their driver."""
    print("building (or reusing) the tiny guest image ...", flush=True)
    image = build_guest_image()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(libvirtd.qemu_uri)
    guests = define_guests(conn, image, SPECS, console_dir)
    print(f"booting {', '.join(guests)} (QEMU, software emulation) ...", flush=True)
    boot(guests.values())
    return conn


class StatusDuringSaves:
    """Captures one ``guestwarden status`` that shows a save's progress, while the
    preserve runs in the foreground (printed afterwards, so the outputs do not mix)."""

    def __init__(self, daemon: GuestwardenDaemon) -> None:
        self._daemon = daemon
        self._stop = threading.Event()
        self.seen = ""
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set() and not self.seen:
            result = self._daemon.cli("status")
            if "% of" in result.stdout:  # the PROGRESS column of a running save
                self.seen = result.stdout

    def finish(self) -> str:
        self._stop.set()
        self._thread.join(10.0)
        return self.seen


def restore_details(daemon: GuestwardenDaemon) -> list[str]:
    """What the last restore says about each guest (clock offsets, failed syncs)."""
    data = json.loads((daemon.state_dir / "journal.json").read_text())
    return [f"{g['name']}: {g['outcome']}: {g['detail']}"
            for g in (data.get("restore") or {}).get("guests", ())]
