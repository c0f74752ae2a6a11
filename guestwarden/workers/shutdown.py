"""Graceful shutdown of one guest, in the mode ``[shutdown] shutdown_mode`` asks for.

* ``acpi``: press the ACPI power button, then wait for the guest to go off.
* ``agent``: ask the QEMU guest agent (guest-shutdown), then wait. When the agent
  cannot be asked (not running, not answering, not configured) the shutdown fails at
  once, so the guest moves on to the next action of its chain instead of waiting out
  a timeout for a request that never reached it.
* ``agent,acpi``: the agent, and the power button when the agent cannot be asked.

Why the agent request runs on a side thread: libvirt's agent shutdown does not
return when the agent has accepted the request but when the guest is off (libvirt
waits for QEMU's SHUTDOWN event, up to 60 s in libvirt 9.0, whatever
``agentSetResponseTimeout`` says). The wait here -- the guest's state polled every
``poll_s`` until the deadline -- stays in charge: the side call is never joined, so
a job that ended (guest off, timed out, cancelled) hands its worker back at once,
and a worker may take its next job (typically the chain's poweroff, which also ends
the blocked call) or exit while the call is still blocked in a daemon thread.

A driver that rejects the mode's flag (libvirt's test driver knows no shutdown
modes) gets a plain shutdown request instead, and the report says so.

This module makes no libvirt call itself: ``ShutdownTarget`` is implemented with
libvirt in ``actions.py``, and with fakes in the unit tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from guestwarden.ipc.messages import GuestState, ShutdownMode

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
"""How often the wait re-reads the guest's state (one cheap RPC)."""

POWER_BUTTON = "the ACPI power button"
AGENT_REQUEST = "the guest agent's shutdown request"


class ModeUnsupported(Exception):
    """The driver rejects the mode's flag: it knows only a plain shutdown request."""


class AgentFailed(Exception):
    """The guest agent could not be asked: not running, not answering, not configured."""


class ShutdownTarget(Protocol):
    """One guest, as a graceful shutdown needs it."""

    @property
    def name(self) -> str: ...

    def state(self) -> GuestState: ...

    def press_power_button(self) -> None:
        """Raises ModeUnsupported when the driver has no ACPI flag."""

    def agent_shutdown(self) -> None:
        """Blocks until the guest is off; raises AgentFailed or ModeUnsupported."""

    def plain_shutdown(self) -> None:
        """The driver's own default way of asking."""


@dataclass(frozen=True)
class ShutdownReport:
    ok: bool
    reason: str
    """``shut-down`` when ok, else ``timeout``, ``agent-failed`` or ``cancelled``."""
    detail: str


class SideCall:
    """A blocking call in a daemon thread that its owner polls and never joins."""

    def __init__(self, fn: Callable[[], None], name: str) -> None:
        self._fn = fn
        self._done = threading.Event()
        self.error: Exception | None = None
        threading.Thread(target=self._body, name=name, daemon=True).start()

    def _body(self) -> None:
        try:
            self._fn()
        except Exception as exc:  # handed to the owner, who decides what it means
            self.error = exc
        finally:
            self._done.set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float) -> bool:
        return self._done.wait(timeout_s)


class GracefulShutdown:
    """Ask one guest to power off in ``mode`` and wait at most ``timeout_s`` for it."""

    def __init__(
        self,
        target: ShutdownTarget,
        mode: ShutdownMode,
        timeout_s: float,
        cancel: threading.Event,
        *,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = POLL_INTERVAL_S,
    ) -> None:
        self.target = target
        self.mode = mode
        self.timeout_s = timeout_s
        self.cancel = cancel
        self.clock = clock
        self.poll_s = poll_s
        self.asked_with = ""
        """How the guest was asked, for the report (changes on a fallback)."""

    def run(self) -> ShutdownReport:
        name = self.target.name
        deadline = self.clock() + self.timeout_s
        agent: SideCall | None = None
        if self.mode == "acpi":
            self._press_power_button()
        else:
            self.asked_with = AGENT_REQUEST
            agent = SideCall(self._agent_shutdown, name=f"agent-shutdown-{name}")
        while True:
            if self.target.state() == "shutoff":
                return ShutdownReport(True, "shut-down", f"off after {self.asked_with}")
            if agent is not None and agent.finished:
                if agent.error is not None:
                    failed = self._agent_failed(agent.error)
                    if failed is not None:
                        return failed
                agent = None  # done or replaced: only the state matters from now on
            if self.clock() >= deadline:
                return ShutdownReport(
                    False, "timeout",
                    f"guest {name} still running {self.timeout_s:g}s after {self.asked_with}",
                )
            if self.cancel.wait(self.poll_s):
                return ShutdownReport(False, "cancelled", f"shutdown of guest {name} cancelled")

    def _agent_shutdown(self) -> None:
        """The side call; its end is logged, as it may come long after the job's."""
        try:
            self.target.agent_shutdown()
        except Exception as exc:
            log.info("guest=%s agent shutdown call failed: %s", self.target.name, exc)
            raise
        log.info("guest=%s agent shutdown call returned", self.target.name)

    def _press_power_button(self) -> None:
        try:
            self.target.press_power_button()
            self.asked_with = POWER_BUTTON
        except ModeUnsupported:
            self.target.plain_shutdown()
            self.asked_with = "a plain shutdown request (the driver has no ACPI flag)"

    def _agent_failed(self, error: Exception) -> ShutdownReport | None:
        """A report when the shutdown has failed; None when it goes on another way."""
        name = self.target.name
        if isinstance(error, ModeUnsupported):
            self.target.plain_shutdown()
            self.asked_with = "a plain shutdown request (the driver has no guest-agent flag)"
            log.info("guest=%s: driver has no agent shutdown (%s): plain shutdown sent",
                     name, error)
            return None
        if self.mode == "agent,acpi":
            self._press_power_button()
            self.asked_with += f" (the guest agent did not answer: {error})"
            log.info("guest=%s: guest agent did not answer (%s): %s sent instead",
                     name, error, POWER_BUTTON)
            return None
        return ShutdownReport(
            False, "agent-failed",
            f"guest {name}: its guest agent did not answer ({error}); shutdown_mode is "
            '"agent", so no other way was tried',
        )
