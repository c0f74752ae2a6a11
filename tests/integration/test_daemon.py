"""The real daemon, real workers and the real CLI against an isolated libvirtd (test driver).

Guests live in libvirt's test driver hosted by the isolated libvirtd, shared by the
test (through the keeper connection) and every worker process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Any

import libvirt

from guestwarden.ipc.messages import Preserve, RunReply, Status
from testbed.daemon import GuestwardenDaemon, run_cli, wait_for, write_config
from testbed.guests import define_guests
from tests.integration.conftest import DaemonFactory


def states(conn: Any) -> dict[str, str]:
    names = {1: "running", 2: "running", 3: "paused", 5: "shutoff"}
    return {d.name(): names.get(d.state()[0], "other") for d in conn.listAllDomains(0)}


def saved(conn: Any) -> set[str]:
    return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE)}


def journal(daemon: GuestwardenDaemon) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((daemon.state_dir / "journal.json").read_text())
    return data


def test_preserve_then_restore_brings_back_exactly_what_ran(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    define_guests(test_conn, "p", running=10, paused=4, off=4)
    define_guests(test_conn, "t", transient_running=6, transient_paused=2)
    before = states(test_conn)
    daemon = make_daemon(workers=4, shutdown={"parallel_save": 2, "parallel_shutdown": 3})
    daemon.start()

    result = daemon.cli("preserve", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    guest_lines = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(guest_lines) == 10 + 4 + 6 + 2, result.stdout
    after = states(test_conn)
    assert not [n for n, s in after.items() if s != "shutoff"], "a guest still runs"
    active_persistent = {n for n, s in before.items() if n.startswith("p-") and s != "shutoff"}
    assert saved(test_conn) == active_persistent
    assert not [n for n in after if n.startswith("t-")], "transient guests are gone when off"

    records = {g["name"]: g for g in journal(daemon)["preserve"]["guests"]}
    assert set(records) == set(before)
    for name, state in before.items():
        assert records[name]["state_before"] == state
        expected = ("untouched" if state == "shutoff"
                    else "saved" if name.startswith("p-")
                    else "poweroff" if state == "paused" else "shutdown")
        assert records[name]["outcome"] == expected, records[name]

    result = daemon.cli("restore", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    restored = states(test_conn)
    for name, state in before.items():
        if name.startswith("p-"):
            assert restored[name] == state, name  # paused come back paused, off stay off
    assert not saved(test_conn), "restore consumes the images"
    assert "gone" in result.stdout  # the transient ones cannot come back, and it says so

    again = daemon.cli("restore", "--wait")
    assert again.returncode == 0
    assert "0/0 guests brought back" in again.stdout  # never twice per preserve


def test_bounds_hold_as_the_dispatcher_sees_them(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    define_guests(test_conn, "b", running=60)
    daemon = make_daemon(workers=6, shutdown={"parallel_save": 2})
    daemon.start()
    assert daemon.cli("preserve", "--wait").returncode == 0
    assert daemon.status().peak_in_flight["save"] == 2

    define_guests(test_conn, "s", running=60)
    other = make_daemon(workers=6, shutdown={"persistent": ["shutdown", "poweroff"],
                                             "parallel_shutdown": 3})
    daemon.stop()
    other.start()
    assert other.cli("preserve", "--wait").returncode == 0
    assert other.status().peak_in_flight["shutdown"] == 3
    assert "save" not in other.status().peak_in_flight


def test_worker_killed_mid_job_loses_no_guest(test_conn: Any, make_daemon: DaemonFactory) -> None:
    define_guests(test_conn, "k", running=20)
    daemon = make_daemon(workers=3, shutdown={"parallel_save": 3})
    status = daemon.start()
    victim = status.workers[0]
    os.kill(victim.pid, signal.SIGSTOP)  # freeze it so the job is surely in flight on it
    reply = daemon.request(Preserve())
    run_id = reply.run_id  # type: ignore[union-attr]

    def victim_has_job() -> bool:
        return any(j.worker_id == victim.worker_id for j in daemon.status().jobs)

    wait_for(victim_has_job, 10, "a job on the frozen worker")
    os.kill(victim.pid, signal.SIGKILL)

    def finished() -> RunReply | None:
        from guestwarden.ipc.messages import GetRun
        reply = daemon.request(GetRun(run_id=run_id))
        assert isinstance(reply, RunReply)
        return reply if reply.run.finished_at is not None else None

    run = wait_for(finished, 30, "the preserve run to finish").run
    assert run.ok, run.detail
    assert all(g.outcome == "saved" for g in run.guests), [g.outcome for g in run.guests]
    assert len(saved(test_conn)) == 20
    assert "re-queued as attempt 2" in daemon.log_text()
    assert "killed by SIGKILL" in daemon.log_text()
    wait_for(lambda: len([w for w in daemon.status().workers if w.state == "idle"]) == 3,
             20, "a replacement worker")


def test_silent_worker_is_replaced_and_its_job_done_elsewhere(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    define_guests(test_conn, "f", running=6)
    daemon = make_daemon(workers=2, advanced={"heartbeat_interval": 0.2,
                                              "heartbeat_timeout": 1.5})
    status = daemon.start()
    frozen = status.workers[0]
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        result = daemon.cli("preserve", "--wait", timeout_s=60)
        assert result.returncode == 0, result.stdout + daemon.log_tail()
        assert len(saved(test_conn)) == 6
        assert "heartbeat expired" in daemon.log_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen.pid, signal.SIGKILL)


def test_sigterm_leaves_guests_as_they_are(test_conn: Any, make_daemon: DaemonFactory) -> None:
    define_guests(test_conn, "l", running=5, paused=1)
    before = states(test_conn)
    daemon = make_daemon(workers=2)
    daemon.start()
    workers = daemon.worker_pids()
    assert daemon.stop() == 0
    assert states(test_conn) == before
    assert not saved(test_conn)
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert not (daemon.runtime_dir / "control.sock").exists()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_restore_runs_once_per_boot(test_conn: Any, make_daemon: DaemonFactory) -> None:
    define_guests(test_conn, "r", running=4, paused=1, off=2)
    before = states(test_conn)
    base = Path(tempfile.mkdtemp(prefix="gwd-", dir="/tmp"))
    try:
        first = make_daemon(base, boot={"on_boot": "restore"}, boot_id="boot-A")
        first.start()
        assert first.cli("preserve", "--wait").returncode == 0
        first.stop()
        assert all(s == "shutoff" for s in states(test_conn).values())

        # "reboot": same state dir, new boot id -> restored automatically
        second = make_daemon(base, boot={"on_boot": "restore"}, boot_id="boot-B")
        second.start()
        wait_for(lambda: states(test_conn) == before, 20, "the automatic restore")
        wait_for(lambda: second.status().runs and second.status().runs[-1].ok, 20,
                 "the restore run to end")
        assert second.status().restored_this_boot
        second.stop()

        # a restart within the same boot does not restore again
        test_conn.lookupByName("r-running-0").destroy()
        third = make_daemon(base, boot={"on_boot": "restore"}, boot_id="boot-B")
        status = third.start()
        assert status.runs == () and status.restored_this_boot
        assert states(test_conn)["r-running-0"] == "shutoff"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_restore_never_cold_boots_a_guest_whose_image_vanished(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    define_guests(test_conn, "m", running=3)
    daemon = make_daemon()
    daemon.start()
    assert daemon.cli("preserve", "--wait").returncode == 0
    test_conn.lookupByName("m-running-1").managedSaveRemove(0)
    result = daemon.cli("restore", "--wait")
    assert result.returncode == 1
    assert "FAIL m-running-1" in result.stdout and "image is gone" in result.stdout
    after = states(test_conn)
    assert after["m-running-1"] == "shutoff"
    assert after["m-running-0"] == after["m-running-2"] == "running"


def test_status_plan_and_resize(test_conn: Any, make_daemon: DaemonFactory) -> None:
    define_guests(test_conn, "s", running=2, off=1, transient_running=1)
    daemon = make_daemon(workers=2)
    daemon.start()
    control = daemon.runtime_dir / "control.sock"
    assert stat.S_IMODE(control.stat().st_mode) == 0o600

    result = daemon.cli("status", "--json")
    assert result.returncode == 0
    status = json.loads(result.stdout)
    assert {"state", "workers", "jobs"} <= set(status)
    assert isinstance(status["workers"], list) and isinstance(status["jobs"], list)
    assert {w["pid"] for w in status["workers"]} == set(daemon.worker_pids())
    table = daemon.cli("status")
    assert "WORKER" in table.stdout and "state: idle" in table.stdout

    plan = json.loads(daemon.cli("plan", "--json").stdout)
    assert len(plan["guests"]) == 4
    for guest in plan["guests"]:
        expected = ([] if guest["state"] == "shutoff"
                    else ["save", "shutdown", "poweroff"] if guest["persistent"]
                    else ["shutdown", "poweroff"])
        assert guest["chain"] == expected, guest
    assert states(test_conn)["s-running-0"] == "running"  # plan changes nothing

    assert daemon.cli("workers", "5").returncode == 0
    wait_for(lambda: len([w for w in daemon.status().workers if w.state == "idle"]) == 5,
             20, "5 workers")
    assert daemon.cli("workers", "1").returncode == 0
    wait_for(lambda: len(daemon.status().workers) == 1, 20, "1 worker")
    bad = daemon.cli("workers", "0")
    assert bad.returncode == 1 and "from 1 to 256" in bad.stderr


def test_second_daemon_on_the_same_runtime_dir_refuses(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(workers=1)
    daemon.start()
    result = run_cli(daemon.config, "daemon", timeout_s=30)
    assert result.returncode == 4
    assert "another guestwarden daemon" in result.stderr and str(daemon.pid) in result.stderr
    assert isinstance(daemon.status(), Status)  # the first one is unharmed


def test_cli_without_daemon_says_so_in_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "g.toml", {"runtime_dir": str(tmp_path / "run")})
    result = run_cli(config, "status")
    assert result.returncode == 3
    assert len(result.stderr.strip().splitlines()) == 1 and "daemon" in result.stderr


def test_bad_config_is_refused_before_anything_starts(tmp_path: Path) -> None:
    config = tmp_path / "g.toml"
    config.write_text(f'runtime_dir = "{tmp_path}/run"\n[shutdown]\nparallel_save = 0\n')
    result = run_cli(config, "daemon", timeout_s=30)
    assert result.returncode == 2
    assert str(config) in result.stderr and "shutdown.parallel_save" in result.stderr
    assert "from 1 to 256" in result.stderr
    assert not (tmp_path / "run").exists()
