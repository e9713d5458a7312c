"""Wire types shared by the server, the SDK's server side and the TUI (msgspec Structs)."""

from __future__ import annotations

from datetime import datetime
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
# epoch milliseconds, or an RFC 3339 string
Timestamp = Union[datetime, Annotated[int, Meta(ge=0, le=32503680000000)]]


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


class IngestAck(Struct):
    accepted: int
    duplicates: int


class ErrorBody(Struct, omit_defaults=True):
    error: str
    field: str | None = None
    index: int | None = None


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
