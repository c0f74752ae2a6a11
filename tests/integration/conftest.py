"""Fixtures for tests that run the real daemon."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.daemon import GuestwardenDaemon
from testbed.libvirtd import IsolatedLibvirtd

DaemonFactory = Callable[..., GuestwardenDaemon]


@pytest.fixture
def make_daemon(libvirtd: IsolatedLibvirtd) -> Iterator[DaemonFactory]:
    """Daemons on short paths (ipc:// paths are limited to ~107 bytes), stopped by pid."""
    made: list[GuestwardenDaemon] = []
    dirs: list[Path] = []

    def factory(base: Path | None = None, **kwargs: Any) -> GuestwardenDaemon:
        if base is None:
            base = Path(tempfile.mkdtemp(prefix="gwd-", dir="/tmp"))
            dirs.append(base)
        daemon = GuestwardenDaemon(base, [libvirtd.test_uri], **kwargs)
        made.append(daemon)
        return daemon

    yield factory
    for daemon in made:
        daemon.stop()
    for base in dirs:
        shutil.rmtree(base, ignore_errors=True)


def started_daemons(uri: str) -> Iterator[DaemonFactory]:
    """For a fixture: a factory of daemons on ``uri`` that are started at once, on short
    paths; at teardown each is stopped by pid and its directory removed."""
    made: list[GuestwardenDaemon] = []

    def factory(**kwargs: Any) -> GuestwardenDaemon:
        base = Path(tempfile.mkdtemp(prefix="gwd-", dir="/tmp"))
        daemon = GuestwardenDaemon(base, [uri], **kwargs)
        made.append(daemon)
        daemon.start()
        return daemon

    yield factory
    for daemon in made:
        daemon.stop()
        shutil.rmtree(daemon.base_dir, ignore_errors=True)
