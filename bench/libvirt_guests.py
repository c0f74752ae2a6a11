"""Debian's ``/usr/lib/libvirt/libvirt-guests.sh``, run for comparison in a private directory.

The script reads its settings from ``$sysconfdir/default/libvirt-guests`` and keeps its
list of saved guests and its lock file under ``$localstatedir``: both are the host's
real paths (``/etc``, ``/var``). To run it against the benchmark's private libvirtd
without touching the host, a copy is made whose two assignments
``sysconfdir="/etc"`` and ``localstatedir="/var"`` point into a work directory; every
other line (the ``sleep 1`` per saved guest, the polling of ``virsh``) is Debian's,
unchanged. If a future Debian changes those two lines, :class:`LibvirtGuestsScript`
refuses to run rather than measure something else.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEBIAN_SCRIPT = Path("/usr/lib/libvirt/libvirt-guests.sh")
_MOVED = {'sysconfdir="/etc"': "etc", 'localstatedir="/var"': "var"}


@dataclass(frozen=True)
class ScriptRun:
    action: str
    wall_s: float
    returncode: int
    output: str


class LibvirtGuestsScript:
    def __init__(self, workdir: Path, script: Path = DEBIAN_SCRIPT) -> None:
        self.workdir = workdir
        text = script.read_text()
        for line, sub in _MOVED.items():
            if text.count(line) != 1:
                raise RuntimeError(f"{script}: expected the line {line!r} once; "
                                   "this copy of libvirt-guests.sh is not the one measured")
            text = text.replace(line, f'{line.split("=")[0]}="{workdir / sub}"')
        (workdir / "etc" / "default").mkdir(parents=True, exist_ok=True)
        (workdir / "var" / "lib" / "libvirt").mkdir(parents=True, exist_ok=True)
        (workdir / "var" / "lock").mkdir(parents=True, exist_ok=True)
        self.path = workdir / "libvirt-guests.sh"
        self.path.write_text(text)
        self.path.chmod(0o755)

    @property
    def list_file(self) -> Path:
        """Where the script remembers the guests it saved or shut down."""
        return self.workdir / "var" / "lib" / "libvirt" / "libvirt-guests"

    def configure(self, settings: Mapping[str, str | int]) -> None:
        """Write the config file the script sources (e.g. URIS, ON_SHUTDOWN)."""
        lines = [f"{key}={shlex.quote(str(value))}" for key, value in settings.items()]
        (self.workdir / "etc" / "default" / "libvirt-guests").write_text("\n".join(lines) + "\n")

    def run(self, action: str, timeout_s: float = 3600.0) -> ScriptRun:
        """Run ``libvirt-guests.sh ACTION`` (start, stop, ...) and time it."""
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        started = time.monotonic()
        proc = subprocess.run(["/bin/sh", str(self.path), action], env=env, text=True,
                              stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout_s, check=False)
        wall = time.monotonic() - started
        return ScriptRun(action, wall, proc.returncode, proc.stdout + proc.stderr)
