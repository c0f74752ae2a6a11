"""The Inhibitor against a real dbus-daemon and python-dbusmock's logind (no libvirt here).

The Inhibitor runs in the test's own event loop; the mock is driven with blocking
dbus-python calls. Every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from guestwarden.supervisor.inhibitor import LOGIND_MANAGER, LOGIND_PATH, WHY, Inhibitor
from testbed.hostbus import LogindMock, PrivateSystemBus, system_bus_with_logind


@pytest.fixture
def bus_and_logind(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[PrivateSystemBus,
                                                                       LogindMock]]:
    with system_bus_with_logind(delay_max_s=600) as (bus, logind):
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        yield bus, logind


async def until(condition: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.02)


def run_with(inhibitor: Inhibitor, scenario: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        task = asyncio.create_task(inhibitor.run())
        try:
            await scenario()
        finally:
            task.cancel()
            inhibitor.close()

    asyncio.run(main())


def test_subscribes_before_inhibiting(
    bus_and_logind: tuple[PrivateSystemBus, LogindMock],
) -> None:
    calls: list[tuple[str, str, list[object]]] = []

    def record(message: Message) -> bool:
        if message.message_type is MessageType.METHOD_CALL:
            calls.append((message.sender or "", message.member or "", list(message.body)))
        return True  # a monitor never answers

    async def nothing() -> None:
        return None

    inhibitor = Inhibitor(nothing)

    async def main() -> None:
        monitor = await MessageBus(bus_type=BusType.SYSTEM).connect()
        await monitor.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus.Monitoring", member="BecomeMonitor",
            signature="asu", body=[["type='method_call'"], 0]))
        monitor.add_message_handler(record)
        task = asyncio.create_task(inhibitor.run())
        try:
            await until(lambda: inhibitor.state == "held", "the inhibitor")
            await until(lambda: any(c[1] == "Inhibit" for c in calls), "the monitor")
        finally:
            task.cancel()
            inhibitor.close()
            monitor.disconnect()

    asyncio.run(main())
    ours = [c for c in calls if c[1] in ("AddMatch", "Inhibit")]
    assert ours[0][1] == "AddMatch" and "PrepareForShutdown" in str(ours[0][2])
    assert [c for c in ours if c[1] == "Inhibit"] == [
        (ours[0][0], "Inhibit", ["shutdown", "guestwarden", WHY, "delay"])]
    assert inhibitor.delay_max_s == 600


def test_held_fd_is_listed_and_close_on_exec(
    bus_and_logind: tuple[PrivateSystemBus, LogindMock],
) -> None:
    _bus, logind = bus_and_logind

    async def nothing() -> None:
        return None

    inhibitor = Inhibitor(nothing)

    async def scenario() -> None:
        await until(lambda: inhibitor.state == "held", "the inhibitor")
        assert logind.ours() == [("shutdown", "guestwarden", WHY, "delay", 1000, 123456)]
        assert inhibitor.fd is not None
        assert fcntl.fcntl(inhibitor.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC

    run_with(inhibitor, scenario)
    assert inhibitor.fd is None and inhibitor.state == "released"
    assert logind.ours() == []


def test_prepare_for_shutdown_releases_only_after_preserve_and_false_takes_a_new_one(
    bus_and_logind: tuple[PrivateSystemBus, LogindMock],
) -> None:
    _bus, logind = bus_and_logind
    preserve_may_end = asyncio.Event()
    preserve_calls: list[float] = []

    async def preserve() -> None:
        preserve_calls.append(time.monotonic())
        await preserve_may_end.wait()

    inhibitor = Inhibitor(preserve)

    async def scenario() -> None:
        await until(lambda: inhibitor.state == "held", "the inhibitor")
        first_fd = inhibitor.fd
        logind.prepare_for_shutdown(True)
        await until(lambda: preserve_calls, "preserve to be called")
        for _ in range(10):  # preserve still running: the lock must stay
            assert logind.ours() and inhibitor.state == "held"
            await asyncio.sleep(0.02)
        logind.prepare_for_shutdown(True)  # a repeated signal starts no second preserve
        preserve_may_end.set()
        await until(lambda: not logind.ours(), "logind to see the inhibitor gone")
        assert inhibitor.state == "released" and len(preserve_calls) == 1
        assert inhibitor.shutdown_seen and inhibitor.preserved
        logind.prepare_for_shutdown(False)
        await until(lambda: logind.ours(), "a new inhibitor after the cancel")
        assert inhibitor.state == "held" and not inhibitor.shutdown_seen
        assert inhibitor.fd is not None and first_fd is not None

    run_with(inhibitor, scenario)


def test_a_forged_prepare_for_shutdown_is_ignored(
    bus_and_logind: tuple[PrivateSystemBus, LogindMock], caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    async def preserve() -> None:
        calls.append(1)

    inhibitor = Inhibitor(preserve)

    async def scenario() -> None:
        await until(lambda: inhibitor.state == "held", "the inhibitor")
        target = inhibitor._bus.unique_name if inhibitor._bus else None
        intruder = await MessageBus(bus_type=BusType.SYSTEM).connect()
        try:  # a broadcast does not match our rule; one sent to us directly is seen, and refused
            await intruder.send(Message.new_signal(LOGIND_PATH, LOGIND_MANAGER,
                                                   "PrepareForShutdown", "b", [True]))
            await intruder.send(Message(
                message_type=MessageType.SIGNAL, destination=target, path=LOGIND_PATH,
                interface=LOGIND_MANAGER, member="PrepareForShutdown", signature="b",
                body=[True]))
            await until(lambda: "not logind" in caplog.text, "the forged signal to be seen")
        finally:
            intruder.disconnect()

    with caplog.at_level(logging.WARNING):
        run_with(inhibitor, scenario)
    assert not calls and not inhibitor.shutdown_seen


def test_no_bus_then_bus_lost_and_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    base = Path(tempfile.mkdtemp(prefix="gwbus-", dir="/tmp"))
    bus = PrivateSystemBus(base)
    logind = LogindMock(bus)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)

    async def nothing() -> None:
        return None

    inhibitor = Inhibitor(nothing, backoff_first_s=0.05, backoff_max_s=0.4)

    async def scenario() -> None:
        await until(lambda: "still unavailable" in caplog.text, "a retry")  # debug level
        assert inhibitor.state == "unavailable"
        await asyncio.to_thread(bus.start)
        await asyncio.to_thread(logind.start)
        await until(lambda: inhibitor.state == "held", "the inhibitor once the bus is up")
        await asyncio.to_thread(logind.stop)  # logind gone (the bus stays)
        await until(lambda: inhibitor.state == "unavailable", "logind to be missed")
        await asyncio.to_thread(bus.stop)
        await asyncio.to_thread(bus.start)
        await asyncio.to_thread(logind.start)
        await until(lambda: inhibitor.state == "held" and logind.ours(), "the inhibitor again")

    try:
        with caplog.at_level(logging.DEBUG, logger="guestwarden"):
            run_with(inhibitor, scenario)
    finally:
        logind.stop()
        bus.stop()
        shutil.rmtree(base, ignore_errors=True)
    warnings = [r for r in caplog.records if "inhibitor unavailable" in r.getMessage()]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # once per outage
