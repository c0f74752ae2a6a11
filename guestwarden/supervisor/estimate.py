"""How long preserve is expected to take, to compare with logind's ``InhibitDelayMaxUSec``.

logind waits for our delay inhibitor at most ``InhibitDelayMaxUSec`` (5 s unless a
``logind.conf.d`` drop-in raises it); past that it shuts down anyway and QEMU is
killed. So status and the log warn when the estimate below is longer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from guestwarden.conf.settings import Settings
from guestwarden.ipc.messages import GuestInfo
from guestwarden.supervisor.plan import chain_for

SAVE_BYTES_PER_S = 500 * 10**6
"""Assumed disk write bandwidth for managed-save images: a SATA SSD, or a slow NVMe
under load. Deliberately modest; a faster disk only makes the warning conservative."""
SAVE_OVERHEAD_S = 1.0
"""Per save, on top of writing the memory (pausing, device state, fsync)."""
POWEROFF_S = 1.0


def estimate_preserve_s(guests: Iterable[GuestInfo], settings: Settings) -> float:
    """Seconds preserve is expected to take for these guests, estimated simply.

    Each running or paused guest is counted under the first action of its chain:

    * **save**: the images go to the same disks, so saves are bound by write
      bandwidth, not by ``parallel_save``: (sum of the guests' memory) /
      ``SAVE_BYTES_PER_S``, plus ``SAVE_OVERHEAD_S`` per guest shared among the
      ``parallel_save`` slots.
    * **shutdown**: we cannot know how fast a guest reacts to the request, and one
      that ignores it takes the whole ``shutdown_timeout`` before it is powered off;
      logind must cover that or the guest is killed. So: ceil(n / ``parallel_shutdown``)
      waves of ``shutdown_timeout`` (one wave when the bound is 0, i.e. none).
    * **poweroff**: ``POWEROFF_S`` each, all at once.

    Saves and graceful shutdowns run at the same time under separate bounds, so the
    estimate is the longest of the three. Fallbacks after a failed action are not
    counted: they are not expected.
    """
    shutdown = settings.shutdown
    save_bytes = 0
    saves = shutdowns = poweroffs = 0
    for guest in guests:
        chain = chain_for(guest, settings)
        if not chain:
            continue
        if chain[0] == "save":
            saves += 1
            save_bytes += guest.memory_kib * 1024
        elif chain[0] == "shutdown":
            shutdowns += 1
        else:
            poweroffs += 1
    # "auto" adds saves only while throughput rises: count its overhead as one at a time
    slots = shutdown.parallel_save if isinstance(shutdown.parallel_save, int) else 1
    save_s = save_bytes / SAVE_BYTES_PER_S + saves * SAVE_OVERHEAD_S / slots if saves else 0.0
    waves = math.ceil(shutdowns / shutdown.parallel_shutdown) if shutdown.parallel_shutdown else 1
    shutdown_s = waves * shutdown.shutdown_timeout if shutdowns else 0.0
    poweroff_s = POWEROFF_S if poweroffs else 0.0
    return round(max(save_s, shutdown_s, poweroff_s), 1)


def delay_warning(delay_max_s: float | None, estimate_s: float | None, guests: int) -> str:
    """The warning for status and the log, or "" when logind's limit is long enough."""
    if delay_max_s is None or estimate_s is None or estimate_s <= delay_max_s:
        return ""
    return (f"logind waits at most {delay_max_s:g}s for the shutdown inhibitor "
            f"(InhibitDelayMaxUSec) but preserving the {guests} running guests is expected to "
            f"take about {estimate_s:g}s: raise InhibitDelayMaxSec with a drop-in in "
            f"/etc/systemd/logind.conf.d/ and reload systemd-logind")
