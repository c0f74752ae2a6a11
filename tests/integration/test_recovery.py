"""The supervisor killed mid-preserve, a corrupt journal: nothing lost, nothing twice."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import libvirt

from guestwarden.ipc.messages import Preserve
from testbed.daemon import wait_for
from testbed.guests import define_guests
from tests.integration.conftest import DaemonFactory


def journal(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((path / "journal.json").read_text())
    except (OSError, ValueError):
        return None
    return data


def active(conn: Any) -> set[str]:
    return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}


def with_image(conn: Any) -> set[str]:
    return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE)}


def test_supervisor_killed_mid_preserve_then_restarted(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    names = define_guests(test_conn, "k", running=40, paused=4)
    base = Path(tempfile.mkdtemp(prefix="gwd-", dir="/tmp"))
    first = make_daemon(base, workers=2, advanced={"heartbeat_timeout": 120},
                        shutdown={"parallel_save": 2})
    first.start()
    # Idle workers are used least recently used first: after a plan (one inventory
    # job), the worker that ran it is the one preserve's first save goes to, right
    # after the inventory runs on the other one. Frozen, it holds one of the two save
    # slots, so the run cannot finish while the other worker saves the rest.
    assert first.cli("plan").returncode == 0
    frozen = next(w for w in first.status().workers if w.jobs_done == 1)
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        first.request(Preserve())

        def mid_run() -> bool:
            data = journal(first.state_dir)
            on_frozen = any(j.worker_id == frozen.worker_id for j in first.status().jobs)
            if not (data and data["preserve"] and on_frozen):
                return False
            saved = [g for g in data["preserve"]["guests"] if g["outcome"] == "saved"]
            return data["preserve"]["finished_at"] is None and len(saved) >= 10

        wait_for(mid_run, 20, "a preserve with saved guests and a job stuck on a frozen worker")
        first.kill()  # SIGKILL the supervisor
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen.pid, signal.SIGKILL)
    wait_for(lambda: not first.worker_pids(), 15, "orphaned workers to exit")
    left = journal(first.state_dir)
    assert left is not None and left["preserve"]["finished_at"] is None
    saved_by_first = with_image(test_conn)
    assert len(saved_by_first) >= 10 and active(test_conn), "the kill missed the run"

    second = make_daemon(base, workers=3)
    status = second.start()
    assert any("interrupted" in note for note in status.notes), status.notes
    closed = journal(second.state_dir)
    assert closed is not None and closed["preserve"]["finished_at"] is not None
    assert any(g["outcome"] == "interrupted" for g in closed["preserve"]["guests"])

    # finishing the job: a new preserve handles the rest and remembers the saved ones
    result = second.cli("preserve", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not active(test_conn)
    outcomes = {g["name"]: g["outcome"] for g in journal(second.state_dir)["preserve"]["guests"]}
    assert set(outcomes) == set(names)
    assert all(outcomes[n] == "saved" for n in names), outcomes
    assert saved_by_first <= with_image(test_conn)

    result = second.cli("restore", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    states = {d.name(): d.state()[0] for d in test_conn.listAllDomains(0)}
    assert all(states[n] == libvirt.VIR_DOMAIN_RUNNING for n in names if "running" in n)
    assert all(states[n] == libvirt.VIR_DOMAIN_PAUSED for n in names if "paused" in n)
    assert not with_image(test_conn)
    restored = journal(second.state_dir)["restore"]["guests"]
    assert sorted(g["name"] for g in restored) == sorted(names)  # each exactly once
    assert all(g["outcome"].startswith("restored") for g in restored), restored


def test_corrupt_journal_is_moved_aside_and_reported(make_daemon: DaemonFactory) -> None:
    base = Path(tempfile.mkdtemp(prefix="gwd-", dir="/tmp"))
    (base / "state").mkdir(mode=0o700)
    (base / "state" / "journal.json").write_bytes(b'{"version": 1, "preserve": {"run_')
    daemon = make_daemon(base, workers=1)
    status = daemon.start()
    assert any("moved aside" in note for note in status.notes), status.notes
    aside = list((base / "state").glob("journal.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b'{"version": 1')
    assert daemon.cli("status").returncode == 0
    assert "moved aside" in daemon.cli("status").stdout


def test_a_second_preserve_before_any_restore_forgets_nobody(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    """E.g. a shutdown that was cancelled after preserve, then a real one later."""
    names = define_guests(test_conn, "c", running=5, off=2)
    daemon = make_daemon(workers=2)
    daemon.start()
    assert daemon.cli("preserve", "--wait").returncode == 0
    assert daemon.cli("preserve", "--wait").returncode == 0  # everything is off by now
    records = {g["name"]: g for g in journal(daemon.state_dir)["preserve"]["guests"]}
    assert {n for n, g in records.items() if g["outcome"] == "saved"} == set(names[:5])
    assert daemon.cli("restore", "--wait").returncode == 0
    assert active(test_conn) == set(names[:5])


def test_a_guest_whose_image_would_not_fit_goes_to_its_next_action(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    base = Path(tempfile.mkdtemp(prefix="gwd-", dir="/tmp"))
    save_dir = base / "save"
    save_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(save_dir)],
                   check=True)
    try:
        small = define_guests(test_conn, "small", running=3, memory_kib=2048)
        big = define_guests(test_conn, "big", running=2, memory_kib=65536)
        daemon = make_daemon(base, workers=2,
                             shutdown={"save_dir": str(save_dir), "save_space_reserve": 1})
        daemon.start()
        result = daemon.cli("preserve", "--wait")
        assert result.returncode == 0, result.stdout + result.stderr
        records = {g["name"]: g for g in journal(daemon.state_dir)["preserve"]["guests"]}
        assert all(records[n]["outcome"] == "saved" for n in small)
        for name in big:
            assert records[name]["outcome"] == "shutdown"
            assert "not enough free space" in records[name]["attempts"][0]
            assert "needs 64 MiB" in records[name]["attempts"][0]
        assert with_image(test_conn) == set(small)
    finally:
        subprocess.run(["umount", str(save_dir)], check=True)
