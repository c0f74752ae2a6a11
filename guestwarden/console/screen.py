"""The live terminal view: a header, an overall bar with the time left, a row per guest.

Plain ANSI escapes and ``shutil.get_terminal_size`` (no curses, no library): the
view is redrawn in place below the command line, never in an alternate screen, so
that the last frame stays on the terminal when the command ends. A frame is never
taller than the terminal (moving the cursor up past the top would garble it) nor
wider (a wrapped line would too); rows that do not fit are summed up in one line,
the guests being worked on and the failed ones first.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import TextIO

from guestwarden.console.lines import duration, progress_text
from guestwarden.console.tracker import GuestRow, RunTracker

HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
CLEAR_TO_END = "\x1b[K"
CLEAR_BELOW = "\x1b[J"
RED, GREEN, BOLD, RESET = "\x1b[31m", "\x1b[32m", "\x1b[1m", "\x1b[0m"
HEADER_ROWS = 4  # title, bar, blank, column heads
NAME_WIDTH = 24


def bar(fraction: float, width: int) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def guest_cells(row: GuestRow, now: float) -> tuple[str, str, str, str]:
    """(action, progress, elapsed, outcome) of one row."""
    record = row.record
    if row.finished and record is not None:
        outcome = ("ok  " if record.ok else "FAIL") + " " + record.outcome
        if not record.ok and record.detail:
            outcome += f": {record.detail}"
        return "-", "", duration(row.elapsed_s(now)), outcome
    if row.action:
        action = row.action + (f" #{row.attempt}" if row.attempt > 1 else "")
        progress = progress_text(row.processed_bytes, row.total_bytes, row.rate_bps)
        return action, progress, duration(row.elapsed_s(now)), ""
    return "waiting", "", duration(row.elapsed_s(now)), ""


def _priority(item: tuple[int, GuestRow]) -> tuple[int, float, int]:
    """Which rows to show when not all fit: busy, failed, waiting, then done (latest)."""
    index, row = item
    if row.action and not row.finished:
        return (0, row.action_since or 0.0, index)
    if row.failed:
        return (1, 0.0, index)
    if not row.finished:
        return (2, 0.0, index)
    return (3, -(row.finished_at or 0.0), index)


class LiveScreen:
    def __init__(
        self,
        out: TextIO,
        *,
        size: Callable[[], os.terminal_size] | None = None,
        wall_clock: Callable[[], float] = time.time,
        color: bool | None = None,
    ) -> None:
        self.out = out
        self.size = size or self._terminal_size
        self.wall_clock = wall_clock
        self.color = "NO_COLOR" not in os.environ if color is None else color
        self._height = 0
        self._started = False

    def frame(self, tracker: RunTracker | None, footer: str = "") -> list[str]:
        """The lines of a frame, without escapes other than colours."""
        columns, lines = self.size()
        width = max(20, columns - 1)
        now = self.wall_clock()
        if tracker is None:
            return [self._cut(footer or "no run going on: waiting for one", width)]
        done, total, failed = tracker.counts()
        state = ("ok" if tracker.final.ok else "FAILED") if tracker.final else "running"
        title = f"guestwarden {tracker.kind or 'run'} {tracker.run_id}  {state}  " \
                f"{done}/{total} guests done" + (f", {failed} failed" if failed else "")
        elapsed = None if tracker.started_at is None else (
            (tracker.final.finished_at or now) if tracker.final else now) - tracker.started_at
        eta = tracker.eta_s(now)
        tail = f" {done}/{total}  elapsed {duration(elapsed)}" + (
            f"  left ~{duration(eta)}" if eta is not None and not tracker.final else "")
        bar_width = max(10, min(50, width - len(tail) - 2))
        out = [self._paint(self._cut(title, width), BOLD),
               self._cut(bar(done / total if total else 1.0, bar_width) + tail, width), "",
               self._cut(f"{'GUEST':<{NAME_WIDTH}} {'ACTION':<12} {'PROGRESS':<34} "
                         f"{'ELAPSED':>7}  OUTCOME", width)]
        rows = [(i, r) for i, r in enumerate(tracker.rows.values()) if r.acting]
        room = max(1, lines - 1 - HEADER_ROWS - (1 if footer else 0))
        if len(rows) > room:
            shown = sorted(rows, key=_priority)[:room - 1]
            picked = {i for i, _ in shown}
            hidden = [r for i, r in rows if i not in picked]
        else:  # all fit: in name order, so that rows stay where they are
            shown, hidden = sorted(rows, key=lambda item: item[1].name), []
        for _, row in shown:
            action, progress, took, outcome = guest_cells(row, now)
            text = self._cut(f"{row.name[:NAME_WIDTH]:<{NAME_WIDTH}} {action:<12} "
                             f"{progress:<34} {took:>7}  {outcome}", width)
            colour = "" if not row.finished else RED if row.failed else GREEN
            out.append(self._paint(text, colour) if colour else text)
        if hidden:
            waiting = sum(1 for r in hidden if not r.finished)
            out.append(f"... and {len(hidden)} more ({len(hidden) - waiting} done, "
                       f"{waiting} not done)")
        if footer:
            out.append(self._cut(footer, width))
        return out

    def draw(self, tracker: RunTracker | None, footer: str = "") -> None:
        """Replace the previous frame with a new one."""
        lines = self.frame(tracker, footer)
        parts = [] if self._started else [HIDE_CURSOR]
        self._started = True
        if self._height:
            parts.append(f"\x1b[{self._height}F")  # to the start of the frame's first line
        parts += [line + CLEAR_TO_END + "\n" for line in lines]
        parts.append(CLEAR_BELOW)
        self.out.write("".join(parts))
        self.out.flush()
        self._height = len(lines)

    def close(self) -> None:
        """The frame stays; the cursor comes back below it."""
        if self._started:
            self.out.write(SHOW_CURSOR)
            self.out.flush()

    def _terminal_size(self) -> os.terminal_size:
        """The terminal's own size, not $COLUMNS/$LINES (shutil's first choice): they
        may be stale or inherited, and a frame one column too wide breaks the redraw."""
        try:
            return os.get_terminal_size(self.out.fileno())
        except (AttributeError, OSError, ValueError):
            return shutil.get_terminal_size()

    def _paint(self, text: str, colour: str) -> str:
        return f"{colour}{text}{RESET}" if self.color else text

    @staticmethod
    def _cut(text: str, width: int) -> str:
        return text if len(text) <= width else text[:width - 1] + "~"
