"""How the ClickHouse store talks to ClickHouse: over HTTP with aiohttp (one statement per request), or, for
tests, in-process through chdb. Both take the same calls: `execute` (DDL and statements without rows),
`select` (rows as tuples, from TabSeparated with names and types) and `insert` (rows of typed columns).

Reads and DDL are retried once when a pooled connection turns out reset (the server closed it idle); an
insert never is: a retried insert that had reached the server would store its rows twice (MergeTree keeps no
insert deduplication without replication), so it fails and the batch is answered 503, its retry counted once
(see `store`).
"""

from __future__ import annotations

import abc
import asyncio
import re
import struct
from collections.abc import Sequence
from itertools import chain
from typing import Any

import aiohttp

from pulse.storage.model import StoreUnavailable

# ClickHouse closes idle HTTP connections after keep_alive_timeout (3 s in Debian's config); a pooled
# connection kept longer may be closed under a request, so the pool lets them go sooner
KEEPALIVE_S = 2.0
CONNECT_TIMEOUT_S = 10.0
_CODE_RE = re.compile(r"^Code: (\d+)")
# reads answer numbers as numbers, whatever their width
READ_SETTINGS = {"output_format_json_quote_64bit_integers": "0"}


class ClickHouseError(Exception):
    """ClickHouse refused a statement: its error code (0 when the answer had none) and text."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"ClickHouse error {code}: {text.strip()[:2000]}")
        self.code = code
        self.text = text


def _error(text: str) -> ClickHouseError:
    match = _CODE_RE.match(text.lstrip())
    return ClickHouseError(int(match.group(1)) if match else 0, text)


# -- TabSeparated values ------------------------------------------------------------------------------------

_UNESCAPE = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r", "0": "\0", "b": "\b", "f": "\f", "'": "'", "N": None}
_ESCAPE_RE = re.compile(r"\\(.)")


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return _ESCAPE_RE.sub(lambda m: _UNESCAPE.get(m.group(1), m.group(1)) or "", value)


def _converter(kind: str):
    if kind.startswith("Nullable("):
        inner = _converter(kind[9:-1])
        return lambda v: None if v == "\\N" else inner(v)
    if re.match(r"^U?Int\d+$", kind):
        return int
    if kind.startswith("Float"):
        return float
    return _unescape


def parse_tsv(body: str) -> list[tuple]:
    """Rows of TabSeparatedWithNamesAndTypes, each value as its type (integers, floats, text)."""
    lines = body.split("\n")
    if len(lines) < 2:
        return []
    converters = [_converter(kind) for kind in lines[1].split("\t")]
    return [tuple(convert(value) for convert, value in zip(converters, line.split("\t")))
            for line in lines[2:] if line]


# -- RowBinary for inserts ----------------------------------------------------------------------------------

def _leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_FIXED = {"UInt8": "<B", "UInt16": "<H", "UInt32": "<I", "UInt64": "<Q", "Int8": "<b", "Int16": "<h",
          "Int32": "<i", "Int64": "<q", "Float64": "<d"}
# the LEB128 lengths of one and two bytes, looked up: nearly every value is shorter than 16 KiB
_LENGTHS = [_leb128(n) for n in range(1 << 14)]


def _strings(values: Sequence[str | bytes]) -> tuple[Sequence[bytes], Sequence[bytes]]:
    """A String column as two: each value's LEB128 length, and its bytes."""
    try:
        raw = list(map(str.encode, values))
    except (TypeError, UnicodeEncodeError):  # bytes given, or a lone surrogate (stored as its bytes, as SQLite does)
        raw = [v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v for v in values]
    lengths = list(map(len, raw))
    if max(lengths, default=0) < len(_LENGTHS):
        return list(map(_LENGTHS.__getitem__, lengths)), raw
    return list(map(_leb128, lengths)), raw


def _fixed_strings(width: int, values: Sequence[bytes]) -> Sequence[bytes]:
    if any(map(width.__ne__, map(len, values))):
        raise ValueError(f"FixedString({width}) given a value of another length")
    return values


def row_binary(types: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    """Rows as RowBinary: fixed-width numbers little-endian, strings with a LEB128 length, FixedString(N) as
    its N bytes. Only the column types the store's tables use. Encoded a column at a time (each column's
    values by one call mapped over them), then interleaved row by row: no Python code of its own runs per value."""
    columns: list[Sequence[bytes]] = []
    for kind, values in zip(types, zip(*rows)):
        if kind in _FIXED:
            columns.append(list(map(struct.Struct(_FIXED[kind]).pack, values)))
        elif kind == "String":
            columns += _strings(values)
        elif kind.startswith("FixedString("):
            columns.append(_fixed_strings(int(kind[12:-1]), values))
        else:
            raise ValueError(f"no RowBinary encoder for {kind}")
    if rows and len(rows[0]) != len(types):
        raise ValueError(f"rows of {len(rows[0])} values for {len(types)} columns")
    return b"".join(chain.from_iterable(zip(*columns)))


def sql_literal(value: Any) -> str:
    """A value as a ClickHouse SQL literal (text escaped; bytes byte by byte, for FixedString)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, bytes):
        return "'" + "".join(f"\\x{b:02x}" for b in value) + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(sql_literal(v) for v in value) + "]"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


class Transport(abc.ABC):
    """What the store needs of a connection to ClickHouse."""

    @abc.abstractmethod
    async def execute(self, sql: str) -> None:
        """Run one statement that answers nothing (DDL, ALTER, INSERT … SELECT)."""

    @abc.abstractmethod
    async def select(self, sql: str) -> list[tuple]:
        """Run one query; its rows."""

    @abc.abstractmethod
    async def insert(self, table: str, columns: Sequence[str], types: Sequence[str],
                     rows: Sequence[Sequence[Any]], settings: dict[str, str] | None = None) -> None:
        """Insert the rows (values in the order of `columns`, of ClickHouse `types`); returns once confirmed."""

    async def close(self) -> None:
        pass


class HttpTransport(Transport):
    """ClickHouse's HTTP interface at `url` (http://host:8123). Statements name their tables with the database."""

    def __init__(self, url: str, *, user: str | None = None, password: str | None = None,
                 timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/") + "/"
        self.headers = {}
        if user:
            self.headers["X-ClickHouse-User"] = user
        if password:
            self.headers["X-ClickHouse-Key"] = password
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=CONNECT_TIMEOUT_S)
        self.session: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_S, limit=32), timeout=self.timeout,
                headers=self.headers)
        return self.session

    async def _post(self, body: bytes, params: dict[str, str], *, retry: bool) -> str:
        for attempt in (0, 1):
            try:
                async with self._session().post(self.url, params=params, data=body) as response:
                    text = await response.text(errors="replace")
                    if response.status != 200:
                        raise _error(text)
                    return text
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # a pooled connection the server had closed: a statement that changes nothing twice is sent again
                if not retry or attempt or not _reset(exc):
                    raise StoreUnavailable(f"ClickHouse at {self.url} cannot be reached: {exc}") from None
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise StoreUnavailable(f"ClickHouse at {self.url} did not answer: {exc or 'timed out'}") from None
        raise AssertionError("unreachable")

    async def execute(self, sql: str) -> None:
        await self._post(sql.encode(), {}, retry=True)

    async def select(self, sql: str) -> list[tuple]:
        text = await self._post(f"{sql}\nFORMAT TabSeparatedWithNamesAndTypes".encode(),
                                dict(READ_SETTINGS), retry=True)
        return parse_tsv(text)

    async def insert(self, table: str, columns: Sequence[str], types: Sequence[str],
                     rows: Sequence[Sequence[Any]], settings: dict[str, str] | None = None) -> None:
        if not rows:
            return
        params = dict(settings or {})
        params["query"] = f"INSERT INTO {table} ({', '.join(columns)}) FORMAT RowBinary"
        await self._post(row_binary(types, rows), params, retry=False)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


def _reset(exc: Exception) -> bool:
    return isinstance(exc, aiohttp.ServerDisconnectedError) or "reset" in str(exc).lower()


class ChdbTransport(Transport):
    """ClickHouse in this process through chdb (a current engine), on the data directory `path`: the same SQL
    as over HTTP, with inserts as VALUES. Calls run on a thread of their own, one at a time (chdb's
    connection is not shared between threads at once), so the event loop is never blocked."""

    def __init__(self, path: str) -> None:
        import chdb

        self.connection = chdb.connect(path)
        self.lock = asyncio.Lock()

    async def _query(self, sql: str, fmt: str) -> str:
        def call() -> str:
            try:
                return self.connection.query(sql, fmt).bytes().decode("utf-8", "replace")
            except RuntimeError as exc:
                raise _error(str(exc)) from None

        async with self.lock:
            return await asyncio.to_thread(call)

    async def execute(self, sql: str) -> None:
        await self._query(sql, "TabSeparated")

    async def select(self, sql: str) -> list[tuple]:
        return parse_tsv(await self._query(sql, "TabSeparatedWithNamesAndTypes"))

    async def insert(self, table: str, columns: Sequence[str], types: Sequence[str],
                     rows: Sequence[Sequence[Any]], settings: dict[str, str] | None = None) -> None:
        if not rows:
            return
        values = ", ".join("(" + ", ".join(sql_literal(v) for v in row) + ")" for row in rows)
        await self.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}")

    async def close(self) -> None:
        await asyncio.to_thread(self.connection.close)
