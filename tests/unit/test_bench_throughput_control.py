"""The arithmetic of the "throughput" and "control" benchmark sections (no guests, no
timing): which row is the headline, what it is compared with, percentiles."""

from __future__ import annotations

from bench import control, throughput
from bench.throughput import Measured
from testbed.spans import max_overlap


def measured(level: int | str, nbytes: int, preserve_s: float, dd_rate: float,
             *, bypass_cache: bool = False) -> Measured:
    detail = {"qemu_stream_mb_s": 1000.0, "per_save_rest_s_mean": 0.2}
    return Measured(bypass_cache, level, nbytes, preserve_s, dd_rate, detail)


def test_headline_is_the_fastest_level_against_the_median_dd_of_its_mode() -> None:
    mb = 1_000_000
    results = [
        measured(1, 1000 * mb, 2.0, 1000.0 * mb),  # 500 MB/s
        measured(2, 1000 * mb, 1.0, 100.0 * mb),  # 1000 MB/s; its own dd slow, would flatter
        measured(4, 1000 * mb, 1.25, 1200.0 * mb),  # 800 MB/s
        measured(1, 1000 * mb, 4.0, 2000.0 * mb, bypass_cache=True),
    ]
    rows = throughput._rows(results)
    headlines = [r for r in rows if "best" in r.name]
    assert [r.name for r in headlines] == [
        "save throughput, best: parallel_save=2 (page cache)",
        "save throughput, best: parallel_save=1 (bypass_cache)",
    ]
    page = headlines[0]
    assert page.value == 1000.0
    assert page.reference_value == 1000.0  # median of 1000, 100, 1200
    assert page.ratio == 1.0
    assert page.met is True
    bypass = headlines[1]
    assert bypass.ratio == 0.12
    assert bypass.met is False
    per_level = [r for r in rows if "best" not in r.name]
    assert len(per_level) == 4
    assert all(r.met is None and r.target == "" for r in per_level)
    assert per_level[1].ratio == 10.0  # its own, adjacent dd


def test_max_overlap_counts_saves_running_at_once() -> None:
    assert max_overlap([(0, 10), (5, 15), (10, 20), (30, 40)]) == 2
    assert max_overlap([(0, 10), (10, 20)]) == 1  # an end before a start


def test_covered_is_the_union_of_spans() -> None:
    second = 1_000_000_000
    spans = [(0, 2 * second), (1 * second, 3 * second), (5 * second, 6 * second)]
    assert throughput._covered_s(spans) == 4.0
    assert throughput._covered_s([(0, 4 * second), (1 * second, 2 * second)]) == 4.0


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert control._percentile(values, 50) == 50.0
    assert control._percentile(values, 99) == 99.0
    assert control._percentile(values, 100) == 100.0
    assert control._percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert control._percentile([5.0], 99) == 5.0


def test_control_rows_judge_p99_and_supervisor_rss() -> None:
    sizes = control.Sizes(guests=8, requests=4, processes=2)
    m = {
        "busy": [0.001, 0.002, 0.003, 0.011], "idle": [0.001],
        "fewest_in_flight": 8, "supervisor_rss": 61_000_000,
        "worker_rss": [40_000_000, 42_000_000], "idle_cpu": 0.01,
        "busy_cpu_per_request_ms": 0.5, "cli": [0.1, 0.12], "virsh": [0.02, 0.02],
    }
    rows = {r.name: r for r in control._rows(m, sizes)}
    p99 = rows["status latency p99, 8 jobs running"]
    assert p99.value == 11.0
    assert p99.met is False
    assert rows["supervisor RSS, 8 jobs running"].met is False
    assert rows["worker RSS, max of 2"].value == 42.0
    assert rows["worker RSS, sum of 2"].value == 82.0
    cli = rows["guestwarden status, whole CLI process (median)"]
    assert cli.ratio == 5.5
