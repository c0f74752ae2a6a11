"""The one Encoder and the typed Decoders of the protocol, created once.

A frame that fails to decode raises ``DecodeError``; callers answer it with an
``Error`` reply (control) or log and drop it (workers). Nothing undecoded ever
reaches the dispatcher.
"""

from __future__ import annotations

from typing import TypeVar, cast

import msgspec

from guestwarden.ipc.messages import Event, FromWorker, Reply, Request, ToWorker

ENCODER = msgspec.msgpack.Encoder()
TO_WORKER = msgspec.msgpack.Decoder(ToWorker)
FROM_WORKER = msgspec.msgpack.Decoder(FromWorker)
REQUEST = msgspec.msgpack.Decoder(Request)
REPLY = msgspec.msgpack.Decoder(Reply)
EVENT = msgspec.msgpack.Decoder(Event)

JSON_ENCODER = msgspec.json.Encoder()

_T = TypeVar("_T")


class DecodeError(ValueError):
    """A frame that is not a valid message of the expected union."""


def encode(message: msgspec.Struct) -> bytes:
    return ENCODER.encode(message)


def decode_to_worker(frame: bytes) -> ToWorker:
    return cast(ToWorker, _decode(TO_WORKER, frame))


def decode_from_worker(frame: bytes) -> FromWorker:
    return cast(FromWorker, _decode(FROM_WORKER, frame))


def decode_request(frame: bytes) -> Request:
    return cast(Request, _decode(REQUEST, frame))


def decode_reply(frame: bytes) -> Reply:
    return cast(Reply, _decode(REPLY, frame))


def decode_event(frame: bytes) -> Event:
    return cast(Event, _decode(EVENT, frame))


def _decode(decoder: msgspec.msgpack.Decoder[_T], frame: bytes) -> _T:
    try:
        return decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(str(exc)) from exc
