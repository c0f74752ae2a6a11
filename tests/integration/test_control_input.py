"""Bad input on the live control socket: error replies, the daemon stays up, nothing changes.

Frames are sent with a raw ZeroMQ DEALER, as any tool (or attacker with root) could.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestwarden.ipc import codec
from guestwarden.ipc.messages import Error, GetStatus, Status
from guestwarden.ipc.sockets import CONTROL_MAX_MESSAGE_BYTES
from testbed.daemon import GuestwardenDaemon
from testbed.guests import define_guests
from tests.integration.conftest import DaemonFactory

UNPRIVILEGED = "gw-nobody"  # created by `make deps`

MUTATING = {"Preserve", "Restore", "SetWorkers", "Reload"}


@pytest.fixture
def daemon(test_conn: Any, make_daemon: DaemonFactory) -> Iterator[GuestwardenDaemon]:
    define_guests(test_conn, "f", running=3, paused=1)
    running = make_daemon(workers=2)
    running.start()
    yield running


class RawClient:
    def __init__(self, daemon: GuestwardenDaemon) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"ipc://{daemon.runtime_dir}/control.sock")

    def ask(self, *frames: bytes, timeout_s: float = 5.0) -> bytes | None:
        self.sock.send_multipart(list(frames))
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return self.sock.recv()

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def assert_unchanged(daemon: GuestwardenDaemon, before: Status) -> None:
    now = daemon.status()
    assert now.pid == before.pid and now.state == "idle"
    assert {w.pid for w in now.workers} == {w.pid for w in before.workers}
    assert now.runs == before.runs and now.workers_target == before.workers_target


junk_maps = st.dictionaries(
    st.sampled_from(["type", "count", "run_id", "job", "protocol", "x", "🙂"]),
    st.one_of(
        st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(), st.text(max_size=20),
        st.none(), st.binary(max_size=20), st.lists(st.integers(0, 9), max_size=3),
        st.sampled_from(["GetStatus", "Preserve", "SetWorkers", "Status", "Assign", "Nope",
                         "GetRun", "Restore", "Reload"]),
    ),
    max_size=4,
)


def is_valid_mutation(frame: bytes) -> bool:
    try:
        request = codec.decode_request(frame)
    except codec.DecodeError:
        return False
    return type(request).__name__ in MUTATING


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=st.one_of(st.binary(max_size=300), junk_maps.map(msgspec.msgpack.encode)))
def test_fuzzed_frames_get_error_replies_and_change_nothing(
    daemon: GuestwardenDaemon, frame: bytes
) -> None:
    if is_valid_mutation(frame):  # a well-formed Preserve is not junk: not this test's job
        return
    before = daemon.status()
    client = RawClient(daemon)
    try:
        reply_frame = client.ask(frame)
    finally:
        client.close()
    assert reply_frame is not None, "no reply"
    reply = codec.decode_reply(reply_frame)
    try:
        codec.decode_request(frame)
    except codec.DecodeError:
        assert isinstance(reply, Error) and reply.code == "bad-request", reply
    else:
        assert not isinstance(reply, Error) or reply.code != "failed", reply  # no crash
    assert_unchanged(daemon, before)


def test_wrong_frame_counts_and_versions(daemon: GuestwardenDaemon) -> None:
    before = daemon.status()
    client = RawClient(daemon)
    try:
        two = client.ask(b"a", b"b")
        assert two is not None
        assert isinstance(codec.decode_reply(two), Error)
        newer = msgspec.msgpack.encode({"type": "GetStatus", "protocol": 99, "shiny": [1, 2]})
        reply = client.ask(newer)
        assert reply is not None and isinstance(codec.decode_reply(reply), Status)
        older = msgspec.msgpack.encode({"type": "SetWorkers"})  # a required field missing
        reply = client.ask(older)
        assert reply is not None
        error = codec.decode_reply(reply)
        assert isinstance(error, Error) and "count" in error.message
        reply = client.ask(msgspec.msgpack.encode({"type": "SetWorkers", "count": -5}))
        assert reply is not None and isinstance(codec.decode_reply(reply), Error)
    finally:
        client.close()
    assert_unchanged(daemon, before)


def test_frames_over_the_size_limit_are_refused_by_the_socket(
    daemon: GuestwardenDaemon,
) -> None:
    before = daemon.status()
    client = RawClient(daemon)
    try:
        huge = msgspec.msgpack.encode(
            {"type": "GetRun", "run_id": "x" * (2 * CONTROL_MAX_MESSAGE_BYTES)})
        assert client.ask(huge, timeout_s=2.0) is None  # dropped, connection closed
    finally:
        client.close()
    assert_unchanged(daemon, before)
    assert daemon.request(GetStatus()) is not None


def test_an_unprivileged_user_cannot_use_the_control_socket(
    daemon: GuestwardenDaemon,
) -> None:
    subprocess.run(["id", UNPRIVILEGED], check=True, capture_output=True,
                   text=True)  # `make deps` creates it; fail loudly if missing
    control = daemon.runtime_dir / "control.sock"
    assert stat.S_IMODE(control.stat().st_mode) == 0o600 and control.stat().st_uid == 0
    # let the user reach the directory, so that only the socket's own mode stops it
    for path in (daemon.base_dir, daemon.runtime_dir, daemon.config):
        os.chmod(path, os.stat(path).st_mode | 0o055)
    before = daemon.status()
    cli = subprocess.run(
        ["runuser", "-u", UNPRIVILEGED, "--", sys.executable, "-m", "guestwarden",
         "--config", str(daemon.config), "status"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert cli.returncode == 3, cli.stderr
    assert "permission denied" in cli.stderr
    raw = subprocess.run(
        ["runuser", "-u", UNPRIVILEGED, "--", sys.executable, "-c",
         "import sys, zmq\n"
         "s = zmq.Context().socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0)\n"
         f"s.connect('ipc://{control}')\n"
         "s.send(b'\\x81\\xa4type\\xa8Preserve')\n"
         "sys.exit(0 if s.poll(2000) else 7)\n"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert raw.returncode == 7, raw.stdout + raw.stderr  # no reply: it never got in
    assert_unchanged(daemon, before)
