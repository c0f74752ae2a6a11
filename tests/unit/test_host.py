"""Host integration logic without a bus: the SIGTERM decision, the estimate, STATUS text."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant

from guestwarden.conf.settings import Settings, ShutdownSettings
from guestwarden.ipc.messages import GuestInfo, JobStatus
from guestwarden.supervisor.estimate import delay_warning
from guestwarden.supervisor.forecast import Forecast, forecast_guests
from guestwarden.supervisor.host import HostIntegration, job_phrase
from guestwarden.supervisor.hostshutdown import host_shutdown_verdict, shutdown_job
from guestwarden.supervisor.inhibitor import Inhibitor
from guestwarden.supervisor.learned import Learned

GIB_KIB = 2**20


def guest(name: str, *, state: str = "running", persistent: bool = True,
          memory_kib: int = GIB_KIB) -> GuestInfo:
    return GuestInfo(uri="test:///default", uuid=name, name=name, state=state,  # type: ignore[arg-type]
                     persistent=persistent, memory_kib=memory_kib)


def reply(signature: str, body: list[Any]) -> Message:
    return Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, signature=signature,
                   body=body)


class FakeBus:
    """What ``Inhibitor.ask`` answers: by member name; None = no answer."""

    def __init__(self, jobs: list[tuple[Any, ...]] | None, preparing: bool | None) -> None:
        self.jobs = jobs
        self.preparing = preparing

    async def ask(self, message: Message) -> Message | None:
        if message.member == "ListJobs":
            return None if self.jobs is None else reply("a(usssoo)", [self.jobs])
        if message.member == "Get" and message.body[1] == "PreparingForShutdown":
            return None if self.preparing is None else reply("v", [Variant("b", self.preparing)])
        raise AssertionError(message.member)


def inhibitor_with(bus: FakeBus) -> Inhibitor:
    async def nothing() -> None:
        return None

    inhibitor = Inhibitor(nothing)
    inhibitor.ask = bus.ask  # type: ignore[method-assign]
    return inhibitor


JOB = (7, "reboot.target", "start", "waiting", "/org/freedesktop/systemd1/job/7",
       "/org/freedesktop/systemd1/unit/reboot_2etarget")


def test_a_start_job_for_a_shutdown_target_is_a_host_shutdown() -> None:
    assert shutdown_job([JOB]) == "systemd has a start job (7) for reboot.target"
    assert shutdown_job([(1, "nginx.service", "restart", "running", "/", "/")]) is None
    assert shutdown_job([(2, "poweroff.target", "stop", "waiting", "/", "/")]) is None
    for target in ("shutdown.target", "poweroff.target", "halt.target", "kexec.target",
                   "soft-reboot.target"):
        assert shutdown_job([(3, target, "start", "waiting", "/", "/")])


@pytest.mark.parametrize(("jobs", "preparing", "expected"), [
    ([JOB], False, True),
    ([], True, True),
    ([], False, False),
    (None, False, False),          # only logind answered: it says no
    ([], None, False),             # only systemd answered: it says no
    (None, None, None),            # nobody to ask
])
def test_verdict(jobs: list[tuple[Any, ...]] | None, preparing: bool | None,
                 expected: bool | None) -> None:
    verdict = asyncio.run(host_shutdown_verdict(inhibitor_with(FakeBus(jobs, preparing))))
    assert verdict.shutting_down is expected, verdict.reason


def test_prepare_for_shutdown_seen_needs_no_question() -> None:
    inhibitor = inhibitor_with(FakeBus(None, None))
    inhibitor.shutdown_seen = True
    verdict = asyncio.run(host_shutdown_verdict(inhibitor))
    assert verdict.shutting_down and "PrepareForShutdown" in verdict.reason


class FakeSupervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = "idle"
        self.runs: list[Any] = []

    def status_line(self) -> str:
        return "Idle"

    async def preserve_and_wait(self) -> Any:
        raise AssertionError("not in these tests")

    async def inventory(self) -> tuple[list[GuestInfo], list[str]]:
        return [], []

    def forecast(self, guests: list[GuestInfo], delay_max_s: float | None) -> Forecast:
        return forecast_guests(guests, self.settings, Learned(), workers=8,
                               delay_max_s=delay_max_s)


def decide(mode: str, sig: signal.Signals, bus: FakeBus, *, preserved: bool = False
           ) -> tuple[bool, str]:
    host = HostIntegration(FakeSupervisor(Settings(on_service_stop=mode)))  # type: ignore[arg-type]
    host.inhibitor = inhibitor_with(bus)
    host.inhibitor.shutdown_seen = host.inhibitor.preserved = preserved
    return asyncio.run(host.stop_decision(sig))


def test_stop_decision_follows_on_service_stop() -> None:
    shutdown, restart, unknown = FakeBus([JOB], False), FakeBus([], False), FakeBus(None, None)
    default = "preserve-if-host-shutdown"
    assert decide(default, signal.SIGTERM, shutdown)[0] is True
    assert decide(default, signal.SIGTERM, restart)[0] is False
    preserve, why = decide(default, signal.SIGTERM, unknown)
    assert preserve is False and "cannot tell" in why
    assert decide("preserve", signal.SIGTERM, restart)[0] is True
    assert decide("leave", signal.SIGTERM, shutdown)[0] is False
    assert decide("preserve", signal.SIGINT, shutdown)[0] is False  # only SIGTERM preserves
    # logind's PrepareForShutdown already led to a finished preserve: not a second one,
    # which would record the (now stopped) guests as "untouched" in the journal
    preserve, why = decide("preserve", signal.SIGTERM, shutdown, preserved=True)
    assert preserve is False and "already" in why


def test_estimate_counts_save_bandwidth_and_shutdown_waves() -> None:
    """Nothing learned yet: a save is priced at its bytes over the assumed bandwidth
    plus the overhead, a graceful shutdown at the whole shutdown_timeout (the guest
    may ignore it), a poweroff at POWEROFF_S; saves together cannot beat the disk."""
    settings = Settings(shutdown=ShutdownSettings(parallel_shutdown=2, shutdown_timeout=100,
                                                  parallel_save=4))

    def estimate(guests: list[GuestInfo]) -> float:
        return forecast_guests(guests, settings, Learned(), workers=8, delay_max_s=None).total_s

    assert estimate([]) == 0
    assert estimate([guest("off", state="shutoff")]) == 0
    saves = [guest(f"p{i}", memory_kib=4 * GIB_KIB) for i in range(10)]  # 40 GiB
    assert estimate(saves) == round(40 * 2**30 / 500e6, 1)  # the disk, not the 3 waves
    transient = [guest(f"t{i}", persistent=False) for i in range(5)]
    assert estimate(transient) == 300  # 3 waves of 100 s
    assert estimate(saves + transient) == 300  # they run side by side
    paused = [guest("tp", state="paused", persistent=False)]  # no shutdown: poweroff at once
    assert estimate(paused) == 1.0


def test_delay_warning_only_when_the_limit_is_shorter() -> None:
    assert delay_warning(600, 300, 5) == ""
    assert delay_warning(None, 300, 5) == ""
    text = delay_warning(5, 300, 5)
    assert "at most 5s" in text and "about 300s" in text and "InhibitDelayMaxSec" in text


def test_host_warns_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    host = HostIntegration(FakeSupervisor(Settings()))  # type: ignore[arg-type]
    transient = [guest("t", persistent=False)]
    host.update_estimate(transient, 5.0)
    host.update_estimate(transient, 5.0)
    assert host.estimate_s == 300 and host.warning
    assert host.status_fields()["warnings"] == (host.warning,)
    assert len([r for r in caplog.records if "InhibitDelayMaxSec" in r.getMessage()]) == 1
    host.update_estimate(transient, 600.0)
    assert not host.warning and host.status_fields()["warnings"] == ()


def test_job_phrases_for_status() -> None:
    def job(kind: str, done: int = 0, total: int = 0) -> JobStatus:
        return JobStatus(job_id=1, kind=kind, uri="u", guest="web3", uuid="x",  # type: ignore[arg-type]
                         worker_id="w1", attempt=1, age_s=0, deadline_in_s=1,
                         processed_bytes=done, total_bytes=total)

    assert job_phrase(job("save", 63, 100)) == "saving web3 63%"
    assert job_phrase(job("shutdown")) == "shutting down web3"
    assert job_phrase(job("start")) == "starting web3"


def test_progress_line_says_how_far_preserve_is() -> None:
    from guestwarden.ipc.messages import GuestOutcome
    from guestwarden.supervisor.host import progress_line
    from guestwarden.supervisor.runs import Run

    class FakeRun(Run):
        kind = "preserve"

    run = FakeRun(jobs=None)  # type: ignore[arg-type]
    assert progress_line("preserving", run, [], 4, "held", "") == "Preserving: listing guests"
    for i in range(40):
        run.guests[str(i)] = GuestOutcome(uri="u", uuid=str(i), name=f"web{i}", persistent=True,
                                          state_before="running", chain=("save",),
                                          finished=i < 12, ok=i < 12)
    saving = JobStatus(job_id=1, kind="save", uri="u", guest="web3", uuid="3", worker_id="w1",
                       attempt=1, age_s=0, deadline_in_s=1, processed_bytes=63,
                       total_bytes=100)
    line = progress_line("preserving", run, [saving], 4, "held", "")
    assert line == "Preserving: 12/40 done, saving web3 63%"
    more = [saving] * 4
    assert progress_line("preserving", run, more, 4, "held", "").endswith("and 2 more")
    run.finished_at, run.ok = 1.0, True
    idle = progress_line("idle", run, [], 4, "held", "a warning")
    assert idle.startswith("Idle: 4 workers, logind inhibitor held; last preserve ok (12/40")
    assert "WARNING" in idle
