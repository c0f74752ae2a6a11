"""A blocking control client, as the CLI (or any script) uses it.

One DEALER socket per request: no REQ state machine to wedge after a timeout. Every
receive is bounded; a daemon that does not answer raises ``Unreachable``.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq

from guestwarden.ipc import codec
from guestwarden.ipc.messages import Reply, Request
from guestwarden.ipc.sockets import CONTROL_MAX_MESSAGE_BYTES, CONTROL_SOCKET


class Unreachable(Exception):
    """No daemon answered on the control socket."""


class ControlClient:
    def __init__(self, runtime_dir: str | Path, timeout_s: float = 5.0) -> None:
        self.socket_path = Path(runtime_dir) / CONTROL_SOCKET
        self.timeout_s = timeout_s
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()

    def request(self, request: Request, timeout_s: float | None = None) -> Reply:
        if not self.socket_path.exists():
            raise Unreachable(f"no guestwarden daemon: {self.socket_path} does not exist")
        if not os.access(self.socket_path, os.R_OK | os.W_OK):
            raise Unreachable(f"guestwarden daemon not reachable: permission denied on "
                              f"{self.socket_path} (it is for root only)")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, 64 * CONTROL_MAX_MESSAGE_BYTES)
            sock.connect(f"ipc://{self.socket_path}")
            sock.send(codec.encode(request))
            if not sock.poll(int(timeout * 1000), zmq.POLLIN):
                raise Unreachable(
                    f"guestwarden daemon not reachable: no reply on {self.socket_path} "
                    f"within {timeout:g}s"
                )
            return codec.decode_reply(sock.recv())
        except codec.DecodeError as exc:
            raise Unreachable(f"guestwarden daemon sent an undecodable reply: {exc}") from None
        except zmq.ZMQError as exc:
            raise Unreachable(f"guestwarden daemon not reachable at {self.socket_path}: {exc}") \
                from None
        finally:
            sock.close(linger=0)
