"""What the host offers the worker pool, read with psutil (conf/settings.py decides).

``workers = "auto"`` is sized from these and from the configured bounds by
``resolve_worker_count``; this module only measures, so the rule stays a pure
function with a unit test.
"""

from __future__ import annotations

import logging

import psutil

from guestwarden.conf.settings import Settings, resolve_worker_count

log = logging.getLogger(__name__)


def host_resources() -> tuple[int | None, int | None]:
    """(CPUs this process may run on, bytes of memory of the host); None when unknown.

    CPUs from the affinity mask where there is one (a cpuset or ``taskset`` limits us
    to fewer than the host has), else psutil's count.
    """
    cpus: int | None
    try:
        cpus = len(psutil.Process().cpu_affinity() or []) or psutil.cpu_count()
    except (AttributeError, psutil.Error, OSError):
        cpus = psutil.cpu_count()
    try:
        memory: int | None = int(psutil.virtual_memory().total)
    except (psutil.Error, OSError):
        memory = None
    return cpus, memory


def worker_count(settings: Settings) -> int:
    """``resolve_worker_count`` for this host, with a log line saying what it saw."""
    cpus, memory = host_resources()
    count = resolve_worker_count(settings, cpus, memory)
    if settings.workers == "auto":
        log.info("workers auto: %d (bounds of the config, %s CPUs, %s MiB of memory)", count,
                 cpus or "unknown", memory // 2**20 if memory else "unknown")
    return count
