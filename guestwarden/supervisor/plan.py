"""What preserve does to each guest: its action chain, and the bounds on actions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from guestwarden.conf.settings import AUTO_SAVE_MAX, Settings, save_ceiling
from guestwarden.ipc.messages import ActionName, GuestInfo, PlannedGuest
from guestwarden.supervisor.policy import ACTIVE_STATES, resolve_policy
from guestwarden.supervisor.savecontrol import AdaptiveSaveSlots, SaveThroughputController

__all__ = ["ACTIVE_STATES", "ActionBounds", "action_timeout_s", "chain_for", "plan_preserve"]


def chain_for(guest: GuestInfo, settings: Settings) -> tuple[ActionName, ...]:
    """The actions tried in order; empty when the guest is not running or paused, or
    excluded. Its metadata and the config's rules decide first (policy.py)."""
    return resolve_policy(guest, settings).chain


def plan_preserve(guests: Iterable[GuestInfo], settings: Settings) -> tuple[PlannedGuest, ...]:
    """Every guest with its effective policy, by URI and name (forecast.py adds the
    expected durations and the order preserve hands guests out in)."""
    return tuple(resolve_policy(g, settings).planned(g)
                 for g in sorted(guests, key=lambda g: (g.uri, g.name)))


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
    action is also bounded by the number of workers. With ``parallel_save = "auto"``
    the save bound is ``adaptive_saves``, which preserve feeds with each save's bytes
    and times (savecontrol.py); ``workers`` (0: unknown) caps how far it may climb.
    """

    def __init__(self, settings: Settings, workers: int = 0) -> None:
        shutdown = settings.shutdown
        self.adaptive_saves: AdaptiveSaveSlots | None = None
        if shutdown.parallel_save == "auto":
            ceiling = save_ceiling(settings, workers or AUTO_SAVE_MAX + 1)
            self.adaptive_saves = AdaptiveSaveSlots(SaveThroughputController(ceiling))
        self._limits: dict[str, asyncio.Semaphore | AdaptiveSaveSlots | None] = {
            "save": self.adaptive_saves or asyncio.Semaphore(save_ceiling(settings, workers)),
            "shutdown": (asyncio.Semaphore(shutdown.parallel_shutdown)
                         if shutdown.parallel_shutdown else None),
            "poweroff": None,
        }

    def slot(self, action: ActionName) -> asyncio.Semaphore | AdaptiveSaveSlots | _NoBound:
        return self._limits[action] or _NO_BOUND


class _NoBound:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_BOUND = _NoBound()
