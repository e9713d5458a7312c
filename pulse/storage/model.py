"""What every store's read side and the server's parameter parsing share: the time window asked about
and the filters on events. Nothing here knows how events are stored."""

from __future__ import annotations

from dataclasses import dataclass

from pulse.storage.rows import HOUR_MS


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
    props: tuple[tuple[str, str], ...] = ()  # event properties
    traits: tuple[tuple[str, str], ...] = ()  # person traits

    @property
    def rollup_ready(self) -> bool:
        """Whether the hourly rollups can answer (nothing but the event name is filtered)."""
        return self == Filters(event=self.event)

    @property
    def by_hour(self) -> bool:
        """Whether what the filters match in an hour is fixed by that hour's events and, for trait filters,
        by which of its users have the traits. UTM filters are not: a session's UTM values are those of
        its first page view, which a late event can change."""
        return self.utm_source is None and self.utm_medium is None and self.utm_campaign is None

    @property
    def traits_only(self) -> bool:
        """Whether person traits are all that is filtered: such filters are answered over whole hours from
        per-person counts of all the events (`People`, `Tally`), cut down to the persons with the traits."""
        return bool(self.traits) and self == Filters(traits=self.traits)
