"""Wire types shared by the server, the SDK's server side, the stores (the read API's parts) and the TUI (msgspec
Structs): what ingest takes, what the read API and the live feed answer."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Union
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
MAX_AGENT = 512

Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME)]
Ident = Annotated[str, Meta(min_length=1, max_length=MAX_ID)]
Url = Annotated[str, Meta(max_length=MAX_URL)]
PropertyKey = Annotated[str, Meta(min_length=1, max_length=MAX_PROPERTY_KEY)]
PropertyValue = Union[Annotated[str, Meta(max_length=MAX_PROPERTY_VALUE)], int, float, bool, None]
Properties = Annotated[dict[PropertyKey, PropertyValue], Meta(max_length=MAX_PROPERTIES)]
Agent = Annotated[str, Meta(max_length=MAX_AGENT)]
# IPv4 or IPv6 text (checked by the ingest handler); 45 characters hold any IPv6 address with an IPv4 tail
IpAddress = Annotated[str, Meta(min_length=2, max_length=45)]
# a BCP 47 language tag as browsers give it ("en-US"); only its first subtag is kept
MAX_LANGUAGE = 35
LANGUAGE_PATTERN = f"^[A-Za-z0-9-]{{1,{MAX_LANGUAGE}}}$"
Language = Annotated[str, Meta(pattern=LANGUAGE_PATTERN)]
# the screen's width in CSS pixels, of which only its class is kept (pulse.enrich.screen_class)
MAX_SCREEN_WIDTH = 100_000
ScreenWidth = Annotated[int, Meta(ge=0, le=MAX_SCREEN_WIDTH)]
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
    # the visitor's own user agent and IP address, sent by a backend that forwards them: used for the browser,
    # OS and device, the bot check and the anonymous visitor's hash, never stored as they are
    user_agent: Agent | None = None
    ip: IpAddress | None = None
    # the browser's language (navigator.language) and screen width (screen.width), as a tracker reads them
    language: Language | None = None
    screen_width: ScreenWidth | None = None


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

# A feed is closed with this code once its read token no longer grants the project (rotated or revoked): the
# client stops instead of reconnecting.
CLOSE_TOKEN_REVOKED = 4001


# -- the read API (GET /api/v1/projects[/{project}/…]) --------------------------------------------------
# The store answers with the parts (PeriodStats, Counts, Ranked, the rows of a page); the server adds the
# project, the window in the project's time zone and the bucket start times, and gives a page's cursor out as
# text ("ts.id" of its last row, passed back as ?cursor= for the next page; null on the last page).


class ProjectSummary(Struct):
    events_today: int  # since local midnight
    hourly: list[int]  # events per hour, the last 24 hours, oldest first


class ProjectRow(Struct, kw_only=True):
    id: int
    name: str
    domain: str | None
    timezone: str
    events_today: int
    hourly: list[int]


class ProjectList(Struct):
    projects: list[ProjectRow]


class TopEvent(Struct):
    event: str
    count: int


class SessionStats(Struct):
    """Of the sessions that started in a window (with a matching event in it, when filtered)."""

    sessions: int
    bounce_rate: float  # a fraction, 0..1
    avg_session_seconds: float
    pages_per_session: float


class PeriodStats(Struct, kw_only=True):
    events: int
    unique_users: int
    sessions: int
    bounce_rate: float
    avg_session_seconds: float
    pages_per_session: float
    top_event: TopEvent | None
    daily_average: float
    distinct_events: int


class OverviewStats(PeriodStats, kw_only=True):
    live_visitors: int  # users with an event in the last five minutes, whatever the window
    previous: PeriodStats  # the window of the same length just before


class Overview(OverviewStats, kw_only=True):
    # the fields of Ranged: the overview's numbers are at the top level of its body
    project: int
    from_: str = msgspec.field(name="from")
    to: str


class Counts(Struct):
    events: int
    unique_users: int
    sessions: int


class Bucket(Struct, kw_only=True):
    start: str  # RFC 3339 in the project's time zone
    events: int
    unique_users: int
    sessions: int


class Ranged(Struct, kw_only=True):
    """What every per-project answer but the overview starts with: the project and the window, [from, to)."""

    project: int
    from_: str = msgspec.field(name="from")
    to: str


class Timeseries(Ranged, kw_only=True):
    interval: str  # "hour" | "day"
    buckets: list[Bucket]
    previous: list[Bucket]  # the previous period's buckets, at their own start times


class Ranked(Struct, omit_defaults=True):
    """One row of a ranking: an event name, a breakdown's value, a property or trait key or value."""

    value: str | None
    count: int  # events (sessions for session breakdowns, persons for traits)
    unique_users: int
    label: str | None = None  # the value's name, for countries ("GB": "United Kingdom") and languages


class RankedRows(Ranged, kw_only=True):
    rows: list[Ranked]


class SessionRow(Struct, kw_only=True):
    session_id: str
    distinct_id: str
    first_ts: int
    last_ts: int
    duration_seconds: float
    events: int
    pageviews: int
    entry_page: str | None
    exit_page: str | None
    referrer: str | None
    utm_source: str | None
    browser: str | None
    os: str | None
    device: str | None


class SessionsPage(Ranged, kw_only=True):
    aggregates: SessionStats
    rows: list[SessionRow]
    next_cursor: str | None


class UserRow(Struct, kw_only=True):
    distinct_id: str
    traits: dict[str, Any] | None
    first_seen: int  # the person's first and last event ever (ms), whatever the window
    last_seen: int
    window_events: int  # events in the window asked about that match its filters (users/{distinct_id}: all of them)
    lifetime_events: int  # every event the person ever sent, bots' and pruned ones included


class UsersPage(Ranged, kw_only=True):
    rows: list[UserRow]
    next_cursor: str | None


class EventRow(Struct, kw_only=True):
    uuid: str
    event: str
    ts: int
    distinct_id: str
    path: str | None
    page_url: str | None
    referrer: str | None
    properties: dict[str, Any] | None
    browser: str | None
    os: str | None
    device: str | None


class EventsPage(Ranged, kw_only=True):
    rows: list[EventRow]
    next_cursor: str | None


class UserTimeline(Ranged, kw_only=True):
    user: UserRow
    rows: list[EventRow]  # the user's events, newest first
    next_cursor: str | None


class Revenue(Struct):
    currency: str | None  # upper-cased; null for events without a currency
    amount: float


class GoalRow(Struct, kw_only=True):
    """One goal over a window: a custom event name, or a page-view path (`/thank-you`, `/blog/*`) declared with
    `pulse goals add`."""

    goal: str
    kind: str  # "event" | "page"
    visitors: int  # persons with the goal's event
    events: int
    conversion_rate: float  # visitors / every visitor of the window, a fraction, 0..1
    revenue: list[Revenue]  # per currency, sorted (null last)


class Goals(Ranged, kw_only=True):
    visitors: int  # every visitor of the window, under the same filters
    rows: list[GoalRow]  # most visitors first


# -- journeys: funnels, retention, paths (GET …/funnel, …/retention, …/paths) -----------------------------


class FunnelStep(Struct, kw_only=True):
    step: str  # as asked: an event name, or `event:/path`
    persons: int  # persons who reached this step
    conversion: float  # persons / the first step's persons, a fraction, 0..1
    from_previous: float  # persons / the previous step's persons
    median_seconds: float | None  # from the previous step, of the persons who reached this one; null for step 1


class FunnelGroup(Struct, kw_only=True):
    value: str | None  # the breakdown's value on the first step's event; null when it has none
    steps: list[FunnelStep]


class Funnel(Ranged, kw_only=True):
    window: str  # "1h" | "1d" | "7d" | "30d"
    steps: list[FunnelStep]
    breakdown: list[FunnelGroup] | None  # per value of the breakdown asked for, most first-step persons first


class CohortCounts(Struct):
    persons: int  # whose first start event ever fell in the cohort's period
    returned: list[int]  # of them, who did the return event in the cohort's period (0) and each one after


class Cohort(Struct, kw_only=True):
    start: str  # RFC 3339 in the project's time zone: the period's first moment
    persons: int
    returned: list[int]


class Retention(Ranged, kw_only=True):
    period: str  # "day" | "week"
    cohorts: list[Cohort]


class PathNode(Struct, kw_only=True):
    """A step of the paths tree: sessions that came this way, of which `dropped` ended here, `other` went on
    to a step not shown below (past the limit, or past the depth), and the rest to the steps in `next`."""

    step: str  # `page_view:/path` for a page view, else the event name
    sessions: int
    dropped: int
    other: int
    next: list[PathNode]


class Paths(Ranged, kw_only=True):
    root: PathNode
