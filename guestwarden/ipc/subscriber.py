"""A blocking subscriber of ``events.sock``, as the CLI (or any script) uses it.

``connect`` waits for the daemon's ``Subscribed`` welcome, so that whatever the
caller asks the daemon to do afterwards is seen from its first event. Events can
still be lost (a subscriber that reads too slowly, a daemon restart): ``seq`` says
so, and the caller then reads a snapshot over the control socket.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import zmq

from guestwarden.ipc import codec
from guestwarden.ipc.client import Unreachable
from guestwarden.ipc.messages import Event, Subscribed
from guestwarden.ipc.sockets import EVENTS_SOCKET

MAX_EVENT_BYTES = 256 << 20
"""A RunPlanned or RunFinished of thousands of guests is about 200 bytes per guest."""
BATCH = 1000
"""At most this many events per ``receive``: a view can redraw between batches."""


class EventSubscriber:
    def __init__(self, runtime_dir: str | Path) -> None:
        self.socket_path = Path(runtime_dir) / EVENTS_SOCKET
        self.welcome: Subscribed | None = None
        self.undecodable = 0
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None

    def connect(self, timeout_s: float = 2.0) -> bool:
        """Subscribe to everything; True once the daemon's welcome came within timeout_s."""
        if not self.socket_path.exists():
            raise Unreachable(f"no guestwarden events: {self.socket_path} does not exist "
                              f"(is the daemon running, and new enough to publish events?)")
        if not os.access(self.socket_path, os.R_OK | os.W_OK):
            raise Unreachable(f"guestwarden events not readable: permission denied on "
                              f"{self.socket_path} (it is for root only)")
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)  # buffer here rather than lose events at the daemon
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_EVENT_BYTES)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(f"ipc://{self.socket_path}")
        self._sock = sock
        if sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            first = self._decode(sock.recv())
            if isinstance(first, Subscribed):
                self.welcome = first
        return self.welcome is not None

    def receive(self, timeout_s: float) -> list[Event]:
        """The events that came within ``timeout_s`` (waiting only for the first)."""
        sock = self._sock
        assert sock is not None, "connect() first"
        events: list[Event] = []
        if not sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            return events
        while len(events) < BATCH:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            event = self._decode(frame)
            if event is not None:
                events.append(event)
        return events

    def _decode(self, frame: bytes) -> Event | None:
        try:
            return codec.decode_event(frame)
        except codec.DecodeError:  # a newer daemon's event type: skip it
            self.undecodable += 1
            return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
