"""A real pseudo-terminal for tests: a private tmux server running one command.

``TmuxTerminal`` starts its own tmux server (a socket in a directory of the test's,
no user config) with a window of a given size running the command, and reads the
screen as a person would see it (``capture-pane``). The pane stays after the command
ends (``remain-on-exit``), so the last screen can be read. The exit status comes from
a small wrapper that runs the command and writes it to a file: tmux 3.3 here does not
always notice that a pane's process ended (it stays a zombie, the pane "alive"). On
close it kills the server and then, by pid, anything of it still alive.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import psutil

from testbed.daemon import wait_for

_WRAPPER = """
import os, signal, subprocess, sys
signal.signal(signal.SIGINT, lambda *_: None)  # Ctrl-C is for the command, not for us
status = subprocess.call(sys.argv[2:])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(status))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
"""


class TmuxTerminal:
    def __init__(self, base_dir: Path, *, width: int = 120, height: int = 40) -> None:
        tmux = shutil.which("tmux")
        if tmux is None:
            raise RuntimeError("tmux is not installed: apt-get install tmux (make deps)")
        self.tmux = tmux
        self.socket = base_dir / "tmux.sock"
        self.config = base_dir / "tmux.conf"
        self.config.write_text("set -g remain-on-exit on\nset -g history-limit 1000\n")
        self.width, self.height = width, height
        self.status_file = base_dir / "exit-status"
        self._processes: list[psutil.Process] = []
        """The server and the command: psutil remembers their start times, so a pid
        reused by the time of close() is never signalled."""

    def _tmux(self, *args: str) -> str:
        # the server's environment is this one's: without COLUMNS and LINES, which would
        # tell the command another size than its terminal's
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        proc = subprocess.run([self.tmux, "-S", str(self.socket), "-f", str(self.config),
                               *args], capture_output=True, text=True, timeout=30, check=False,
                              env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def start(self, command: Sequence[str]) -> None:
        """Run ``command`` (an argv, no shell) in a fresh pane of width x height."""
        self._tmux("new-session", "-d", "-s", "t", "-x", str(self.width), "-y",
                   str(self.height), sys.executable, "-c", _WRAPPER, str(self.status_file),
                   *command)
        for what in ("#{pid}", "#{pane_pid}"):  # the server, the wrapper
            with contextlib.suppress(psutil.Error):  # the command may be over already
                self._processes.append(
                    psutil.Process(int(self._tmux("display", "-p", "-t", "t", what))))

    def screen(self) -> str:
        """What the command wrote on the screen, one line per row, trailing spaces removed.

        With the lines scrolled above the screen: when the command ends, tmux scrolls
        the screen up by a line to print "Pane is dead (...)" at the bottom (that line
        is left out here).
        """
        lines = self._tmux("capture-pane", "-p", "-S", "-", "-t", "t").splitlines()
        return "\n".join(line.rstrip() for line in lines
                         if not line.startswith("Pane is dead ("))

    def send_keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def exit_status(self) -> int | None:
        """The command's exit status once it ended; None while it runs."""
        try:
            return int(self.status_file.read_text())
        except FileNotFoundError:
            return None

    def wait_exit(self, timeout_s: float) -> int:
        def ended() -> int | None:
            status = self.exit_status()
            return None if status is None else status + 1  # 0 would read as "not yet"

        try:
            return wait_for(ended, timeout_s, "the command in the terminal to end") - 1
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; its screen:\n{self.screen()}") from None

    def close(self) -> None:
        processes = list(self._processes)
        for process in self._processes:  # the command under the wrapper, if still there
            with contextlib.suppress(psutil.Error):
                processes += process.children(recursive=True)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._tmux("kill-server")
        for process in reversed(processes):
            with contextlib.suppress(psutil.Error):
                process.kill()
            with contextlib.suppress(psutil.Error):
                process.wait(5)
        self.socket.unlink(missing_ok=True)

    def __enter__(self) -> TmuxTerminal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
