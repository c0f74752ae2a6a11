"""Room for managed-save images, decided before anything is written.

A managed-save image is about the guest's memory in use. A save that runs out of
space midway fails after minutes of writing and may leave the disk full for the
saves after it, so each save first reserves its guest's memory (plus a margin)
against the free space of the save directory, counting the reservations of saves
still running. A guest that does not fit goes straight to its next action.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MIB = 1 << 20


def free_bytes(path: str) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def is_local(uri: str) -> bool:
    """A URI naming a host (qemu+ssh://host/system) saves on that host, not here."""
    return not urlsplit(uri).hostname


class SpaceBudget:
    def __init__(
        self,
        save_dir: str,
        reserve_mib: int,
        free: Callable[[str], int] = free_bytes,
    ) -> None:
        self.save_dir = save_dir
        self.reserve_bytes = reserve_mib * MIB
        self.free = free
        self._held: dict[str, int] = {}
        self._warned = False

    def try_reserve(self, key: str, uri: str, memory_bytes: int) -> str | None:
        """Reserve room for one image; None if it fits, else why it does not."""
        if not self.save_dir or not is_local(uri) or memory_bytes <= 0:
            return None
        try:
            free = self.free(self.save_dir)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot check free space of save_dir %s (%s): not checking",
                            self.save_dir, exc.strerror)
            return None
        available = free - sum(self._held.values()) - self.reserve_bytes
        if memory_bytes > available:
            return (f"not enough free space for its managed-save image in {self.save_dir}: "
                    f"needs {memory_bytes / MIB:.0f} MiB, {max(available, 0) / MIB:.0f} MiB "
                    f"available ({free / MIB:.0f} MiB free, {self.reserve_bytes / MIB:.0f} MiB "
                    f"kept in reserve, {sum(self._held.values()) / MIB:.0f} MiB held by "
                    "saves in progress)")
        self._held[key] = memory_bytes
        return None

    def release(self, key: str) -> None:
        self._held.pop(key, None)
