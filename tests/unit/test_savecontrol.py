"""``parallel_save = "auto"``: the controller climbs while throughput rises, with fake time."""

from __future__ import annotations

import asyncio
import logging

import pytest

from guestwarden.supervisor.savecontrol import AdaptiveSaveSlots, SaveThroughputController

GB = 10**9


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run_level(control: SaveThroughputController, clock: Clock, rate_bps: float,
              saves: int | None = None, size: int = GB) -> int | None:
    """``saves`` saves (default: one per slot) started now, all writing together at an
    aggregate ``rate_bps``; returns what the last one's finish made of the limit."""
    count = saves or control.limit
    start = clock.now
    control.save_started()
    clock.now = start + count * size / rate_bps
    change = None
    for _ in range(count):
        change = control.save_finished(size, start, clock.now)
    return change


def test_climbs_while_throughput_rises_then_steps_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "guestwarden.supervisor.savecontrol")
    clock = Clock()
    control = SaveThroughputController(ceiling=8, clock=clock)
    assert control.limit == 1
    assert run_level(control, clock, 0.5 * GB) == 2     # one save: always try a second
    assert run_level(control, clock, 0.9 * GB) == 3     # +80%: try a third
    assert run_level(control, clock, 1.2 * GB) == 4     # +33%
    assert run_level(control, clock, 1.25 * GB) == 3    # +4% only: back to 3, and stay
    assert control.settled and control.limit == 3
    assert run_level(control, clock, 5 * GB) is None    # settled: no more changes
    assert control.measured == pytest.approx(
        {1: 0.5 * GB, 2: 0.9 * GB, 3: 1.2 * GB, 4: 1.25 * GB})
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "parallel_save auto: 1 save at once writes 500 MB/s: trying 2"
    assert "(+80% over 1): trying 3" in lines[1]
    assert "4 saves at once write 1250 MB/s, +4% over 3: not worth it; staying at 3" in lines[3]


def test_stops_at_the_ceiling_and_never_climbs_with_one_slot() -> None:
    clock = Clock()
    control = SaveThroughputController(ceiling=2, clock=clock)
    assert run_level(control, clock, 1 * GB) == 2
    assert run_level(control, clock, 3 * GB) is None
    assert control.settled and control.limit == 2
    single = SaveThroughputController(ceiling=1, clock=clock)
    assert single.settled and run_level(single, clock, 1 * GB) is None


def test_a_level_is_judged_on_saves_that_started_under_it() -> None:
    clock = Clock()
    control = SaveThroughputController(ceiling=4, clock=clock)
    assert run_level(control, clock, 1 * GB) == 2
    # a save handed out before the raise finishes now: it says nothing about level 2
    assert control.save_finished(GB, started=clock.now - 5, finished=clock.now + 1) is None
    assert 2 not in control.measured
    assert run_level(control, clock, 1 * GB, saves=1) is None  # one of two slots: not yet
    assert run_level(control, clock, 1 * GB, saves=1) == 1  # both in, no gain: back to 1
    assert control.settled


def test_slots_follow_the_limit_first_come_first_served() -> None:
    async def scenario() -> list[str]:
        clock = Clock()
        slots = AdaptiveSaveSlots(SaveThroughputController(ceiling=3, clock=clock))
        order: list[str] = []
        gates = {name: asyncio.Event() for name in "abcde"}

        async def save(name: str) -> None:
            async with slots:
                order.append(name)
                started = clock.now
                await gates[name].wait()
                clock.now += 1.0
                slots.finished(GB, started, clock.now)

        tasks = [asyncio.create_task(save(n)) for n in "abcde"]
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == ["a"] and slots.in_use == 1  # one slot to begin with
        gates["a"].set()  # measured 1 GB/s: the limit goes to 2, b and c get slots
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == ["a", "b", "c"] and slots.limit == 2
        for name in "bcde":
            gates[name].set()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["a", "b", "c", "d", "e"]
