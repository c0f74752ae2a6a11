"""Learned durations: how long each guest's save, shutdown, poweroff and start took.

Kept in the journal (``JournalData.learned``) across runs as an exponentially
weighted mean per guest and action, so that one slow run counts but does not rule:
preserve hands out the longest expected guests of a group first (a long save started
last would set the end of the whole run), and ``plan`` estimates how long a preserve
will take. Also kept: the aggregate write throughput of managed saves (bytes of the
guests saved / time during which at least one save ran), which prices the saves of
guests that were never saved before.

Only actions that did their work are learned: a save that found the guest already
off, a shutdown that timed out or a poweroff of a guest already off say nothing
about how long the action takes. Times are the worker's own (``spans_ns``: from the
libvirt call's start to its end, no queueing), else the supervisor's
(``durations_s``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from guestwarden.ipc.messages import GuestOutcome, RunStatus

ALPHA = 0.3
"""Weight of the newest measurement in the mean."""
MAX_AGE_S = 180 * 86400.0
"""A guest not seen for this long is forgotten (it was removed or renamed long ago)."""
MAX_GUESTS = 20000

# the result words of an action that did its work (see workers/actions.py)
WORKED = {
    "save": frozenset({"saved"}),
    "shutdown": frozenset({"shut-down"}),
    "poweroff": frozenset({"powered-off"}),
    "start": frozenset({"restored", "started"}),
}


class ActionStats(msgspec.Struct, frozen=True, kw_only=True):
    mean_s: float
    runs: int = 1
    last_s: float = 0.0


class GuestHistory(msgspec.Struct, frozen=True, kw_only=True):
    name: str = ""
    actions: dict[str, ActionStats] = {}
    seen_at: float = 0.0
    """Wall-clock time of the last measurement."""


class Learned(msgspec.Struct, frozen=True, kw_only=True):
    guests: dict[str, GuestHistory] = {}
    """Keyed like the journal: ``uri uuid``."""
    save_bytes_per_s: float | None = None
    save_runs: int = 0
    save_parallel: int = 0
    """How many saves at once the last measured run ended with."""


def mean(old: ActionStats | None, seconds: float) -> ActionStats:
    if old is None:
        return ActionStats(mean_s=round(seconds, 3), last_s=round(seconds, 3))
    value = ALPHA * seconds + (1 - ALPHA) * old.mean_s
    return ActionStats(mean_s=round(value, 3), runs=old.runs + 1, last_s=round(seconds, 3))


def expected_s(learned: Learned, key: str, action: str) -> float | None:
    history = learned.guests.get(key)
    stats = history.actions.get(action) if history else None
    return stats.mean_s if stats else None


def worked(outcome: GuestOutcome) -> tuple[str, float, tuple[int, int] | None] | None:
    """(action, seconds, worker span) of the action that did this guest's work, if any."""
    if not outcome.ok or not outcome.chain:
        return None  # no chain: not acted on in this run (excluded, off, or an earlier run's)
    if outcome.chain == ("start",):  # a restore: "restored, clock synced" and the like
        action, result = "start", outcome.outcome.split(",", 1)[0]
    elif outcome.attempts:
        action, _, result = outcome.attempts[-1].partition(": ")
    else:
        return None
    if result not in WORKED.get(action, ()):
        return None
    span = outcome.spans_ns.get(action)
    if span is not None and span[1] > span[0]:
        return action, (span[1] - span[0]) / 1e9, span
    seconds = outcome.durations_s.get(action)
    return (action, seconds, None) if seconds is not None else None


def learn(
    learned: Learned,
    run: RunStatus,
    now: float,
    memory_bytes: Mapping[str, int] | None = None,
    save_parallel: int = 0,
) -> Learned:
    """``learned`` updated with what ``run`` measured (a preserve or a restore)."""
    guests = dict(learned.guests)
    save_spans: list[tuple[int, int]] = []
    save_bytes = 0
    for outcome in run.guests:
        measured = worked(outcome)
        if measured is None:
            continue
        action, seconds, span = measured
        key = f"{outcome.uri} {outcome.uuid}"
        old = guests.get(key, GuestHistory())
        actions = dict(old.actions)
        actions[action] = mean(actions.get(action), seconds)
        guests[key] = GuestHistory(name=outcome.name, actions=actions, seen_at=now)
        if action == "save" and span is not None and memory_bytes:
            save_spans.append(span)
            save_bytes += memory_bytes.get(key, 0)
    rate, runs = learned.save_bytes_per_s, learned.save_runs
    busy_s = busy_seconds(save_spans)
    if save_bytes > 0 and busy_s > 0:
        sample = save_bytes / busy_s
        rate = sample if rate is None else ALPHA * sample + (1 - ALPHA) * rate
        runs += 1
    return Learned(
        guests=prune(guests, now), save_bytes_per_s=rate, save_runs=runs,
        save_parallel=save_parallel if busy_s > 0 else learned.save_parallel,
    )


def busy_seconds(spans: Iterable[tuple[int, int]]) -> float:
    """How long at least one of the spans (ns) was open: the length of their union."""
    total = 0
    end = None
    for start, stop in sorted(spans):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1e9


def prune(guests: dict[str, GuestHistory], now: float) -> dict[str, GuestHistory]:
    kept = {k: g for k, g in guests.items() if now - g.seen_at <= MAX_AGE_S}
    if len(kept) > MAX_GUESTS:
        newest = sorted(kept, key=lambda k: kept[k].seen_at, reverse=True)[:MAX_GUESTS]
        kept = {k: kept[k] for k in newest}
    return kept
