"""A worker process: one DEALER socket to the supervisor, one libvirt action at a time.

The asyncio loop stays free at all times: the action runs in a daemon thread, and
the loop keeps heartbeating, forwards save progress and listens for ``Cancel`` and
``Stop``. So a save that takes minutes never looks like a dead worker, while a
worker whose loop is stuck (or whose supervisor is gone) is noticed on both sides.

A job's fixed cost is on the critical path of every preserve (saves go one at a
time by default), so the hot path is kept lean, measured against libvirt's test
driver: the actions run on one long-lived thread (``ActionThread``) rather than a
new thread per job, and the socket is a plain ZeroMQ socket whose frames are read
by a reader callback on its fd and sent without blocking, rather than
``zmq.asyncio``'s futures (together about 200 µs of CPU less per job).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import cast

import zmq

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
from guestwarden.ipc.sockets import configure, has_input
from guestwarden.workers.actions import ActionError, ActionResult, Actions, Connections
from guestwarden.workers.threads import ActionThread, deliver, in_daemon_thread

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
"""Default of ``[advanced] progress_interval``: how often a save's progress is read."""


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
        self._last_heard = 0.0
        self._socket: zmq.Socket[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: deque[bytes] = deque()
        self._woken: asyncio.Future[None] | None = None
        self._actions_thread = ActionThread()
        self._background: set[asyncio.Future[object]] = set()

    async def run(self) -> int:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        configure(sock, max_message_bytes=64 << 20)
        sock.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        sock.connect(self.endpoint)
        self._socket = sock
        loop = self._loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._request_stop, "SIGTERM")
        fd = cast(int, sock.getsockopt(zmq.FD))
        loop.add_reader(fd, self._receive)
        try:
            self._send(Ready(worker_id=self.worker_id, pid=os.getpid()))
            self._last_heard = self.clock()
            # frames are handled by _receive as they come; this loop wakes every
            # heartbeat interval, and at once when a stop or a job's end is due
            while not (self._stopping and self._task is None):
                await self._pause(self.heartbeat_interval_s)
                self._receive()  # a frame whose fd signal a send took (see _receive)
                now = self.clock()
                if now - self._last_heard > self.heartbeat_timeout_s:
                    log.error("worker=%s: supervisor silent for %.1fs: exiting",
                              self.worker_id, now - self._last_heard)
                    return 1
                if os.getppid() != self._parent:
                    log.error("worker=%s: supervisor gone: exiting", self.worker_id)
                    return 1
                self._flush()
                if not self._outbox and now - self._last_sent >= self.heartbeat_interval_s:
                    self._send(Heartbeat(sent_at=now))
            self._send(Bye(reason=self._stopping))
            return 0
        finally:
            loop.remove_reader(fd)
            self.actions.close_all()
            sock.close(linger=0)

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if ``_nudge`` is called meanwhile."""
        loop = asyncio.get_running_loop()
        self._woken = woken = loop.create_future()
        timer = loop.call_later(seconds, deliver, woken, None, None)
        try:
            await woken
        finally:
            timer.cancel()
            self._woken = None

    def _nudge(self) -> None:
        """The main loop should look again now (a stop was asked, a job ended)."""
        if self._woken is not None:
            deliver(self._woken, None, None)

    def _request_stop(self, why: str) -> None:
        self._stopping = self._stopping or why
        self._nudge()

    def _receive(self) -> None:
        """Handle every frame waiting on the socket: until ``has_input`` says none is
        left (ZeroMQ's fd is edge-triggered, see there); every send looks again
        (``_flush``), and the main loop calls it once a turn as well."""
        sock = self._socket
        if sock is None or sock.closed:
            return
        while has_input(sock):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._last_heard = self.clock()
            self._handle(frame)

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
                    self._send(JobFailed(job_id=job.job_id, reason="busy"))
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
        # logging and the rest wait until the action is handed over (and, below, the
        # reply sent): at thousands of quick jobs, every step before it adds up
        running = self._actions_thread.submit(lambda: self.actions.run(job, cancel))
        log.info("worker=%s job=%d %s guest=%s attempt=%d started",
                 self.worker_id, job.job_id, job.kind, job.name, job.attempt)
        progress = (asyncio.create_task(self._report_progress(job))
                    if job.kind == "save" else None)
        reply: FromWorker
        try:
            result: ActionResult = await running
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
        self._send(reply)
        log.info("worker=%s job=%d %s guest=%s: %s", self.worker_id, job.job_id, job.kind,
                 job.name, getattr(reply, "result", None) or getattr(reply, "reason", ""))
        self._task = None
        self._nudge()

    async def _report_progress(self, job: Job) -> None:
        while True:
            await asyncio.sleep(self.progress_interval_s)
            numbers = await in_daemon_thread(lambda: self.actions.progress(job), name="progress")
            if numbers is not None:
                self._send(Progress(job_id=job.job_id, processed_bytes=numbers[0],
                                    total_bytes=numbers[1]))

    def _send(self, message: FromWorker) -> None:
        self._outbox.append(codec.encode(message))
        self._flush()

    def _flush(self) -> None:
        """Send what is queued, without blocking: a DEALER queues 1000 frames before it
        refuses (a supervisor that reads nothing), and then the rest waits for the next
        turn of the main loop."""
        sock = self._socket
        assert sock is not None
        while self._outbox:
            try:
                sock.send(self._outbox[0], zmq.NOBLOCK)
            except zmq.Again:
                break
            self._outbox.popleft()
            self._last_sent = self.clock()
        if has_input(sock) and self._loop is not None:
            self._loop.call_soon(self._receive)  # a frame came in; its fd signal may be gone


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
