"""The supervisor's side of the host: logind's inhibitor and systemd's notify socket.

``HostIntegration`` owns the ``Inhibitor`` and the ``SystemdNotifier`` and does for
the supervisor what involves them:

* runs preserve when logind announces a shutdown (the inhibitor waits for it);
* decides whether SIGTERM means "preserve first" (``on_service_stop``, and
  hostshutdown.py for how a host shutdown is recognised);
* keeps systemd's ``STATUS=`` current, pings the watchdog, sends
  ``EXTEND_TIMEOUT_USEC`` while a preserve runs;
* estimates how long a preserve would take (forecast.py, the same estimate as
  ``plan``) whenever logind's delay limit is known, and warns when the limit is shorter.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from guestwarden.conf.settings import Settings
from guestwarden.ipc.messages import GuestInfo, JobStatus
from guestwarden.supervisor.estimate import delay_warning
from guestwarden.supervisor.forecast import Forecast
from guestwarden.supervisor.hostshutdown import host_shutdown_verdict
from guestwarden.supervisor.inhibitor import Inhibitor
from guestwarden.supervisor.plan import chain_for
from guestwarden.supervisor.runs import Run
from guestwarden.supervisor.systemd import SystemdNotifier

log = logging.getLogger(__name__)

ESTIMATE_POLL_S = 1.0
ESTIMATE_REFRESH_S = 300.0
"""Guests started or stopped by hand are noticed at the latest after this long."""
SHOWN_JOBS = 2

_DOING = {"save": "saving", "shutdown": "shutting down", "poweroff": "powering off",
          "start": "starting", "sync_time": "setting the clock of", "inventory": "listing"}


class HostedSupervisor(Protocol):
    """What HostIntegration needs of the supervisor."""

    settings: Settings
    state: str
    runs: list[Run]

    def status_line(self) -> str: ...

    async def preserve_and_wait(self) -> Run: ...

    async def inventory(self) -> tuple[list[GuestInfo], list[str]]: ...

    def forecast(self, guests: Sequence[GuestInfo], delay_max_s: float | None) -> Forecast: ...


def job_phrase(job: JobStatus) -> str:
    text = f"{_DOING.get(job.kind, job.kind)} {job.guest or job.uri}"
    if job.total_bytes:
        text += f" {100 * job.processed_bytes // job.total_bytes}%"
    return text


def progress_line(state: str, run: Run | None, jobs: Sequence[JobStatus], workers: int,
                  inhibitor: str, warning: str) -> str:
    """``Preserving: 12/40 done, saving web3 63%`` and the like, for ``STATUS=``."""
    if run is not None and run.finished_at is None:
        verb = "Preserving" if run.kind == "preserve" else "Restoring"
        done, total = run.counts()
        if not run.guests:
            return f"{verb}: listing guests"
        text = f"{verb}: {done}/{total} done"
        doing = [job_phrase(j) for j in jobs if j.kind != "inventory"]
        if doing:
            text += ", " + ", ".join(doing[:SHOWN_JOBS])
            if len(doing) > SHOWN_JOBS:
                text += f" and {len(doing) - SHOWN_JOBS} more"
        return text
    head = {"starting": "Starting", "idle": "Idle", "stopping": "Stopping"}.get(
        state, state.capitalize())
    text = f"{head}: {workers} workers, logind inhibitor {inhibitor}"
    if run is not None:
        done, total = run.counts()
        text += (f"; last {run.kind} {'ok' if run.ok else 'FAILED'} "
                 f"({done}/{total} guests)")
    if warning:
        text += "; WARNING: logind's delay limit is shorter than preserve needs"
    return text


class HostIntegration:
    def __init__(self, supervisor: HostedSupervisor, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.supervisor = supervisor
        self.clock = clock
        self.inhibitor = Inhibitor(self._preserve_for_logind)
        self.notifier = SystemdNotifier()
        self.estimate_s: float | None = None
        self.warning = ""
        self._estimated_at: float | None = None
        self._estimate_key: tuple[object, ...] = ()

    def coroutines(self) -> list[Coroutine[Any, Any, None]]:
        """What runs on the supervisor's loop for the daemon's whole life."""
        return [
            self.inhibitor.run(),
            self.notifier.run_watchdog(),
            self.notifier.run_status(self.supervisor.status_line),
            self._keep_estimate(),
        ]

    def ready(self) -> None:
        self.notifier.ready(self.supervisor.status_line())

    def close(self) -> None:
        self.inhibitor.close()

    async def extend_while(self, run: Run) -> None:
        """``EXTEND_TIMEOUT_USEC`` from the start of a preserve run until it has finished."""
        await self.notifier.extend_until(run.finished)

    def status_fields(self) -> dict[str, Any]:
        return {
            "inhibitor": self.inhibitor.state,
            "inhibitor_detail": self.inhibitor.detail,
            "inhibit_delay_max_s": self.inhibitor.delay_max_s,
            "preserve_estimate_s": self.estimate_s,
            "warnings": (self.warning,) if self.warning else (),
        }

    # ------------------------------------------------------------------ shutdown

    async def _preserve_for_logind(self) -> None:
        await self.supervisor.preserve_and_wait()

    async def stopping(self, sig: signal.Signals) -> bool:
        """The daemon is stopping on ``sig``: True if it must preserve the guests first.

        Says so in the log and to systemd (``STOPPING=1``).
        """
        preserve, why = await self.stop_decision(sig)
        log.info("%s received: stopping; %s: %s", sig.name,
                 "preserving guests first" if preserve else "guests are left as they are", why)
        self.notifier.stopping("Stopping: preserving guests first" if preserve
                               else "Stopping: guests are left as they are")
        return preserve

    async def stop_decision(self, sig: signal.Signals) -> tuple[bool, str]:
        """Whether this signal must preserve the guests before the daemon exits, and why."""
        mode = self.supervisor.settings.on_service_stop
        if sig != signal.SIGTERM:
            return False, f"{sig.name} never preserves guests (only SIGTERM can)"
        if mode == "leave":
            return False, 'on_service_stop = "leave"'
        if self.inhibitor.shutdown_seen and self.inhibitor.preserved:
            return False, "the guests were preserved already when logind announced this shutdown"
        if mode == "preserve":
            return True, 'on_service_stop = "preserve"'
        verdict = await host_shutdown_verdict(self.inhibitor)
        if verdict.shutting_down:
            return True, f"the host is shutting down: {verdict.reason}"
        if verdict.shutting_down is None:
            return False, (f"{verdict.reason}; treated as a service stop, not a host shutdown "
                           f'(set on_service_stop = "preserve" to always preserve)')
        return False, f"a service stop, not a host shutdown: {verdict.reason}"

    # ------------------------------------------------------------------ estimate

    async def _keep_estimate(self) -> None:
        """Estimate preserve's duration whenever logind's limit is known and we are idle."""
        while True:
            await asyncio.sleep(ESTIMATE_POLL_S)
            delay = self.inhibitor.delay_max_s
            if delay is None or self.inhibitor.state != "held" or self.supervisor.state != "idle":
                continue
            runs = self.supervisor.runs
            key = (delay, runs[-1].run_id if runs else "", runs[-1].finished_at if runs else 0,
                   self.supervisor.settings)
            now = self.clock()
            if (self._estimated_at is not None and key == self._estimate_key
                    and now - self._estimated_at < ESTIMATE_REFRESH_S):
                continue
            self._estimate_key, self._estimated_at = key, now
            guests, errors = await self.supervisor.inventory()
            if errors:
                log.info("preserve estimate not updated: %s", "; ".join(errors))
                continue
            self.update_estimate(guests, delay)

    def update_estimate(self, guests: Sequence[GuestInfo], delay_max_s: float | None) -> None:
        settings = self.supervisor.settings
        self.estimate_s = self.supervisor.forecast(guests, delay_max_s).total_s
        acting = sum(1 for g in guests if chain_for(g, settings))
        warning = delay_warning(delay_max_s, self.estimate_s, acting)
        if warning != self.warning:
            if warning:
                log.warning("%s", warning)
            elif self.warning:
                log.info("logind's delay limit (%gs) now covers the expected preserve (%gs)",
                         delay_max_s, self.estimate_s)
            self.warning = warning
