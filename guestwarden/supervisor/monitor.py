"""Resource use of the supervisor and its workers, read with psutil."""

from __future__ import annotations

import os

import psutil


class Monitor:
    """Keeps one ``psutil.Process`` per pid so that ``cpu_percent`` measures an interval."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def usage(self, pid: int) -> tuple[int, float]:
        """(RSS bytes, CPU percent since the last call) of a process; zeros if gone."""
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)
            return proc.memory_info().rss, proc.cpu_percent(None)
        except psutil.Error:
            self._procs.pop(pid, None)
            return 0, 0.0

    def own_rss(self) -> int:
        return self.usage(os.getpid())[0]

    def forget_others(self, alive: set[int]) -> None:
        for pid in list(self._procs):
            if pid not in alive and pid != os.getpid():
                del self._procs[pid]
