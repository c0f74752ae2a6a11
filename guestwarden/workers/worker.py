"""A worker process: one DEALER socket to the supervisor, one libvirt action at a time.

The asyncio loop stays free at all times: the action runs in a daemon thread, and
the loop keeps heartbeating, forwards save progress and listens for ``Cancel`` and
``Stop``. So a save that takes minutes never looks like a dead worker, while a
worker whose loop is stuck (or whose supervisor is gone) is noticed on both sides.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import zmq
import zmq.asyncio

from guestwarden.ipc import codec
from guestwarden.ipc.messages import (
    Assign,
    Bye,
    Cancel,
    FromWorker,
    Heartbeat,
    Job,
    JobDone,
    JobFailed,
    Progress,
    Ready,
    Stop,
)
from guestwarden.ipc.sockets import configure
from guestwarden.workers.actions import ActionError, ActionResult, Actions, Connections

log = logging.getLogger(__name__)

_T = TypeVar("_T")

PROGRESS_INTERVAL_S = 0.5
"""Default of ``[advanced] progress_interval``: how often a save's progress is read."""


def in_daemon_thread(fn: Callable[[], _T], name: str) -> asyncio.Future[_T]:
    """Run a blocking call in a daemon thread (one that never holds up process exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def deliver(result: _T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            result = fn()
        except BaseException as exc:  # delivered to the awaiting coroutine
            loop.call_soon_threadsafe(deliver, None, exc)
        else:
            loop.call_soon_threadsafe(deliver, result, None)

    threading.Thread(target=body, name=name, daemon=True).start()
    return future


class Worker:
    def __init__(
        self,
        *,
        worker_id: str,
        endpoint: str,
        heartbeat_interval_s: float,
        heartbeat_timeout_s: float,
        actions: Actions,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker_id = worker_id
        self.endpoint = endpoint
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.actions = actions
        self.progress_interval_s = progress_interval_s
        self.clock = clock
        self._parent = os.getppid()
        self._stopping = ""
        self._current: tuple[Job, threading.Event] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_sent = 0.0
        self._socket: zmq.asyncio.Socket | None = None
        self._background: set[asyncio.Future[object]] = set()

    async def run(self) -> int:
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        configure(sock, max_message_bytes=64 << 20)
        sock.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        sock.connect(self.endpoint)
        self._socket = sock
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._request_stop, "SIGTERM")
        try:
            await self._send(Ready(worker_id=self.worker_id, pid=os.getpid()))
            last_heard = self.clock()
            while not (self._stopping and self._task is None):
                if await sock.poll(int(self.heartbeat_interval_s * 1000)):
                    frame = await sock.recv()
                    last_heard = self.clock()
                    self._handle(frame)
                now = self.clock()
                if now - last_heard > self.heartbeat_timeout_s:
                    log.error("worker=%s: supervisor silent for %.1fs: exiting",
                              self.worker_id, now - last_heard)
                    return 1
                if os.getppid() != self._parent:
                    log.error("worker=%s: supervisor gone: exiting", self.worker_id)
                    return 1
                if now - self._last_sent >= self.heartbeat_interval_s:
                    await self._send(Heartbeat(sent_at=now))
            await self._send(Bye(reason=self._stopping))
            return 0
        finally:
            self.actions.close_all()
            sock.close(linger=0)

    def _request_stop(self, why: str) -> None:
        self._stopping = self._stopping or why

    def _handle(self, frame: bytes) -> None:
        try:
            message = codec.decode_to_worker(frame)
        except codec.DecodeError as exc:
            log.error("worker=%s: undecodable frame dropped: %s", self.worker_id, exc)
            return
        match message:
            case Assign(job=job):
                if self._task is not None:
                    # the supervisor never does this; refuse rather than run two at once
                    self._spawn(self._send(JobFailed(job_id=job.job_id, reason="busy")))
                    return
                self._task = asyncio.create_task(self._run_job(job))
            case Cancel(job_id=job_id):
                if self._current is not None and self._current[0].job_id == job_id:
                    job, cancel = self._current
                    cancel.set()
                    if job.kind in ("save", "start"):
                        self._spawn(in_daemon_thread(
                            lambda: self.actions.abort(job), name="abort"))
            case Stop(reason=reason):
                self._request_stop(reason or "asked to stop")
            case Heartbeat():
                pass

    def _spawn(self, awaitable: Awaitable[object]) -> None:
        """Run on the side; the reference is kept until it ends (asyncio holds weak ones)."""
        task = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run_job(self, job: Job) -> None:
        cancel = threading.Event()
        self._current = (job, cancel)
        started = time.monotonic_ns()
        log.info("worker=%s job=%d %s guest=%s attempt=%d started",
                 self.worker_id, job.job_id, job.kind, job.name, job.attempt)
        progress = (asyncio.create_task(self._report_progress(job))
                    if job.kind == "save" else None)
        reply: FromWorker
        try:
            result: ActionResult = await in_daemon_thread(
                lambda: self.actions.run(job, cancel), name=f"job-{job.job_id}")
            reply = JobDone(job_id=job.job_id, result=result.result, detail=result.detail,
                            started_ns=started, finished_ns=time.monotonic_ns(),
                            guests=result.guests)
        except ActionError as exc:
            reply = JobFailed(job_id=job.job_id, reason=exc.reason, detail=exc.detail,
                              started_ns=started, finished_ns=time.monotonic_ns())
        except Exception as exc:  # a bug must not kill the worker silently
            log.exception("worker=%s job=%d crashed", self.worker_id, job.job_id)
            reply = JobFailed(job_id=job.job_id, reason="internal-error",
                              detail=f"{job.kind} of guest {job.name}: {exc!r}",
                              started_ns=started, finished_ns=time.monotonic_ns())
        finally:
            if progress is not None:
                progress.cancel()
            self._current = None
        log.info("worker=%s job=%d %s guest=%s: %s", self.worker_id, job.job_id, job.kind,
                 job.name, getattr(reply, "result", None) or getattr(reply, "reason", ""))
        await self._send(reply)
        self._task = None

    async def _report_progress(self, job: Job) -> None:
        while True:
            await asyncio.sleep(self.progress_interval_s)
            numbers = await in_daemon_thread(lambda: self.actions.progress(job), name="progress")
            if numbers is not None:
                await self._send(Progress(job_id=job.job_id, processed_bytes=numbers[0],
                                          total_bytes=numbers[1]))

    async def _send(self, message: FromWorker) -> None:
        assert self._socket is not None
        self._last_sent = self.clock()
        await self._socket.send(codec.encode(message))


def make_worker(
    *, worker_id: str, endpoint: str, heartbeat_interval_s: float, heartbeat_timeout_s: float,
    connect_timeout_s: float, progress_interval_s: float = PROGRESS_INTERVAL_S,
) -> Worker:
    return Worker(
        worker_id=worker_id,
        endpoint=endpoint,
        heartbeat_interval_s=heartbeat_interval_s,
        heartbeat_timeout_s=heartbeat_timeout_s,
        actions=Actions(Connections(connect_timeout_s), queries=Connections(connect_timeout_s)),
        progress_interval_s=progress_interval_s,
    )
