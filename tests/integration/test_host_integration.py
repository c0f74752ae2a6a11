"""The real daemon, a real libvirtd, a private system bus with a mock logind, a fake systemd.

* the bus: dbus-daemon on a socket in a temp dir + python-dbusmock's logind template
  (with InhibitDelayMaxUSec added), and dbusmock's systemd template with ListJobs where
  a test needs systemd's job queue (testbed/hostbus.py);
* systemd's side: an AF_UNIX datagram socket as NOTIFY_SOCKET, with SO_PASSCRED so
  every message's sender pid is known;
* guests: libvirt's test driver in the session's isolated libvirtd.

A worker frozen with SIGSTOP (and killed by the daemon when its heartbeats stop)
makes a preserve last at least ``heartbeat_timeout``, so that "during the preserve"
is a time span the test can look at. Every wait is for a condition, with a deadline;
every process is stopped by pid (fixtures, and ``finally`` for frozen workers).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from guestwarden.ipc.messages import Error, Reload
from testbed.daemon import GuestwardenDaemon, wait_for
from testbed.guests import define_guests
from testbed.hostbus import (
    LogindMock,
    NotifyCollector,
    PrivateSystemBus,
    SystemdMock,
    system_bus_with_logind,
)
from tests.integration.conftest import DaemonFactory

SLOW = {"heartbeat_interval": 0.2, "heartbeat_timeout": 2.5}


@dataclass
class Host:
    bus: PrivateSystemBus
    logind: LogindMock
    notify: NotifyCollector

    def env(self, **extra: str) -> dict[str, str]:
        return {"DBUS_SYSTEM_BUS_ADDRESS": self.bus.address,
                "NOTIFY_SOCKET": str(self.notify.path), **extra}


@pytest.fixture
def host() -> Iterator[Host]:
    with system_bus_with_logind(delay_max_s=600) as (bus, logind):
        notify = NotifyCollector(bus.base_dir / "notify")
        try:
            yield Host(bus, logind, notify)
        finally:
            notify.close()


@pytest.fixture
def systemd(host: Host) -> Iterator[SystemdMock]:
    mock = SystemdMock(host.bus)
    mock.start()
    yield mock
    mock.stop()


# ---------------------------------------------------------------------- helpers


def active(conn: Any) -> set[str]:
    return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}


def with_image(conn: Any) -> set[str]:
    return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE)}


def all_names(conn: Any) -> set[str]:
    return {d.name() for d in conn.listAllDomains(0)}


def journal_outcomes(daemon: GuestwardenDaemon) -> dict[str, str]:
    data = json.loads((daemon.state_dir / "journal.json").read_text())
    return {g["name"]: g["outcome"] for g in data["preserve"]["guests"]}


def fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


def inhibitor_fd(daemon_pid: int, logind_pid: int) -> tuple[int, str]:
    """The daemon's fd whose pipe the mock logind holds the other end of."""
    theirs = {t for t in fd_targets(logind_pid).values() if t.startswith("pipe:")}
    ours = [(fd, t) for fd, t in fd_targets(daemon_pid).items() if t in theirs]
    assert len(ours) == 1, (ours, theirs)
    return ours[0]


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP a worker (the daemon kills it when its heartbeats stop); SIGKILL it after."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start_held(daemon: GuestwardenDaemon, host: Host) -> None:
    daemon.start()
    wait_for(lambda: host.logind.ours() and daemon.status().inhibitor == "held", 20,
             "the daemon's inhibitor")


# ---------------------------------------------------------------------- logind


def test_inhibitor_is_held_listed_and_never_reaches_a_worker(
    test_conn: Any, make_daemon: DaemonFactory, host: Host
) -> None:
    define_guests(test_conn, "i", running=3, transient_running=1)
    daemon = make_daemon(workers=2, env=host.env())
    start_held(daemon, host)
    [(what, who, why, mode, _uid, _pid)] = host.logind.ours()
    assert (what, who, mode) == ("shutdown", "guestwarden", "delay")
    assert "guests are being protected" in why

    status = wait_for(lambda: (s := daemon.status()).preserve_estimate_s is not None and s, 20,
                      "the preserve estimate")
    assert status.inhibit_delay_max_s == 600 and not status.warnings
    text = daemon.cli("status").stdout
    assert "inhibitor: held (logind waits at most 600s; preserve now: about" in text

    # workers started after the inhibitor was taken must not hold it either
    assert daemon.cli("workers", "4").returncode == 0
    wait_for(lambda: len([w for w in daemon.status().workers if w.state == "idle"]) == 4, 20,
             "4 workers")
    assert host.logind.process is not None
    fd, pipe = inhibitor_fd(daemon.pid, host.logind.process.pid)
    flags = Path(f"/proc/{daemon.pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
    assert int(flags, 8) & os.O_CLOEXEC, "the inhibitor fd must be close-on-exec"
    workers = daemon.worker_pids()
    assert len(workers) == 4
    for pid in workers:
        assert pipe not in fd_targets(pid).values(), f"worker {pid} holds the inhibitor"


def test_prepare_for_shutdown_preserves_every_guest_before_the_inhibitor_goes(
    test_conn: Any, make_daemon: DaemonFactory, host: Host
) -> None:
    names = define_guests(test_conn, "s", running=12, paused=3, off=2, transient_running=4)
    was_active = active(test_conn)
    daemon = make_daemon(workers=2, advanced=SLOW, env=host.env())
    start_held(daemon, host)
    wait_for(lambda: daemon.status().preserve_estimate_s is not None, 20, "the estimate")
    save_worker = next_but_one_worker(daemon)
    seen_in_progress = False
    with frozen(save_worker):
        host.logind.prepare_for_shutdown(True)

        def released() -> bool:
            nonlocal seen_in_progress
            held = bool(host.logind.ours())  # first the lock, then the guests:
            still = active(test_conn) & was_active  # a guest seen running here ran after it
            if held:
                seen_in_progress |= bool(still)
                return False
            assert not still, f"inhibitor released while {sorted(still)} still ran"
            return True

        wait_for(released, 60, "the inhibitor to be released", interval_s=0.01)
    assert seen_in_progress, "the preserve was never seen in progress"
    persistent_active = {n for n in was_active if not n.startswith("s-transient")}
    assert with_image(test_conn) == persistent_active
    assert not {n for n in all_names(test_conn) if n.startswith("s-transient")}
    outcomes = journal_outcomes(daemon)
    assert set(outcomes) == set(names)
    assert daemon.status().inhibitor == "released"
    statuses = [n.value for n in host.notify.find("STATUS")]
    progress = r"Preserving: \d+/19 done, (saving|shutting down) s-"
    assert any(re.match(progress, s) for s in statuses), statuses
    assert host.notify.find("EXTEND_TIMEOUT_USEC")


def next_but_one_worker(daemon: GuestwardenDaemon) -> int:
    """The pid of the worker that will get preserve's first save (with two workers).

    Idle workers are used least recently used first. After a plan (one inventory job),
    the worker that ran it is the one preserve's first save goes to, right after the
    preserve's inventory runs on the other one; frozen, it holds the only save slot
    (parallel_save = 1) for ``heartbeat_timeout``, so the run is seen mid-way.
    """
    before = {w.worker_id: w.jobs_done for w in daemon.status().workers}
    assert daemon.cli("plan").returncode == 0
    return next(w.pid for w in daemon.status().workers
                if w.jobs_done > before.get(w.worker_id, 0))


def test_cancelled_shutdown_takes_a_new_inhibitor(
    test_conn: Any, make_daemon: DaemonFactory, host: Host
) -> None:
    define_guests(test_conn, "c", running=2)
    daemon = make_daemon(workers=2, env=host.env())
    start_held(daemon, host)
    host.logind.prepare_for_shutdown(True)
    wait_for(lambda: not host.logind.ours(), 20, "the inhibitor to be released")
    host.logind.prepare_for_shutdown(False)
    wait_for(lambda: host.logind.ours() and daemon.status().inhibitor == "held", 20,
             "a new inhibitor")
    assert len(host.logind.ours()) == 1


def test_bus_killed_and_restarted_inhibitor_taken_again(
    test_conn: Any, make_daemon: DaemonFactory, host: Host
) -> None:
    daemon = make_daemon(workers=2, env=host.env())
    start_held(daemon, host)
    host.bus.stop()  # the mock logind exits with its bus
    status = wait_for(lambda: (s := daemon.status()).inhibitor == "unavailable" and s, 20,
                      "the daemon to notice")
    assert status.state == "idle"  # it keeps working
    assert "inhibitor: unavailable (" in daemon.cli("status").stdout
    host.bus.start()
    host.logind.start()
    wait_for(lambda: host.logind.ours() and daemon.status().inhibitor == "held", 60,
             "the inhibitor to be taken again")
    warnings = [line for line in daemon.log_text().splitlines()
                if "inhibitor unavailable" in line]
    assert len(warnings) == 1, warnings  # said once, retried quietly


# ---------------------------------------------------------------------- SIGTERM


def test_sigterm_without_host_shutdown_leaves_guests_running(
    test_conn: Any, make_daemon: DaemonFactory, host: Host, systemd: SystemdMock
) -> None:
    define_guests(test_conn, "l", running=4, paused=1, transient_running=1)
    before = active(test_conn)
    systemd.set_jobs([(11, "guestwarden.service", "restart", "running")])
    daemon = make_daemon(workers=2, env=host.env())
    start_held(daemon, host)
    assert daemon.stop() == 0
    assert active(test_conn) == before and not with_image(test_conn)
    assert "a service stop, not a host shutdown" in daemon.log_text()
    assert host.notify.find("STOPPING", "1")


@pytest.mark.parametrize("how", ["systemd-job", "logind-property"])
def test_sigterm_during_host_shutdown_preserves_and_a_second_one_does_not_abort(
    test_conn: Any, make_daemon: DaemonFactory, host: Host, systemd: SystemdMock, how: str
) -> None:
    names = define_guests(test_conn, "h", running=10, paused=2, transient_running=2)
    daemon = make_daemon(workers=3, advanced=SLOW, env=host.env())
    start_held(daemon, host)
    if how == "systemd-job":
        systemd.set_jobs([(7, "poweroff.target", "start", "waiting"),
                          (8, "guestwarden.service", "stop", "running")])
    else:
        host.logind.set_preparing_for_shutdown(True)
    assert daemon.process is not None
    with frozen(daemon.status().workers[0].pid):
        os.kill(daemon.pid, signal.SIGTERM)
        wait_for(lambda: "preserving guests first" in daemon.log_text(), 20, "the decision")
        os.kill(daemon.pid, signal.SIGTERM)
        wait_for(lambda: "SIGTERM received while stopping: ignored" in daemon.log_text(), 20,
                 "the second SIGTERM to be ignored")
        assert daemon.process.wait(60) == 0
    assert not active(test_conn), "a guest still runs"
    assert set(journal_outcomes(daemon)) == set(names)
    reason = "start job (7) for poweroff.target" if how == "systemd-job" else \
        "PreparingForShutdown"
    assert reason in daemon.log_text()
    main = daemon.pid
    for key in ("EXTEND_TIMEOUT_USEC", "STOPPING"):
        assert host.notify.find(key) and {n.pid for n in host.notify.find(key)} == {main}
    # EXTEND_TIMEOUT_USEC came after STOPPING (systemd's stop timeout is what it extends)
    assert host.notify.find("EXTEND_TIMEOUT_USEC")[0].seq > host.notify.find("STOPPING")[0].seq


def test_sigterm_after_logind_shutdown_does_not_preserve_twice(
    test_conn: Any, make_daemon: DaemonFactory, host: Host
) -> None:
    define_guests(test_conn, "t", running=3)
    daemon = make_daemon(workers=2, env=host.env())
    start_held(daemon, host)
    host.logind.prepare_for_shutdown(True)
    wait_for(lambda: not host.logind.ours(), 20, "the preserve for logind")
    assert daemon.stop() == 0
    assert set(journal_outcomes(daemon).values()) == {"saved"}  # not overwritten by "untouched"
    assert "preserved already when logind announced this shutdown" in daemon.log_text()


# ---------------------------------------------------------------------- systemd notify


def test_notify_ready_watchdog_status_extend_reload_stopping_all_from_the_main_pid(
    test_conn: Any, make_daemon: DaemonFactory, host: Host
) -> None:
    define_guests(test_conn, "n", running=5)
    daemon = make_daemon(workers=2, env=host.env(WATCHDOG_USEC="1000000"))
    start_held(daemon, host)
    notify = host.notify
    ready = notify.wait("READY", "1")[0]
    notify.wait("WATCHDOG", "1", count=2, after=ready.seq)
    assert notify.find("STATUS")

    result = daemon.cli("preserve", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    [extend] = notify.wait("EXTEND_TIMEOUT_USEC")
    done = wait_for(lambda: [n for n in notify.find("STATUS") if "last preserve ok" in n.value],
                    20, "the status after the preserve")[0]
    notify.wait("WATCHDOG", "1", count=2, after=done.seq)  # time passes, the loop lives...
    assert [n.seq for n in notify.find("EXTEND_TIMEOUT_USEC")] == [extend.seq]  # ...no EXTEND

    # reload: RELOADING=1 then READY=1, and what changed (live or not) is said
    text = daemon.config.read_text()
    daemon.config.write_text(text.replace("[shutdown]\n", "[shutdown]\nparallel_save = 2\n")
                             .replace("[advanced]\n", "[advanced]\nheartbeat_timeout = 5.0\n"))
    result = daemon.cli("reload")
    assert result.returncode == 0, result.stderr
    assert "shutdown.parallel_save: 1 -> 2 (in effect now)" in result.stdout
    assert "advanced.heartbeat_timeout: 10.0 -> 5.0 (needs a restart" in result.stdout
    reloading = notify.wait("RELOADING", "1")[0]
    notify.wait("READY", "1", after=reloading.seq)

    # a broken file is refused, with the file and key named; the daemon goes on
    daemon.config.write_text(text.replace("[shutdown]\n", "[shutdown]\nparallel_save = 0\n"))
    reply = daemon.request(Reload())
    assert isinstance(reply, Error) and reply.code == "invalid"
    assert str(daemon.config) in reply.message and "shutdown.parallel_save" in reply.message
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: daemon.log_text().count("reload refused") == 2, 20, "SIGHUP's refusal")
    assert daemon.status().state == "idle"
    assert len(notify.find("RELOADING")) == 3 and len(notify.find("READY")) == 4

    assert daemon.stop() == 0
    notify.wait("STOPPING", "1")
    senders = {n.pid for n in notify.drain()}
    assert senders == {daemon.pid}, f"sent by {senders}, main pid {daemon.pid}"


def test_without_a_bus_or_systemd_the_daemon_works_and_says_so(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    define_guests(test_conn, "x", running=2)
    daemon = make_daemon(workers=2)  # DBUS_SYSTEM_BUS_ADDRESS points at nothing
    status = daemon.start()
    wait_for(lambda: daemon.status().inhibitor == "unavailable", 10, "the inhibitor state")
    assert status.state == "idle"
    assert daemon.cli("preserve", "--wait").returncode == 0
    assert len([line for line in daemon.log_text().splitlines()
                if "inhibitor unavailable" in line]) == 1
