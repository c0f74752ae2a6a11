"""Per-guest chains and the action bounds."""

from __future__ import annotations

import asyncio

from guestwarden.conf.settings import Settings, ShutdownSettings
from guestwarden.ipc.messages import GuestInfo, GuestState
from guestwarden.supervisor.plan import ActionBounds, chain_for, plan_preserve


def guest(state: GuestState, persistent: bool = True, name: str = "g") -> GuestInfo:
    return GuestInfo(uri="u", uuid=name, name=name, state=state, persistent=persistent)


def test_chains_by_persistence_and_state() -> None:
    s = Settings()
    assert chain_for(guest("running"), s) == ("save", "shutdown", "poweroff")
    assert chain_for(guest("running", persistent=False), s) == ("shutdown", "poweroff")
    assert chain_for(guest("paused"), s) == ("save", "poweroff")  # no power button when paused
    assert chain_for(guest("paused", persistent=False), s) == ("poweroff",)
    assert chain_for(guest("shutoff"), s) == ()
    only_shutdown = Settings(shutdown=ShutdownSettings(persistent=("shutdown",)))
    assert chain_for(guest("paused"), only_shutdown) == ("shutdown",)  # never an empty chain


def test_plan_lists_every_guest_sorted_and_says_why_some_are_left_alone() -> None:
    planned = plan_preserve([guest("running", name="b"), guest("shutoff", name="a")], Settings())
    assert [p.name for p in planned] == ["a", "b"]
    assert planned[0].chain == () and "shutoff" in planned[0].note
    assert planned[1].chain == ("save", "shutdown", "poweroff")


def test_bounds_limit_concurrency_per_action() -> None:
    async def scenario() -> dict[str, int]:
        bounds = ActionBounds(Settings(shutdown=ShutdownSettings(parallel_save=2,
                                                                 parallel_shutdown=3)))
        running = {"save": 0, "shutdown": 0, "poweroff": 0}
        peak = dict(running)
        gate = asyncio.Event()

        async def act(action: str) -> None:
            async with bounds.slot(action):  # type: ignore[arg-type]
                running[action] += 1
                peak[action] = max(peak[action], running[action])
                await gate.wait()
                running[action] -= 1

        tasks = [asyncio.create_task(act(a)) for a in ["save"] * 5 + ["shutdown"] * 6
                 + ["poweroff"] * 7]
        for _ in range(1000):  # let every task run as far as its bound allows
            await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)
        return peak

    assert asyncio.run(scenario()) == {"save": 2, "shutdown": 3, "poweroff": 7}
