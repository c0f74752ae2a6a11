"""The prices of actions nothing was learned about yet, and logind's delay warning.

logind waits for our delay inhibitor at most ``InhibitDelayMaxUSec`` (5 s unless a
``logind.conf.d`` drop-in raises it); past that it shuts down anyway and QEMU is
killed. So status, plan and the log warn when the expected preserve (forecast.py,
which prices guests with these constants until it has learned their durations,
ordering.py) is longer.
"""

from __future__ import annotations

SAVE_BYTES_PER_S = 500 * 10**6
"""Assumed disk write bandwidth for managed-save images: a SATA SSD, or a slow NVMe
under load. Deliberately modest; a faster disk only makes the warning conservative."""
SAVE_OVERHEAD_S = 1.0
"""Per save, on top of writing the memory (pausing, device state, fsync)."""
POWEROFF_S = 1.0


def delay_warning(delay_max_s: float | None, estimate_s: float | None, guests: int) -> str:
    """The warning for status and the log, or "" when logind's limit is long enough."""
    if delay_max_s is None or estimate_s is None or estimate_s <= delay_max_s:
        return ""
    return (f"logind waits at most {delay_max_s:g}s for the shutdown inhibitor "
            f"(InhibitDelayMaxUSec) but preserving the {guests} running guests is expected to "
            f"take about {estimate_s:g}s: raise InhibitDelayMaxSec with a drop-in in "
            f"/etc/systemd/logind.conf.d/ and reload systemd-logind")
