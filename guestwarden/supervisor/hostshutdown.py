"""Is the host shutting down? What SIGTERM means depends on it.

systemd sends SIGTERM both when the service alone is stopped (``systemctl restart``,
a package upgrade: guests must not be touched) and when the host goes down (guests
must be preserved first). The signal does not say which, so we ask, in this order:

1. **logind told us**: ``PrepareForShutdown(true)`` arrived and was not cancelled.
   Covers every shutdown that goes through logind (``systemctl poweroff`` / ``reboot``
   by a user or by root when logind is running, the power key, ``shutdown +5``).
2. **systemd's job queue** (``ListJobs`` on ``org.freedesktop.systemd1``): a *start*
   job for ``shutdown.target``, ``poweroff.target``, ``reboot.target``,
   ``halt.target``, ``kexec.target`` or ``soft-reboot.target``. Every shutdown path
   that stops services queues one of these, including the root paths that send no
   ``PrepareForShutdown`` (``systemctl start poweroff.target``, ``systemctl isolate
   reboot.target``, ``systemctl poweroff`` when logind is not asked). The job is
   still queued while our stop runs: ``shutdown.target`` is ordered after every
   service with default dependencies, so its job waits for ours to finish. This is
   the same test systemd itself makes for ``SystemState=stopping``.
3. **logind's** ``PreparingForShutdown`` property, for a shutdown logind began
   before our bus connection saw the signal (e.g. while we were reconnecting).

If neither systemd nor logind can be asked (no system bus) the answer is "cannot
tell", which the supervisor treats as *not* a host shutdown and says so in the log:
a restart that saved every guest (and, in the same boot, would not restore them) is
the surprise users complain about most (REFERENCE.md, "What users keep asking
for" #7), and on a systemd host the bus is there during shutdown as long as the unit
is ordered ``After=dbus.service``. Each question is bounded by the bus call timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guestwarden.supervisor.inhibitor import (
    LOGIND,
    LOGIND_MANAGER,
    LOGIND_PATH,
    Inhibitor,
    get_property,
    method_call,
)

SHUTDOWN_TARGETS = frozenset({
    "shutdown.target", "poweroff.target", "reboot.target", "halt.target", "kexec.target",
    "soft-reboot.target",
})
SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"


@dataclass(frozen=True)
class Verdict:
    shutting_down: bool | None
    """True, False, or None: nobody could be asked."""
    reason: str


def shutdown_job(jobs: Any) -> str | None:
    """The first start job for a shutdown target in a ``ListJobs`` reply body, described."""
    for job in jobs:
        job_id, unit, job_type = job[0], job[1], job[2]
        if unit in SHUTDOWN_TARGETS and job_type == "start":
            return f"systemd has a start job ({job_id}) for {unit}"
    return None


async def host_shutdown_verdict(inhibitor: Inhibitor) -> Verdict:
    if inhibitor.shutdown_seen:
        return Verdict(True, "logind sent PrepareForShutdown(true)")
    jobs = await inhibitor.ask(method_call(SYSTEMD, SYSTEMD_PATH, SYSTEMD_MANAGER, "ListJobs"))
    if jobs is not None:
        found = shutdown_job(jobs.body[0])
        if found:
            return Verdict(True, found)
    preparing = await inhibitor.ask(
        get_property(LOGIND, LOGIND_PATH, LOGIND_MANAGER, "PreparingForShutdown"))
    if preparing is not None and bool(preparing.body[0].value):
        return Verdict(True, "logind is preparing for shutdown (PreparingForShutdown)")
    if jobs is None and preparing is None:
        return Verdict(None, f"cannot tell: neither systemd nor logind answered on the "
                             f"system bus ({inhibitor.detail})")
    asked = " and ".join(name for name, reply in (("systemd's job queue", jobs),
                                                  ("logind", preparing)) if reply is not None)
    return Verdict(False, f"no host shutdown according to {asked}")
