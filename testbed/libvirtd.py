"""A real, isolated libvirtd for tests (see /work/shared/TESTBED.md).

``IsolatedLibvirtd(base_dir)`` runs the system's monolithic ``libvirtd`` as root in a
private mount namespace, with subfolders of ``base_dir`` bind-mounted over
``/run/libvirt``, ``/var/lib/libvirt``, ``/etc/libvirt``, ``/var/cache/libvirt`` and
``/var/log/libvirt``: the host's real libvirt directories are never written to (only
missing, empty mount points are created). Clients reach it through a unix socket in
``base_dir/sock``; use :attr:`IsolatedLibvirtd.test_uri` for libvirt's test driver and
:attr:`IsolatedLibvirtd.qemu_uri` for real QEMU guests (``<domain type='qemu'>``).

Process tree (all in the private mount namespace)::

    unshare --mount --propagation private -- sh -c MOUNTS   (does the bind mounts, then)
      `- exec tini -s -- sh -c LOOP       <- the Popen pid; subreaper of all below
           |- sh (restart loop)
           |    `- libvirtd -f CONF -p PIDFILE               <- IsolatedLibvirtd.pid
           `- qemu-system-x86_64 ...      <- daemonized by libvirtd, reparented to tini

The restart loop lets :meth:`IsolatedLibvirtd.restart` stop and start libvirtd alone,
in the same namespace, while QEMU guests keep running under the same tini (so they
are still reaped at once; PID 1 here reaps orphans only every ~2 s).

:meth:`IsolatedLibvirtd.stop` finds every process of the instance, whatever its
parent, by looking at what ``/proc/PID/root/etc/libvirt`` is: a process of this
instance (even one in a nested namespace, like the per-guest mount namespace libvirt
gives QEMU) sees ``base_dir/etc`` there. It sends SIGTERM, then SIGKILL after a grace
period, checking each pid's start time so that a reused pid is never signalled. A
watchdog process does the same if the Python process dies without calling stop().

Timing: start() returns once the test driver answers (~0.1 s). The qemu driver is
not probed: the first qemu_uri call that needs QEMU's capabilities (getCapabilities,
defining or starting a guest) takes ~1.2 s more in a fresh base_dir. After a restart,
libvirtd reconnects to running QEMU guests in the background: an operation on such a
guest right after restart() may race with that (a destroy of a transient guest was seen
to fail with "Domain not found" although the guest was destroyed).

Unix socket paths are limited to 107 bytes: keep ``base_dir`` short (for example
``tempfile.mkdtemp(prefix="gw-", dir="/tmp")``); the constructor rejects a base_dir
whose socket path would be too long.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import libvirt

__all__ = ["IsolatedLibvirtd", "find_requirement_problems"]

# Bind-mount sources (under base_dir) and their targets.
_MOUNTS: tuple[tuple[str, str], ...] = (
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("etc", "/etc/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
)
_SOCKET_NAME = "libvirt-sock"
_MAX_SOCKET_PATH = 107  # sizeof(sun_path) - 1
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Environment variables the wrapped libvirtd must not inherit from a test process.
_DROPPED_ENV = (
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LIBVIRT_DEFAULT_URI",
)

# $1 conf, $2 pidfile, $3 control fifo, $4 status file, $5 tini, $6 libvirtd, $7 the
# loop script, then pairs of (source, target) to bind-mount.
_MOUNT_SCRIPT = r"""
set -eu
conf=$1 pidfile=$2 fifo=$3 status=$4 tini=$5 libvirtd=$6 loop=$7
shift 7
while [ "$#" -gt 0 ]; do
  mount --bind "$1" "$2"
  shift 2
done
exec "$tini" -s -- /bin/sh -c "$loop" gw-libvirtd-loop "$conf" "$pidfile" "$fifo" "$status" \
  "$libvirtd"
"""
# Runs libvirtd; when it exits, records its status and waits for "start" on the fifo.
_LOOP_SCRIPT = r"""
conf=$1 pidfile=$2 fifo=$3 status=$4 libvirtd=$5
while :; do
  rc=0
  "$libvirtd" -f "$conf" -p "$pidfile" || rc=$?
  echo "$rc" > "$status"
  cmd=
  read -r cmd < "$fifo" || exit 1
  [ "$cmd" = start ] || exit 0
done
"""

_WATCHDOG_CODE = (
    "import sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from testbed.libvirtd import _watchdog_main\n"
    "_watchdog_main(int(sys.argv[2]), int(sys.argv[3]))\n"
)


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "")
    return shutil.which(name, path=f"{path}:{_SBIN_PATH}" if path else _SBIN_PATH)


def find_requirement_problems(*, qemu: bool = False) -> list[str]:
    """What is missing to run an IsolatedLibvirtd here (empty list: nothing).

    All of it is installed by ``make deps``. ``qemu=True`` also checks for the QEMU
    emulator, needed only to start real guests.
    """
    problems: list[str] = []
    for binary in ("libvirtd", "tini", "unshare", "mount"):
        if _which(binary) is None:
            problems.append(f"{binary} not found")
    if qemu and _which("qemu-system-x86_64") is None:
        problems.append("qemu-system-x86_64 not found")
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        problems.append("system user libvirt-qemu missing (libvirt 9.0 needs it for qemu.conf)")
    if os.geteuid() != 0:
        problems.append("not running as root (needed for unshare --mount and bind mounts)")
    return problems


# --------------------------------------------------------------------------------------
# Finding and killing the processes of one instance (also used by the watchdog).

_Marker = tuple[int, int]  # (st_dev, st_ino) of base_dir/etc


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, start time) of a live, non-zombie process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: fields after the last ')' are safe.
    close = data.rfind(b")")
    comm = data[data.find(b"(") + 1 : close].decode(errors="replace")
    fields = data[close + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X", b"x"):
        return None
    return comm, int(fields[1]), int(fields[19])


def _start_time(pid: int) -> int | None:
    st = _stat(pid)
    return None if st is None else st[2]


def _alive(pid: int, start_time: int) -> bool:
    """Whether the process runs (a zombie does not): start_time guards pid reuse."""
    return _start_time(pid) == start_time


def _exists(pid: int, start_time: int) -> bool:
    """Whether the process exists at all, zombie included (i.e. is not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return len(fields) > 19 and int(fields[19]) == start_time


def _scan(marker: _Marker) -> dict[int, tuple[str, int, int]]:
    """pid -> (comm, ppid, start time) of every live process of the instance.

    A process belongs to the instance if what it sees as /etc/libvirt is base_dir/etc.
    """
    found: dict[int, tuple[str, int, int]] = {}
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me:
            continue
        try:
            st = os.stat(f"/proc/{pid}/root/etc/libvirt")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) != marker:
            continue
        info = _stat(pid)
        if info is not None:
            found[pid] = info
    return found


def _signal(procs: dict[int, int], sig: signal.Signals) -> None:
    for pid, start in procs.items():
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _wait_gone(procs: dict[int, int], deadline: float, *, reaped: bool = False) -> dict[int, int]:
    """Wait until none of procs runs (or, if reaped, exists); return those left."""
    check = _exists if reaped else _alive
    while True:
        left = {pid: start for pid, start in procs.items() if check(pid, start)}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.01)


def _terminate_all(
    marker: _Marker, grace_s: float, deadline: float, extra: Iterable[tuple[int, int]] = ()
) -> dict[int, int]:
    """SIGTERM every process of the instance, SIGKILL what is left after grace_s.

    The workers (libvirtd, QEMU...) go first and the wrappers (tini and the shell loop
    under it) only once tini has reaped the workers: otherwise their zombies would be
    left to PID 1, which reaps only every ~2 s. Returns the processes still running
    at the deadline (normally none).
    """
    found = _scan(marker)
    wrappers = {
        pid
        for pid, (comm, ppid, _) in found.items()
        if comm in ("tini", "unshare") or (comm == "sh" and found.get(ppid, ("",))[0] == "tini")
    }
    workers = {pid: st for pid, (_, _, st) in found.items() if pid not in wrappers}
    if workers:
        _signal(workers, signal.SIGTERM)
        left = _wait_gone(workers, min(deadline, time.monotonic() + grace_s))
        if left:
            _signal(left, signal.SIGKILL)
            _wait_gone(left, min(deadline, time.monotonic() + 2.0))
        _wait_gone(workers, min(deadline, time.monotonic() + 0.5), reaped=True)
    procs = {pid: st for pid, (_, _, st) in _scan(marker).items()}
    procs.update(extra)
    if not procs:
        return {}
    _signal(procs, signal.SIGTERM)
    _wait_gone(procs, min(deadline, time.monotonic() + grace_s))
    while True:
        procs = {pid: start for pid, start in procs.items() if _alive(pid, start)}
        procs.update((pid, st) for pid, (_, _, st) in _scan(marker).items())  # new ones
        if not procs:
            return {}
        if time.monotonic() >= deadline:
            return procs
        _signal(procs, signal.SIGKILL)
        _wait_gone(procs, min(deadline, time.monotonic() + 2.0))


def _watchdog_main(dev: int, ino: int) -> None:
    """Body of the watchdog process: kill the instance once stdin reaches EOF.

    stdin is a pipe whose only writer is the Python process that started libvirtd: EOF
    means it called stop() or died (even by SIGKILL).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    _terminate_all((dev, ino), grace_s=3.0, deadline=time.monotonic() + 10.0)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


# --------------------------------------------------------------------------------------


class IsolatedLibvirtd:
    """A real libvirtd isolated in ``base_dir``; see the module docstring.

    Not thread-safe: drive one instance from one thread. Several instances may run one
    after another (or at the same time, with different base_dirs) in one process.

    Layout of ``base_dir``: ``libvirtd.conf``, ``libvirtd.log`` (:attr:`log_path`),
    ``wrapper.log`` (stdout and stderr of the wrapper and libvirtd), ``libvirtd.pid``,
    ``sock/libvirt-sock`` (:attr:`socket_path`), and ``run``, ``lib``, ``etc``
    (with ``qemu.conf``), ``cache``, ``log``: what libvirtd sees as ``/run/libvirt``,
    ``/var/lib/libvirt``, ``/etc/libvirt``, ``/var/cache/libvirt``, ``/var/log/libvirt``.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        log_level: int = 3,
        extra_libvirtd_conf: str = "",
        extra_qemu_conf: str = "",
    ) -> None:
        """``log_level``: libvirt's 1 (debug) to 4 (errors) for :attr:`log_path`.

        ``extra_*_conf`` are appended to the generated configuration files.
        """
        self._base = Path(os.path.abspath(base_dir))
        self._log_level = log_level
        self._extra_libvirtd_conf = extra_libvirtd_conf
        self._extra_qemu_conf = extra_qemu_conf
        if len(os.fsencode(self.socket_path)) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"unix socket path {self.socket_path} is longer than {_MAX_SOCKET_PATH} "
                "bytes: use a shorter base_dir, e.g. tempfile.mkdtemp(prefix='gw-', dir='/tmp')"
            )
        self._wrapper: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_fd: int | None = None  # write end of the watchdog's stdin
        self._marker: _Marker | None = None
        self._libvirtd: tuple[int, int] | None = None  # (pid, start time)
        self._keeper: libvirt.virConnect | None = None

    # ---------------------------------------------------------------- properties

    @property
    def base_dir(self) -> Path:
        return self._base

    @property
    def socket_path(self) -> Path:
        return self._base / "sock" / _SOCKET_NAME

    @property
    def test_uri(self) -> str:
        """libvirt's test driver, one state shared by every client (see keeper())."""
        return f"test+unix:///default?socket={self.socket_path}"

    @property
    def qemu_uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket_path}"

    @property
    def log_path(self) -> Path:
        """libvirtd's own log (log_outputs); startup errors go to wrapper_log_path."""
        return self._base / "libvirtd.log"

    @property
    def wrapper_log_path(self) -> Path:
        return self._base / "wrapper.log"

    @property
    def pid(self) -> int | None:
        """libvirtd's pid while it runs, else None."""
        if self._libvirtd is not None and _alive(*self._libvirtd):
            return self._libvirtd[0]
        return None

    def processes(self) -> list[int]:
        """The pids of every live process of this instance (wrapper, libvirtd, QEMU...)."""
        if self._marker is None:
            return []
        found = set(_scan(self._marker))
        if self._wrapper is not None and self._wrapper.poll() is None:
            found.add(self._wrapper.pid)
        return sorted(found)

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> IsolatedLibvirtd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout_s: float = 30.0) -> None:
        """Start libvirtd and wait until the test driver answers on its socket.

        Also starts libvirtd again after stop_libvirtd() (same namespace, same dirs,
        QEMU guests still running). Raises RuntimeError, with the tail of the logs, if
        libvirtd exits or is not ready within timeout_s; everything of the instance is
        stopped then.
        """
        if self.pid is not None:
            raise RuntimeError(f"libvirtd already running (pid {self.pid})")
        deadline = time.monotonic() + timeout_s
        try:
            if self._wrapper is None or self._wrapper.poll() is not None:
                self._reap_wrapper()
                self._launch()
            else:
                self._prepare_restart()
                self._send_start(deadline)
            self._wait_ready(deadline)
        except BaseException as exc:
            try:
                self.stop()
            except Exception as stop_exc:  # keep the original error, mention this one
                exc.add_note(f"and stopping the instance failed: {stop_exc}")
            raise

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop libvirtd and every process it started; idempotent.

        Closes the keeper connection, sends SIGTERM to every process of the instance
        and SIGKILL to those left after a grace period (a third of timeout_s). Raises
        RuntimeError if a process survives timeout_s (it never has). Also works on a
        new object for the base_dir of an instance whose owner died.
        """
        deadline = time.monotonic() + timeout_s
        self._close_keeper()
        if self._marker is None:
            # Never started by this object: still clean up what another (dead) one left.
            with contextlib.suppress(OSError):
                etc = os.stat(self._base / "etc")
                self._marker = (etc.st_dev, etc.st_ino)
        survivors: dict[int, int] = {}
        if self._marker is not None:
            extra: list[tuple[int, int]] = []
            if self._wrapper is not None and self._wrapper.poll() is None:
                start = _start_time(self._wrapper.pid)
                if start is not None:
                    extra.append((self._wrapper.pid, start))
            survivors = _terminate_all(self._marker, timeout_s / 3, deadline, extra)
        elif self._wrapper is not None and self._wrapper.poll() is None:
            # Killed before its namespace existed: it is our child, its pid is safe.
            self._wrapper.kill()
        self._reap_wrapper(max(0.1, deadline - time.monotonic()))
        self._libvirtd = None
        self._stop_watchdog()
        if survivors:
            raise RuntimeError(
                f"processes of libvirtd in {self._base} survived SIGKILL: {sorted(survivors)}"
            )

    def stop_libvirtd(self, timeout_s: float = 15.0, *, hard: bool = False) -> None:
        """Stop libvirtd alone (SIGTERM, or SIGKILL if hard, to simulate a crash).

        QEMU guests keep running, and start() brings libvirtd back in the same
        namespace with the same directories. Closes the keeper connection.
        """
        deadline = time.monotonic() + timeout_s
        self._close_keeper()
        if self._libvirtd is None or not _alive(*self._libvirtd):
            return
        procs = dict([self._libvirtd])
        _signal(procs, signal.SIGKILL if hard else signal.SIGTERM)
        if _wait_gone(procs, deadline):
            _signal(procs, signal.SIGKILL)
            if _wait_gone(procs, time.monotonic() + 5.0):
                raise RuntimeError(f"libvirtd {self._libvirtd[0]} survived SIGKILL")
        self._libvirtd = None
        # Wait until the restart loop has seen the exit (it writes the status file).
        status = self._base / "libvirtd.status"
        while not status.exists():
            if self._wrapper is None or self._wrapper.poll() is not None:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError("the libvirtd restart loop did not notice libvirtd's exit")
            time.sleep(0.01)

    def restart(self, timeout_s: float = 30.0, *, hard: bool = False) -> None:
        """stop_libvirtd() then start(): libvirtd gets a new pid, guests keep running.

        The keeper connection is closed (call keeper() again), and the test driver's
        state is lost: after a restart ``test:///default`` holds only its predefined
        running guest "test" again. QEMU guests (qemu_uri) survive; libvirtd
        reconnects to them.
        """
        deadline = time.monotonic() + timeout_s
        self.stop_libvirtd(timeout_s / 2, hard=hard)
        self.start(max(1.0, deadline - time.monotonic()))

    def keeper(self) -> libvirt.virConnect:
        """One connection to test_uri held until stop() or restart().

        The test driver's state is shared by all clients but resets when the last
        connection closes; this connection keeps it alive. The same object is returned
        until it is closed by stop(), stop_libvirtd() or restart().
        """
        if self.pid is None:
            raise RuntimeError("libvirtd is not running")
        if self._keeper is not None:
            try:
                alive = self._keeper.isAlive() == 1
            except libvirt.libvirtError:  # closed by the caller
                alive = False
            if not alive:  # libvirtd died under it, or it was closed
                self._close_keeper()
        if self._keeper is None:
            self._keeper = libvirt.open(self.test_uri)
        return self._keeper

    # ---------------------------------------------------------------- internals

    def _close_keeper(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            with contextlib.suppress(libvirt.libvirtError):
                keeper.close()

    def _write_config(self) -> None:
        for name in ("sock", *(src for src, _ in _MOUNTS)):
            (self._base / name).mkdir(parents=True, exist_ok=True)
        libvirtd_conf = (
            "# generated by testbed/libvirtd.py\n"
            f'unix_sock_dir = "{self._base / "sock"}"\n'
            'unix_sock_group = "root"\n'
            'unix_sock_rw_perms = "0770"\n'
            'auth_unix_ro = "none"\n'
            'auth_unix_rw = "none"\n'
            f'log_outputs = "{self._log_level}:file:{self.log_path}"\n'
            f"{self._extra_libvirtd_conf}\n"
        )
        qemu_conf = (
            "# generated by testbed/libvirtd.py: no virtlogd, no cgroups, no security\n"
            "# driver, no dynamic ownership; guests run as root with <domain type='qemu'>\n"
            'user = "root"\n'
            'group = "root"\n'
            "dynamic_ownership = 0\n"
            "remember_owner = 0\n"
            'security_driver = "none"\n'
            'stdio_handler = "file"\n'
            "cgroup_controllers = [ ]\n"
            f"{self._extra_qemu_conf}\n"
        )
        (self._base / "libvirtd.conf").write_text(libvirtd_conf)
        # Also in etc/ (= /etc/libvirt for libvirtd), to be found where one looks.
        (self._base / "etc" / "libvirtd.conf").write_text(libvirtd_conf)
        (self._base / "etc" / "qemu.conf").write_text(qemu_conf)
        fifo = self._base / "libvirtd.ctl"
        if not fifo.is_fifo():
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo, 0o600)

    def _clear_runtime_files(self) -> None:
        for path in (self.socket_path, self._base / "libvirtd.pid", self._base / "libvirtd.status"):
            path.unlink(missing_ok=True)

    def _launch(self) -> None:
        problems = find_requirement_problems()
        if problems:
            raise RuntimeError(
                "cannot start libvirtd: " + "; ".join(problems) + " (run `make deps` as root)"
            )
        self._write_config()
        self._clear_runtime_files()
        etc = os.stat(self._base / "etc")
        self._marker = (etc.st_dev, etc.st_ino)
        for _, target in _MOUNTS:
            # Mount points must exist; only missing (empty) ones are created on the host.
            os.makedirs(target, exist_ok=True)
        self._start_watchdog()
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
        env["PATH"] = f"{env['PATH']}:{_SBIN_PATH}" if env.get("PATH") else _SBIN_PATH
        tini, libvirtd, unshare = (_which(n) for n in ("tini", "libvirtd", "unshare"))
        assert tini is not None and libvirtd is not None and unshare is not None
        argv = [
            unshare,
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            _MOUNT_SCRIPT,
            "gw-libvirtd-mount",
            str(self._base / "libvirtd.conf"),
            str(self._base / "libvirtd.pid"),
            str(self._base / "libvirtd.ctl"),
            str(self._base / "libvirtd.status"),
            tini,
            libvirtd,
            _LOOP_SCRIPT,
        ]
        for src, target in _MOUNTS:
            argv += [str(self._base / src), target]
        with open(self.wrapper_log_path, "ab") as out:
            self._wrapper = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd="/",
                start_new_session=True,
            )

    def _prepare_restart(self) -> None:
        self._write_config()
        self._clear_runtime_files()

    def _send_start(self, deadline: float) -> None:
        """Tell the restart loop (blocked opening the fifo) to run libvirtd again."""
        fifo = self._base / "libvirtd.ctl"
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
            else:
                try:
                    os.write(fd, b"start\n")
                finally:
                    os.close(fd)
                return
            if self._wrapper is None or self._wrapper.poll() is not None:
                raise self._failure("the libvirtd wrapper exited")
            if time.monotonic() >= deadline:
                raise self._failure("the libvirtd restart loop does not read its fifo")
            time.sleep(0.01)

    def _wait_ready(self, deadline: float) -> None:
        status = self._base / "libvirtd.status"
        while True:
            if self._wrapper is None or self._wrapper.poll() is not None:
                code = None if self._wrapper is None else self._wrapper.returncode
                raise self._failure(f"the libvirtd wrapper exited early (status {code})")
            if status.exists():
                raise self._failure(f"libvirtd exited early (status {status.read_text().strip()})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._failure("libvirtd not ready in time")
            if self.socket_path.exists() and self._probe(remaining):
                break
            time.sleep(0.02)
        self._libvirtd = self._read_pidfile()

    def _probe(self, timeout_s: float) -> bool:
        """Whether test_uri can be opened; runs in a thread in case libvirtd hangs."""
        result: list[bool] = []

        def attempt() -> None:
            try:
                conn = libvirt.open(self.test_uri)
            except libvirt.libvirtError:
                result.append(False)
                return
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            result.append(True)

        thread = threading.Thread(target=attempt, name="libvirtd-probe", daemon=True)
        thread.start()
        thread.join(timeout_s)
        return bool(result and result[0])

    def _read_pidfile(self) -> tuple[int, int]:
        text = (self._base / "libvirtd.pid").read_text().strip()
        pid = int(text)
        start = _start_time(pid)
        if start is None or self._marker is None or pid not in _scan(self._marker):
            raise self._failure(f"libvirtd pid {pid} from the pidfile is not running")
        return pid, start

    def _failure(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"{what} (base_dir {self._base})\n"
            f"--- tail of {self.log_path}:\n{_tail(self.log_path)}\n"
            f"--- tail of {self.wrapper_log_path}:\n{_tail(self.wrapper_log_path)}"
        )

    def _reap_wrapper(self, timeout_s: float = 5.0) -> None:
        wrapper, self._wrapper = self._wrapper, None
        if wrapper is None:
            return
        try:
            wrapper.wait(timeout_s)
        except subprocess.TimeoutExpired:
            wrapper.kill()
            wrapper.wait()

    def _start_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.poll() is None:
            return
        assert self._marker is not None
        read_fd, write_fd = os.pipe()
        try:
            self._watchdog = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WATCHDOG_CODE,
                    str(Path(__file__).parent.parent),
                    str(self._marker[0]),
                    str(self._marker[1]),
                ],
                stdin=read_fd,
                stdout=subprocess.DEVNULL,
                cwd="/",
                start_new_session=True,
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self._watchdog_fd = write_fd

    def _stop_watchdog(self) -> None:
        fd, self._watchdog_fd = self._watchdog_fd, None
        if fd is not None:
            os.close(fd)  # EOF: the watchdog checks (finds nothing) and exits
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            try:
                watchdog.wait(15.0)
            except subprocess.TimeoutExpired:
                watchdog.kill()
                watchdog.wait()
