"""The supervisor: one asyncio loop that wires the pool, the dispatcher, runs and control.

It never calls libvirt (a hung libvirtd must not starve it); even the guest
inventory is a worker's job. Signal handlers only queue the signal; the main loop
reads it. Every frame from a worker goes through the dispatcher, whose effects are
applied here.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import cast

import zmq
import zmq.asyncio

from guestwarden.conf.loading import ConfigError, load_settings
from guestwarden.conf.settings import Settings, resolve_worker_count
from guestwarden.ipc import codec
from guestwarden.ipc.messages import (
    ClearPolicy,
    Error,
    GetMetrics,
    GetRun,
    GetStatus,
    GuestInfo,
    Heartbeat,
    Job,
    JobDone,
    JobFailed,
    JobKind,
    Jobs,
    ListJobs,
    MetricsText,
    Ok,
    Plan,
    Preserve,
    Progress,
    Reload,
    Reloaded,
    Reply,
    Request,
    Restore,
    RunReply,
    SetPolicy,
    SetWorkers,
    ShowPolicy,
    Status,
    WorkerStatus,
)
from guestwarden.ipc.sockets import (
    CONTROL_SOCKET,
    LOCK_FILE,
    WORKER_MAX_MESSAGE_BYTES,
    WORKER_SOCKET,
    configure,
    has_input,
    private_umask,
)
from guestwarden.supervisor.capacity import host_resources, worker_count
from guestwarden.supervisor.control import ControlServer
from guestwarden.supervisor.dispatcher import Dispatcher, Effect, JobFinished, KillWorker, SendTo
from guestwarden.supervisor.dueling import DuelingGuard, DuelingSources, RefusedRun
from guestwarden.supervisor.forecast import Forecast, build_plan, forecast_guests
from guestwarden.supervisor.host import HostIntegration, progress_line
from guestwarden.supervisor.journal import Journal, JournalData
from guestwarden.supervisor.monitor import Monitor
from guestwarden.supervisor.policyeditor import PolicyEditor
from guestwarden.supervisor.pool import WorkerPool
from guestwarden.supervisor.preserve import PreserveRun, take_inventory
from guestwarden.supervisor.recovery import close_interrupted
from guestwarden.supervisor.reload import describe_changes, diff_settings, effective_settings
from guestwarden.supervisor.restore import RestoreRun
from guestwarden.supervisor.runs import Run
from guestwarden.supervisor.telemetry import Telemetry

log = logging.getLogger(__name__)

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
WORKER_READY_TIMEOUT_S = 30.0
KEPT_RUNS = 4


class AlreadyRunning(Exception):
    pass


def read_boot_id(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def take_lock(runtime_dir: Path) -> int:
    """Hold ``guestwarden.lock`` for the daemon's life: one daemon per runtime_dir.

    Needed because a second bind of an ipc:// path succeeds silently and would steal
    the first daemon's sockets. The fd is close-on-exec: workers never hold it.
    """
    path = runtime_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunning(
            f"another guestwarden daemon (pid {other}) is running with runtime_dir "
            f"{runtime_dir}; refusing to start a second one"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        *,
        boot_id_path: Path = BOOT_ID_PATH,
        log_level: str = "INFO",
        clock: Callable[[], float] = time.monotonic,
        config_path: Path | None = None,
        config_missing_ok: bool = False,
        dueling_sources: DuelingSources | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path  # re-read by reload (SIGHUP, `guestwarden reload`)
        self.config_missing_ok = config_missing_ok
        self.clock = clock
        self.log_level = log_level
        self.runtime_dir = Path(settings.runtime_dir)
        self.state_dir = Path(settings.state_dir)
        self.boot_id = read_boot_id(boot_id_path)
        self.started_at = clock()
        self.state = "starting"
        self.adv = settings.advanced
        self.dispatcher = Dispatcher(
            heartbeat_timeout_s=self.adv.heartbeat_timeout,
            grace_s=self.adv.job_grace,
            max_attempts=self.adv.max_attempts,
        )
        self.journal = Journal(self.state_dir)
        self.journal_data = JournalData()
        self.monitor = Monitor()
        self.runs: list[Run] = []
        self.current: Run | None = None
        self._futures: dict[int, asyncio.Future[JobDone | JobFailed]] = {}
        self._next_job_id = 1
        self._signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._tasks: set[asyncio.Task[object]] = set()
        self.ctx = zmq.asyncio.Context()
        # a plain socket, read by a callback on its fd (_read_workers): every job's
        # result passes here, and zmq.asyncio's futures cost a quarter of the
        # supervisor's CPU per job (measured at 5,000 test-driver guests)
        self.router: zmq.Socket[bytes] = zmq.Context.shadow(self.ctx.underlying).socket(
            zmq.ROUTER)
        configure(self.router, max_message_bytes=WORKER_MAX_MESSAGE_BYTES)
        # events.sock and the metrics (telemetry.py): told of jobs, workers and runs
        self.telemetry = Telemetry(self.ctx, self.runtime_dir, clock=clock,
                                   textfile=lambda: self.settings.metrics_textfile)
        self.pool = WorkerPool(
            endpoint=f"ipc://{self.runtime_dir / WORKER_SOCKET}",
            advanced=self.adv,
            log_level=log_level,
            on_spawn=self._worker_spawned,
            on_exit=self._worker_exited,
            clock=clock,
        )
        self.pool.target = worker_count(settings)  # capacity.py: psutil's CPUs and memory
        self.policies = PolicyEditor(self._jobs(), lambda: self.settings)
        self.control = ControlServer(self.ctx, self.runtime_dir / CONTROL_SOCKET, self.handle)
        # logind inhibitor + systemd notify (host.py); its tasks start with run()
        self.host = HostIntegration(self, clock=clock)
        # libvirt-guests or libvirt's auto-shutdown acting on the same guests (dueling.py)
        self.dueling = DuelingGuard(dueling_sources or DuelingSources())
        self._run_task: asyncio.Task[object] | None = None

    # ------------------------------------------------------------------ life

    async def run(self) -> int:
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = take_lock(self.runtime_dir)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._signals.put_nowait, sig)
        try:
            self.journal_data = self._recover_journal()
            worker_sock = self.runtime_dir / WORKER_SOCKET
            worker_sock.unlink(missing_ok=True)
            with private_umask():
                self.router.bind(f"ipc://{worker_sock}")
            self.control.bind()
            self.telemetry.open(loop, self.journal_data.preserve, self.journal_data.restore)
            self._start(self._read_workers())
            self._start(self._tick())
            self._start(self.control.serve())
            for coroutine in self.host.coroutines():
                self._start(coroutine)
            await self.pool.reconcile()
            await self._wait_for_workers()
            self.state = "idle"
            log.info("ready: %d workers, control at %s", self.pool.target, self.control.socket_path)
            self.host.ready()
            self.dueling.refresh(allowed=self.settings.allow_dueling)
            self._maybe_restore_on_boot()
            return await self._serve_signals()
        finally:
            await self._shutdown()
            os.close(lock_fd)

    def _recover_journal(self) -> JournalData:
        """Load the journal; close runs a dead supervisor left open (see recovery.py)."""
        data = self.journal.load()
        closed, notes = close_interrupted(data, time.time())
        if notes:
            self.journal.notes.extend(notes)
            self.journal.save(closed)
        return closed

    async def _wait_for_workers(self) -> None:
        deadline = self.clock() + WORKER_READY_TIMEOUT_S
        while self.dispatcher.ready_count() < min(1, self.pool.target):
            if self.clock() > deadline:
                log.error("no worker became ready within %.0fs", WORKER_READY_TIMEOUT_S)
                return
            await asyncio.sleep(0.05)

    async def _shutdown(self) -> None:
        self.state = "stopping"
        if self.current is not None:
            log.warning("stopping during %s run=%s: it ends unfinished",
                        self.current.kind, self.current.run_id)
        for worker_id in list(self.dispatcher.workers):
            self.pool.mark_retiring(worker_id)
            self._apply(self.dispatcher.retire_worker(worker_id, "daemon stopping"))
        await self.pool.close(grace_s=max(5.0, self.adv.job_grace))
        for task in self._tasks:
            task.cancel()
        self.host.close()  # the inhibitor goes last: preserve (if any) is over
        self.control.close()
        self.telemetry.close()
        asyncio.get_running_loop().remove_reader(self._router_fd())
        self.router.close(linger=0)
        (self.runtime_dir / WORKER_SOCKET).unlink(missing_ok=True)
        self.ctx.term()

    def _start(self, coro: Coroutine[object, None, object]) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("supervisor task failed", exc_info=task.exception())

    # ------------------------------------------------------------------ workers

    def _router_fd(self) -> int:
        return cast(int, self.router.getsockopt(zmq.FD))

    async def _read_workers(self) -> None:
        """Frames from workers are handled as they come, by ``_drain_workers`` as the
        reader of the socket's fd; this also drains once a second, in case an fd
        signal went missing (see ``_drain_workers``)."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self._router_fd(), self._drain_workers)
        while True:
            self._drain_workers()
            await asyncio.sleep(1.0)

    def _drain_workers(self) -> None:
        """Handle every frame waiting on the router: until ``has_input`` says none is
        left (ZeroMQ's fd is edge-triggered, see there), and once more at the end,
        after the sends of ``_apply``."""
        router = self.router
        while has_input(router):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                log.warning("worker frame with %d parts dropped", len(frames))
                continue
            worker_id = frames[0].decode(errors="replace")
            try:
                message = codec.decode_from_worker(frames[1])
            except codec.DecodeError as exc:
                log.warning("undecodable frame from worker=%s dropped: %s", worker_id, exc)
                continue
            self._apply(self.dispatcher.on_message(worker_id, message, self.clock()))
            if isinstance(message, Progress):
                self.telemetry.progress(self.dispatcher.in_flight.get(message.job_id),
                                        worker_id, message)

    async def _tick(self) -> None:
        interval = min(0.25, self.adv.heartbeat_interval / 2)
        last_beat = 0.0
        while True:
            now = self.clock()
            self._apply(self.dispatcher.tick(now))
            if now - last_beat >= self.adv.heartbeat_interval:
                last_beat = now
                beat = Heartbeat(sent_at=now)
                for worker_id, slot in list(self.dispatcher.workers.items()):
                    if slot.state != "starting":
                        self._apply([SendTo(worker_id, beat)])
            await self.pool.reconcile()
            self.telemetry.tick(self.host.inhibitor.state, self.host.inhibitor.detail)
            await asyncio.sleep(interval)

    def _worker_spawned(self, worker_id: str, pid: int) -> None:
        self.dispatcher.worker_spawned(worker_id, pid, self.clock())
        self.telemetry.worker_spawned(worker_id, pid)

    def _worker_exited(self, worker_id: str, returncode: int) -> None:
        self.telemetry.worker_exited(worker_id, returncode, stopping=self.state == "stopping")
        self._apply(self.dispatcher.worker_exited(worker_id, self.clock()))

    def _apply(self, effects: list[Effect]) -> None:
        self.telemetry.effects(effects)
        for effect in effects:
            match effect:
                case SendTo(worker_id=worker_id, message=message):
                    try:
                        self.router.send_multipart(
                            [worker_id.encode(), codec.encode(message)], flags=zmq.NOBLOCK)
                    except zmq.ZMQError as exc:
                        log.warning("worker=%s unreachable (%s): treating it as lost",
                                    worker_id, exc)
                        self.pool.kill(worker_id, "unreachable")
                        self._apply(self.dispatcher.worker_exited(worker_id, self.clock()))
                case KillWorker(worker_id=worker_id, reason=reason):
                    self.pool.kill(worker_id, reason)
                case JobFinished(job=job, result=result):
                    future = self._futures.pop(job.job_id, None)
                    if future is not None and not future.done():
                        future.set_result(result)
        if has_input(self.router):
            asyncio.get_running_loop().call_soon(self._drain_workers)

    # ------------------------------------------------------------------ jobs

    def new_job(self, kind: JobKind, uri: str, **fields: object) -> Job:
        job_id = self._next_job_id
        self._next_job_id += 1
        return Job(job_id=job_id, kind=kind, uri=uri, **fields)  # type: ignore[arg-type]

    async def run_job(self, job: Job) -> JobDone | JobFailed:
        future: asyncio.Future[JobDone | JobFailed] = asyncio.get_running_loop().create_future()
        self._futures[job.job_id] = future
        self._apply(self.dispatcher.submit(job, self.clock()))
        try:
            return await future
        except asyncio.CancelledError:
            self._futures.pop(job.job_id, None)
            self._apply(self.dispatcher.cancel(job.job_id, self.clock()))
            raise

    # ------------------------------------------------------------------ runs

    def _jobs(self) -> _JobAdapter:
        return _JobAdapter(self)

    def _set_journal(self, data: JournalData) -> None:
        self.journal_data = data

    def start_preserve(self) -> Run:
        if self.current is not None and self.current.kind == "preserve":
            return self.current
        refused = self.dueling.refusal("preserve", allowed=self.settings.allow_dueling)
        if refused:  # every trigger gets a run that ends at once (dueling.RefusedRun)
            return self._launch(RefusedRun(self._jobs(), "preserve", refused), "preserving")
        run = PreserveRun(self._jobs(), self.settings, self.journal,
                          lambda: self.journal_data, self.boot_id, workers=self.pool.target)
        run.on_journal = self._set_journal
        return self._launch(run, "preserving")

    def start_restore(self, *, automatic: bool = False) -> Run:
        refused = self.dueling.refusal("restore", allowed=self.settings.allow_dueling)
        if refused:
            return self._launch(RefusedRun(self._jobs(), "restore", refused), "restoring")
        run = RestoreRun(self._jobs(), self.settings, self.journal,
                         lambda: self.journal_data, self.boot_id, automatic=automatic)
        run.on_journal = self._set_journal
        return self._launch(run, "restoring")

    def _launch(self, run: Run, state: str) -> Run:
        self.current = run
        self.state = state
        self.runs = [*self.runs[-(KEPT_RUNS - 1):], run]
        self.telemetry.run_launched(run)

        async def body() -> None:
            try:
                await run.run()
            finally:
                if self.current is run:
                    self.current = None
                    self.state = "idle"

        self._run_task = self._start(body())
        if run.kind == "preserve":  # systemd must not time us out mid-save
            self._start(self.host.extend_while(run))
        return run

    def _maybe_restore_on_boot(self) -> None:
        if self.settings.boot.on_boot != "restore":
            return
        if not self.boot_id:
            log.warning("boot id unknown: not restoring automatically")
            return
        if self.journal_data.restore_boot_id == self.boot_id:
            log.info("restore already ran in this boot (%s): not again", self.boot_id)
            return
        if self.dueling.refusal("restore", allowed=self.settings.allow_dueling):
            log.error("not restoring automatically in boot %s: see the refusal above; a "
                      "daemon started after the setup is fixed restores then", self.boot_id)
            return
        log.info("first start in boot %s: restoring guests from the journal", self.boot_id)
        self.start_restore(automatic=True)

    # ------------------------------------------------------------------ control

    async def handle(self, request: Request) -> Reply:
        match request:
            case GetStatus():
                return self.status()
            case ListJobs():
                return Jobs(jobs=self.dispatcher.job_statuses(self.clock()),
                            queued_jobs=len(self.dispatcher.queue))
            case Preserve():
                if self.current is not None and self.current.kind == "restore":
                    return Error(code="busy", message="a restore is running; try again after it")
                refused = self.dueling.refusal("preserve", allowed=self.settings.allow_dueling)
                if refused:
                    return Error(code="unavailable", message=refused)
                run = self.start_preserve()
                return Ok(detail="preserve started", run_id=run.run_id)
            case Restore():
                if self.current is not None:
                    return Error(code="busy",
                                 message=f"a {self.current.kind} is running; try again after it")
                refused = self.dueling.refusal("restore", allowed=self.settings.allow_dueling)
                if refused:
                    return Error(code="unavailable", message=refused)
                run = self.start_restore()
                return Ok(detail="restore started", run_id=run.run_id)
            case GetRun(run_id=run_id):
                for run in self.runs:
                    if run.run_id == run_id:
                        return RunReply(run=run.status())
                return Error(code="invalid", message=f"no run {run_id!r} (known: "
                             f"{', '.join(r.run_id for r in self.runs) or 'none'})")
            case Plan():
                guests, errors = await take_inventory(self._jobs(), self.settings)
                return build_plan(guests, errors, self.settings, self.journal_data.learned,
                                  workers=self.pool.target,
                                  delay_max_s=self.host.inhibitor.delay_max_s)
            case ShowPolicy() | SetPolicy() | ClearPolicy():
                return await self.policies.handle(request)
            case SetWorkers(count=count):
                if not 1 <= count <= 256:
                    return Error(code="invalid",
                                 message=f"worker count must be from 1 to 256, got {count}")
                return await self.resize(count)
            case Reload():
                return await self.reload()
            case GetMetrics():
                return MetricsText(text=self.telemetry.metrics_text(self.status()))

    async def resize(self, count: int) -> Reply:
        """Grow now; shrink by retiring idle workers first, busy ones after their job."""
        before = self.pool.target
        self.pool.target = count
        surplus = len(self.pool.active()) - count
        if surplus > 0:
            slots = self.dispatcher.workers
            order = sorted(self.pool.active(),
                           key=lambda h: (slots[h.worker_id].state == "busy"
                                          if h.worker_id in slots else False))
            for handle in order[:surplus]:
                self.pool.mark_retiring(handle.worker_id)
                self._apply(self.dispatcher.retire_worker(handle.worker_id))
        await self.pool.reconcile()
        log.info("workers resized from %d to %d", before, count)
        return Ok(detail=f"workers: {before} -> {count}")

    def status(self) -> Status:
        now = self.clock()
        workers = []
        alive = set()
        for handle in self.pool.handles.values():
            slot = self.dispatcher.workers.get(handle.worker_id)
            rss, cpu = self.monitor.usage(handle.pid)
            alive.add(handle.pid)
            workers.append(WorkerStatus(
                worker_id=handle.worker_id, pid=handle.pid,
                state=("retiring" if handle.retiring else slot.state if slot else "lost"),
                job_id=slot.job_id if slot else None, rss_bytes=rss, cpu_percent=cpu,
                jobs_done=slot.jobs_done if slot else 0,
            ))
        self.monitor.forget_others(alive)
        dueling = self.dueling.refresh(allowed=self.settings.allow_dueling)
        return Status(
            state=self.state,
            pid=os.getpid(),
            uptime_s=round(now - self.started_at, 3),
            workers_target=self.pool.target,
            workers=tuple(sorted(workers, key=lambda w: int(w.worker_id[1:]))),
            jobs=self.dispatcher.job_statuses(now),
            queued_jobs=len(self.dispatcher.queue),
            runs=tuple(r.status() for r in self.runs),
            boot_id=self.boot_id,
            restored_this_boot=self.journal_data.restore_boot_id == self.boot_id,
            notes=(*self.journal.notes, *self.dueling.notes()),
            dueling=dueling,
            refusing_guests=bool(dueling) and not self.settings.allow_dueling,
            supervisor_rss_bytes=self.monitor.own_rss(),
            peak_in_flight=dict(self.dispatcher.peak_in_flight),
            **self.host.status_fields(),
        )

    # ------------------------------------------------------------------ host: signals, reload

    async def _serve_signals(self) -> int:
        """SIGHUP reloads; SIGTERM/SIGINT stop, preserving first if ``host.stopping`` says so.

        A preserve running when the stop comes (started by logind, the CLI or this
        SIGTERM) is finished first; signals meanwhile are logged and never abort it.
        """
        while (sig := await self._signals.get()) == signal.SIGHUP:
            await self.reload()
        preserve = await self.host.stopping(sig)
        if preserve or (self.current is not None and self.current.kind == "preserve"):
            ignoring = self._start(self._ignore_signals())
            run = await self.preserve_and_wait()  # joins a preserve already running
            ignoring.cancel()
            log.info("preserve run=%s ended before exit: ok=%s %s", run.run_id, run.ok,
                     run.detail)
        return 0

    async def _ignore_signals(self) -> None:
        while True:
            sig = await self._signals.get()
            log.warning("%s received while stopping: ignored, the preserve goes on (SIGKILL "
                        "would stop it)", sig.name)

    async def preserve_and_wait(self) -> Run:
        """Preserve now (joining a preserve already running) and wait until it has ended.

        A restore that is running is cancelled first: the host is going down.
        """
        if self.current is not None and self.current.kind == "restore" and self._run_task:
            log.warning("restore run=%s interrupted: guests are preserved instead",
                        self.current.run_id)
            self._run_task.cancel()
            await asyncio.wait({self._run_task})
        run = self.start_preserve()
        await run.finished.wait()
        return run

    async def inventory(self) -> tuple[list[GuestInfo], list[str]]:
        return await take_inventory(self._jobs(), self.settings)

    def forecast(self, guests: Sequence[GuestInfo], delay_max_s: float | None) -> Forecast:
        """plan's estimate of a preserve of ``guests`` now (host.py compares it with
        logind's limit)."""
        return forecast_guests(guests, self.settings, self.journal_data.learned,
                               workers=self.pool.target, delay_max_s=delay_max_s)

    def status_line(self) -> str:
        return progress_line(self.state, self.current or (self.runs[-1] if self.runs else None),
                             self.dispatcher.job_statuses(self.clock()), len(self.pool.active()),
                             self.host.inhibitor.state, self.host.warning)

    async def reload(self) -> Reply:
        """Re-read the config file; apply what can change live (reload.py says which)."""
        if self.config_path is None:
            return Error(code="unavailable", message="this daemon was started without a "
                         "config file path: there is nothing to re-read")
        self.host.notifier.reloading()
        try:
            try:
                new = load_settings(self.config_path, missing_ok=self.config_missing_ok)
            except ConfigError as exc:
                log.error("reload refused, the running config stays: %s", exc)
                return Error(code="invalid", message=f"{exc} (the running config stays)")
            changes = diff_settings(self.settings, new)
            old, self.settings = self.settings, effective_settings(self.settings, new)
            for line in describe_changes(changes) or ["no changes"]:
                log.info("reload of %s: %s", self.config_path, line)
            resources = host_resources()
            count = resolve_worker_count(self.settings, *resources)
            if count != resolve_worker_count(old, *resources):
                await self.resize(count)
            return Reloaded(path=str(self.config_path), changes=changes)
        finally:
            self.host.notifier.ready(self.status_line())


class _JobAdapter:
    """The ``JobService`` a run sees: job ids and the dispatcher, nothing else."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def new_job(self, kind: JobKind, uri: str, **fields: object) -> Job:
        return self._supervisor.new_job(kind, uri, **fields)

    async def run(self, job: Job) -> JobDone | JobFailed:
        return await self._supervisor.run_job(job)
