"""Run the real ``guestwarden daemon`` and CLI as separate processes, for tests and the demo.

``GuestwardenDaemon`` writes a config, starts ``python -m guestwarden daemon`` with it,
waits (with a deadline) until the control socket answers with every worker ready,
and stops it by pid: SIGTERM, then SIGKILL after a grace period, and the worker
processes too if any outlived it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import psutil

from guestwarden.ipc.client import ControlClient, Unreachable
from guestwarden.ipc.messages import GetStatus, Reply, Request, Status

_T = TypeVar("_T")


def wait_for(
    condition: Callable[[], _T | None], timeout_s: float, what: str, interval_s: float = 0.05
) -> _T:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, settings: Mapping[str, Any]) -> Path:
    """Top-level keys first, then one table per nested mapping."""
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items() if not isinstance(v, Mapping)]
    for table, values in settings.items():
        if isinstance(values, Mapping):
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(config: Path, *args: str, timeout_s: float = 120.0,
            env: Mapping[str, str] | None = None) -> CliResult:
    """Run ``guestwarden --config CONFIG ARGS...`` as a real process."""
    proc = subprocess.run(
        [sys.executable, "-m", "guestwarden", "--config", str(config), *args],
        capture_output=True, text=True, timeout=timeout_s,
        env={**os.environ, **(env or {})},
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


HOST_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "DBUS_SYSTEM_BUS_ADDRESS")


def daemon_env(base_dir: Path, env: Mapping[str, str] | None) -> dict[str, str]:
    """The daemon's environment: ours, but never the host's logind or systemd.

    Without an explicit ``DBUS_SYSTEM_BUS_ADDRESS`` the daemon is pointed at a socket
    that does not exist (no inhibitor, "unavailable"), and the test's own
    ``NOTIFY_SOCKET``/``WATCHDOG_*`` (a CI run under systemd) are dropped, so a test
    daemon never takes a real inhibitor or talks to the real service manager.
    """
    out = {k: v for k, v in os.environ.items() if k not in HOST_ENV}
    out["DBUS_SYSTEM_BUS_ADDRESS"] = f"unix:path={base_dir}/no-system-bus"
    out.update(env or {})
    return out


class GuestwardenDaemon:
    def __init__(
        self,
        base_dir: Path,
        uris: Sequence[str],
        *,
        workers: int = 3,
        shutdown: Mapping[str, Any] | None = None,
        boot: Mapping[str, Any] | None = None,
        advanced: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        boot_id: str = "boot-1",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.env = daemon_env(base_dir, env)
        self.state_dir = base_dir / "state"
        self.runtime_dir = base_dir / "run"
        self.log_path = base_dir / "daemon.log"
        self.boot_id_path = base_dir / "boot_id"
        self.boot_id_path.write_text(boot_id + "\n")
        # where the daemon looks for libvirt-guests.service and qemu.conf (dueling.py):
        # an empty tree, so that the host's own setup never changes a test
        self.host_root = base_dir / "host"
        settings: dict[str, Any] = {
            "uris": list(uris),
            "state_dir": str(self.state_dir),
            "runtime_dir": str(self.runtime_dir),
            "workers": workers,
            **(extra or {}),
            "shutdown": dict(shutdown or {}),
            "boot": {"on_boot": "ignore", **(boot or {})},
            "advanced": {"connect_timeout": 10.0, **(advanced or {})},
        }
        self.config = write_config(base_dir / "guestwarden.toml", settings)
        self.process: subprocess.Popen[bytes] | None = None
        self.client = ControlClient(self.runtime_dir, timeout_s=10.0)
        self._log: Any = None

    # ------------------------------------------------------------------ life

    def start(self, timeout_s: float = 30.0, *, expect_workers: int | None = None) -> Status:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "guestwarden", "--config", str(self.config), "daemon",
             "--boot-id-file", str(self.boot_id_path), "--log-level", "DEBUG",
             "--dueling-root", str(self.host_root)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
        )
        return self.wait_ready(timeout_s, expect_workers=expect_workers)

    def wait_ready(self, timeout_s: float = 30.0, *, expect_workers: int | None = None) -> Status:
        def ready() -> Status | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n"
                                   + self.log_tail())
            status = self.try_status()
            if status is None or status.state == "starting":
                return None
            wanted = status.workers_target if expect_workers is None else expect_workers
            idle_or_busy = [w for w in status.workers if w.state in ("idle", "busy")]
            return status if len(idle_or_busy) >= wanted else None

        return wait_for(ready, timeout_s, "the daemon and its workers to be ready")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL; also kills worker processes that outlived it."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5.0)
        for pid in self.worker_pids():  # none, unless something went wrong
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the supervisor alone (workers notice and exit by themselves)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10.0)

    def __enter__(self) -> GuestwardenDaemon:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ talk

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def worker_pids(self) -> list[int]:
        """Every worker of this daemon, also orphans of a killed supervisor.

        Found by the worker endpoint in their command line, which names this
        daemon's runtime_dir and nobody else's.
        """
        endpoint = f"ipc://{self.runtime_dir}/workers.sock"
        pids = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if "guestwarden.workers" in cmdline and endpoint in cmdline:
                pids.append(proc.pid)
        return pids

    def request(self, request: Request, timeout_s: float | None = None) -> Reply:
        return self.client.request(request, timeout_s)

    def try_status(self) -> Status | None:
        try:
            reply = self.client.request(GetStatus(), timeout_s=2.0)
        except Unreachable:
            return None
        return reply if isinstance(reply, Status) else None

    def status(self) -> Status:
        reply = self.client.request(GetStatus())
        assert isinstance(reply, Status), reply
        return reply

    def cli(self, *args: str, timeout_s: float = 120.0) -> CliResult:
        return run_cli(self.config, *args, timeout_s=timeout_s)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")
