"""Dueling setups found on disk: libvirt-guests enabled, libvirt's auto-shutdown on."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from guestwarden.conf.libvirtconf import parse_libvirt_conf, read_libvirt_conf
from guestwarden.ipc.messages import Job, JobDone, JobFailed, JobKind
from guestwarden.supervisor.dueling import (
    DuelingGuard,
    DuelingSources,
    RefusedRun,
    find_dueling,
    libvirt_auto_shutdown,
    libvirt_guests_enabled,
)

UNIT = "libvirt-guests.service"


def enable(root: Path, where: str = "etc/systemd/system/multi-user.target.wants") -> Path:
    link = root / where / UNIT
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(f"/usr/lib/systemd/system/{UNIT}")
    return link


def qemu_conf(root: Path, text: str) -> Path:
    path = root / "etc/libvirt/qemu.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_nothing_on_an_empty_host(tmp_path: Path) -> None:
    assert find_dueling(DuelingSources(tmp_path)) == ()


@pytest.mark.parametrize("where", [
    "etc/systemd/system/multi-user.target.wants",
    "etc/systemd/system/graphical.target.requires",
    "run/systemd/system/multi-user.target.wants",
    "usr/lib/systemd/system/multi-user.target.wants",
])
def test_an_enablement_link_counts(tmp_path: Path, where: str) -> None:
    link = enable(tmp_path, where)
    reason = libvirt_guests_enabled(DuelingSources(tmp_path))
    assert reason is not None and str(link) in reason
    assert "allow_dueling" in reason


def test_a_masked_unit_does_not_count(tmp_path: Path) -> None:
    enable(tmp_path)
    mask = tmp_path / "etc/systemd/system" / UNIT
    mask.symlink_to("/dev/null")
    assert libvirt_guests_enabled(DuelingSources(tmp_path)) is None


def test_a_unit_file_without_enablement_does_not_count(tmp_path: Path) -> None:
    unit = tmp_path / "usr/lib/systemd/system" / UNIT
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nType=oneshot\n")
    assert libvirt_guests_enabled(DuelingSources(tmp_path)) is None


def test_auto_shutdown_keys_not_none(tmp_path: Path) -> None:
    path = qemu_conf(tmp_path, (
        "# auto_shutdown_try_save = \"persistent\"\n"
        "auto_shutdown_try_save = \"none\"\n"
        "user = \"root\"\n"
        "auto_shutdown_poweroff = 'all'   # commented after\n"
        "cgroup_controllers = [ \"cpu\",\n   \"memory\" ]\n"
        "auto_shutdown_try_shutdown = \"persistent\"\n"
        "auto_shutdown_wait = 30\n"
    ))
    found = libvirt_auto_shutdown(DuelingSources(tmp_path))
    assert len(found) == 2
    assert f"{path} line 7 sets auto_shutdown_try_shutdown = 'persistent'" in found[0]
    assert f"{path} line 4 sets auto_shutdown_poweroff = 'all'" in found[1]


def test_auto_shutdown_all_none_or_absent(tmp_path: Path) -> None:
    qemu_conf(tmp_path, 'auto_shutdown_try_save = "none"\nauto_shutdown_poweroff = "none"\n')
    assert libvirt_auto_shutdown(DuelingSources(tmp_path)) == []


def test_libvirt_conf_reader() -> None:
    settings, problems = parse_libvirt_conf(
        'a = "x # not a comment"  # a comment\n'
        "b = 'single'\n"
        'c = [ "one",  # first\n  "two", ]\n'
        "d = -3\n"
        'e = "esc \\" quote"\n'
        "this line is junk\n"
        'f = "after junk"\n'
    )
    assert {k: v.value for k, v in settings.items()} == {
        "a": "x # not a comment", "b": "single", "c": ["one", "two"], "d": -3,
        "e": 'esc " quote', "f": "after junk"}
    assert settings["c"].line == 3 and settings["f"].line == 8
    assert len(problems) == 1 and problems[0].startswith("line 7:")


def test_libvirt_conf_missing_file(tmp_path: Path) -> None:
    assert read_libvirt_conf(tmp_path / "nope.conf") is None


def test_guard_logs_once_per_change_and_honours_allow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="guestwarden.supervisor.dueling")
    guard = DuelingGuard(DuelingSources(tmp_path))
    assert guard.refusal("preserve", allowed=False) is None
    assert not caplog.records

    link = enable(tmp_path)
    refusal = guard.refusal("preserve", allowed=False)
    assert refusal is not None and refusal.startswith("refusing to preserve guests: ")
    assert guard.refusal("restore", allowed=False) is not None
    guard.refresh(allowed=False)
    assert [r.levelname for r in caplog.records] == ["ERROR"]  # once, not per call
    assert guard.notes()[0].startswith("refusing to preserve or restore guests: ")

    assert guard.refusal("preserve", allowed=True) is None
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    assert guard.notes()[0].startswith("dueling setup allowed by allow_dueling = true")

    os.unlink(link)
    assert guard.refusal("preserve", allowed=False) is None
    assert caplog.records[-1].message == "dueling setup gone: acting on guests again"
    assert guard.notes() == ()


class _NoJobs:
    def new_job(self, kind: JobKind, uri: str, **fields: object) -> Job:
        raise AssertionError("a refused run must not make jobs")

    async def run(self, job: Job) -> JobDone | JobFailed:
        raise AssertionError("a refused run must not run jobs")


def test_refused_run_ends_at_once_failed_and_touches_nothing() -> None:
    run = RefusedRun(_NoJobs(), "preserve", "refusing to preserve guests: because")
    status = asyncio.run(run.run())
    assert run.finished.is_set()
    assert status.kind == "preserve" and status.ok is False
    assert status.detail == "refusing to preserve guests: because"
    assert status.guests == ()
    assert run.run_id.startswith("preserve-")
