"""``guestwarden policy show|set|clear``: a guest's metadata, read and written by workers.

Why the CLI asks the daemon instead of opening libvirt itself: the supervisor's
workers are the one place that talks to libvirt (with bounded connects and job
deadlines, so a hung libvirtd cannot hang the command), they use the URIs of the
configuration the daemon actually runs with, the change is logged by the daemon
like every other change to a guest, and ``show`` resolves the effective values with
the daemon's own rules and defaults, exactly as ``plan`` and preserve will. The CLI
stays free of libvirt (workers/actions.py is the only module that imports it); the
price is that the daemon must be running, which the service always is.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

from guestwarden.conf import guestpolicy
from guestwarden.conf.settings import Settings
from guestwarden.ipc.messages import (
    ClearPolicy,
    Error,
    GuestInfo,
    GuestPolicy,
    JobDone,
    PolicyReply,
    Reply,
    SetPolicy,
    ShowPolicy,
)
from guestwarden.supervisor.policy import resolve_policy
from guestwarden.supervisor.runs import JobService

log = logging.getLogger(__name__)

PolicyRequest = ShowPolicy | SetPolicy | ClearPolicy


def looks_like_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


class PolicyEditor:
    def __init__(self, jobs: JobService, settings: Callable[[], Settings]) -> None:
        self.jobs = jobs
        self.settings = settings

    async def handle(self, request: PolicyRequest) -> Reply:
        settings = self.settings()
        found = await self._find(request.guest, request.uri, settings)
        if isinstance(found, Error):
            return found
        match request:
            case ShowPolicy():
                return self._reply(found, settings)
            case SetPolicy(policy=changes, unset=unset):
                if guestpolicy.is_empty(changes) and not unset:
                    return Error(code="invalid", message="nothing to change: give at least one "
                                 "of chain, order, shutdown_timeout, start_delay, exclude, or "
                                 "a field to unset")
                try:
                    merged = guestpolicy.merge(found.policy, changes, unset)
                except guestpolicy.PolicyError as exc:
                    return Error(code="invalid", message=str(exc))
                refused = guestpolicy.refusal(merged, persistent=found.persistent)
                if refused:
                    return Error(code="invalid", message=f"guest {found.name}: {refused}")
                return await self._write(found, None if guestpolicy.is_empty(merged) else merged,
                                         settings)
            case ClearPolicy():
                return await self._write(found, None, settings)

    async def _find(self, guest: str, uri: str, settings: Settings) -> GuestInfo | Error:
        """The one guest of that name (or UUID) on ``uri``, or on the only URI that has it."""
        if uri and uri not in settings.uris:
            return Error(code="invalid", message=f"{uri} is not one of the daemon's uris "
                         f"({', '.join(settings.uris)})")
        uris = (uri,) if uri else settings.uris
        by_uuid = looks_like_uuid(guest)
        results = await asyncio.gather(*(self.jobs.run(self.jobs.new_job(
            "policy_get", u, uuid=guest if by_uuid else "", name=guest,
            timeout_s=settings.advanced.connect_timeout + 30.0)) for u in uris))
        found = [r.guests[0] for r in results if isinstance(r, JobDone) and r.guests]
        failures = [f"{u}: {r.detail or r.reason}" for u, r in zip(uris, results, strict=True)
                    if not isinstance(r, JobDone) and r.reason != "not-found"]
        if len(found) == 1:
            return found[0]
        if found:
            return Error(code="invalid", message=f"guest {guest} is on several uris "
                         f"({', '.join(g.uri for g in found)}): name one with --uri")
        if failures:
            return Error(code="failed", message="; ".join(failures))
        return Error(code="invalid", message=f"no guest {guest!r} on {', '.join(uris)}")

    async def _write(self, guest: GuestInfo, policy: GuestPolicy | None,
                     settings: Settings) -> Reply:
        result = await self.jobs.run(self.jobs.new_job(
            "policy_set", guest.uri, uuid=guest.uuid, name=guest.name, policy=policy,
            timeout_s=settings.advanced.connect_timeout + 30.0))
        if not isinstance(result, JobDone) or not result.guests:
            return Error(code="failed", message=result.detail or "no answer from the worker")
        log.info("guest=%s policy %s on %s: %s", guest.name,
                 "cleared" if policy is None else "set", guest.uri, guestpolicy.describe(policy))
        return self._reply(result.guests[0], settings,
                           "metadata removed" if policy is None else "metadata written")

    @staticmethod
    def _reply(guest: GuestInfo, settings: Settings, detail: str = "") -> PolicyReply:
        return PolicyReply(guest=resolve_policy(guest, settings).planned(guest),
                           metadata=guest.policy, detail=detail)
