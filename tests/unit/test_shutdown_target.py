"""The worker's view of a guest being shut down (workers/actions.py ``_ShutdownTarget``).

While libvirt ends QEMU after the guest powered off, the qemu driver says SHUTDOWN;
the state is then read again at once (not after the wait's 0.1 s poll), for a bounded
while. A fake domain plays libvirt's state codes; the clock and sleep are injected.
"""

from __future__ import annotations

from collections.abc import Iterable

import libvirt

from guestwarden.ipc.messages import Job
from guestwarden.workers.actions import STOPPING_POLL_S, STOPPING_RECHECK_S, _ShutdownTarget

RUNNING, SHUTDOWN, SHUTOFF = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_SHUTDOWN,
                              libvirt.VIR_DOMAIN_SHUTOFF)
JOB = Job(job_id=1, kind="shutdown", uri="qemu:///system", uuid="u-1", name="g1")


class FakeDomain:
    """Answers state() with the given codes, then repeats the last one."""

    def __init__(self, codes: Iterable[int | Exception]) -> None:
        self.codes = list(codes)
        self.reads = 0

    def state(self) -> list[int]:
        code = self.codes[min(self.reads, len(self.codes) - 1)]
        self.reads += 1
        if isinstance(code, Exception):
            raise code
        return [code, 0]


class FakeTime:
    """A clock that advances only when slept on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def target(dom: FakeDomain, fake: FakeTime) -> _ShutdownTarget:
    return _ShutdownTarget(dom, JOB, clock=fake.clock, sleep=fake.sleep)


def test_shutdown_state_is_read_again_at_once_until_shut_off() -> None:
    dom, fake = FakeDomain([RUNNING, SHUTDOWN, SHUTDOWN, SHUTOFF]), FakeTime()
    guest = target(dom, fake)
    assert guest.state() == "running"
    assert fake.slept == []  # running: the caller's own poll interval applies
    assert guest.state() == "shutoff"
    assert dom.reads == 4
    assert fake.slept == [STOPPING_POLL_S, STOPPING_POLL_S]


def test_a_guest_that_stays_in_shutdown_is_running_after_the_bound() -> None:
    dom, fake = FakeDomain([SHUTDOWN]), FakeTime()
    guest = target(dom, fake)
    assert guest.state() == "running"
    assert STOPPING_RECHECK_S <= fake.now < STOPPING_RECHECK_S + 2 * STOPPING_POLL_S
    # the bound counts from the first SHUTDOWN seen: later reads do not wait again
    reads = dom.reads
    assert guest.state() == "running"
    assert dom.reads == reads + 1


def test_a_transient_guest_that_is_gone_is_shut_off() -> None:
    gone = libvirt.libvirtError("Domain not found")
    gone.err = (libvirt.VIR_ERR_NO_DOMAIN, 0, "Domain not found", 0, "", None, None, 0, 0)
    assert target(FakeDomain([SHUTDOWN, gone]), FakeTime()).state() == "shutoff"
