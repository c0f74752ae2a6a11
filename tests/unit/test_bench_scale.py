"""The rows of the benchmark's "scale" section, from made-up measurements."""

from __future__ import annotations

import pytest

from bench.libvirt_guests import ScriptRun
from bench.report import Row
from bench.scale import FleetTimes, ScriptTimes, scale_rows
from guestwarden.ipc.messages import GuestOutcome, RunStatus
from testbed.scale import GuestCounts, TimedRun


def timed(guests: int, wall_s: float, supervisor_cpu_s: float = 0.1) -> TimedRun:
    records = tuple(GuestOutcome(uri="test:///default", uuid=f"u{i}", name=f"g{i}",
                                 persistent=True, state_before="running")
                    for i in range(guests))
    run = RunStatus(run_id="r", kind="preserve", started_at=0.0, finished_at=wall_s,
                    guests=records)
    return TimedRun(run, wall_s, wall_s - 0.01,
                    {"supervisor": supervisor_cpu_s, "workers": 0.2, "libvirtd": 0.3})


def fleet(guests: int, preserve_s: list[float], restore_s: list[float]) -> FleetTimes:
    return FleetTimes(guests, [timed(guests, s) for s in preserve_s],
                      [timed(guests, s) for s in restore_s])


def script(mode: str, stop_s: float, start_s: float, guests: int = 100) -> ScriptTimes:
    return ScriptTimes(mode, guests, ScriptRun("stop", stop_s, 0, ""),
                       ScriptRun("start", start_s, 0, ""), GuestCounts(guests, 0, guests),
                       GuestCounts(guests, guests, 0))


def by_name(rows: list[Row], start: str) -> Row:
    [row] = [r for r in rows if r.name.startswith(start)]
    return row


def test_medians_ratios_and_targets() -> None:
    rows = scale_rows(
        fleet(1000, [1.2, 0.9, 1.0], [1.1, 1.3, 1.2]),
        fleet(5000, [5.0, 6.0, 5.4], [7.0, 6.0, 6.5]),
        [script("suspend", 105.0, 4.0), script("shutdown", 14.0, 4.0)],
    )
    small = by_name(rows, "preserve, 1000")
    assert small.value == 1.0 and small.met is True and small.target == "≤ 1.5 s"
    assert small.detail["per_guest_ms"] == 1.0 and small.detail["runs_s"] == [1.2, 0.9, 1.0]
    assert small.detail["cpu_s_median"]["supervisor"] == 0.1
    large = by_name(rows, "preserve, 5000")
    assert large.value == 5.4 and large.reference_value == 1.0
    assert large.ratio == pytest.approx(5.4) and large.met is True
    restore = by_name(rows, "restore, 5000")
    assert restore.ratio == pytest.approx(6.5 / 1.2) and restore.met is None
    suspend = by_name(rows, "preserve per guest (1000) vs stop, suspend")
    assert suspend.value == pytest.approx(1.0) and suspend.reference_value == pytest.approx(1050)
    assert suspend.ratio == pytest.approx(1050) and suspend.met is True
    shutdown = by_name(rows, "preserve per guest (1000) vs stop, shutdown")
    assert shutdown.ratio == pytest.approx(140) and shutdown.met is None
    start = by_name(rows, "restore per guest")
    assert start.ratio == pytest.approx(40 / 1.2)
    assert by_name(rows, "libvirt-guests.sh stop, suspend").value == 105.0


def test_targets_missed_are_reported() -> None:
    rows = scale_rows(fleet(1000, [1.6], [1.0]), fleet(5000, [9.0], [5.0]),
                      [script("suspend", 50.0, 4.0)])
    assert by_name(rows, "preserve, 1000").met is False
    assert by_name(rows, "preserve, 5000").met is False  # 5.6x > 5.5x
    assert by_name(rows, "preserve per guest").met is False  # 500 / 1.6 = 312x


def test_quick_sizes_keep_the_growth_target_but_not_the_absolute_one() -> None:
    rows = scale_rows(fleet(200, [0.3], [0.3]), fleet(1000, [1.5], [1.5]),
                      [script("suspend", 21.0, 1.0, guests=20)])
    assert by_name(rows, "preserve, 200").met is None
    large = by_name(rows, "preserve, 1000")
    assert large.target == "≤ 5.5x" and large.met is True
