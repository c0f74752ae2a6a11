"""The order in which preserve and restore hand guests out.

* Order groups: preserve goes from the highest ``order`` to the lowest, restore from
  the lowest to the highest (a firewall or a domain controller with a low order is
  the last down and the first up), with a barrier between groups: a group starts
  when every guest of the group before it has finished. The bounds
  (``parallel_save``, ``parallel_shutdown``, ``parallel_start``) apply within a group.
* Within a preserve group, the longest expected first: with bounded slots, a long
  save handed out last would end the whole run late (longest-processing-time-first
  list scheduling). Expected is what earlier runs measured for the guest's first
  action (learned.py), else a price: a save costs its memory at the measured (or
  assumed) write throughput, a graceful shutdown never seen to finish costs its whole
  timeout (the guest may ignore the request), a poweroff a second.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from guestwarden.ipc.messages import ActionName
from guestwarden.supervisor.estimate import POWEROFF_S, SAVE_BYTES_PER_S, SAVE_OVERHEAD_S
from guestwarden.supervisor.learned import Learned, expected_s
from guestwarden.supervisor.policy import EffectivePolicy

_T = TypeVar("_T")


@dataclass(frozen=True)
class Handout:
    """One guest to preserve: its group, first action and how long that should take."""

    key: str
    name: str
    order: int
    action: ActionName
    expected_s: float
    learned: bool
    memory_bytes: int = 0


def price_s(
    key: str, action: ActionName, memory_bytes: int, shutdown_timeout_s: float,
    learned: Learned,
) -> tuple[float, bool]:
    """(expected seconds of ``action`` for this guest, whether it was learned)."""
    known = expected_s(learned, key, action)
    if known is not None:
        return known, True
    if action == "save":
        rate = learned.save_bytes_per_s or SAVE_BYTES_PER_S
        return round(memory_bytes / rate + SAVE_OVERHEAD_S, 3), False
    if action == "shutdown":
        return shutdown_timeout_s, False
    return POWEROFF_S, False


def handout(key: str, name: str, policy: EffectivePolicy, memory_bytes: int,
            learned: Learned) -> Handout:
    """The guest (whose ``policy.chain`` is not empty) as preserve will hand it out."""
    action = policy.chain[0]
    expected, was_learned = price_s(key, action, memory_bytes, policy.shutdown_timeout, learned)
    return Handout(key=key, name=name, order=policy.order, action=action, expected_s=expected,
                   learned=was_learned, memory_bytes=memory_bytes)


def groups(items: Iterable[_T], order_of: Callable[[_T], int], *,
           descending: bool) -> list[tuple[int, list[_T]]]:
    """Items by order group, groups in the requested direction, items in given order."""
    by_order: dict[int, list[_T]] = defaultdict(list)
    for item in items:
        by_order[order_of(item)].append(item)
    return [(order, by_order[order]) for order in sorted(by_order, reverse=descending)]


def preserve_groups(items: Iterable[Handout]) -> list[tuple[int, list[Handout]]]:
    """Highest order first; in each group the longest expected first (then by name)."""
    return [(order, sorted(group, key=lambda h: (-h.expected_s, h.name, h.key)))
            for order, group in groups(items, lambda h: h.order, descending=True)]
