"""Metrics: valid Prometheus text (prometheus_client's own parser), the right numbers,
and a textfile that is replaced atomically."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from guestwarden.conf.loading import ConfigError, parse_settings
from guestwarden.ipc import messages as m
from guestwarden.supervisor.metrics import Metrics, last_run_families, render, write_textfile


def outcome(name: str, **fields: object) -> m.GuestOutcome:
    base: dict[str, object] = {"uri": "qemu:///system", "uuid": f"u-{name}", "name": name,
                               "persistent": True, "state_before": "running",
                               "chain": ("save", "shutdown", "poweroff"), "finished": True}
    return m.GuestOutcome(**{**base, **fields})  # type: ignore[arg-type]


PRESERVE = m.RunStatus(
    run_id="preserve-1", kind="preserve", started_at=1000.0, finished_at=1012.5, ok=False,
    guests=(
        outcome("a", outcome="saved", ok=True, attempts=("save: saved",),
                durations_s={"save": 4.0}, memory_kib=1024),
        outcome("b", outcome="saved", ok=True, attempts=("save: saved",),
                durations_s={"save": 6.0}, memory_kib=2048),
        outcome("c", outcome="poweroff", ok=True,
                attempts=("save: failed (timeout)", "shutdown: failed (timeout): still on",
                          "poweroff: powered-off"),
                durations_s={"save": 9.0, "shutdown": 3.0, "poweroff": 0.5},
                memory_kib=4096),
        outcome("d", outcome="failed", ok=False, attempts=("save: failed (libvirt-error)",),
                durations_s={"save": 1.0}),
        outcome("e", outcome="untouched", ok=True, chain=(), state_before="shutoff"),
    ))
RESTORE = m.RunStatus(
    run_id="restore-1", kind="restore", started_at=2000.0, finished_at=2003.0, ok=True,
    guests=(
        outcome("a", chain=("start",), outcome="restored, clock synced", ok=True,
                durations_s={"start": 1.0, "sync_time": 0.5}),
        outcome("b", chain=("start",), outcome="restored, clock sync failed", ok=True,
                durations_s={"start": 2.0, "sync_time": 60.0}),
    ))


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return found[f"guestwarden_{name}", frozenset(labels.items())]


def test_last_runs_in_the_text_format_with_counts_durations_and_bytes() -> None:
    text = render(last_run_families([PRESERVE, RESTORE]))
    found = samples(text)
    assert value(found, "last_run_timestamp_seconds", kind="preserve") == 1012.5
    assert value(found, "last_run_duration_seconds", kind="preserve") == 12.5
    assert value(found, "last_run_success", kind="preserve") == 0
    assert value(found, "last_run_success", kind="restore") == 1
    assert value(found, "last_run_guests", kind="preserve", outcome="saved") == 2
    assert value(found, "last_run_guests", kind="preserve", outcome="poweroff") == 1
    assert value(found, "last_run_guests", kind="preserve", outcome="failed") == 1
    assert value(found, "last_run_guests", kind="preserve", outcome="untouched") == 1
    assert value(found, "last_run_actions", kind="preserve", action="save", result="ok") == 2
    assert value(found, "last_run_actions", kind="preserve", action="save",
                 result="failed") == 2
    assert value(found, "last_run_actions", kind="preserve", action="poweroff",
                 result="ok") == 1
    assert value(found, "last_run_action_duration_seconds_sum", kind="preserve",
                 action="save") == 20.0
    assert value(found, "last_run_action_duration_seconds_count", kind="preserve",
                 action="save") == 4
    assert value(found, "last_run_action_duration_max_seconds", kind="preserve",
                 action="save") == 9.0
    assert value(found, "last_run_saved_bytes", kind="preserve") == (1024 + 2048) * 1024
    # restore: the clock sync counted apart, the outcome without it
    assert value(found, "last_run_guests", kind="restore", outcome="restored") == 2
    assert value(found, "last_run_actions", kind="restore", action="sync_time",
                 result="failed") == 1
    assert value(found, "last_run_clock_sync_failures", kind="restore") == 1


def test_an_unfinished_run_gives_no_last_run_numbers() -> None:
    going = m.RunStatus(run_id="p", kind="preserve", started_at=1.0)
    assert render(last_run_families([going])) == ""


def test_counters_follow_the_events() -> None:
    metrics = Metrics(wall_clock=lambda: 1234.0)
    job: dict[str, Any] = {"run_id": "p", "job_id": 1, "uri": "u", "uuid": "x", "name": "a"}
    for event in (
        m.WorkerSpawned(seq=1, worker_id="w1", pid=10),
        m.GuestActionFinished(seq=2, action="save", result="saved", elapsed_s=2.0, **job),
        m.GuestActionFailed(seq=3, action="shutdown", reason="timeout", elapsed_s=5.0, **job),
        m.GuestFinished(seq=4, run_id="p", guest=PRESERVE.guests[0]),
        m.WorkerLost(seq=5, worker_id="w1", pid=10, reason="killed by SIGKILL"),
        m.RunFinished(seq=6, run_id="p", kind="preserve", ok=False, run=PRESERVE),
    ):
        metrics.observe(event)
    found = samples(render(metrics.families()))
    assert value(found, "start_time_seconds") == 1234.0
    assert value(found, "actions_total", action="save", result="ok") == 1
    assert value(found, "actions_total", action="shutdown", result="failed") == 1
    assert value(found, "action_seconds_total", action="shutdown") == 5.0
    assert value(found, "saved_bytes_total") == 1024 * 1024
    assert value(found, "runs_total", kind="preserve", result="failed") == 1
    assert value(found, "guests_total", kind="preserve", outcome="saved") == 2
    assert value(found, "worker_spawns_total") == 1
    assert value(found, "worker_losses_total") == 1
    assert value(found, "events_total") == 6


def test_label_values_are_escaped() -> None:
    odd = m.RunStatus(run_id="p", kind="preserve", started_at=1.0, finished_at=2.0, ok=True,
                      guests=(outcome("a", outcome='we"ird\\out\ncome', ok=True),))
    found = samples(render(last_run_families([odd])))
    assert value(found, "last_run_guests", kind="preserve", outcome='we"ird\\out\ncome') == 1


def test_textfile_is_replaced_whole_readable_by_all_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    path = tmp_path / "guestwarden.prom"
    path.write_text("old\n")
    old_umask = os.umask(0o077)  # the daemon's umask must not make it unreadable
    try:
        write_textfile(path, "guestwarden_up 1\n")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "guestwarden_up 1\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["guestwarden.prom"]


def test_textfile_in_a_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_textfile(tmp_path / "nope" / "guestwarden.prom", "x\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["metrics.prom", "/var/lib/node_exporter/guestwarden.txt"])
def test_metrics_textfile_must_be_an_absolute_prom_path(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(f'metrics_textfile = "{value}"\n'.encode(), Path("/etc/g.toml"))
    assert "metrics_textfile" in str(caught.value) and ".prom" in str(caught.value)
    ok = parse_settings(b'metrics_textfile = "/var/lib/x/guestwarden.prom"\n', Path("/g.toml"))
    assert ok.metrics_textfile == "/var/lib/x/guestwarden.prom"
