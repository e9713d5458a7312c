"""What the server, the CLI and every store share, and nothing about how events are stored: the window asked
about and the filters on events, projects and key grants, an ingest job and a committed event, what ingest
reports, and the errors a store raises."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from pulse.protocol import IngestEvent

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
PAGE_VIEW = "page_view"

INGEST = "ingest"
READ = "read"
SHARE = "share"  # a share link's token: reads only the dashboard's aggregates of one project

# the breakdowns every store answers: of events (page views by path, user agents, the visitor's country, the
# browser's language, the screen's class) and of sessions, by the values of the page view that started them
EVENT_BREAKDOWNS = ("pages", "browsers", "os", "devices", "countries", "languages", "screens")
SESSION_BREAKDOWNS = ("entry-pages", "exit-pages", "referrers", "utm_source", "utm_medium", "utm_campaign")

Cursor = tuple[int, int]  # (ts ms, id) of the last row of a page: the next page starts after it


@dataclass(frozen=True, slots=True)
class Window:
    """A half-open time range [start, end) in epoch milliseconds."""

    start: int
    end: int

    @property
    def previous(self) -> Window:
        return Window(self.start - (self.end - self.start), self.start)

    def split(self) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
        """(whole hours [h0, h1) or None, raw millisecond pieces that are not whole hours)."""
        first_hour = -(-self.start // HOUR_MS)
        last_hour = self.end // HOUR_MS
        if first_hour >= last_hour:
            return None, [(self.start, self.end)] if self.start < self.end else []
        raw = []
        if self.start < first_hour * HOUR_MS:
            raw.append((self.start, first_hour * HOUR_MS))
        if last_hour * HOUR_MS < self.end:
            raw.append((last_hour * HOUR_MS, self.end))
        return (first_hour, last_hour), raw


@dataclass(frozen=True, slots=True)
class Filters:
    """Conditions on events, ANDed. Each value is matched exactly."""

    event: str | None = None
    path: str | None = None
    referrer: str | None = None  # the referrer's domain
    utm_source: str | None = None  # of the event's session
    utm_medium: str | None = None
    utm_campaign: str | None = None
    browser: str | None = None
    os: str | None = None
    device: str | None = None
    country: str | None = None  # ISO 3166 alpha-2 code, "GB"
    language: str | None = None  # base language subtag, "en"
    screen: str | None = None  # screen class: mobile, tablet, laptop, desktop
    props: tuple[tuple[str, str], ...] = ()  # event properties
    traits: tuple[tuple[str, str], ...] = ()  # person traits

    @property
    def rollup_ready(self) -> bool:
        """Whether the hourly rollups can answer (nothing but the event name is filtered)."""
        return self == Filters(event=self.event)

    @property
    def traits_only(self) -> bool:
        """Whether person traits are all that is filtered: such filters are answered over whole hours from
        per-person counts of all the events (`People`, `Tally`), cut down to the persons with the traits."""
        return bool(self.traits) and self == Filters(traits=self.traits)


# -- opening a store ------------------------------------------------------------------------------------


class SchemaTooNew(Exception):
    """The stored data was written by a newer pulse than this one: refused rather than touched."""
# -- life cycle ---------------------------------------------------------------------------------------


class StoreInUse(Exception):
    """Another server holds this store (`Store.lock`): two servers writing beside each other are refused."""


# -- the catalog --------------------------------------------------------------------------------------


class ProjectError(Exception):
    """A project or key operation that cannot be done, with a message for the user."""


class ProjectNotFound(ProjectError):
    pass


@dataclass(frozen=True, slots=True)
class Project:
    id: int
    name: str
    domain: str | None
    timezone: str
    retention_days: int
    created_at: int
    # hosts whose pages may send events (a host also allows its subdomains); None: any origin
    allowed_origins: str | None = None
    # a UUID made at creation, by which trackers that send no key name the project (Umami's `website`)
    site_id: str | None = None

    def origin_allowed(self, origin: str | None) -> bool:
        """Whether a browser on `origin` may send events. Requests without an Origin (servers) always may."""
        if not self.allowed_origins or origin is None:
            return True
        host = urlsplit(origin).hostname or ""
        return any(host == allowed or host.endswith("." + allowed) for allowed in self.allowed_origins.split())

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """What a presented key allows: one project, one kind, until `expires_at` (ms) if set."""

    project_id: int
    kind: str
    expires_at: int | None

    def valid(self, now_ms: int) -> bool:
        return self.expires_at is None or now_ms < self.expires_at


@dataclass(frozen=True, slots=True)
class Catalog:
    """Every project and every key's grant (by SHA-256 digest of the secret), as of `version`."""

    version: int
    grants: dict[bytes, KeyGrant]
    projects: dict[int, Project]


def digest(secret: str) -> bytes:
    """What a key is kept and looked up by (`Catalog.grants`): its SHA-256, never the secret itself."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def now_ms() -> int:
    """The catalog's clock (`Project.created_at`, `KeyGrant.expires_at`): epoch milliseconds."""
    return time.time_ns() // 1_000_000


# -- ingest --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class IngestJob:
    """One request's events with what the server knows about the request."""

    project_id: int
    events: list[IngestEvent]
    received_ms: int
    skew_ms: int  # add to client timestamps (server clock minus client clock at send time)
    ip: str
    user_agent: str
    project_domain: str | None = None
    # the visitor's country (ISO 3166 alpha-2), looked up from the IP by the server; the IP itself is only hashed
    country: str | None = None
    # the base language of the request's Accept-Language, for events that carry no language of their own
    language: str | None = None


@dataclass(slots=True)
class CommittedEvent:
    """What the live feed needs of an event that was committed."""

    project_id: int
    ts: int
    event: str
    distinct_id: str | None
    path: str | None
    properties: str | None  # JSON text
    user_agent: str


@dataclass(frozen=True, slots=True)
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int]  # one per bound, then one past the last
    total: float


@dataclass(frozen=True, slots=True)
class IngestStats:
    """What ingest has done since the store opened, and where it stands: for /health, /metrics, `pulse status`."""

    state: str  # ok; stalled: a request waited past the write deadline; restarting; stopping
    queued_events: int
    lag_seconds: float  # how long the oldest request still waiting for its commit has waited
    commits: int
    events_written: int
    duplicates: int
    failures: int
    restarts: int
    stalled_requests: int
    last_commit_at: float | None  # wall clock seconds
    last_batch_events: int
    last_commit_seconds: float
    commit_seconds: Histogram
    batch_events: Histogram
    wal_bytes: int = 0


class QueueFull(Exception):
    """The writer's queue cannot take this batch now; the client should retry later."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"ingest queue is full, retry after {retry_after}s")
        self.retry_after = retry_after


class WriterClosed(Exception):
    """The writer takes no new work: shutting down, or restarting after a crash."""


class WriteFailed(Exception):
    """The transaction holding a batch failed; nothing of the batch was stored."""


class WriterStalled(Exception):
    """The writer has not committed within the write deadline. A batch refused with it was not queued; a
    batch that waited past the deadline stays queued and is stored once the writer moves again."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ProjectGone(Exception):
    """The batch's project was deleted before its commit; nothing of the batch was stored."""


# -- reads and maintenance ----------------------------------------------------------------------------


class NotAvailable(Exception):
    """The store cannot answer this question (yet): answered 501 with the message, never with another number."""


class StoreUnavailable(Exception):
    """The store's database cannot be reached or did not answer in time (a ClickHouse server down): a 503."""


class QueryTimeout(Exception):
    """A read query ran past its time limit and was interrupted."""


class ReadStopped(QueryTimeout):
    """A read was stopped before it finished because nobody waits for it any more. A QueryTimeout, so that
    whoever copes with a read that did not finish copes with this one too."""


@dataclass(frozen=True, slots=True)
class Difference:
    project_id: int
    what: str  # "hourly", "hourly_dims", "session", "session_days", "person", or the table of an orphan row
    key: str
    stored: object
    recounted: object

    def __str__(self) -> str:
        return f"project {self.project_id} {self.what} {self.key}: stored {self.stored}, recounted {self.recounted}"
