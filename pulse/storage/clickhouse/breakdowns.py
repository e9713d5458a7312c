"""Breakdowns and the bots report on the ClickHouse store, with the SQLite store's meaning (`sqlite/breakdowns.py`).

Event-level breakdowns (pages, browsers, OS, devices, countries, languages, screen classes) count the non-bot
events of the window that match the filters and have a value (pages: page views with a path), and their
distinct persons. Session-level ones (entry and exit page, referrer, UTM source, medium and campaign) count
the non-bot sessions that started in the window (with a matching event in it, when filtered) and have a value,
and their persons, from the `sessions` rollup. An empty string is what the store keeps for a value SQLite keeps
as NULL (pulse never stores an empty path, referrer domain, UTM value, country, language or screen class), so
rows without a value are left out as SQLite's joins leave them out. Where SQLite's answer depends on the order
events arrived in (page views of a session at the same millisecond as its first or last one, with different
values), which this store does not keep, the session breakdown answers 501 instead (`check_ties`).

Every number is an exact count (`count`, `uniqExact`) grouped in ClickHouse; rows are ranked there by count,
then value (byte order of UTF-8 is code point order, so this is Python's order of the same strings).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pulse.protocol import Ranked
from pulse.storage.clickhouse import periods
from pulse.storage.model import Filters, NotAvailable, Window

if TYPE_CHECKING:
    from pulse.storage.clickhouse.store import ClickHouseStore

# event-level breakdowns: the column grouped, and which events count beyond the filters
EVENT_DIMENSIONS = {
    "pages": ("path", " AND page = 1"),
    "browsers": ("browser", ""),
    "os": ("os", ""),
    "devices": ("device", ""),
    "countries": ("country", ""),
    "languages": ("language", ""),
    "screens": ("screen", ""),
}
# session-level breakdowns: the events' column a session's value is taken from, and whether from its first page
# view (else its last); the merge of the `sessions` rollup's column that gives it
SESSION_DIMENSIONS = {
    "entry-pages": ("path", True, "argMinIfMerge(entry)"),
    "exit-pages": ("path", False, "argMaxIfMerge(exit)"),
    "referrers": ("referrer_domain", True, "argMinIfMerge(referrer)"),
    "utm_source": ("utm_source", True, "argMinIfMerge(utm_source)"),
    "utm_medium": ("utm_medium", True, "argMinIfMerge(utm_medium)"),
    "utm_campaign": ("utm_campaign", True, "argMinIfMerge(utm_campaign)"),
}
RANKED = "GROUP BY v ORDER BY c DESC, v LIMIT {limit}"


def _span(window: Window) -> str:
    return f"ts >= {window.start} AND ts < {window.end}"


async def _ranked(store: ClickHouseStore, sql: str) -> list[Ranked]:
    return [Ranked(value, count, users) for value, count, users in await store.ch.select(sql)]


async def breakdown(store: ClickHouseStore, project_id: int, window: Window, filters: Filters, dimension: str,
                    limit: int) -> list[Ranked]:
    if dimension in EVENT_DIMENSIONS:
        column, extra = EVENT_DIMENSIONS[dimension]
        return await _ranked(store, (
            f"SELECT {column} AS v, count() AS c, uniqExact(person) AS u FROM {store.t('events')}"
            f" WHERE {store._conditions(project_id, filters)} AND {_span(window)} AND {column} != ''{extra}"
            f" {RANKED.format(limit=limit)}"))
    column, first, value = SESSION_DIMENSIONS[dimension]
    await check_ties(store, project_id, window, column, first)
    return await _session_breakdown(store, project_id, window, filters, value, limit)


async def check_ties(store: ClickHouseStore, project_id: int, window: Window, column: str, first: bool) -> None:
    """NotAvailable when a session that may have started in the window has two page views at the millisecond of
    its first (`first`) or last page view with different values of `column`. SQLite takes the one that arrived
    first (entry) or last (exit) of those; the order events of one batch arrived in is not stored here."""
    # per session, the least and the greatest value at its edge millisecond, in one pass: they differ when tied
    near, far = ("ts", "negate(ts)") if first else ("negate(ts)", "ts")
    tied = (await store.ch.select(
        f"SELECT countIf(least != greatest) FROM (SELECT argMin({column}, ({near}, {column})) AS least,"
        f" argMax({column}, ({far}, {column})) AS greatest FROM {store.t('events')}"
        f" WHERE project_id = {project_id} AND page = 1 AND ts >= {window.start} GROUP BY session)"))[0][0]
    if tied:
        raise NotAvailable(f"{tied} sessions have page views at the same millisecond as their "
                           f"{'first' if first else 'last'} one: which counts depends on the order they arrived in,"
                           " which the ClickHouse store does not keep")


async def _session_breakdown(store: ClickHouseStore, project_id: int, window: Window, filters: Filters,
                             value: str, limit: int) -> list[Ranked]:
    """Sessions and their persons per value, over the non-bot sessions that started in the window (with a
    matching event in it, when filtered). A session's person and bot flag are its rollup's (one person per
    session; the bot flag of its first event)."""
    return await _ranked(store, (
        "SELECT v, count() AS c, uniqExact(p) AS u FROM ("
        f" SELECT session, {value} AS v, anyMerge(person) AS p, minMerge(first) AS f, argMinMerge(bot) AS b"
        f" FROM {store.t('sessions')} WHERE {periods.started(store, project_id, window, filters)}"
        f" GROUP BY session HAVING f >= {window.start} AND f < {window.end} AND b = 0)"
        f" WHERE v != '' {RANKED.format(limit=limit)}"))


async def bots(store: ClickHouseStore, project_id: int, window: Window, limit: int) -> list[Ranked]:
    """What every other number leaves out: events and persons per crawler (the browser family its user agent
    parsed to)."""
    return await _ranked(store, (
        f"SELECT browser AS v, count() AS c, uniqExact(person) AS u FROM {store.t('events')}"
        f" WHERE project_id = {project_id} AND bot = 1 AND {_span(window)} {RANKED.format(limit=limit)}"))
