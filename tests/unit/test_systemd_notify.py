"""SystemdNotifier: what reaches a NOTIFY_SOCKET, from whom, and what happens when it cannot."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guestwarden.supervisor.systemd import SystemdNotifier, status_text, watchdog_interval_s
from testbed.hostbus import NotifyCollector


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyCollector]:
    base = Path(tempfile.mkdtemp(prefix="gwn-", dir="/tmp"))
    sink = NotifyCollector(base / "notify")
    for key in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sink.path))
    yield sink
    sink.close()
    base.rmdir()


def fields(sink: NotifyCollector) -> list[str]:
    return [f"{n.key}={n.value}" for n in sink.drain()]


def test_status_text_is_one_line_of_ascii_and_keeps_the_meaning() -> None:
    text = status_text("Préservé: 12/40 done, saving wéb3 63%\nREADY=1 日本")
    assert text == "Preserve: 12/40 done, saving web3 63% READY=1 \\u65e5\\u672c"
    assert text.isascii() and "\n" not in text
    assert len(status_text("x" * 5000)) <= 400


def test_watchdog_interval_honours_watchdog_pid() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, 42) is None
    assert watchdog_interval_s({}, 42) is None


def test_without_notify_socket_every_call_is_a_quiet_no_op(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert not notifier.ready("x") and not notifier.extend_timeout()
    assert not caplog.records


def test_socket_is_read_when_the_notifier_is_made_and_messages_come_from_our_pid(
    collector: NotifyCollector,
) -> None:
    notifier = SystemdNotifier()  # NOTIFY_SOCKET was set after the module was imported
    assert notifier.ready("Idle: 2 workers")
    assert notifier.status("Preserving: 1/3 done")
    assert not notifier.status("Preserving: 1/3 done")  # unchanged: not sent again
    assert notifier.status("Préservé: 日本")  # sdnotify alone would drop this one silently
    assert notifier.extend_timeout() and notifier.stopping() and notifier.reloading()
    got = fields(collector)
    assert got[:6] == ["READY=1", "STATUS=Idle: 2 workers", "STATUS=Preserving: 1/3 done",
                       "STATUS=Preserve: \\u65e5\\u672c", "EXTEND_TIMEOUT_USEC=30000000",
                       "STOPPING=1"]
    assert got[6] == "RELOADING=1" and got[7].startswith("MONOTONIC_USEC=")
    assert {n.pid for n in collector.drain()} == {os.getpid()}


def test_abstract_socket_address_works(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    name = f"gw-notify-test-{os.getpid()}"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert SystemdNotifier().ready()
        assert sink.recv(100) == b"READY=1"
    finally:
        sink.close()


def test_errors_are_logged_once_not_swallowed(
    collector: NotifyCollector, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier()
    assert notifier.ready()
    collector.sock.close()  # systemd went away
    with caplog.at_level(logging.ERROR):
        assert not notifier.status("a")
        assert not notifier.status("b")
    errors = [r for r in caplog.records if "notify" in r.getMessage()]
    assert len(errors) == 1 and "failed" in errors[0].getMessage()


def test_unreachable_socket_is_reported_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    with caplog.at_level(logging.ERROR):
        notifier = SystemdNotifier()
    assert not notifier.enabled
    assert "/nonexistent/notify" in caplog.text


def test_extend_is_repeated_while_running_and_stops_when_done(collector: NotifyCollector) -> None:
    async def scenario() -> tuple[int, int]:
        notifier = SystemdNotifier(extend_usec=1_000_000, extend_interval_s=0.02)
        done = asyncio.Event()
        task = asyncio.create_task(notifier.extend_until(done))
        deadline = time.monotonic() + 5
        while len(collector.find("EXTEND_TIMEOUT_USEC")) < 3:
            assert time.monotonic() < deadline, "EXTEND_TIMEOUT_USEC was not repeated"
            await asyncio.sleep(0.01)
        done.set()
        await asyncio.wait_for(task, 1.0)
        sent = len(collector.find("EXTEND_TIMEOUT_USEC"))
        await asyncio.sleep(0.1)  # several intervals: nothing more may come
        return sent, len(collector.find("EXTEND_TIMEOUT_USEC"))

    sent, later = asyncio.run(scenario())
    assert sent >= 3 and later == sent
    assert {n.value for n in collector.find("EXTEND_TIMEOUT_USEC")} == {"1000000"}


def test_watchdog_pings_from_the_loop_and_stops_while_the_loop_is_stuck(
    collector: NotifyCollector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # a ping every 10 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    async def scenario() -> tuple[int, int, int]:
        notifier = SystemdNotifier()
        task = asyncio.create_task(notifier.run_watchdog())
        deadline = time.monotonic() + 5
        while len(collector.find("WATCHDOG")) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        before = len(collector.find("WATCHDOG"))
        time.sleep(0.3)  # the loop is stuck: a helper thread would ping ~30 times now
        during = len(collector.find("WATCHDOG"))
        while len(collector.find("WATCHDOG")) <= during + 2:
            assert time.monotonic() < deadline + 5
            await asyncio.sleep(0.01)
        task.cancel()
        return before, during, len(collector.find("WATCHDOG"))

    before, during, after = asyncio.run(scenario())
    assert during == before, "pinged while the loop was stuck"
    assert after > during


def test_watchdog_meant_for_another_pid_is_not_pinged(
    collector: NotifyCollector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    asyncio.run(asyncio.wait_for(SystemdNotifier().run_watchdog(), 1.0))  # returns at once
    assert not collector.find("WATCHDOG")


def test_status_follows_its_source_sending_only_changes(collector: NotifyCollector) -> None:
    texts = iter(["Idle", "Idle", "Preserving: 0/2 done", "Preserving: 0/2 done",
                  "Preserving: 2/2 done"])

    async def scenario() -> None:
        notifier = SystemdNotifier()
        task = asyncio.create_task(notifier.run_status(lambda: next(texts, "Idle"),
                                                       interval_s=0.001))
        deadline = time.monotonic() + 5
        while len(collector.find("STATUS")) < 4:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(scenario())
    assert [n.value for n in collector.find("STATUS")][:4] == [
        "Idle", "Preserving: 0/2 done", "Preserving: 2/2 done", "Idle"]
