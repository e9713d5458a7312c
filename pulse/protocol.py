"""Wire types shared by the server, the SDK's server side and the TUI (msgspec Structs)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Union
from uuid import UUID

import msgspec
from msgspec import Meta, Struct

MAX_NAME = 200
MAX_ID = 200
MAX_URL = 2048
MAX_PROPERTIES = 64
MAX_PROPERTY_KEY = 128
MAX_PROPERTY_VALUE = 1024
MAX_EVENTS_PER_BATCH = 1000

Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME)]
Ident = Annotated[str, Meta(min_length=1, max_length=MAX_ID)]
Url = Annotated[str, Meta(max_length=MAX_URL)]
PropertyKey = Annotated[str, Meta(min_length=1, max_length=MAX_PROPERTY_KEY)]
PropertyValue = Union[Annotated[str, Meta(max_length=MAX_PROPERTY_VALUE)], int, float, bool, None]
Properties = Annotated[dict[PropertyKey, PropertyValue], Meta(max_length=MAX_PROPERTIES)]
# a time the client sends, epoch milliseconds or an RFC 3339 string, lies in 1970..3000: wide enough for
# any clock, narrow enough that clock-skew correction by it stays a time (RFC 3339 allows years 1..9999)
MIN_TIME_MS = 0
MAX_TIME_MS = 32_503_680_000_000  # 3000-01-01
_MIN_TIME = datetime.fromtimestamp(MIN_TIME_MS / 1000, timezone.utc)
_MAX_TIME = datetime.fromtimestamp(MAX_TIME_MS / 1000, timezone.utc)
_OUT_OF_RANGE = "Expected a time from 1970-01-01T00:00:00Z to 3000-01-01T00:00:00Z"
Timestamp = Union[datetime, Annotated[int, Meta(ge=MIN_TIME_MS, le=MAX_TIME_MS)]]


def _in_range(value: datetime) -> bool:
    if value.tzinfo is None:  # read as UTC, as the server reads it
        value = value.replace(tzinfo=timezone.utc)
    return _MIN_TIME <= value <= _MAX_TIME


# gc=False: decoded batches hold no reference cycles, so the cyclic GC need not scan them (it was a large
# share of the ingest CPU under load)
class IngestEvent(Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    event: Name
    uuid: UUID | None = None
    distinct_id: Ident | None = None
    session_id: Ident | None = None
    page_url: Url | None = None
    referrer: Url | None = None
    properties: Properties | None = None
    # person traits, merged into the person by `$identify` (or any event that carries them)
    traits: Properties | None = None
    # the anonymous id that `$identify` links to distinct_id
    anon_id: Ident | None = None
    timestamp: Timestamp | None = None


class IngestBatch(Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    events: Annotated[list[IngestEvent], Meta(min_length=1, max_length=MAX_EVENTS_PER_BATCH)]
    sent_at: Timestamp | None = None

    def __post_init__(self) -> None:
        """msgspec bounds a time in milliseconds; one in RFC 3339 is bounded here, once per batch.

        The message names the field the way msgspec does (it passes a message raised for the whole batch
        on as it is), so the 400 names the field and the event's index like any other.
        """
        sent_at = self.sent_at
        if sent_at is not None and sent_at.__class__ is not int and not _in_range(sent_at):
            raise ValueError(f"{_OUT_OF_RANGE} - at `$.sent_at`")
        for index, ev in enumerate(self.events):
            ts = ev.timestamp
            # a year strictly inside no UTC offset (less than a day) can move out: most times, told cheaply
            if ts is not None and ts.__class__ is not int and not 1970 < ts.year < 2999 and not _in_range(ts):
                raise ValueError(f"{_OUT_OF_RANGE} - at `$.events[{index}].timestamp`")


class IngestAck(Struct):
    accepted: int
    duplicates: int


class ErrorBody(Struct, omit_defaults=True):
    error: str
    field: str | None = None
    index: int | None = None


def to_ms(value: datetime | int | None) -> int | None:
    """A Timestamp as epoch milliseconds (a datetime without a zone is UTC)."""
    if value is None or isinstance(value, int):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)


batch_decoder = msgspec.json.Decoder(IngestBatch)
json_encoder = msgspec.json.Encoder()


# -- the live feed (WebSocket /api/v1/ws/events/{project}) ----------------------------------------


class LiveEvent(Struct, omit_defaults=True):
    event: str
    ts: int  # epoch milliseconds
    distinct_id: str | None = None
    path: str | None = None
    properties: msgspec.Raw | dict | None = None
    browser: str | None = None
    os: str | None = None
    device: str | None = None


class LiveEvents(Struct, tag="events"):
    """Events committed since the last message, oldest first."""

    events: list[LiveEvent]


class LiveDropped(Struct, tag="dropped"):
    """This many events were not sent to this client because it read too slowly."""

    count: int


class LiveHello(Struct, tag="hello"):
    project: int
    event: str | None = None


LiveMessage = Union[LiveHello, LiveEvents, LiveDropped]
live_decoder = msgspec.json.Decoder(LiveMessage)
