"""``workers = "auto"`` from the bounds, the CPUs and the memory; the save ceiling."""

from __future__ import annotations

from pathlib import Path

import psutil

from guestwarden.conf.loading import parse_settings
from guestwarden.conf.settings import (
    AUTO_SAVE_MAX,
    Settings,
    resolve_worker_count,
    save_ceiling,
)
from guestwarden.supervisor.capacity import host_resources, worker_count

GIB = 1 << 30


def parse(text: str) -> Settings:
    return parse_settings(text.encode(), Path("/g.toml"))


def test_memory_caps_the_pool_but_never_below_two() -> None:
    default = parse("")
    assert resolve_worker_count(default, 2) == 9  # unchanged without a memory figure
    assert resolve_worker_count(default, 2, 64 * GIB) == 9
    assert resolve_worker_count(default, 2, 2 * GIB) == 5  # 10% of 2 GiB at 40 MiB each
    assert resolve_worker_count(default, 2, 256 << 20) == 2
    assert resolve_worker_count(parse("[shutdown]\nparallel_shutdown = 0"), 96, 64 * GIB) == 64
    assert resolve_worker_count(parse("workers = 40"), 2, 256 << 20) == 40  # asked for: given


def test_auto_saves_count_as_their_ceiling() -> None:
    auto = parse('[shutdown]\nparallel_save = "auto"\nparallel_shutdown = 2')
    assert resolve_worker_count(auto, 2) == AUTO_SAVE_MAX + 1
    assert save_ceiling(auto, 9) == AUTO_SAVE_MAX
    assert save_ceiling(auto, 3) == 2  # one worker stays free for inventory and poweroff
    assert save_ceiling(auto, 1) == 1
    assert save_ceiling(parse("[shutdown]\nparallel_save = 3"), 2) == 3


def test_host_resources_come_from_psutil() -> None:
    cpus, memory = host_resources()
    assert cpus == len(psutil.Process().cpu_affinity())
    assert memory == psutil.virtual_memory().total
    assert worker_count(Settings()) == resolve_worker_count(Settings(), cpus, memory)
