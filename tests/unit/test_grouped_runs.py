"""Preserve and restore by order group, longest first, with a fake job service.

The fake runs each job for a number of event-loop turns (its "duration") and stamps
start and end with a counter, so the tests read the order of events without clocks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec

from guestwarden.conf.settings import BootSettings, Rule, Settings, ShutdownSettings
from guestwarden.ipc.messages import (
    ClearPolicy,
    Error,
    GuestInfo,
    GuestPolicy,
    Job,
    JobDone,
    JobFailed,
    JobKind,
    PolicyReply,
    SetPolicy,
    ShowPolicy,
)
from guestwarden.supervisor.journal import Journal, JournalData
from guestwarden.supervisor.learned import ActionStats, GuestHistory, Learned
from guestwarden.supervisor.policyeditor import PolicyEditor
from guestwarden.supervisor.preserve import PreserveRun
from guestwarden.supervisor.restore import RestoreRun, StartPacer

RESULTS = {"save": "saved", "shutdown": "shut-down", "poweroff": "powered-off",
           "start": "restored", "agent_wait": "answered", "sync_time": "synced"}


class FakeJobs:
    def __init__(self, guests: list[GuestInfo], turns: dict[str, int] | None = None) -> None:
        self.guests = guests
        self.turns = turns or {}
        self.jobs: list[Job] = []
        self.events: list[tuple[int, str, str, str]] = []  # (tick, edge, kind, guest)
        self.tick = 0
        self._next = 1
        self.hang: set[str] = set()
        """Guests whose jobs never end (until cancelled)."""

    def new_job(self, kind: JobKind, uri: str, **fields: Any) -> Job:
        self._next += 1
        return Job(job_id=self._next, kind=kind, uri=uri, **fields)

    def _stamp(self, edge: str, job: Job) -> int:
        self.tick += 1
        self.events.append((self.tick, edge, job.kind, job.name))
        return self.tick

    async def run(self, job: Job) -> JobDone | JobFailed:
        self.jobs.append(job)
        if job.kind == "inventory":
            return JobDone(job_id=job.job_id, result="listed", guests=tuple(self.guests))
        started = self._stamp("start", job)
        if job.name in self.hang:
            await asyncio.Event().wait()
        for _ in range(self.turns.get(job.name, 1)):
            await asyncio.sleep(0)
        if job.kind == "policy_get":
            found = [g for g in self.guests if g.name == job.name and g.uri == job.uri]
            if not found:
                return JobFailed(job_id=job.job_id, reason="not-found")
            return JobDone(job_id=job.job_id, result="found", guests=(found[0],))
        if job.kind == "policy_set":
            old = next(g for g in self.guests if g.uuid == job.uuid and g.uri == job.uri)
            new = msgspec.structs.replace(old, policy=job.policy)
            self.guests[self.guests.index(old)] = new
            return JobDone(job_id=job.job_id, result="set", guests=(new,))
        return JobDone(job_id=job.job_id, result=RESULTS[job.kind], started_ns=started,
                       finished_ns=self._stamp("end", job))

    def order_of(self, kind: str, edge: str = "start") -> list[str]:
        return [name for _, e, k, name in self.events if k == kind and e == edge]

    def span(self, kind: str, name: str) -> tuple[int, int]:
        ticks = {e: t for t, e, k, n in self.events if k == kind and n == name}
        return ticks["start"], ticks["end"]


def guest(name: str, *, order: int | None = None, memory_mib: int = 100,
          policy: GuestPolicy | None = None, uri: str = "u") -> GuestInfo:
    if order is not None:
        policy = msgspec.structs.replace(policy or GuestPolicy(), order=order)
    return GuestInfo(uri=uri, uuid=f"id-{name}", name=name, state="running", persistent=True,
                     memory_kib=memory_mib * 1024, policy=policy)


def preserve(tmp_path: Path, jobs: FakeJobs, settings: Settings,
             learned: Learned | None = None) -> JournalData:
    journal = Journal(tmp_path)
    data = JournalData(learned=learned or Learned())

    def current() -> JournalData:
        return data

    def keep(new: JournalData) -> None:
        nonlocal data
        data = new

    run = PreserveRun(jobs, settings, journal, current, "boot", workers=8)
    run.on_journal = keep
    status = asyncio.run(run.run())
    assert status.ok, status.detail
    assert journal.load() == data
    return data


def test_preserve_goes_group_by_group_and_longest_first(tmp_path: Path) -> None:
    guests = [guest("fw", order=-10), guest("db-small", order=10, memory_mib=100),
              guest("db-big", order=10, memory_mib=4000), guest("app1"), guest("app2"),
              guest("app3")]
    history = Learned(guests={"u id-app2": GuestHistory(actions={"save": ActionStats(
        mean_s=60.0)})})
    jobs = FakeJobs(guests, turns={"db-big": 5, "app1": 3})
    data = preserve(tmp_path, jobs, Settings(shutdown=ShutdownSettings(parallel_save=2)),
                    history)
    assert jobs.order_of("save") == ["db-big", "db-small", "app2", "app1", "app3", "fw"]
    ends = {name: jobs.span("save", name)[1] for name in jobs.order_of("save")}
    starts = {name: jobs.span("save", name)[0] for name in jobs.order_of("save")}
    # the barrier: every guest of a group has finished before the next group starts
    assert max(ends["db-big"], ends["db-small"]) < min(starts[n] for n in ("app1", "app2",
                                                                               "app3"))
    assert max(ends[n] for n in ("app1", "app2", "app3")) < starts["fw"]
    records = {g.name: g for g in data.preserve.guests} if data.preserve else {}
    assert records["fw"].order == -10 and records["app1"].order == 0
    # what this run measured is in the journal's learned durations
    assert set(data.learned.guests) == {f"u id-{g.name}" for g in guests}
    assert data.learned.guests["u id-app2"].actions["save"].runs == 2


def test_policy_decides_chain_timeout_and_exclusion(tmp_path: Path) -> None:
    guests = [guest("db", policy=GuestPolicy(chain=("shutdown", "poweroff"),
                                             shutdown_timeout=42.0)),
              guest("k8s-node"), guest("web")]
    settings = Settings(rules=(Rule(match="k8s-*", exclude=True),))
    jobs = FakeJobs(guests)
    data = preserve(tmp_path, jobs, settings)
    shutdowns = [j for j in jobs.jobs if j.kind == "shutdown"]
    assert [(j.name, j.timeout_s) for j in shutdowns] == [("db", 42.0)]
    assert not [j for j in jobs.jobs if j.name == "k8s-node"]
    assert data.preserve is not None
    records = {g.name: g for g in data.preserve.guests}
    assert (records["k8s-node"].outcome, records["k8s-node"].ok) == ("excluded", True)
    assert records["k8s-node"].detail == "excluded (rule 1 (k8s-*))"


def restore(tmp_path: Path, jobs: FakeJobs, settings: Settings) -> JournalData:
    data = preserve(tmp_path, jobs, settings)
    jobs.events.clear()

    def current() -> JournalData:
        return data

    def keep(new: JournalData) -> None:
        nonlocal data
        data = new

    run = RestoreRun(jobs, settings, Journal(tmp_path), current, "boot")
    run.on_journal = keep
    status = asyncio.run(run.run())
    assert status.ok, status.detail
    return data


def test_restore_goes_lowest_first_and_waits_for_agents(tmp_path: Path) -> None:
    guests = [guest("app", order=5), guest("dc", order=-1), guest("fw", order=-10),
              guest("app-b", order=5)]
    jobs = FakeJobs(guests, turns={"fw": 4})
    settings = Settings(boot=BootSettings(wait_for_agents=30.0, sync_time=True))
    data = restore(tmp_path, jobs, settings)
    assert jobs.order_of("start") == ["fw", "dc", "app", "app-b"]
    # fw's agent answered before dc started; dc's before the apps; none after the last group
    assert jobs.span("agent_wait", "fw")[1] < jobs.span("start", "dc")[0]
    assert jobs.span("agent_wait", "dc")[1] < jobs.span("start", "app")[0]
    assert jobs.order_of("agent_wait") == ["fw", "dc"]
    assert data.restore is not None
    records = {g.name: g for g in data.restore.guests}
    assert set(records["fw"].spans_ns) == {"start", "agent_wait"}
    assert records["app"].outcome == "restored, clock synced"
    assert data.learned.guests["u id-fw"].actions["start"].runs == 1


def test_a_cancelled_restore_starts_nothing_more(tmp_path: Path) -> None:
    jobs = FakeJobs([guest("a"), guest("b"), guest("c", order=1)])
    settings = Settings(boot=BootSettings(parallel_start=1, sync_time=False))
    data = preserve(tmp_path, jobs, settings)
    jobs.hang = {"a"}

    async def scenario() -> list[asyncio.Task[Any]]:
        run = RestoreRun(jobs, settings, Journal(tmp_path), lambda: data, "boot")
        task = asyncio.create_task(run.run())
        while "a" not in jobs.order_of("start"):
            await asyncio.sleep(0)
        task.cancel()  # the host goes down while a's start hangs
        await asyncio.gather(task, return_exceptions=True)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(scenario()) == []  # nothing left running...
    assert jobs.order_of("start") == ["a"]  # ...and b and c were never started


def test_restore_paces_each_guest_by_its_own_start_delay(tmp_path: Path) -> None:
    guests = [guest("a", policy=GuestPolicy(start_delay=0.0)), guest("b")]
    jobs = FakeJobs(guests)
    data = restore(tmp_path, jobs, Settings(boot=BootSettings(start_delay=7.0,
                                                              sync_time=False)))
    assert data.preserve is not None
    delays = {g.name: g.start_delay_s for g in data.preserve.guests}
    assert delays == {"a": 0.0, "b": 7.0}  # recorded at preserve, used by restore's pacer


def editor(guests: list[GuestInfo], uris: tuple[str, ...] = ("u",)) -> tuple[PolicyEditor,
                                                                            FakeJobs]:
    jobs = FakeJobs(guests)
    settings = Settings(uris=uris, rules=(Rule(match="db*", order=3),))
    return PolicyEditor(jobs, lambda: settings), jobs


def test_policy_editor_merges_refuses_and_reports_sources() -> None:
    ed, jobs = editor([guest("db1", policy=GuestPolicy(chain=("shutdown",)))])
    reply = asyncio.run(ed.handle(SetPolicy(guest="db1", policy=GuestPolicy(order=9))))
    assert isinstance(reply, PolicyReply), reply
    assert reply.metadata == GuestPolicy(chain=("shutdown",), order=9)
    assert reply.guest.order == 9 and reply.guest.sources["order"] == "metadata"
    reply = asyncio.run(ed.handle(SetPolicy(guest="db1", unset=("order",))))
    assert isinstance(reply, PolicyReply)
    assert reply.guest.sources["order"] == "rule 1 (db*)" and reply.guest.order == 3
    reply = asyncio.run(ed.handle(ClearPolicy(guest="db1")))
    assert isinstance(reply, PolicyReply) and reply.metadata is None
    assert [j.policy for j in jobs.jobs if j.kind == "policy_set"][-1] is None
    for request, words in (
        (SetPolicy(guest="db1"), "nothing to change"),
        (ShowPolicy(guest="nope"), "no guest 'nope' on u"),
        (ShowPolicy(guest="db1", uri="other"), "not one of the daemon's uris"),
    ):
        refused = asyncio.run(ed.handle(request))
        assert isinstance(refused, Error) and words in refused.message, refused


def test_policy_editor_needs_uri_when_a_name_is_on_several() -> None:
    ed, _ = editor([guest("db1"), guest("db1", uri="v")], uris=("u", "v"))
    refused = asyncio.run(ed.handle(ShowPolicy(guest="db1")))
    assert isinstance(refused, Error) and "--uri" in refused.message
    shown = asyncio.run(ed.handle(ShowPolicy(guest="db1", uri="v")))
    assert isinstance(shown, PolicyReply) and shown.guest.uri == "v"
    transient = msgspec.structs.replace(guest("t1"), persistent=False)
    ed, _ = editor([transient])
    refused = asyncio.run(ed.handle(SetPolicy(guest="t1", policy=GuestPolicy(chain=("save",)))))
    assert isinstance(refused, Error) and "transient" in refused.message


def test_start_pacer_spaces_the_next_start_by_this_guests_delay() -> None:
    now = [50.0]
    pacer = StartPacer(7.0, clock=lambda: now[0])

    async def turns() -> list[float]:
        await pacer.wait_turn(0.0)  # a guest with start_delay 0: the next may go at once
        first = pacer.next_start_at
        await pacer.wait_turn()  # no delay of its own: [boot] start_delay
        return [first, pacer.next_start_at]

    assert asyncio.run(turns()) == [50.0, 57.0]
