"""Order groups on two tiny real QEMU guests: real saves take time, a real agent answers.

With ``parallel_save = 2`` both saves could run at once; the barrier between order
groups must still finish the higher group's save before the lower group's begins, and
restore must start the lower group first and wait for its guest agent before starting
the next group. The policy is set through the CLI into the qemu driver's metadata.
The order of events comes from the journal's ``spans_ns`` (the workers'
CLOCK_MONOTONIC), never from wall time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from testbed.daemon import GuestwardenDaemon
from testbed.guestimage import build_guest_image
from testbed.libvirtd import IsolatedLibvirtd
from testbed.qemuguests import GuestSpec, QemuGuest, boot, define_guests, remove
from tests.conftest import require_libvirtd

pytestmark = pytest.mark.libvirtd

FIRST, SECOND = "gw-ord-first", "gw-ord-second"
"""FIRST (order 1) is the last down and the first up; SECOND (order 2) the other way."""
RUN_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def guests(libvirtd: IsolatedLibvirtd,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, QemuGuest]]:
    require_libvirtd(qemu=True)
    if libvirtd.pid is None:
        libvirtd.stop()
        libvirtd.start()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(libvirtd.qemu_uri)
    made = define_guests(conn, build_guest_image(), (GuestSpec(FIRST), GuestSpec(SECOND)),
                         tmp_path_factory.mktemp("consoles"))
    try:
        boot(made.values())
        yield made
    finally:
        remove(made.values(), libvirtd.base_dir / "run")
        conn.close()


@pytest.fixture
def daemon(libvirtd: IsolatedLibvirtd) -> Iterator[GuestwardenDaemon]:
    base = Path(tempfile.mkdtemp(prefix="gwd-", dir="/tmp"))
    made = GuestwardenDaemon(base, [libvirtd.qemu_uri], workers=3,
                             shutdown={"parallel_save": 2},
                             boot={"wait_for_agents": 60.0, "sync_time": False})
    try:
        yield made
    finally:
        made.stop()
        shutil.rmtree(base, ignore_errors=True)


def run(daemon: GuestwardenDaemon, *args: str) -> str:
    result = daemon.cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr + daemon.log_tail()
    return result.stdout


def spans(daemon: GuestwardenDaemon, kind: str) -> dict[str, dict[str, tuple[int, int]]]:
    data: dict[str, Any] = json.loads((daemon.state_dir / "journal.json").read_text())
    return {g["name"]: {a: (int(s), int(e)) for a, (s, e) in g["spans_ns"].items()}
            for g in data[kind]["guests"]}


def test_real_guests_are_preserved_and_restored_group_by_group(
    guests: dict[str, QemuGuest], daemon: GuestwardenDaemon
) -> None:
    daemon.start()
    run(daemon, "policy", "set", FIRST, "--order", "1")
    run(daemon, "policy", "set", SECOND, "--order", "2")
    assert '"order":2' in run(daemon, "policy", "show", SECOND, "--json")

    run(daemon, "preserve", "--wait", "--timeout", str(RUN_TIMEOUT_S))
    saved = spans(daemon, "preserve")
    assert saved[SECOND]["save"][1] <= saved[FIRST]["save"][0], saved  # highest order first
    assert all(not g.dom.isActive() and g.dom.hasManagedSaveImage(0) for g in guests.values())

    run(daemon, "restore", "--wait", "--timeout", str(RUN_TIMEOUT_S))
    back = spans(daemon, "restore")
    assert back[FIRST]["start"][1] <= back[FIRST]["agent_wait"][1] <= back[SECOND]["start"][0]
    assert f"guest={FIRST} agent answered" in daemon.log_text()  # a real agent, not a timeout
    assert "agent_wait" not in back[SECOND]  # nothing comes after the last group

    data = json.loads((daemon.state_dir / "journal.json").read_text())
    learned = {g["name"]: g["actions"] for g in data["learned"]["guests"].values()}
    for name in (FIRST, SECOND):
        assert learned[name]["save"]["mean_s"] > 0 and learned[name]["start"]["mean_s"] > 0
    assert data["learned"]["save_bytes_per_s"] > 0
