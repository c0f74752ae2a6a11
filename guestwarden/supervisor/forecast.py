"""``plan``: every guest's effective policy, and how long the whole preserve should take.

The whole preserve is simulated the way preserve.py runs it: order groups one after
the other (the barrier), and in each group the guests handed out longest expected
first, each starting when a slot of its first action's bound (``parallel_save``,
``parallel_shutdown``) and a worker are free (list scheduling). Each guest costs its
expected time (ordering.py: learned, else priced). Saves share the disk, so a
group's saves also take at least their bytes over the measured (else assumed)
aggregate write throughput. Fallbacks after a failed action are not counted.

The estimate is compared with the two limits a host shutdown puts on preserve:

* logind's ``InhibitDelayMaxUSec`` (read by inhibitor.py): after it, logind shuts
  down whatever our inhibitor says;
* the stop budget: systemd's ``poweroff.target`` and ``reboot.target`` have
  ``JobTimeoutSec=30min`` with a forced poweroff or reboot after it.
  ``EXTEND_TIMEOUT_USEC`` keeps the unit's own ``TimeoutStopSec`` from running out
  while preserve runs, but not this job timeout.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from guestwarden.conf.settings import Settings
from guestwarden.ipc.messages import GuestInfo, PlanReply
from guestwarden.supervisor.estimate import SAVE_BYTES_PER_S, delay_warning
from guestwarden.supervisor.journal import guest_key
from guestwarden.supervisor.learned import Learned
from guestwarden.supervisor.ordering import Handout, handout, preserve_groups
from guestwarden.supervisor.policy import EffectivePolicy, resolve_policy

STOP_BUDGET_S = 1800.0
"""systemd's JobTimeoutSec of poweroff.target and reboot.target (30 min)."""


@dataclass(frozen=True)
class Forecast:
    total_s: float
    groups: tuple[tuple[int, float, int], ...]
    """(order, seconds, guests) per group, in the order preserve runs them."""
    basis: str
    warnings: tuple[str, ...]


def makespan(handouts: Sequence[Handout], limits: Mapping[str, int], workers: int) -> float:
    """When the last of ``handouts`` ends if each starts, in the given order, as soon as
    a slot of its action (``limits``; 0: no bound) and a worker are free."""
    queues: dict[str, deque[tuple[int, Handout]]] = {}
    for index, item in enumerate(handouts):
        queues.setdefault(item.action, deque()).append((index, item))
    running: list[tuple[float, str]] = []
    busy: Counter[str] = Counter()
    now = 0.0
    while running or any(queues.values()):
        while len(running) < max(1, workers):
            ready = [(queue[0][0], action) for action, queue in queues.items()
                     if queue and (not limits.get(action) or busy[action] < limits[action])]
            if not ready:
                break
            action = min(ready)[1]
            _, item = queues[action].popleft()
            heapq.heappush(running, (now + item.expected_s, action))
            busy[action] += 1
        now, action = heapq.heappop(running)
        busy[action] -= 1
    return now


def forecast_preserve(
    plan: Sequence[tuple[int, Sequence[Handout]]], settings: Settings, learned: Learned,
    workers: int, delay_max_s: float | None,
) -> Forecast:
    shutdown = settings.shutdown
    save_limit = (shutdown.parallel_save if isinstance(shutdown.parallel_save, int)
                  else learned.save_parallel or 1)
    limits = {"save": save_limit, "shutdown": shutdown.parallel_shutdown, "poweroff": 0}
    rate = learned.save_bytes_per_s or SAVE_BYTES_PER_S
    rows = []
    for order, items in plan:
        seconds = makespan(items, limits, workers)
        save_bytes = sum(h.memory_bytes for h in items if h.action == "save")
        rows.append((order, round(max(seconds, save_bytes / rate), 1), len(items)))
    total = round(sum(seconds for _, seconds, _ in rows), 1)
    guests = sum(n for _, _, n in rows)
    known = sum(1 for _, items in plan for h in items if h.learned)
    measured = (f"measured over {learned.save_runs} preserve(s)" if learned.save_bytes_per_s
                else "assumed: none measured yet")
    basis = (f"{known} of {guests} guests priced from earlier runs; saves at "
             f"{rate / 1e6:.0f} MB/s ({measured}); {len(rows)} order group(s), "
             f"{save_limit if shutdown.parallel_save != 'auto' else f'auto ({save_limit})'} "
             f"save(s) at once, {workers} workers")
    warnings = []
    too_slow = delay_warning(delay_max_s, total, guests)
    if too_slow:
        warnings.append(too_slow)
    if total > STOP_BUDGET_S:
        warnings.append(
            f"preserving the {guests} guests is expected to take about {total:g}s, longer "
            f"than systemd lets a shutdown take ({STOP_BUDGET_S:g}s, the JobTimeoutSec of "
            "poweroff.target and reboot.target): guests still being preserved then are "
            "killed; raise parallel_save or parallel_shutdown, or shorten the chains")
    return Forecast(total_s=total, groups=tuple(rows), basis=basis, warnings=tuple(warnings))


def _handouts(
    guests: Sequence[GuestInfo], settings: Settings, learned: Learned,
) -> tuple[dict[str, EffectivePolicy], list[tuple[int, list[Handout]]]]:
    """Each guest's policy, and the guests with a chain in the groups and turn preserve
    would hand them out in."""
    policies = {guest_key(g.uri, g.uuid): resolve_policy(g, settings) for g in guests}
    handouts = [handout(guest_key(g.uri, g.uuid), g.name, policies[guest_key(g.uri, g.uuid)],
                        g.memory_kib * 1024, learned)
                for g in guests if policies[guest_key(g.uri, g.uuid)].chain]
    return policies, preserve_groups(handouts)


def forecast_guests(
    guests: Sequence[GuestInfo], settings: Settings, learned: Learned,
    *, workers: int, delay_max_s: float | None,
) -> Forecast:
    """The estimate of a preserve of these guests now. ``status`` (host.py, compared with
    logind's limit) and ``plan`` both use it, so that they never disagree."""
    _, plan = _handouts(guests, settings, learned)
    return forecast_preserve(plan, settings, learned, workers, delay_max_s)


def build_plan(
    guests: Sequence[GuestInfo], errors: Sequence[str], settings: Settings, learned: Learned,
    *, workers: int, delay_max_s: float | None,
) -> PlanReply:
    """What preserve would do now: each guest's values and their sources, its expected
    time and turn, and the whole estimate with its warnings."""
    policies, plan = _handouts(guests, settings, learned)
    turn = [h for _, items in plan for h in items]
    rank = {h.key: number for number, h in enumerate(turn, 1)}
    expected = {h.key: h.expected_s for h in turn}
    result = forecast_preserve(plan, settings, learned, workers, delay_max_s)
    planned = tuple(
        policies[key].planned(g, expected_s=expected.get(key), rank=rank.get(key, 0))
        for g in sorted(guests, key=lambda g: (g.uri, g.name))
        for key in [guest_key(g.uri, g.uuid)]
    )
    return PlanReply(guests=planned, errors=tuple(errors), estimate_s=result.total_s,
                     estimate_basis=result.basis, warnings=result.warnings,
                     inhibit_delay_max_s=delay_max_s, stop_budget_s=STOP_BUDGET_S)
