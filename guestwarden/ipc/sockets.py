"""Socket addresses and the options every guestwarden ZeroMQ socket gets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import zmq

CONTROL_SOCKET = "control.sock"
WORKER_SOCKET = "workers.sock"
EVENTS_SOCKET = "events.sock"
LOCK_FILE = "guestwarden.lock"

CONTROL_MAX_MESSAGE_BYTES = 1 << 20
"""A control request is tiny; anything over 1 MiB is refused by ZeroMQ itself."""

WORKER_MAX_MESSAGE_BYTES = 64 << 20
"""An inventory of thousands of guests is the largest worker frame."""


def control_endpoint(runtime_dir: str | Path) -> str:
    return f"ipc://{Path(runtime_dir) / CONTROL_SOCKET}"


def worker_endpoint(runtime_dir: str | Path) -> str:
    return f"ipc://{Path(runtime_dir) / WORKER_SOCKET}"


def events_endpoint(runtime_dir: str | Path) -> str:
    return f"ipc://{Path(runtime_dir) / EVENTS_SOCKET}"


def configure(sock: zmq.Socket[Any], *, max_message_bytes: int) -> None:
    """LINGER=0 (never block exit on unsent frames) and a frame size limit."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if sock.socket_type == zmq.ROUTER:
        # an unroutable reply raises instead of vanishing silently
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)


def has_input(sock: zmq.Socket[Any]) -> bool:
    """Whether a frame is waiting on an open ``sock``.

    Readers driven by the socket's fd (``loop.add_reader``) must ask this: ZeroMQ's fd
    is edge-triggered, it signals that the socket's state may have changed, and any
    operation on the socket, a send too, may consume that signal. So a reader reads
    until this says no, and a sender looks again after sending.
    """
    return not sock.closed and bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


@contextmanager
def private_umask(mask: int = 0o077) -> Iterator[None]:
    """Create socket files readable by their owner only (no window with wider modes)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)
