"""An action whose libvirt connection dies under it runs again on a new one, boundedly.

The real thing (libvirtd restarted and killed under saves and shutdowns of real
guests) is tests/integration/test_faults_real_guests.py; these pin the rules with a
fake connection: which errors count as a lost connection, how often the action runs
again, with how much of its time, and never after a cancel.
"""

from __future__ import annotations

import threading
from typing import Any

import libvirt
import pytest

from guestwarden.ipc.messages import Job
from guestwarden.workers import actions as actions_module
from guestwarden.workers.actions import ActionError, ActionResult, Actions, Connections

URI = "qemu:///system"


class FakeError(libvirt.libvirtError):  # type: ignore[misc]
    """A libvirtError with a chosen code (real ones read libvirt's last error)."""

    def __init__(self, code: int, message: str = "End of file while reading data") -> None:
        Exception.__init__(self, message)
        self.code = code
        self.message = message

    def get_error_code(self) -> int:
        return self.code

    def get_error_message(self) -> str:
        return self.message


class FakeConn:
    def __init__(self, alive: bool) -> None:
        self.alive = alive
        self.closed = False

    def isAlive(self) -> int:
        return int(self.alive)

    def close(self) -> None:
        self.closed = True


def connections_with(conn: FakeConn) -> Connections:
    connections = Connections(connect_timeout_s=1.0)
    connections._open[URI] = conn  # as if get() had opened it
    return connections


def test_lost_only_for_a_connection_error_on_a_dead_connection() -> None:
    dead = FakeConn(alive=False)
    connections = connections_with(dead)
    assert not connections.lost(URI, FakeError(libvirt.VIR_ERR_OPERATION_INVALID))
    assert URI in connections._open
    assert connections.lost(URI, FakeError(libvirt.VIR_ERR_SYSTEM_ERROR))
    assert URI not in connections._open and dead.closed  # the next get() opens a new one

    alive = connections_with(FakeConn(alive=True))
    assert not alive.lost(URI, FakeError(libvirt.VIR_ERR_SYSTEM_ERROR))
    assert not Connections(1.0).lost(URI, FakeError(libvirt.VIR_ERR_SYSTEM_ERROR))


class Scripted:
    """A save handler that fails ``failures`` times with ``error``, then succeeds.

    Each failure leaves a dead connection behind, as a restarting libvirtd does."""

    def __init__(self, connections: Connections, failures: int, error: FakeError) -> None:
        self.connections = connections
        self.failures = failures
        self.error = error
        self.jobs: list[Job] = []

    def __call__(self, job: Job, cancel: threading.Event) -> ActionResult:
        self.jobs.append(job)
        if len(self.jobs) <= self.failures:
            self.connections._open[URI] = FakeConn(alive=False)
            raise self.error
        return ActionResult("saved")


def actions_with(failures: int, code: int = libvirt.VIR_ERR_SYSTEM_ERROR) -> tuple[
        Actions, Scripted]:
    connections = Connections(connect_timeout_s=1.0)
    actions = Actions(connections)
    handler = Scripted(connections, failures, FakeError(code))
    actions.save = handler  # type: ignore[method-assign]
    return actions, handler


def job() -> Any:
    return Job(job_id=7, kind="save", uri=URI, uuid="u", name="web1", timeout_s=30.0)


def test_a_lost_connection_runs_the_action_again_with_the_time_left() -> None:
    actions, handler = actions_with(failures=2)
    assert actions.run(job(), threading.Event()).result == "saved"
    assert len(handler.jobs) == 3
    assert handler.jobs[0].timeout_s == 30.0
    assert all(0 < j.timeout_s <= 30.0 for j in handler.jobs[1:])


def test_reruns_are_bounded() -> None:
    actions, handler = actions_with(failures=100)
    with pytest.raises(ActionError) as failed:
        actions.run(job(), threading.Event())
    assert failed.value.reason == "libvirt-error"
    assert len(handler.jobs) == actions_module._MAX_RERUNS + 1


def test_other_errors_and_cancelled_jobs_are_not_run_again() -> None:
    actions, handler = actions_with(failures=1, code=libvirt.VIR_ERR_OPERATION_FAILED)
    with pytest.raises(ActionError):
        actions.run(job(), threading.Event())
    assert len(handler.jobs) == 1

    actions, handler = actions_with(failures=1)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ActionError):
        actions.run(job(), cancel)
    assert len(handler.jobs) == 1
