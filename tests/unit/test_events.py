"""The event publisher on a real ipc:// socket, with a real subscriber: the welcome,
the sequence numbers, the permissions, the subscriber count, the observers."""

from __future__ import annotations

import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from guestwarden.ipc import messages as m
from guestwarden.ipc.subscriber import EventSubscriber
from guestwarden.supervisor.events import EventPublisher
from testbed.daemon import wait_for


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """ipc:// paths are limited to ~107 bytes: pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="gwe-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def publisher(short_dir: Path) -> Iterator[EventPublisher]:
    seen: list[m.Event] = []
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = EventPublisher(ctx, short_dir / "events.sock", observers=(seen.append,),
                         wall_clock=lambda: 100.0)
    pub.bind()
    pub.seen = seen  # type: ignore[attr-defined]
    yield pub
    pub.close()
    ctx.term()


def subscribers(pub: EventPublisher, count: int) -> None:
    def reached() -> bool:
        pub.drain()  # what the supervisor's loop does when the socket's fd wakes it
        return pub.subscribers == count

    wait_for(reached, 5, f"{count} subscribers")


def subscribed(pub: EventPublisher, sub: EventSubscriber) -> None:
    """Connect, pumping the publisher's notices as the supervisor's loop would (the
    welcome goes out when the publisher's socket processes the join)."""
    sub.connect(timeout_s=0.0)
    subscribers(pub, 1)
    if sub.welcome is None:
        events = wait_for(lambda: sub.receive(0.05), 5, "the welcome")
        assert isinstance(events[0], m.Subscribed), events


def test_socket_is_root_only_and_gone_after_close(short_dir: Path) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = EventPublisher(ctx, short_dir / "events.sock")
    pub.bind()
    try:
        assert stat.S_IMODE((short_dir / "events.sock").stat().st_mode) == 0o600
    finally:
        pub.close()
        ctx.term()
    assert not (short_dir / "events.sock").exists()


def test_subscriber_gets_welcome_then_every_event_in_order(publisher: EventPublisher,
                                                           short_dir: Path) -> None:
    with EventSubscriber(short_dir) as sub:
        subscribed(publisher, sub)
        job = m.Job(job_id=3, kind="save", uri="u", uuid="x", name="web1")
        publisher.worker_spawned("w1", 42)
        publisher.action_started("run-1", job, "w1")
        publisher.action_progress("run-1", job, 50, 100)
        publisher.action_ended("run-1", job, m.JobDone(job_id=3, result="saved"), 1.25)
        publisher.action_ended("run-1", job, m.JobFailed(job_id=3, reason="timeout"), 2.0)
        publisher.worker_exited("w1", 42, "killed by SIGKILL", lost=True)
        publisher.worker_exited("w2", 43, "exited with status 0", lost=False)
        publisher.inhibitor("held", "logind delays shutdown")
        got: list[m.Event] = []

        def eight() -> bool:
            got.extend(sub.receive(0.05))
            return len(got) >= 8

        wait_for(eight, 5, "8 events")
    assert [type(e) for e in got] == [
        m.WorkerSpawned, m.GuestActionStarted, m.GuestActionProgress, m.GuestActionFinished,
        m.GuestActionFailed, m.WorkerLost, m.WorkerRetired, m.InhibitorChanged]
    assert [e.seq for e in got] == list(range(1, 9))
    assert all(e.at == 100.0 for e in got)
    started = got[1]
    assert isinstance(started, m.GuestActionStarted)
    assert (started.run_id, started.name, started.action, started.worker_id) == (
        "run-1", "web1", "save", "w1")
    assert got == publisher.seen  # type: ignore[attr-defined]


def test_subscriber_count_follows_joins_and_leaves(publisher: EventPublisher,
                                                   short_dir: Path) -> None:
    first, second = EventSubscriber(short_dir), EventSubscriber(short_dir)
    subscribed(publisher, first)
    second.connect(timeout_s=0.0)
    subscribers(publisher, 2)
    first.close()
    second.close()
    subscribers(publisher, 0)


def test_a_failing_observer_does_not_stop_publishing(short_dir: Path) -> None:
    def broken(event: m.Event) -> None:
        raise RuntimeError("bug")

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = EventPublisher(ctx, short_dir / "events.sock", observers=(broken,))
    pub.bind()
    try:
        with EventSubscriber(short_dir) as sub:
            subscribed(pub, sub)
            pub.inhibitor("released")
            events = wait_for(lambda: sub.receive(0.05), 5, "the event")
        assert isinstance(events[0], m.InhibitorChanged) and events[0].state == "released"
    finally:
        pub.close()
        ctx.term()
