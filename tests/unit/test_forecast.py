"""Learned durations, the order guests are handed out in, and plan's estimate."""

from __future__ import annotations

import msgspec
import pytest

from guestwarden.conf.settings import Settings, ShutdownSettings
from guestwarden.ipc.messages import GuestInfo, GuestOutcome, GuestPolicy, RunStatus
from guestwarden.supervisor.estimate import SAVE_BYTES_PER_S, SAVE_OVERHEAD_S
from guestwarden.supervisor.forecast import STOP_BUDGET_S, build_plan, makespan
from guestwarden.supervisor.learned import (
    ActionStats,
    GuestHistory,
    Learned,
    busy_seconds,
    learn,
)
from guestwarden.supervisor.ordering import Handout, preserve_groups

MIB = 1 << 20


def outcome(name: str, attempts: tuple[str, ...], *, span: tuple[int, int] | None = None,
            seconds: float = 0.0, outcome_: str = "saved", chain: tuple[str, ...] = ()
            ) -> GuestOutcome:
    action = attempts[-1].split(":")[0] if attempts else "start"
    return GuestOutcome(
        uri="u", uuid=name, name=name, persistent=True, state_before="running",
        chain=chain or ("save", "shutdown", "poweroff"), outcome=outcome_, ok=True,
        finished=True, attempts=attempts, durations_s={action: seconds},
        spans_ns={action: span} if span else {})


def run(*guests: GuestOutcome) -> RunStatus:
    return RunStatus(run_id="r", kind="preserve", started_at=0.0, guests=guests)


def test_only_actions_that_did_their_work_are_learned_as_a_weighted_mean() -> None:
    first = learn(Learned(), run(
        outcome("a", ("save: saved",), span=(0, 2 * 10**9), seconds=9.0),
        outcome("b", ("save: already-saved",), seconds=0.1),
        outcome("c", ("save: failed (timeout)", "shutdown: shut-down"), seconds=4.0,
                outcome_="shutdown"),
        outcome("d", ("save: failed (x)", "shutdown: failed (timeout)", "poweroff: already-off"),
                outcome_="off"),
    ), now=1000.0, memory_bytes={"u a": 1000 * MIB})
    assert set(first.guests) == {"u a", "u c"}
    assert first.guests["u a"].actions["save"] == ActionStats(mean_s=2.0, last_s=2.0)  # the span
    assert first.guests["u c"].actions == {"shutdown": ActionStats(mean_s=4.0, last_s=4.0)}
    assert first.save_bytes_per_s == pytest.approx(500 * MIB)
    second = learn(first, run(outcome("a", ("save: saved",), span=(0, 4 * 10**9))), now=2000.0,
                   memory_bytes={"u a": 1000 * MIB})
    assert second.guests["u a"].actions["save"].mean_s == pytest.approx(0.3 * 4 + 0.7 * 2)
    assert second.guests["u a"].actions["save"].runs == 2
    assert second.save_bytes_per_s == pytest.approx(0.3 * 250 * MIB + 0.7 * 500 * MIB)
    assert second.guests["u c"] == first.guests["u c"]  # kept across runs


def test_restores_are_learned_and_old_guests_forgotten() -> None:
    restored = outcome("r", (), chain=("start",), outcome_="restored, clock synced",
                       span=(10, 10 + 3 * 10**9))
    gone = outcome("g", (), chain=("start",), outcome_="gone")
    old = Learned(guests={"u old": GuestHistory(name="old", seen_at=0.0)})
    learned = learn(old, run(restored, gone), now=365 * 86400.0)
    assert learned.guests["u r"].actions["start"].mean_s == 3.0
    assert "u g" not in learned.guests and "u old" not in learned.guests


def test_busy_time_is_the_union_of_spans() -> None:
    assert busy_seconds([(0, 2 * 10**9), (10**9, 3 * 10**9), (5 * 10**9, 6 * 10**9)]) == 4.0
    assert busy_seconds([]) == 0.0


def handout(name: str, seconds: float, *, order: int = 0, action: str = "save",
            memory: int = 0) -> Handout:
    return Handout(key=name, name=name, order=order, action=action,  # type: ignore[arg-type]
                   expected_s=seconds, learned=True, memory_bytes=memory)


def test_groups_run_highest_first_and_longest_first_within() -> None:
    plan = preserve_groups([handout("a", 1, order=0), handout("b", 5, order=0),
                            handout("fw", 9, order=-10), handout("db", 2, order=10),
                            handout("c", 5, order=0)])
    assert [(order, [h.name for h in items]) for order, items in plan] == [
        (10, ["db"]), (0, ["b", "c", "a"]), (-10, ["fw"])]


def test_makespan_is_list_scheduling_under_bounds_and_workers() -> None:
    saves = [handout(n, s) for n, s in (("a", 4), ("b", 3), ("c", 3), ("d", 2))]
    assert makespan(saves, {"save": 1}, workers=8) == 12
    assert makespan(saves, {"save": 2}, workers=8) == 6  # a | b,c ... a+d=6, b+c=6
    shutdowns = [handout(n, 10, action="shutdown") for n in "xyz"]
    assert makespan(saves + shutdowns, {"save": 1, "shutdown": 0}, workers=8) == 12
    assert makespan(saves + shutdowns, {"save": 1, "shutdown": 0}, workers=2) == 22


def guest(name: str, *, memory_mib: int = 1024, policy: GuestPolicy | None = None,
          state: str = "running") -> GuestInfo:
    return GuestInfo(uri="u", uuid=name, name=name, state=state,  # type: ignore[arg-type]
                     persistent=True, memory_kib=memory_mib * 1024, policy=policy)


def test_plan_prices_unknown_guests_ranks_them_and_sums_groups() -> None:
    learned = Learned(guests={"u big": GuestHistory(actions={"save": ActionStats(mean_s=40.0)})})
    guests = [guest("big"), guest("small", memory_mib=500), guest("off", state="shutoff"),
              guest("fw", policy=GuestPolicy(order=-1, chain=("shutdown", "poweroff"),
                                             shutdown_timeout=20.0))]
    reply = build_plan(guests, [], Settings(), learned, workers=9, delay_max_s=5.0)
    by_name = {g.name: g for g in reply.guests}
    assert [g.name for g in reply.guests] == ["big", "fw", "off", "small"]  # by name
    assert by_name["big"].expected_s == 40.0
    small_s = 500 * MIB / SAVE_BYTES_PER_S + SAVE_OVERHEAD_S
    assert by_name["small"].expected_s == pytest.approx(small_s, abs=0.001)
    assert by_name["fw"].expected_s == 20.0  # never seen to shut down: its whole timeout
    assert (by_name["big"].rank, by_name["small"].rank, by_name["fw"].rank,
            by_name["off"].rank) == (1, 2, 3, 0)
    assert by_name["fw"].sources["order"] == "metadata"
    # one save at a time, then the fw group after the barrier
    assert reply.estimate_s == pytest.approx(40.0 + small_s + 20.0, abs=0.2)
    assert "1 of 3 guests priced from earlier runs" in reply.estimate_basis
    assert len(reply.warnings) == 1 and "InhibitDelayMaxUSec" in reply.warnings[0]
    assert reply.stop_budget_s == STOP_BUDGET_S


def test_saves_cannot_beat_the_measured_throughput_and_budget_warns() -> None:
    learned = Learned(save_bytes_per_s=100 * MIB, save_runs=3)
    guests = [guest(f"g{i}", memory_mib=1000) for i in range(4)]
    wide = Settings(shutdown=ShutdownSettings(parallel_save=4))
    reply = build_plan(guests, [], wide, learned, workers=9, delay_max_s=None)
    assert reply.estimate_s == pytest.approx(40.0)  # 4000 MiB at 100 MiB/s, however parallel
    assert reply.warnings == ()
    slow = [guest(f"s{i}", policy=GuestPolicy(chain=("shutdown",), shutdown_timeout=1000.0))
            for i in range(2)]
    one = Settings(shutdown=ShutdownSettings(parallel_shutdown=1))
    reply = build_plan(slow, [], one, Learned(), workers=9, delay_max_s=None)
    assert reply.estimate_s == 2000.0
    assert len(reply.warnings) == 1 and "JobTimeoutSec" in reply.warnings[0]


def test_records_kept_from_an_earlier_run_are_not_learned_twice() -> None:
    kept = msgspec.structs.replace(outcome("a", ("save: saved",), span=(0, 10**9)), chain=())
    assert learn(Learned(), run(kept), now=1.0).guests == {}
