"""Makespans of independent jobs on identical parallel slots (P||Cmax), for the benchmark.

The makespan section compares guestwarden's graceful shutdowns under
``parallel_shutdown = N`` with the best any scheduler could do with the guests'
known shutdown delays: :func:`optimal_makespan`, computed exactly (branch and bound;
the problem is NP-hard in general, but a dozen jobs is instant). :func:`list_makespan`
is what a scheduler that hands jobs out in a given order achieves (libvirt-guests.sh
in its list order; guestwarden's first run, which knows nothing yet), and
:func:`lpt_makespan` that with the longest first (guestwarden once it has learned the
durations), which is at most 4/3 - 1/(3N) of the optimum and often equal to it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

MAX_EXACT_JOBS = 16
""":func:`optimal_makespan` is exponential in the worst case: refuse more jobs."""


def list_makespan(durations: Sequence[float], slots: int) -> float:
    """Hand the jobs out in the given order, each to the slot that frees up first."""
    _check(slots)
    ends = [0.0] * min(slots, max(1, len(durations)))
    for duration in durations:
        heapq.heapreplace(ends, ends[0] + duration)
    return max(ends) if durations else 0.0


def lpt_makespan(durations: Sequence[float], slots: int) -> float:
    """Longest processing time first: list scheduling with the jobs sorted longest first."""
    return list_makespan(sorted(durations, reverse=True), slots)


def optimal_makespan(durations: Sequence[float], slots: int) -> float:
    """The smallest possible makespan of ``durations`` on ``slots`` identical slots.

    Depth-first over the jobs, longest first, each placed on every slot in turn; a
    branch is cut when it cannot beat the best found so far (which starts as LPT's
    schedule), slots with equal loads are tried once (they are interchangeable), and
    the search stops as soon as a schedule meets the trivial lower bound
    max(longest job, total / slots).
    """
    _check(slots)
    if len(durations) > MAX_EXACT_JOBS:
        raise ValueError(f"at most {MAX_EXACT_JOBS} jobs for an exact makespan, "
                         f"got {len(durations)}")
    if any(d < 0 for d in durations):
        raise ValueError(f"durations must not be negative, got {list(durations)}")
    if not durations:
        return 0.0
    jobs = sorted(durations, reverse=True)
    if slots >= len(jobs):
        return float(jobs[0])
    bound = max(float(jobs[0]), sum(jobs) / slots)
    best = lpt_makespan(jobs, slots)
    loads = [0.0] * slots

    def place(i: int, current_max: float) -> None:
        nonlocal best
        if i == len(jobs):
            best = min(best, current_max)
            return
        tried: set[float] = set()
        for s in range(slots):
            load = loads[s]
            if load in tried:
                continue
            tried.add(load)
            new_load = load + jobs[i]
            if new_load >= best:
                continue
            loads[s] = new_load
            place(i + 1, max(current_max, new_load))
            loads[s] = load
            if best <= bound:
                return

    place(0, 0.0)
    return best


def optimal_makespan_with_overhead(
    durations: Sequence[float], slots: int, free_after_s: float, last_ends_after_s: float
) -> float:
    """The best makespan when every job also costs a fixed overhead after its duration.

    A slot is free for the next job ``free_after_s`` after a job's duration (a guest's
    delay, then libvirt saying it is off), but the makespan ends ``last_ends_after_s``
    after the duration of each slot's last job (its QEMU process gone). Every slot's
    end is then its load minus the same ``free_after_s - last_ends_after_s``, so the
    optimum of the loads minus that difference is exact.
    """
    if not durations:
        return 0.0
    loaded = [d + free_after_s for d in durations]
    return optimal_makespan(loaded, slots) - (free_after_s - last_ends_after_s)


def _check(slots: int) -> None:
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
