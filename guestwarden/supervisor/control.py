"""The control socket: requests from the CLI (or any tool) answered by the supervisor.

A ROUTER socket at ``{runtime_dir}/control.sock``, created with mode 0600. Every
request is handled in its own task, so a slow one (a plan needs an inventory) does
not hold up ``status``. Errors are replies, never crashes: a frame that does not
decode, has the wrong shape or makes a handler raise gets an ``Error`` reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import zmq
import zmq.asyncio

from guestwarden.ipc import codec
from guestwarden.ipc.messages import Error, Reply, Request
from guestwarden.ipc.sockets import CONTROL_MAX_MESSAGE_BYTES, configure, private_umask

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Reply]]


class ControlServer:
    def __init__(self, ctx: zmq.asyncio.Context, socket_path: Path, handler: Handler) -> None:
        self.socket_path = socket_path
        self.handler = handler
        self.sock = ctx.socket(zmq.ROUTER)
        configure(self.sock, max_message_bytes=CONTROL_MAX_MESSAGE_BYTES)
        self._tasks: set[asyncio.Task[None]] = set()

    def bind(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        with private_umask():
            self.sock.bind(f"ipc://{self.socket_path}")
        self.socket_path.chmod(0o600)

    async def serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) < 2:
                continue  # not even an identity to answer
            identity, body = frames[0], frames[1:]
            task = asyncio.create_task(self._answer(identity, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, identity: bytes, body: list[bytes]) -> None:
        reply: Reply
        if len(body) != 1:
            reply = Error(code="bad-request", message=f"expected 1 frame, got {len(body)}")
        else:
            try:
                request = codec.decode_request(body[0])
            except codec.DecodeError as exc:
                reply = Error(code="bad-request", message=f"undecodable request: {exc}")
            else:
                try:
                    reply = await self.handler(request)
                except Exception as exc:
                    log.exception("control request %s failed", type(request).__name__)
                    reply = Error(code="failed", message=f"internal error: {exc!r}")
        try:
            await self.sock.send_multipart([identity, codec.encode(reply)])
        except zmq.ZMQError as exc:
            log.info("control reply not delivered (client gone?): %s", exc)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.sock.close(linger=0)
        self.socket_path.unlink(missing_ok=True)
