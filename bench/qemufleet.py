"""Real QEMU guests in a private libvirtd, with the real daemon, for a benchmark section.

``qemu_fleet(prefix, specs, workers=..., shutdown=...)`` starts an
:class:`~testbed.libvirtd.IsolatedLibvirtd` in a short temp dir, defines and boots the
guests (in parallel; each waits until it says READY on its console), starts the real
``guestwarden daemon`` on the qemu driver, and at the end stops the daemon, destroys
and undefines the guests (waiting by pid until every QEMU is gone) and stops libvirtd.

``Fleet.reconfigure(shutdown=...)`` rewrites the daemon's config file and sends it a
``Reload``: every ``[shutdown]`` key is live from the next run on (supervisor/reload.py),
so one daemon serves every configuration a section compares.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from guestwarden.ipc.messages import GetRun, Preserve, Reload, Reloaded, RunReply, RunStatus
from testbed.daemon import GuestwardenDaemon, wait_for, write_config
from testbed.guestimage import build_guest_image
from testbed.libvirtd import IsolatedLibvirtd, find_requirement_problems
from testbed.qemuguests import GuestSpec, QemuGuest, boot, define_guests, qemu_pid, remove

RUN_TIMEOUT_S = 300.0


@dataclass
class Fleet:
    base: Path
    libvirtd: IsolatedLibvirtd
    conn: Any
    guests: dict[str, QemuGuest]
    daemon: GuestwardenDaemon

    @property
    def save_dir(self) -> Path:
        """Where this libvirtd's qemu driver writes managed-save images: its
        /var/lib/libvirt/qemu/save, i.e. ``lib/qemu/save`` under its base dir."""
        return self.libvirtd.base_dir / "lib" / "qemu" / "save"

    def reconfigure(self, *, shutdown: Mapping[str, Any]) -> None:
        """Replace the ``[shutdown]`` table of the daemon's config and reload it."""
        settings = tomllib.loads(self.daemon.config.read_text())
        settings["shutdown"] = {**settings.get("shutdown", {}), **shutdown}
        write_config(self.daemon.config, settings)
        reply = self.daemon.request(Reload(), timeout_s=30.0)
        if not isinstance(reply, Reloaded):
            raise RuntimeError(f"reload refused: {reply}")

    def start_preserve(self) -> str:
        reply = self.daemon.request(Preserve(), timeout_s=30.0)
        run_id = getattr(reply, "run_id", "")
        if not run_id:
            raise RuntimeError(f"preserve refused: {reply}")
        return str(run_id)

    def finished_run(self, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> RunStatus:
        """The run once it has finished (polled; its times are the daemon's own clock)."""
        def done() -> RunStatus | None:
            reply = self.daemon.request(GetRun(run_id=run_id), timeout_s=30.0)
            if not isinstance(reply, RunReply):
                raise RuntimeError(f"GetRun {run_id}: {reply}")
            return reply.run if reply.run.finished_at is not None else None

        return wait_for(done, timeout_s, f"run {run_id} to finish", interval_s=0.1)

    def qemu_pids(self) -> list[int]:
        pids = (qemu_pid(self.libvirtd.base_dir / "run", name) for name in self.guests)
        return [pid for pid in pids if pid is not None]


@contextlib.contextmanager
def qemu_fleet(
    prefix: str,
    specs: Sequence[GuestSpec],
    *,
    workers: int,
    shutdown: Mapping[str, Any] | None = None,
    advanced: Mapping[str, Any] | None = None,
) -> Iterator[Fleet]:
    """Everything a section needs, stopped by pid whatever happens (see the module doc)."""
    problems = find_requirement_problems(qemu=True)
    if problems:
        raise RuntimeError("cannot run real QEMU guests here (make deps installs what is "
                           f"missing): {'; '.join(problems)}")
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    libvirtd = IsolatedLibvirtd(base / "lv")
    conn: Any = None
    guests: dict[str, QemuGuest] = {}
    daemon: GuestwardenDaemon | None = None
    try:
        libvirtd.start()
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        conn = libvirt.open(libvirtd.qemu_uri)
        (base / "consoles").mkdir()
        guests = define_guests(conn, build_guest_image(), specs, base / "consoles")
        boot(guests.values())
        (base / "gw").mkdir()
        save_dir = libvirtd.base_dir / "lib" / "qemu" / "save"
        daemon = GuestwardenDaemon(
            base / "gw", [libvirtd.qemu_uri], workers=workers,
            shutdown={"save_dir": str(save_dir), **(shutdown or {})},
            advanced=advanced,
        )
        daemon.start(timeout_s=120.0)
        yield Fleet(base, libvirtd, conn, guests, daemon)
    finally:
        if daemon is not None:
            daemon.stop()
        with contextlib.suppress(Exception):
            remove(guests.values(), libvirtd.base_dir / "run")
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        libvirtd.stop()
        shutil.rmtree(base, ignore_errors=True)
