"""A re-dispatched start finishes what the killed attempt began (no real libvirt).

On drivers without VIR_DOMAIN_START_PAUSED (the test driver) a guest that was paused
before preserve is started, then paused: two calls. A worker killed between them left
it running, and the re-dispatched job used to report "already-running" and leave it
so (seen in make soak). The real-libvirt side is tests/integration/test_soak.py.
"""

from __future__ import annotations

import threading
from typing import Any

import libvirt

from guestwarden.ipc.messages import Job
from guestwarden.workers.actions import Actions, Connections

URI = "test:///default"


class FakeDomain:
    def __init__(self, state: int) -> None:
        self.code = state
        self.suspended = 0

    def state(self) -> list[int]:
        return [self.code, 0]

    def suspend(self) -> None:
        self.suspended += 1
        self.code = libvirt.VIR_DOMAIN_PAUSED


class FakeConn:
    def __init__(self, dom: FakeDomain) -> None:
        self.dom = dom

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        return self.dom

    def isAlive(self) -> int:
        return 1

    def close(self) -> None:
        pass


def start(dom: FakeDomain, **job: Any) -> tuple[str, str]:
    connections = Connections(connect_timeout_s=1.0)
    connections._open[URI] = FakeConn(dom)
    actions = Actions(connections)
    result = actions.start(Job(job_id=1, kind="start", uri=URI, uuid="u", name="g", **job),
                           threading.Event())
    return result.result, result.detail


def test_redispatched_start_pauses_a_guest_the_killed_attempt_left_running() -> None:
    dom = FakeDomain(libvirt.VIR_DOMAIN_RUNNING)
    outcome, detail = start(dom, attempt=2, start_paused=True, expect_managed_save=True)
    assert (outcome, dom.suspended, dom.code) == ("restored", 1, libvirt.VIR_DOMAIN_PAUSED)
    assert "earlier attempt" in detail


def test_first_attempt_leaves_a_guest_someone_else_started_alone() -> None:
    dom = FakeDomain(libvirt.VIR_DOMAIN_RUNNING)
    assert start(dom, attempt=1, start_paused=True)[0] == "already-running"
    assert dom.suspended == 0
