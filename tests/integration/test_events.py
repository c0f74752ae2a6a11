"""events.sock and the metrics, with the real daemon, real workers and libvirt's test
driver: what a subscriber sees is what the journal records; the textfile and
``guestwarden metrics`` parse with prometheus_client and say what happened."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from guestwarden.ipc import messages as m
from guestwarden.ipc.subscriber import EventSubscriber
from guestwarden.supervisor.journal import JournalData
from guestwarden.supervisor.metrics import action_results
from testbed.daemon import GuestwardenDaemon, wait_for
from testbed.guests import define_guests
from testbed.hostbus import system_bus_with_logind

DaemonFactory = Callable[..., GuestwardenDaemon]


@pytest.fixture
def subscriber() -> Iterator[Callable[[Path], EventSubscriber]]:
    made: list[EventSubscriber] = []

    def connect(runtime_dir: Path) -> EventSubscriber:
        sub = EventSubscriber(runtime_dir)
        made.append(sub)
        assert sub.connect(timeout_s=5.0), "no Subscribed welcome from the daemon"
        return sub

    yield connect
    for sub in made:
        sub.close()


def until(sub: EventSubscriber, done: Callable[[m.Event], bool], timeout_s: float = 60.0,
          ) -> list[m.Event]:
    """Every event until (and with) the first for which ``done`` is true."""
    got: list[m.Event] = []

    def finished() -> bool:
        got.extend(sub.receive(0.1))
        return any(done(e) for e in got)

    wait_for(finished, timeout_s, "the events of the run")
    return got[:next(i for i, e in enumerate(got) if done(e)) + 1]


def run_events(sub: EventSubscriber, daemon: GuestwardenDaemon, request: m.Request,
               ) -> tuple[str, list[m.Event]]:
    reply = daemon.request(request)
    assert isinstance(reply, m.Ok), reply
    events = until(sub, lambda e: isinstance(e, m.RunFinished) and e.run_id == reply.run_id)
    return reply.run_id, [e for e in events if getattr(e, "run_id", reply.run_id)
                          == reply.run_id]


def read_journal(daemon: GuestwardenDaemon) -> JournalData:
    return msgspec.json.decode((daemon.state_dir / "journal.json").read_bytes(),
                               type=JournalData)


def key(uri: str, uuid: str) -> str:
    return f"{uri} {uuid}"


def check_against_journal(events: list[m.Event], run: m.RunStatus) -> None:
    """The events of one run tell the same story as the journal's record of it."""
    assert [e.seq for e in events] == list(range(events[0].seq, events[0].seq + len(events))), \
        "events of the run were lost or reordered"
    assert isinstance(events[0], m.RunStarted) and isinstance(events[-1], m.RunFinished)
    assert events[-1].run == run and events[-1].ok == run.ok
    planned = [e for e in events if isinstance(e, m.RunPlanned)]
    assert len(planned) == 1
    records = {key(g.uri, g.uuid): g for g in run.guests}
    assert {key(g.uri, g.uuid) for g in planned[0].guests} == set(records)

    finished = {key(e.guest.uri, e.guest.uuid): e.guest for e in events
                if isinstance(e, m.GuestFinished)}
    assert finished == records, "GuestFinished differs from the journal's records"

    started: dict[int, m.GuestActionStarted] = {}
    ended: dict[str, list[tuple[str, bool]]] = {k: [] for k in records}
    for event in events:
        if isinstance(event, m.GuestActionStarted):
            started[event.job_id] = event
        elif isinstance(event, m.GuestActionFinished | m.GuestActionFailed):
            assert event.job_id in started, f"{event.name}: ended before it started"
            ended[key(event.uri, event.uuid)].append(
                (event.action, isinstance(event, m.GuestActionFinished)))
    for guest_key, record in records.items():
        if record.attempts:  # preserve: every attempt, in order
            assert ended[guest_key] == action_results(record), record.name
        else:  # restore: the actions it timed
            assert {a for a, _ in ended[guest_key]} == set(record.durations_s), record.name


def test_event_stream_matches_the_journal(
    test_conn: Any, make_daemon: DaemonFactory, subscriber: Callable[[Path], EventSubscriber],
) -> None:
    define_guests(test_conn, "e", running=20, paused=6, off=4, transient_running=8,
                  transient_paused=2)
    daemon = make_daemon(workers=4, shutdown={"parallel_save": 2, "parallel_shutdown": 3})
    daemon.start()
    assert stat.S_IMODE((daemon.runtime_dir / "events.sock").stat().st_mode) == 0o600
    sub = subscriber(daemon.runtime_dir)

    run_id, events = run_events(sub, daemon, m.Preserve())
    journal = read_journal(daemon)
    assert journal.preserve is not None and journal.preserve.run_id == run_id
    assert len(journal.preserve.guests) == 40 and journal.preserve.ok
    check_against_journal(events, journal.preserve)
    assert sum(isinstance(e, m.GuestActionFinished) for e in events) == 36  # all but "off"

    # a restore in which one guest fails: its image is gone
    test_conn.lookupByName("e-running-3").managedSaveRemove(0)
    run_id, events = run_events(sub, daemon, m.Restore())
    journal = read_journal(daemon)
    assert journal.restore is not None and journal.restore.run_id == run_id
    assert not journal.restore.ok
    check_against_journal(events, journal.restore)
    failed = [e for e in events if isinstance(e, m.GuestActionFailed)]
    assert {e.name for e in failed} == {"e-running-3"} | {
        f"e-transient-{kind}-{i}" for kind, n in (("running", 8), ("paused", 2))
        for i in range(n)}  # the transient ones are gone: "not-found", reported as such


def test_workers_coming_and_going_are_published(
    make_daemon: DaemonFactory, subscriber: Callable[[Path], EventSubscriber],
) -> None:
    daemon = make_daemon(workers=2)
    status = daemon.start()
    sub = subscriber(daemon.runtime_dir)
    assert daemon.cli("workers", "3").returncode == 0
    spawned = until(sub, lambda e: isinstance(e, m.WorkerSpawned))[-1]
    assert isinstance(spawned, m.WorkerSpawned) and spawned.worker_id == "w3"

    victim = status.workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    lost = until(sub, lambda e: isinstance(e, m.WorkerLost))[-1]
    assert isinstance(lost, m.WorkerLost)
    assert (lost.worker_id, lost.pid) == (victim.worker_id, victim.pid)
    assert "SIGKILL" in lost.reason
    until(sub, lambda e: isinstance(e, m.WorkerSpawned))  # its replacement

    assert daemon.cli("workers", "2").returncode == 0
    retired = until(sub, lambda e: isinstance(e, m.WorkerRetired))[-1]
    assert isinstance(retired, m.WorkerRetired) and "status 0" in retired.reason


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
        **labels: str) -> float:
    return found[f"guestwarden_{name}", frozenset(labels.items())]


def test_metrics_textfile_and_command(test_conn: Any, make_daemon: DaemonFactory) -> None:
    define_guests(test_conn, "x", running=6, paused=2, off=1, transient_running=2)
    base = Path(tempfile.mkdtemp(prefix="gwd-", dir="/tmp"))
    try:
        check_metrics(test_conn, make_daemon, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def check_metrics(test_conn: Any, make_daemon: DaemonFactory, base: Path) -> None:
    collector = base / "textfile"  # node_exporter's --collector.textfile.directory
    collector.mkdir()
    textfile = collector / "guestwarden.prom"
    daemon = make_daemon(base, workers=2, extra={"metrics_textfile": str(textfile)})
    daemon.start()

    result = daemon.cli("preserve", "--wait", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1]["type"] == "RunFinished" and lines[-1]["run"]["ok"] is True
    assert sum(1 for d in lines if d["type"] == "GuestFinished" and d["guest"]["chain"]) == 10

    preserve = read_journal(daemon).preserve
    assert preserve is not None and preserve.finished_at is not None
    found = parse(textfile.read_text())  # written before the CLI heard the run end
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
    assert [p.name for p in collector.iterdir()] == ["guestwarden.prom"]
    assert get(found, "last_run_success", kind="preserve") == 1
    assert get(found, "last_run_timestamp_seconds", kind="preserve") == preserve.finished_at
    assert get(found, "last_run_duration_seconds", kind="preserve") == pytest.approx(
        preserve.finished_at - preserve.started_at, abs=0.001)
    assert get(found, "last_run_guests", kind="preserve", outcome="saved") == 8
    assert get(found, "last_run_guests", kind="preserve", outcome="shutdown") == 2
    assert get(found, "last_run_guests", kind="preserve", outcome="untouched") == 1
    assert get(found, "last_run_actions", kind="preserve", action="save", result="ok") == 8
    assert get(found, "last_run_action_duration_seconds_count", kind="preserve",
               action="shutdown") == 2
    saved = sum(g.memory_kib * 1024 for g in preserve.guests if g.outcome == "saved")
    assert saved > 0 and get(found, "last_run_saved_bytes", kind="preserve") == saved
    assert get(found, "runs_total", kind="preserve", result="ok") == 1
    assert get(found, "actions_total", action="save", result="ok") == 8

    assert daemon.cli("restore", "--wait").returncode == 0
    found = parse(textfile.read_text())
    assert get(found, "last_run_success", kind="restore") == 1
    assert get(found, "last_run_guests", kind="restore", outcome="restored") == 8
    assert get(found, "last_run_guests", kind="restore", outcome="gone") == 2
    assert get(found, "last_run_timestamp_seconds", kind="preserve") == preserve.finished_at

    live = daemon.cli("metrics")
    assert live.returncode == 0, live.stderr
    found = parse(live.stdout)
    assert get(found, "up") == 1 and get(found, "workers_target") == 2
    assert get(found, "run_in_progress", kind="preserve") == 0
    assert get(found, "runs_total", kind="restore", result="ok") == 1
    assert ("guestwarden_event_subscribers", frozenset()) in found

    # a restarted daemon still reports the last runs (from the journal)
    daemon.stop()
    again = make_daemon(base, workers=2, extra={"metrics_textfile": str(textfile)})
    again.start()
    found = parse(again.cli("metrics").stdout)
    assert get(found, "last_run_timestamp_seconds", kind="preserve") == preserve.finished_at
    assert get(found, "last_run_success", kind="restore") == 1
    assert not any(name == "guestwarden_runs_total" for name, _ in found)


def test_inhibitor_taken_and_released_are_published(
    test_conn: Any, make_daemon: DaemonFactory, subscriber: Callable[[Path], EventSubscriber],
) -> None:
    """With a private system bus and python-dbusmock's logind (testbed/hostbus.py)."""
    define_guests(test_conn, "i", running=3)
    with system_bus_with_logind(delay_max_s=600) as (bus, logind):
        daemon = make_daemon(workers=2, env={"DBUS_SYSTEM_BUS_ADDRESS": bus.address})
        daemon.start()
        wait_for(lambda: daemon.status().inhibitor == "held", 20, "the inhibitor")
        sub = subscriber(daemon.runtime_dir)

        logind.prepare_for_shutdown(True)  # the host goes down: preserve, then let go
        events = until(sub, lambda e: isinstance(e, m.InhibitorChanged)
                       and e.state == "released")
        released = events[-1]
        assert isinstance(released, m.InhibitorChanged) and released.state == "released"
        finished = [e for e in events if isinstance(e, m.RunFinished)]
        assert len(finished) == 1 and finished[0].kind == "preserve" and finished[0].ok
        assert finished[0].seq < released.seq  # the guests first, then the host may go

        logind.prepare_for_shutdown(False)  # cancelled: a new inhibitor
        held = until(sub, lambda e: isinstance(e, m.InhibitorChanged) and e.state == "held")[-1]
        assert isinstance(held, m.InhibitorChanged) and held.state == "held"
        daemon.stop()  # before the bus goes
