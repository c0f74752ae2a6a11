"""Shared fixtures: a real libvirtd isolated in a temp dir (testbed/libvirtd.py).

* ``libvirtd`` (session): one IsolatedLibvirtd for the whole session.
* ``test_conn``: its keeper connection to the test driver, emptied of guests first.
* ``private_libvirtd``: a started IsolatedLibvirtd of the test's own, for tests that
  restart or stop libvirtd.

Without libvirtd, tini etc. these fixtures fail (never skip): run ``make deps``.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from testbed.libvirtd import IsolatedLibvirtd


def short_tmpdir() -> Path:
    """A fresh dir with a short path: unix socket paths are limited to 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="gw-", dir="/tmp"))


def require_libvirtd(*, qemu: bool = False) -> None:
    """pytest.fail (not skip) unless an IsolatedLibvirtd can run here."""
    try:
        import libvirt  # noqa: F401
    except ImportError as exc:
        pytest.fail(
            f"libvirt-python cannot be imported ({exc}): run `make deps` and `make venv` (as root)",
            pytrace=False,
        )
    from testbed.libvirtd import find_requirement_problems

    problems = find_requirement_problems(qemu=qemu)
    if problems:
        pytest.fail(
            "cannot run the isolated libvirtd: "
            + "; ".join(problems)
            + ". Run `make deps` (as root) to install libvirt-daemon, tini, QEMU and "
            "create the accounts.",
            pytrace=False,
        )


@contextmanager
def isolated_libvirtd(**kwargs: Any) -> Iterator[IsolatedLibvirtd]:
    """A started IsolatedLibvirtd in a fresh short dir; stopped and removed afterwards.

    The cleanup also runs at interpreter exit if the ``with`` block is never left
    (interrupted session); the instance's watchdog covers a killed interpreter.
    """
    require_libvirtd()
    from testbed.libvirtd import IsolatedLibvirtd

    base = short_tmpdir()
    daemon = IsolatedLibvirtd(base, **kwargs)

    def cleanup() -> None:
        try:
            daemon.stop()
        finally:
            atexit.unregister(cleanup)
            shutil.rmtree(base, ignore_errors=True)

    atexit.register(cleanup)
    try:
        daemon.start()
        yield daemon
    finally:
        cleanup()


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[IsolatedLibvirtd]:
    """One isolated libvirtd for the session (test_uri, qemu_uri, keeper())."""
    with isolated_libvirtd() as daemon:
        yield daemon


@pytest.fixture
def test_conn(libvirtd: IsolatedLibvirtd) -> Any:
    """The session libvirtd's keeper connection (test driver), with no guests at all.

    Do not close it: it keeps the test driver's shared state alive.
    """
    from testbed.guests import remove_all

    if libvirtd.pid is None:  # a test stopped or broke it
        libvirtd.stop()
        libvirtd.start()
    conn = libvirtd.keeper()
    remove_all(conn)
    return conn


@pytest.fixture
def private_libvirtd() -> Iterator[IsolatedLibvirtd]:
    """An isolated libvirtd of the test's own (about 0.1 s to start and to stop)."""
    with isolated_libvirtd() as daemon:
        yield daemon
