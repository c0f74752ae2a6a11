"""GracefulShutdown's decisions, with a fake guest and a clock that ticks once per read.

The real thing (QEMU guests that ignore the power button, have no agent or take
seconds to power off) is tested end to end in tests/integration/test_qemu_e2e.py.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import pytest

from guestwarden.ipc.messages import GuestState, ShutdownMode
from guestwarden.workers.shutdown import (
    AgentFailed,
    GracefulShutdown,
    ModeUnsupported,
    ShutdownReport,
    SideCall,
)


class FakeGuest:
    """Goes off ``off_after`` state reads after the way it listens to was used."""

    def __init__(self, *, listens_to: tuple[str, ...] = ("acpi", "agent", "plain"),
                 off_after: int = 2, acpi_flag: bool = True,
                 agent: Callable[[], None] | None = None) -> None:
        self.name = "g1"
        self.listens_to = listens_to
        self.off_after = off_after
        self.acpi_flag = acpi_flag
        self.agent = agent
        self.calls: list[str] = []
        self._asked_at: int | None = None
        self._reads = 0

    def _asked(self, how: str) -> None:
        self.calls.append(how)
        if how in self.listens_to and self._asked_at is None:
            self._asked_at = self._reads

    def state(self) -> GuestState:
        self._reads += 1
        if self._asked_at is not None and self._reads - self._asked_at > self.off_after:
            return "shutoff"
        return "running"

    def press_power_button(self) -> None:
        if not self.acpi_flag:
            self.calls.append("acpi-rejected")
            raise ModeUnsupported("unsupported flags (0x1)")
        self._asked("acpi")

    def plain_shutdown(self) -> None:
        self._asked("plain")

    def agent_shutdown(self) -> None:
        if self.agent is not None:
            self.agent()
        self._asked("agent")


def run(guest: FakeGuest, mode: ShutdownMode, timeout_s: float = 50.0,
        cancel: threading.Event | None = None) -> ShutdownReport:
    ticks = itertools.count()
    return GracefulShutdown(guest, mode, timeout_s, cancel or threading.Event(),
                            clock=lambda: float(next(ticks)), poll_s=0.001).run()


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    done = threading.Event()
    deadline = threading.Timer(timeout_s, done.set)
    deadline.start()
    try:
        while not condition():
            assert not done.wait(0.001), "condition not met in time"
    finally:
        deadline.cancel()


def test_acpi_presses_only_the_power_button() -> None:
    guest = FakeGuest()
    report = run(guest, "acpi")
    assert report == ShutdownReport(True, "shut-down", "off after the ACPI power button")
    assert guest.calls == ["acpi"]


def test_acpi_on_a_driver_without_the_flag_sends_a_plain_shutdown() -> None:
    guest = FakeGuest(acpi_flag=False)
    report = run(guest, "acpi")
    assert report.ok and "plain shutdown request" in report.detail
    assert guest.calls == ["acpi-rejected", "plain"]


def test_ignored_power_button_times_out_at_the_deadline() -> None:
    guest = FakeGuest(listens_to=("agent",))
    report = run(guest, "acpi", timeout_s=5)
    assert not report.ok and report.reason == "timeout"
    assert report.detail == "guest g1 still running 5s after the ACPI power button"


def test_agent_mode_returns_when_off_although_the_agent_call_still_blocks() -> None:
    release = threading.Event()
    blocked = threading.Event()

    def agent() -> None:
        blocked.set()
        release.wait(10)

    guest = FakeGuest(listens_to=(), agent=agent)
    # the guest goes off by itself while libvirt's agent call is still waiting
    guest.state = lambda: "shutoff" if blocked.is_set() else "running"  # type: ignore[method-assign]
    try:
        report = run(guest, "agent")
        assert report.ok and report.detail == "off after the guest agent's shutdown request"
        assert not release.is_set()  # returned with the side call still blocked
    finally:
        release.set()


def test_agent_mode_times_out_while_the_agent_call_blocks() -> None:
    release = threading.Event()
    guest = FakeGuest(listens_to=(), agent=lambda: release.wait(10) and None)
    try:
        report = run(guest, "agent", timeout_s=20)
        assert report.reason == "timeout"
        assert "after the guest agent's shutdown request" in report.detail
    finally:
        release.set()
    assert "acpi" not in guest.calls


def no_agent() -> None:
    raise AgentFailed("Guest agent is not responding: QEMU guest agent is not connected")


def test_agent_mode_without_an_agent_fails_at_once_and_presses_nothing() -> None:
    guest = FakeGuest(agent=no_agent)
    report = run(guest, "agent", timeout_s=1000)
    assert report.reason == "agent-failed"
    assert "guest agent did not answer" in report.detail and "not connected" in report.detail
    assert guest.calls == []


def test_agent_then_acpi_falls_back_to_the_power_button() -> None:
    guest = FakeGuest(agent=no_agent)
    report = run(guest, "agent,acpi")
    assert report.ok, report
    assert guest.calls == ["acpi"]
    assert report.detail.startswith("off after the ACPI power button (the guest agent did not")


def test_agent_then_acpi_uses_the_agent_when_it_answers() -> None:
    guest = FakeGuest()
    report = run(guest, "agent,acpi")
    assert report.ok and report.detail == "off after the guest agent's shutdown request"
    assert guest.calls == ["agent"]


@pytest.mark.parametrize("mode", ["agent", "agent,acpi"])
def test_agent_flag_rejected_by_the_driver_sends_a_plain_shutdown(mode: ShutdownMode) -> None:
    def rejected() -> None:
        raise ModeUnsupported("unsupported flags (0x2)")

    guest = FakeGuest(agent=rejected)
    report = run(guest, mode)
    assert report.ok and "no guest-agent flag" in report.detail
    assert guest.calls == ["plain"]


def test_cancel_ends_the_wait() -> None:
    cancel = threading.Event()
    cancel.set()
    report = run(FakeGuest(listens_to=()), "acpi", cancel=cancel)
    assert report.reason == "cancelled"


def test_side_call_keeps_the_error_for_its_owner() -> None:
    call = SideCall(no_agent, name="t")
    assert call.wait(5)
    assert isinstance(call.error, AgentFailed)
    ok = SideCall(lambda: None, name="t2")
    wait_until(lambda: ok.finished)
    assert ok.error is None
