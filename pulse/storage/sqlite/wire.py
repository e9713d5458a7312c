"""Frames between the server process and the writer process: 4-byte length, then msgpack."""

from __future__ import annotations

import struct
from typing import ClassVar

import msgspec

# the `accepted` of a job's result when its project was deleted before the job's commit: nothing of it
# is written, and the request is answered like one with a revoked key
PROJECT_GONE = -1


class Submit(msgspec.Struct, array_like=True, tag="submit"):
    """One request's prepared events, as the server process sends them to the writer."""

    job_id: int
    project_id: int
    received: int
    ip: str
    user_agent: str
    events: list[tuple]
    country: str | None = None  # the visitor's, from the IP (IngestJob.country)


class Flush(msgspec.Struct, array_like=True, tag="flush"):
    """A read asks for everything kept in memory to be written (see write_behind); answered like a job."""

    job_id: int
    events: ClassVar[tuple] = ()


class Shutdown(msgspec.Struct, array_like=True, tag="shutdown"):
    """Write everything received, commit, answer Stopped and exit."""


class Ready(msgspec.Struct, array_like=True, tag="ready"):
    pid: int


class StartFailed(msgspec.Struct, array_like=True, tag="start_failed"):
    error: str


class Committed(msgspec.Struct, array_like=True, tag="committed"):
    results: list[tuple[int, int, list[int]]]  # job id, events accepted (PROJECT_GONE: none), positions of duplicates
    seconds: float
    events: int
    unwritten: bool = False  # changes are kept in the writer's memory after it (see write_behind)


class Failed(msgspec.Struct, array_like=True, tag="failed"):
    job_ids: list[int]
    error: str


class Stopped(msgspec.Struct, array_like=True, tag="stopped"):
    pass


_LENGTH = struct.Struct(">I")
_encoder = msgspec.msgpack.Encoder()
_to_writer = msgspec.msgpack.Decoder(Submit | Flush | Shutdown)
_from_writer = msgspec.msgpack.Decoder(Ready | StartFailed | Committed | Failed | Stopped)


def frame(message: msgspec.Struct) -> bytes:
    payload = _encoder.encode(message)
    return _LENGTH.pack(len(payload)) + payload


def read_frames(buffer: bytearray) -> list[bytes]:
    """Take every complete frame off the front of the buffer."""
    found = []
    offset = 0
    while len(buffer) - offset >= 4:
        (length,) = _LENGTH.unpack_from(buffer, offset)
        if len(buffer) - offset - 4 < length:
            break
        found.append(bytes(buffer[offset + 4:offset + 4 + length]))
        offset += 4 + length
    del buffer[:offset]
    return found


def decode_to_writer(payload: bytes) -> Submit | Flush | Shutdown:
    return _to_writer.decode(payload)


def decode_from_writer(payload: bytes) -> Ready | StartFailed | Committed | Failed | Stopped:
    return _from_writer.decode(payload)
