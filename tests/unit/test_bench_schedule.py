"""bench/schedule.py: the makespan lower bound of the makespan benchmark, against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from bench.schedule import (
    list_makespan,
    lpt_makespan,
    optimal_makespan,
    optimal_makespan_with_overhead,
)


def brute_force(durations: list[float], slots: int) -> float:
    """Every assignment of jobs to slots (slots**jobs of them): the true optimum."""
    if not durations:
        return 0.0
    best = float("inf")
    for assignment in itertools.product(range(slots), repeat=len(durations)):
        loads = [0.0] * slots
        for duration, slot in zip(durations, assignment, strict=True):
            loads[slot] += duration
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_optimal_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    slots = rng.randint(1, 4)
    jobs = rng.randint(0, 7)
    if seed % 2:
        durations = [float(rng.randint(1, 10)) for _ in range(jobs)]
    else:
        durations = [round(rng.uniform(0.1, 10.0), 3) for _ in range(jobs)]
    assert optimal_makespan(durations, slots) == pytest.approx(brute_force(durations, slots))


def test_lpt_is_not_always_optimal() -> None:
    # the classic counter-example: LPT puts 3 and 3 apart and ends at 7; 3+3 | 2+2+2 is 6
    durations = [3.0, 3.0, 2.0, 2.0, 2.0]
    assert lpt_makespan(durations, 2) == 7.0
    assert optimal_makespan(durations, 2) == 6.0 == brute_force(durations, 2)


def test_the_benchmark_seed() -> None:
    # bench/makespan.py's delays (random.Random(8), ten integers in [1, 10]) on 4 slots:
    # 9+2 | 7+4 | 6+4+1 | 4+3+3
    from bench.makespan import SEED, delays

    durations = [4.0, 6.0, 7.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0, 9.0]
    assert SEED == 8 and delays(10) == durations  # the seed was chosen first and is kept
    assert optimal_makespan(durations, 4) == 11.0
    assert optimal_makespan(durations[:8], 4) == brute_force(durations[:8], 4)


def test_list_scheduling_keeps_the_given_order() -> None:
    # 1 and 1 first on two slots, then 5 goes to a slot at 1: ends at 6, and 2 at 3
    assert list_makespan([1.0, 1.0, 5.0, 2.0], 2) == 6.0
    assert list_makespan([5.0, 2.0, 1.0, 1.0], 2) == 5.0
    assert list_makespan([], 3) == 0.0


def test_more_slots_than_jobs_and_bad_input() -> None:
    assert optimal_makespan([2.0, 5.0], 4) == 5.0
    assert optimal_makespan([], 2) == 0.0
    with pytest.raises(ValueError, match="slots"):
        optimal_makespan([1.0], 0)
    with pytest.raises(ValueError, match="negative"):
        optimal_makespan([1.0, -1.0], 2)
    with pytest.raises(ValueError, match="at most"):
        optimal_makespan([1.0] * 17, 4)


def brute_force_with_overhead(durations: list[float], slots: int, free_after_s: float,
                              last_ends_after_s: float) -> float:
    """Every assignment; a slot ends at its jobs plus free_after_s for all but its last."""
    best = float("inf")
    for assignment in itertools.product(range(slots), repeat=len(durations)):
        ends = []
        for slot in range(slots):
            mine = [d for d, s in zip(durations, assignment, strict=True) if s == slot]
            if mine:
                ends.append(sum(mine) + free_after_s * (len(mine) - 1) + last_ends_after_s)
        best = min(best, max(ends))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_overhead_bound_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    slots = rng.randint(1, 3)
    durations = [float(rng.randint(1, 10)) for _ in range(rng.randint(1, 7))]
    free_after, last_after = rng.uniform(0.0, 0.5), rng.uniform(0.0, 0.3)
    assert optimal_makespan_with_overhead(durations, slots, free_after, last_after) == (
        pytest.approx(brute_force_with_overhead(durations, slots, free_after, last_after)))


def test_overhead_bound_of_the_benchmark_seed() -> None:
    # 9+2 | 7+4 | 6+4+1 | 4+3+3: two slots with three guests each pay the overhead twice
    durations = [4.0, 6.0, 7.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0, 9.0]
    assert optimal_makespan_with_overhead(durations, 4, 0.3, 0.1) == pytest.approx(11.7)
    assert optimal_makespan_with_overhead([], 4, 0.3, 0.1) == 0.0
