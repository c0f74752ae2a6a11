"""What preserve does to each guest: its action chain, and the bounds on actions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from guestwarden.conf.settings import Settings
from guestwarden.ipc.messages import ActionName, GuestInfo, PlannedGuest

ACTIVE_STATES = frozenset({"running", "paused"})


def chain_for(guest: GuestInfo, settings: Settings) -> tuple[ActionName, ...]:
    """The actions tried in order; empty when the guest is not running or paused."""
    if guest.state not in ACTIVE_STATES:
        return ()
    shutdown = settings.shutdown
    chain = shutdown.persistent if guest.persistent else shutdown.transient
    if guest.state == "paused":
        # a paused guest sees no power button: graceful shutdown would only time out
        chain = tuple(a for a in chain if a != "shutdown") or chain
    return chain


def plan_preserve(guests: Iterable[GuestInfo], settings: Settings) -> tuple[PlannedGuest, ...]:
    planned = []
    for guest in sorted(guests, key=lambda g: (g.uri, g.name)):
        chain = chain_for(guest, settings)
        note = "" if chain else f"left alone ({guest.state})"
        planned.append(PlannedGuest(
            uri=guest.uri, uuid=guest.uuid, name=guest.name, state=guest.state,
            persistent=guest.persistent, chain=chain, note=note,
        ))
    return tuple(planned)


def action_timeout_s(action: ActionName, settings: Settings) -> float:
    shutdown = settings.shutdown
    return {
        "save": shutdown.save_timeout,
        "shutdown": shutdown.shutdown_timeout,
        "poweroff": shutdown.poweroff_timeout,
    }[action]


class ActionBounds:
    """At most ``parallel_save`` saves and ``parallel_shutdown`` graceful shutdowns at once.

    Poweroff has no bound of its own: it is quick, and it is the last resort. Every
    action is also bounded by the number of workers.
    """

    def __init__(self, settings: Settings) -> None:
        shutdown = settings.shutdown
        self._limits: dict[str, asyncio.Semaphore | None] = {
            "save": asyncio.Semaphore(shutdown.parallel_save),
            "shutdown": (asyncio.Semaphore(shutdown.parallel_shutdown)
                         if shutdown.parallel_shutdown else None),
            "poweroff": None,
        }

    def slot(self, action: ActionName) -> asyncio.Semaphore | _NoBound:
        return self._limits[action] or _NO_BOUND


class _NoBound:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_BOUND = _NoBound()
