"""``parallel_save = "auto"``: add concurrent saves only while write throughput still rises.

Whether two saves at once write faster than one depends on the storage (one NVMe
queue fills with one writer on some machines, a RAID or a network store may want
eight), on the guests (QEMU skips zero pages) and on what else the host does while
it shuts down. So the bound is found while saving, hill-climbing on measurements:

* start with one save at a time;
* measure each level: the bytes of the saves that *started* at this level, divided by
  the time from when the level took effect to the last of them finishing; judge a
  level once as many of its saves as it has slots have finished;
* the first level always tries a second slot; a further slot only when the last
  one gave at least ``MIN_GAIN`` more throughput than the level below it;
* otherwise go back to the best level and stay there for the rest of the run.

The bytes of a save are the guest's memory as the inventory saw it (what a
managed-save image is about); the time comes from the supervisor's clock when the
save was handed out and when its result came back. Time is injected, so the unit
tests feed measurements without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

MIN_GAIN = 0.10
"""A further slot must have raised throughput by at least this share."""


def _mb_per_s(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:.0f} MB/s"


class SaveThroughputController:
    """Decides the save bound from measured throughput; no asyncio, no I/O."""

    def __init__(self, ceiling: int, *, min_gain: float = MIN_GAIN,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ceiling = max(1, ceiling)
        self.min_gain = min_gain
        self.clock = clock
        self.limit = 1
        self.settled = self.ceiling == 1
        self.measured: dict[int, float] = {}
        """Bytes per second measured at each level tried."""
        self._since: float | None = None
        self._bytes = 0
        self._saves = 0
        self._last_end = 0.0

    def save_started(self) -> None:
        """A save was handed out; the first one starts the measurement of level 1."""
        if self._since is None:
            self._since = self.clock()

    def save_finished(self, nbytes: int, started: float, finished: float) -> int | None:
        """A save that wrote ``nbytes`` ran from ``started`` to ``finished``: the new
        bound when this measurement changes it, else None."""
        if self.settled or self._since is None or started < self._since or nbytes <= 0:
            return None  # it began under the previous level: it says nothing of this one
        self._bytes += nbytes
        self._saves += 1
        self._last_end = max(self._last_end, finished)
        if self._saves < self.limit or self._last_end <= self._since:
            return None
        level = self.limit
        rate = self._bytes / (self._last_end - self._since)
        self.measured[level] = rate
        below = self.measured.get(level - 1)
        if below is not None and rate < below * (1 + self.min_gain):
            self.limit, self.settled = level - 1, True
            log.info("parallel_save auto: %d saves at once write %s, %+.0f%% over %d: not "
                     "worth it; staying at %d for this run", level, _mb_per_s(rate),
                     100 * (rate / below - 1), level - 1, level - 1)
            return self.limit
        gain = "" if below is None else f" ({100 * (rate / below - 1):+.0f}% over {level - 1})"
        if level >= self.ceiling:
            self.settled = True
            log.info("parallel_save auto: %d saves at once write %s%s; the most allowed "
                     "here, staying there", level, _mb_per_s(rate), gain)
            return None
        self.limit = level + 1
        self._since, self._bytes, self._saves = self.clock(), 0, 0
        log.info("parallel_save auto: %d save%s at once write%s %s%s: trying %d",
                 level, "s" if level > 1 else "", "" if level > 1 else "s",
                 _mb_per_s(rate), gain, self.limit)
        return self.limit


class AdaptiveSaveSlots:
    """The save bound for ``auto``: an async context manager like a semaphore, whose
    limit the controller moves. Waiters are served first come, first served, so the
    longest-expected-first order of preserve is kept."""

    def __init__(self, controller: SaveThroughputController) -> None:
        self.controller = controller
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        return self.controller.limit

    async def __aenter__(self) -> None:
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # the slot is counted for us when we are woken
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.in_use -= 1
                    self._wake()
                else:
                    self._waiters.remove(waiter)
                raise
        self.controller.save_started()

    async def __aexit__(self, *exc: object) -> None:
        self.in_use -= 1
        self._wake()

    def finished(self, nbytes: int, started: float, finished: float) -> None:
        """Feed a finished save to the controller; a higher limit wakes waiters now."""
        if self.controller.save_finished(nbytes, started, finished) is not None:
            self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)
