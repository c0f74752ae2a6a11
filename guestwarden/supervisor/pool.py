"""Worker processes: spawn by exec, watch, classify exits, kill, respawn.

Workers are started with ``asyncio.create_subprocess_exec(..., close_fds=True)``,
never forked: a forked child would inherit the logind inhibitor fd and hold up the
host's shutdown for as long as it lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from guestwarden.conf.settings import AdvancedSettings

log = logging.getLogger(__name__)

CRASH_WINDOW_S = 5.0
"""A worker that dies sooner than this after its start counts towards crash backoff."""


@dataclass
class WorkerHandle:
    worker_id: str
    process: asyncio.subprocess.Process
    started_at: float
    retiring: bool = False
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid


def describe_exit(returncode: int) -> str:
    """Gunicorn-style: say whether it exited or was killed, and by what."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if -returncode == signal.SIGKILL:
        return f"killed by {name} (perhaps out of memory, or killed by hand)"
    return f"killed by {name}"


class WorkerPool:
    def __init__(
        self,
        *,
        endpoint: str,
        advanced: AdvancedSettings,
        log_level: str,
        on_spawn: Callable[[str, int], None],
        on_exit: Callable[[str, int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.advanced = advanced
        self.log_level = log_level
        self.on_spawn = on_spawn
        self.on_exit = on_exit
        self.clock = clock
        self.target = 0
        self.handles: dict[str, WorkerHandle] = {}
        self._next_id = 1
        self._recent_crashes = 0
        self._next_spawn_at = 0.0
        self._closing = False
        self._reconciling = asyncio.Lock()

    def active(self) -> list[WorkerHandle]:
        return [h for h in self.handles.values() if not h.retiring]

    def command(self, worker_id: str) -> list[str]:
        adv = self.advanced
        return [
            sys.executable, "-m", "guestwarden.workers",
            "--worker-id", worker_id,
            "--endpoint", self.endpoint,
            "--heartbeat-interval", str(adv.heartbeat_interval),
            "--heartbeat-timeout", str(adv.heartbeat_timeout),
            "--connect-timeout", str(adv.connect_timeout),
            "--progress-interval", str(adv.progress_interval),
            "--log-level", self.log_level,
        ]

    async def reconcile(self) -> None:
        """Start workers until ``target`` are active (with backoff after crashes)."""
        async with self._reconciling:  # one at a time, or two callers both spawn
            while not self._closing and len(self.active()) < self.target:
                if self.clock() < self._next_spawn_at:
                    return
                await self.spawn()

    async def spawn(self) -> WorkerHandle:
        worker_id = f"w{self._next_id}"
        self._next_id += 1
        process = await asyncio.create_subprocess_exec(
            *self.command(worker_id), stdin=asyncio.subprocess.DEVNULL, close_fds=True,
        )
        handle = WorkerHandle(worker_id=worker_id, process=process, started_at=self.clock())
        self.handles[worker_id] = handle
        handle.watcher = asyncio.create_task(self._watch(handle))
        log.info("worker=%s pid=%d spawned", worker_id, process.pid)
        self.on_spawn(worker_id, process.pid)
        return handle

    async def _watch(self, handle: WorkerHandle) -> None:
        returncode = await handle.process.wait()
        self.handles.pop(handle.worker_id, None)
        lived = self.clock() - handle.started_at
        level = logging.INFO if (handle.retiring or self._closing) and returncode == 0 else (
            logging.WARNING)
        log.log(level, "worker=%s pid=%d %s after %.1fs", handle.worker_id, handle.pid,
                describe_exit(returncode), lived)
        if not handle.retiring and not self._closing:
            if lived < CRASH_WINDOW_S:
                self._recent_crashes += 1
                delay = min(10.0, 0.1 * 2 ** self._recent_crashes)
                self._next_spawn_at = self.clock() + delay
                log.warning("worker crash backoff: next spawn in %.1fs", delay)
            else:
                self._recent_crashes = 0
        self.on_exit(handle.worker_id, returncode)

    def kill(self, worker_id: str, reason: str) -> None:
        handle = self.handles.get(worker_id)
        if handle is None or handle.process.returncode is not None:
            return
        log.warning("worker=%s pid=%d killed: %s", worker_id, handle.pid, reason)
        with contextlib.suppress(ProcessLookupError):
            handle.process.kill()

    def mark_retiring(self, worker_id: str) -> None:
        handle = self.handles.get(worker_id)
        if handle is not None:
            handle.retiring = True

    async def close(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the workers (already sent Stop), then KILL the rest."""
        self._closing = True
        watchers = [h.watcher for h in self.handles.values() if h.watcher is not None]
        if watchers:
            _done, pending = await asyncio.wait(watchers, timeout=grace_s)
            if pending:
                for handle in list(self.handles.values()):
                    self.kill(handle.worker_id, "did not stop in time")
                await asyncio.wait(pending, timeout=5.0)
