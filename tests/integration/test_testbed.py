"""The test bed itself: the isolated libvirtd and the test-driver guest helpers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from testbed.guests import define_guests, remove_all
from testbed.libvirtd import IsolatedLibvirtd
from testbed.qemuguests import process_runs
from tests.conftest import isolated_libvirtd, require_libvirtd, short_tmpdir

pytestmark = pytest.mark.libvirtd

REPO = Path(__file__).resolve().parents[2]

# A diskless QEMU guest: SeaBIOS finds nothing to boot and idles. Enough to prove that
# the qemu driver starts real guests and that stop() kills them.
QEMU_XML = """
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
"""


def _names(conn: Any, flags: int = 0) -> set[str]:
    return {dom.name() for dom in conn.listAllDomains(flags)}


def _gone(pid: int) -> bool:
    """No process with that pid, not even a zombie."""
    return not Path(f"/proc/{pid}").exists()


def _snapshot(root: str) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            found[path] = (st.st_mtime_ns, st.st_size)
    return found


# ---------------------------------------------------------------- the session daemon


def test_daemon_answers_on_test_and_qemu_uris(libvirtd: IsolatedLibvirtd) -> None:
    assert libvirtd.pid is not None
    assert libvirtd.socket_path.is_socket()
    assert len(os.fsencode(libvirtd.socket_path)) <= 107
    assert libvirtd.test_uri == f"test+unix:///default?socket={libvirtd.socket_path}"
    assert libvirtd.qemu_uri == f"qemu+unix:///system?socket={libvirtd.socket_path}"
    conn = libvirt.open(libvirtd.test_uri)
    try:
        assert conn.getType() == "TEST"
    finally:
        conn.close()
    conn = libvirt.open(libvirtd.qemu_uri)
    try:
        assert conn.getType() == "QEMU"
    finally:
        conn.close()
    assert libvirtd.log_path.exists()
    assert libvirtd.pid in libvirtd.processes()


def test_keeper_is_one_connection(libvirtd: IsolatedLibvirtd) -> None:
    assert libvirtd.keeper() is libvirtd.keeper()


def test_test_conn_starts_without_guests(test_conn: Any) -> None:
    # remove_all removed even the test driver's predefined guest "test"
    assert test_conn.listAllDomains(0) == []
    assert test_conn.getType() == "TEST"


def test_define_guests_mix(test_conn: Any) -> None:
    names = define_guests(
        test_conn, "mix", running=3, paused=2, off=4, transient_running=2, transient_paused=1
    )
    assert len(names) == len(set(names)) == 12
    assert names[0] == "mix-running-0"
    assert names[-1] == "mix-transient-paused-0"
    assert _names(test_conn) == set(names)
    expected = {
        "running": (libvirt.VIR_DOMAIN_RUNNING, 1),
        "paused": (libvirt.VIR_DOMAIN_PAUSED, 1),
        "off": (libvirt.VIR_DOMAIN_SHUTOFF, 1),
        "transient-running": (libvirt.VIR_DOMAIN_RUNNING, 0),
        "transient-paused": (libvirt.VIR_DOMAIN_PAUSED, 0),
    }
    for name in names:
        kind = name[len("mix-") :].rsplit("-", 1)[0]
        dom = test_conn.lookupByName(name)
        assert (dom.state()[0], dom.isPersistent()) == expected[kind], name
        assert dom.maxMemory() == 131072
    assert len(_names(test_conn, libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)) == 3
    assert len(_names(test_conn, libvirt.VIR_CONNECT_LIST_DOMAINS_PAUSED)) == 3
    assert len(_names(test_conn, libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE)) == 4


def test_define_guests_rejects_duplicate_names(test_conn: Any) -> None:
    define_guests(test_conn, "dup", running=1)
    with pytest.raises(libvirt.libvirtError):
        define_guests(test_conn, "dup", running=1)


def test_remove_all_removes_managed_save_images(test_conn: Any) -> None:
    names = define_guests(test_conn, "ms", running=3, paused=1, transient_running=1)
    for name in names[:2]:
        test_conn.lookupByName(name).managedSave(0)
    assert len(_names(test_conn, libvirt.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE)) == 2
    remove_all(test_conn)
    assert test_conn.listAllDomains(0) == []
    # Same names again: no managed-save image survived the undefine.
    define_guests(test_conn, "ms", running=3)
    assert not _names(test_conn, libvirt.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE)


def test_5000_guests_define_and_remove(test_conn: Any) -> None:
    started = time.monotonic()
    names = define_guests(
        test_conn, "bulk", running=4000, paused=500, off=250, transient_running=250
    )
    defined = time.monotonic() - started
    assert len(names) == 5000
    assert len(test_conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)) == 4750
    started = time.monotonic()
    remove_all(test_conn)
    removed = time.monotonic() - started
    print(f"5000 guests: define {defined:.2f} s, remove_all {removed:.2f} s")
    assert test_conn.listAllDomains(0) == []
    assert defined < 30 and removed < 30  # ~1.4 s and ~0.6 s here


def test_state_is_shared_with_another_process(libvirtd: IsolatedLibvirtd, test_conn: Any) -> None:
    names = define_guests(test_conn, "shared", running=2, paused=1)
    code = textwrap.dedent("""
        import json, sys
        import libvirt
        conn = libvirt.open(sys.argv[1])
        conn.lookupByName(sys.argv[2]).managedSave(0)
        print(json.dumps(sorted(d.name() for d in conn.listAllDomains(0))))
        conn.close()
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code, libvirtd.test_uri, names[0]],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # The other process saw the guests defined here...
    assert json.loads(proc.stdout) == sorted(names)
    # ...and its managed save is visible on the keeper connection.
    dom = test_conn.lookupByName(names[0])
    assert dom.hasManagedSaveImage(0) == 1
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    assert _names(test_conn, libvirt.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE) == {names[0]}
    # Starting it restores from the image, which is then gone.
    dom.create()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert dom.hasManagedSaveImage(0) == 0


def test_real_etc_libvirt_untouched(libvirtd: IsolatedLibvirtd, test_conn: Any) -> None:
    roots = ("/etc/libvirt", "/var/lib/libvirt")
    before = {root: _snapshot(root) for root in roots}
    # The generated configuration is in base_dir, seen by libvirtd as /etc/libvirt.
    assert "generated by testbed" in (libvirtd.base_dir / "etc" / "qemu.conf").read_text()
    name = "gw-etc-probe"
    # Persistent QEMU guest: libvirtd writes /etc/libvirt/qemu/<name>.xml in its view.
    conn = libvirt.open(libvirtd.qemu_uri)
    try:
        dom = conn.defineXML(QEMU_XML.format(name=name))
        assert (libvirtd.base_dir / "etc" / "qemu" / f"{name}.xml").exists()
        assert not Path(f"/etc/libvirt/qemu/{name}.xml").exists()
        dom.undefine()
    finally:
        conn.close()
    define_guests(test_conn, "etc", running=2)
    test_conn.lookupByName("etc-running-0").managedSave(0)
    assert {root: _snapshot(root) for root in roots} == before


# ---------------------------------------------------------------- private daemons


def test_restart_gives_new_libvirtd_and_fresh_test_driver(
    private_libvirtd: IsolatedLibvirtd,
) -> None:
    daemon = private_libvirtd
    keeper = daemon.keeper()
    define_guests(keeper, "before", running=2)
    old_pid = daemon.pid
    assert old_pid is not None
    started = time.monotonic()
    daemon.restart()
    print(f"restart: {time.monotonic() - started:.2f} s")
    assert daemon.pid not in (None, old_pid)
    assert _gone(old_pid)
    with pytest.raises(libvirt.libvirtError):  # the old keeper was closed
        keeper.isAlive()
    new_keeper = daemon.keeper()
    assert new_keeper is not keeper
    # The test driver's state was lost: only its predefined guest is back.
    assert _names(new_keeper) == {"test"}
    define_guests(new_keeper, "after", off=1)
    daemon.restart(hard=True)  # SIGKILL, as in a crash
    assert _names(daemon.keeper()) == {"test"}


def test_qemu_guest_survives_restart_and_stop_kills_everything(
    private_libvirtd: IsolatedLibvirtd,
) -> None:
    require_libvirtd(qemu=True)
    daemon = private_libvirtd
    conn = libvirt.open(daemon.qemu_uri)
    try:
        conn.createXML(QEMU_XML.format(name="q-restart"), 0)
        qemu_pid = _qemu_pid(daemon, "q-restart")
    finally:
        conn.close()
    assert qemu_pid in daemon.processes()
    old_libvirtd = daemon.pid
    assert old_libvirtd is not None
    daemon.restart()
    assert _gone(old_libvirtd)
    assert qemu_pid in daemon.processes()  # QEMU kept running, under the same tini
    conn = libvirt.open(daemon.qemu_uri)
    try:
        assert conn.lookupByName("q-restart").state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        conn.close()
    everything = daemon.processes()
    assert len(everything) >= 4  # tini, its shell loop, libvirtd, QEMU
    started = time.monotonic()
    daemon.stop()
    print(f"stop with one QEMU guest: {time.monotonic() - started:.2f} s")
    assert daemon.pid is None
    assert daemon.processes() == []
    assert [pid for pid in everything if not _gone(pid)] == []


def _qemu_pid(daemon: IsolatedLibvirtd, name: str) -> int:
    """QEMU's pid, from the pid file libvirtd keeps in /run/libvirt/qemu."""
    return int((daemon.base_dir / "run" / "qemu" / f"{name}.pid").read_text())


def test_stop_leaves_nothing_and_is_idempotent(private_libvirtd: IsolatedLibvirtd) -> None:
    daemon = private_libvirtd
    pid = daemon.pid
    assert pid is not None
    everything = daemon.processes()
    assert pid in everything
    started = time.monotonic()
    daemon.stop()
    print(f"stop: {time.monotonic() - started:.2f} s")
    assert daemon.pid is None
    assert [p for p in everything if not _gone(p)] == []
    daemon.stop()
    with pytest.raises(RuntimeError, match="not running"):
        daemon.keeper()


def test_instances_one_after_another() -> None:
    pids = []
    for _ in range(3):
        started = time.monotonic()
        with isolated_libvirtd() as daemon:
            ready = time.monotonic() - started
            pids.append(daemon.pid)
            assert daemon.keeper().getType() == "TEST"
            assert _names(daemon.keeper()) == {"test"}
        print(f"start {ready:.2f} s, start+stop {time.monotonic() - started:.2f} s")
    assert all(pid is not None and _gone(pid) for pid in pids)


def test_start_failure_raises_with_log_tail() -> None:
    require_libvirtd()
    base = short_tmpdir()
    daemon = IsolatedLibvirtd(base, extra_libvirtd_conf='max_clients = "lots"')
    try:
        with pytest.raises(RuntimeError, match="exited early") as info:
            daemon.start(timeout_s=20)
        assert "max_clients" in str(info.value)  # libvirtd's own complaint, from its log
        assert daemon.processes() == []
        assert daemon.pid is None
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_socket_path_too_long_is_refused() -> None:
    with pytest.raises(ValueError, match="107"):
        IsolatedLibvirtd(Path("/tmp") / ("x" * 100))


def test_watchdog_cleans_up_when_the_owner_is_killed() -> None:
    require_libvirtd()
    base = short_tmpdir()
    code = textwrap.dedent("""
        import json, sys, time
        from pathlib import Path
        sys.path.insert(0, sys.argv[1])
        from testbed.libvirtd import IsolatedLibvirtd
        daemon = IsolatedLibvirtd(Path(sys.argv[2]))
        daemon.start()
        daemon.keeper()
        print(json.dumps(daemon.processes()), flush=True)
        time.sleep(600)
    """)
    owner = subprocess.Popen(
        [sys.executable, "-c", code, str(REPO), str(base)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        pids = json.loads(owner.stdout.readline())
        assert len(pids) >= 3
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 20
        left = pids
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [pid for pid in pids if process_runs(pid)]
        assert left == [], "the watchdog did not stop the orphaned instance"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        # In case the watchdog failed: stop whatever is left of that instance.
        IsolatedLibvirtd(base).stop()
        shutil.rmtree(base, ignore_errors=True)


