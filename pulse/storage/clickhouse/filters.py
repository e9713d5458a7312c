"""Filters as WHERE terms over `events`, matching exactly what the SQLite store's `event_conditions` matches.

Event properties and person traits are compared as SQLite compares them: `CAST(json_extract(...) AS TEXT)`
equal to the value asked for. Properties are stored as the JSON text ingest encoded (msgspec: a flat object
of strings, numbers, booleans and nulls, no spaces), so a key's value is found in that text without a JSON
function (18.16 has none that takes an escaped key): the raw JSON of the value follows `{"KEY":` or `,"KEY":`,
which no string inside the object can hold (its quotes are escaped). Which raw JSON texts SQLite reads as the
text asked for is worked out here with SQLite itself (the library the SQLite store runs on): the string, the
integer, `true` for `1` and `false` for `0`, and the one float whose text it is. A number that SQLite reads
as a float from an integer beyond 64 bits cannot be listed that way, nor is a key with a `"` looked for (its
escaped form in the stored text is not worked out here): filters on those raise NotAvailable.

Person traits are kept per person and key (`person_traits`, newest `seq` wins, `null` deletes a key: what
json_patch does with flat objects, in commit order), so a trait filter is the persons whose current value is
one of those texts. UTM filters match the events of sessions whose first page view carried the value.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

import apsw
import msgspec

from pulse.storage.clickhouse.transport import sql_literal
from pulse.storage.model import Filters, NotAvailable

if TYPE_CHECKING:
    from pulse.storage.clickhouse.store import ClickHouseStore

# one scalar JSON value at the start of the text: a string (escapes included) or anything up to , or }
RAW_VALUE = r'^("(?:[^"\\]|\\.)*"|[^,}]*)'
# every key of a flat object, each with its value consumed so the next match starts at the next key
RAW_KEYS = r'[{,]("(?:[^"\\]|\\.)*"):(?:"(?:[^"\\]|\\.)*"|[^,}]*)'
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
BIGGEST_EXACT = 2 ** 63  # beyond it SQLite reads an integer as a float, as many integers as one float
_encode = msgspec.json.Encoder().encode


@functools.cache
def _sqlite() -> apsw.Connection:
    return apsw.Connection(":memory:")


@functools.lru_cache(maxsize=65536)
def sqlite_text(raw: str) -> str | None:
    """What SQLite's CAST(json_extract(...) AS TEXT) gives for a value whose JSON is `raw` (None for null)."""
    return _sqlite().execute("SELECT CAST(json_extract(?, '$') AS TEXT)", (raw,)).fetchone()[0]


def check_key(key: str) -> None:
    if '"' in key:
        raise NotAvailable(f"property or trait keys with a double quote ({key!r}) are not available on the"
                           " ClickHouse store")


@functools.lru_cache(maxsize=4096)
def raw_candidates(text: str) -> tuple[str, ...]:
    """Every raw JSON value ingest can have stored that SQLite reads as `text`."""
    found = [_encode(text).decode()]
    if _INTEGER.fullmatch(text):
        found.append(text)
    if text in ("1", "0"):
        found.append("true" if text == "1" else "false")
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None and number == number and abs(number) != float("inf"):
        floats = [number, -number] if number == 0 else [number]
        for value in floats:
            raw = _encode(value).decode()
            if sqlite_text(raw) == text:
                if abs(value) >= BIGGEST_EXACT:
                    raise NotAvailable(f"matching {text!r}, which SQLite also reads from integers beyond 64 bits,"
                                       " is not available on the ClickHouse store")
                found.append(raw)
    return tuple(raw for raw in dict.fromkeys(found) if sqlite_text(raw) == text)


def raw_value(column: str, key: str) -> str:
    """SQL: the raw JSON of `key`'s value in the flat JSON object `column`, '' where it has no such key."""
    encoded = _encode(key).decode()
    first, later = "{" + encoded + ":", "," + encoded + ":"
    at = f"position({column}, {sql_literal(later)})"
    pattern = sql_literal(RAW_VALUE)
    return (f"if(startsWith({column}, {sql_literal(first)}),"
            f" extract(substring({column}, {len(first.encode()) + 1}), {pattern}),"
            f" if({at} > 0, extract(substring({column}, {at} + {len(later.encode())}), {pattern}), ''))")


def raw_keys(column: str) -> str:
    """SQL: the keys of the flat JSON object `column`, each as its JSON string."""
    return f"extractAll({column}, {sql_literal(RAW_KEYS)})"


def one_of(expression: str, texts: tuple[str, ...]) -> str:
    return f"{expression} IN ({', '.join(map(sql_literal, texts))})"


def current_traits(store: ClickHouseStore, project_id: int) -> str:
    """SQL: (person, key, value) of every trait each person of the project has now (raw JSON values)."""
    return (f"SELECT person, key, value FROM (SELECT person, key, argMax(value, seq) AS value"
            f" FROM {store.t('person_traits')} WHERE project_id = {project_id} GROUP BY person, key)"
            " WHERE value != 'null'")


def trait_people(store: ClickHouseStore, project_id: int, key: str, value: str) -> str:
    """SQL: the persons whose trait `key` SQLite reads as `value`."""
    check_key(key)
    return (f"SELECT person FROM ({current_traits(store, project_id)})"
            f" WHERE key = {sql_literal(key)} AND {one_of('value', raw_candidates(value))}")


def conditions(store: ClickHouseStore, project_id: int, filters: Filters) -> str:
    """WHERE terms over `events` for the project, no bots, and the filters."""
    terms = [f"project_id = {project_id}", "bot = 0"]
    for column, value in (("name", filters.event), ("path", filters.path), ("referrer_domain", filters.referrer),
                          ("browser", filters.browser), ("os", filters.os), ("device", filters.device),
                          ("country", filters.country), ("language", filters.language),
                          ("screen", filters.screen)):
        if value is not None:
            terms.append(f"{column} = {sql_literal(value)}")
    for column, value in (("utm_source", filters.utm_source), ("utm_medium", filters.utm_medium),
                          ("utm_campaign", filters.utm_campaign)):
        if value is None:
            continue
        if value == "":  # stored for "none", which the SQLite store never matches
            terms.append("0")
            continue
        terms.append(f"session GLOBAL IN (SELECT session FROM {store.t('sessions')} WHERE project_id = {project_id}"
                     f" GROUP BY session HAVING argMinIfMerge({column}) = {sql_literal(value)})")
    for key, value in filters.props:
        check_key(key)
        terms.append(one_of(raw_value("props", key), raw_candidates(value)))
    for key, value in filters.traits:
        terms.append(f"person GLOBAL IN ({trait_people(store, project_id, key, value)})")
    return " AND ".join(terms)
