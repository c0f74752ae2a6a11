"""Blocking calls of a worker, run off its asyncio loop and awaited from it.

A worker's loop must stay free (heartbeats, ``Cancel``, ``Stop``), so every libvirt
call runs on another thread: actions on the worker's one long-lived
``ActionThread``, side queries (progress, abort) each on a thread of its own.
Threads are daemon threads: a hung libvirt call never holds up the process's exit.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


def in_daemon_thread(fn: Callable[[], _T], name: str) -> asyncio.Future[_T]:
    """Run a blocking call in a daemon thread (one that never holds up process exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()
    threading.Thread(target=_run_and_deliver, args=(loop, future, fn), name=name,
                     daemon=True).start()
    return future


def _run_and_deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any],
                     fn: Callable[[], object]) -> None:
    """In a thread: ``fn()``, its result or exception handed to the loop's ``future``."""
    try:
        result = fn()
    except BaseException as exc:  # delivered to the awaiting coroutine
        loop.call_soon_threadsafe(deliver, future, None, exc)
    else:
        loop.call_soon_threadsafe(deliver, future, result, None)


def deliver(future: asyncio.Future[Any], result: object, error: BaseException | None) -> None:
    """Complete ``future`` (on its loop) unless it is done already, e.g. cancelled."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class ActionThread:
    """One long-lived daemon thread that runs a worker's actions, one at a time.

    The same as ``in_daemon_thread`` per job (a hung action hangs only this thread,
    and the worker refuses new jobs until it returns), without starting a thread for
    every job. Started on first use; it dies with the process.
    """

    def __init__(self, name: str = "actions") -> None:
        self.name = name
        self._queue: queue.SimpleQueue[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]]
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        self._queue.put((loop, future, fn))
        return future

    def _serve(self) -> None:
        while True:
            _run_and_deliver(*self._queue.get())
