"""Spans of time (start, end) in nanoseconds, as the journal records each action's."""

from __future__ import annotations

from collections.abc import Sequence


def max_overlap(spans: Sequence[tuple[int, int]]) -> int:
    """Most spans open at the same moment (an end at the same ns as a start first)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    open_now = peak = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    return peak
