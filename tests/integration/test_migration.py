"""Moving over from libvirt-guests, through the real CLI and the real daemon.

* Guests that libvirt-guests stopped (its list file) are taken over into the journal
  and brought back by ``guestwarden restore``: exactly those, saved ones from their
  image, shut-down ones booted, nothing else.
* A dueling setup (libvirt-guests enabled, libvirt's auto-shutdown on) makes the
  daemon refuse to act on guests, saying why, until it is fixed or allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import libvirt

from testbed.daemon import GuestwardenDaemon
from testbed.guests import define_guests
from testbed.libvirtd import IsolatedLibvirtd
from tests.integration.conftest import DaemonFactory

UNKNOWN_UUID = "0badc0de-0000-4000-8000-000000000001"
ELSEWHERE_UUID = "0badc0de-0000-4000-8000-000000000002"


def states(conn: Any) -> dict[str, str]:
    names = {1: "running", 2: "running", 3: "paused", 5: "shutoff"}
    return {d.name(): names.get(d.state()[0], "other") for d in conn.listAllDomains(0)}


def saved(conn: Any) -> set[str]:
    return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE)}


def restore_outcomes(daemon: GuestwardenDaemon) -> dict[str, str]:
    data = json.loads((daemon.state_dir / "journal.json").read_text())
    return {g["uuid"]: g["outcome"] for g in data["restore"]["guests"]}


def enable_libvirt_guests(daemon: GuestwardenDaemon) -> Path:
    link = (daemon.host_root / "etc/systemd/system/multi-user.target.wants"
            / "libvirt-guests.service")
    link.parent.mkdir(parents=True)
    link.symlink_to("/usr/lib/systemd/system/libvirt-guests.service")
    return link


def test_guests_stopped_by_libvirt_guests_are_restored_by_guestwarden(
    test_conn: Any, libvirtd: IsolatedLibvirtd, make_daemon: DaemonFactory
) -> None:
    define_guests(test_conn, "lg", running=6, off=2)
    dom = {d.name(): d for d in test_conn.listAllDomains(0)}
    # what `libvirt-guests stop` left: 0-2 saved (suspend), 3 shut down (no image)
    for i in range(3):
        dom[f"lg-running-{i}"].managedSave(0)
    dom["lg-running-3"].destroy()
    # 4 is listed but was started again by hand since; 5 was saved by hand, unlisted
    dom["lg-running-5"].managedSave(0)
    listed = [dom[f"lg-running-{i}"].UUIDString() for i in range(5)]
    daemon = make_daemon(boot={"sync_time": True})
    listing = daemon.base_dir / "libvirt-guests"
    listing.write_text(f"{libvirtd.test_uri} {' '.join(listed)} {UNKNOWN_UUID}\n"
                       f"qemu:///elsewhere {ELSEWHERE_UUID}\n")

    result = daemon.cli("config", "import-libvirt-guests", "--list", str(listing))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "took over 6 guests" in result.stdout
    assert "qemu:///elsewhere left out" in result.stderr
    assert not listing.exists()

    daemon.start()
    result = daemon.cli("restore", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr + daemon.log_tail()

    now = states(test_conn)
    for i in range(5):
        assert now[f"lg-running-{i}"] == "running", i
    assert now["lg-running-5"] == "shutoff"
    assert now["lg-off-0"] == now["lg-off-1"] == "shutoff"
    assert saved(test_conn) == {"lg-running-5"}  # the images of 0-2 were restored
    outcomes = restore_outcomes(daemon)
    for i in range(3):
        assert outcomes[listed[i]].startswith("restored"), outcomes
    assert outcomes[listed[3]].startswith("started")  # it was shut down: booted
    assert outcomes[listed[4]].startswith("already-running")
    assert outcomes[UNKNOWN_UUID] == "gone"  # e.g. a transient guest shut down
    assert ELSEWHERE_UUID not in outcomes

    again = daemon.cli("restore", "--wait")
    assert again.returncode == 0 and "0/0 guests brought back" in again.stdout


def test_takeover_is_refused_while_the_daemon_runs(
    test_conn: Any, libvirtd: IsolatedLibvirtd, make_daemon: DaemonFactory
) -> None:
    daemon = make_daemon()
    daemon.start()
    listing = daemon.base_dir / "libvirt-guests"
    listing.write_text(f"{libvirtd.test_uri} {UNKNOWN_UUID}\n")
    result = daemon.cli("config", "import-libvirt-guests", "--list", str(listing))
    assert result.returncode == 1
    assert f"daemon (pid {daemon.pid}) is running" in result.stderr
    assert listing.exists()
    assert not (daemon.state_dir / "journal.json").exists()


def test_daemon_refuses_to_act_while_libvirt_guests_is_enabled(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    define_guests(test_conn, "d", running=3)
    daemon = make_daemon(boot={"on_boot": "restore"})
    link = enable_libvirt_guests(daemon)
    status = daemon.start()

    assert status.refusing_guests
    assert len(status.dueling) == 1 and "libvirt-guests.service is enabled" in status.dueling[0]
    shown = daemon.cli("status")
    assert "note: refusing to preserve or restore guests: libvirt-guests.service" in shown.stdout
    for command in ("preserve", "restore"):
        result = daemon.cli(command, "--wait")
        assert result.returncode == 1, result.stdout
        assert f"refusing to {command} guests" in result.stderr
        assert "allow_dueling = true" in result.stderr
    assert set(states(test_conn).values()) == {"running"}
    log = daemon.log_text()
    assert log.count("refusing to preserve or restore guests:") == 1  # once per change
    assert "not restoring automatically in boot" in log

    link.unlink()  # fixed: no restart needed
    result = daemon.cli("preserve", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(states(test_conn).values()) == {"shutoff"}
    assert saved(test_conn) == {"d-running-0", "d-running-1", "d-running-2"}
    assert "dueling setup gone" in daemon.log_text()
    assert not daemon.status().refusing_guests


def test_allow_dueling_acts_anyway_and_says_so(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    define_guests(test_conn, "a", running=2)
    daemon = make_daemon(extra={"allow_dueling": True})
    conf = daemon.host_root / "etc/libvirt/qemu.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text('# ours\nauto_shutdown_try_save = "persistent"\n')
    status = daemon.start()
    assert not status.refusing_guests
    assert "auto_shutdown_try_save = 'persistent'" in status.dueling[0]
    assert any(n.startswith("dueling setup allowed by allow_dueling = true")
               for n in status.notes)
    result = daemon.cli("preserve", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert saved(test_conn) == {"a-running-0", "a-running-1"}
