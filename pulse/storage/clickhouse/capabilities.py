"""What the ClickHouse server can do, probed once at connect from its system tables (never from its version
string: Debian's 18.16 carries back-ported patches, and chdb embeds a current engine).

The store keeps to SQL that ClickHouse 18.16 has (see `schema`); a server that lacks any of it is refused
with the list of what is missing rather than failing later on one question.
"""

from __future__ import annotations

from dataclasses import dataclass

from pulse.storage.clickhouse.transport import Transport, sql_literal

# the functions the schema and the questions use (combinators -State, -Merge, -If are not listed in
# system.functions on 18.16: their base functions are)
FUNCTIONS = ("count", "uniqExact", "min", "max", "sum", "any", "argMin", "argMax", "transform", "arrayFirstIndex",
             "intDiv", "toYYYYMM", "toDateTime", "sipHash64", "startsWith", "visitParamExtractRaw", "hex")
TYPES = ("FixedString", "AggregateFunction", "String", "UInt8", "UInt32", "UInt64", "Int64")
# settings the store sets per request: a cluster needs synchronous distributed inserts (the 202 waits for
# every shard's confirmation)
SETTINGS = ("output_format_json_quote_64bit_integers", "insert_distributed_sync")


class Unsupported(Exception):
    """The server lacks what the store needs."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    functions: frozenset[str]
    types: frozenset[str]
    settings: frozenset[str]

    @property
    def json_extract(self) -> bool:
        """JSONExtract* (newer servers) besides visitParamExtract* (every server)."""
        return "JSONExtractString" in self.functions


async def probe(transport: Transport) -> Capabilities:
    wanted_functions = (*FUNCTIONS, "JSONExtractString")
    functions = {name for (name,) in await transport.select(
        f"SELECT name FROM system.functions WHERE name IN ({', '.join(map(sql_literal, wanted_functions))})")}
    types = {name for (name,) in await transport.select(
        f"SELECT name FROM system.data_type_families WHERE name IN ({', '.join(map(sql_literal, TYPES))})")}
    settings = {name for (name,) in await transport.select(
        f"SELECT name FROM system.settings WHERE name IN ({', '.join(map(sql_literal, SETTINGS))})")}
    missing = ([f"function {f}" for f in FUNCTIONS if f not in functions]
               + [f"type {t}" for t in TYPES if t not in types]
               + [f"setting {s}" for s in SETTINGS if s not in settings])
    if missing:
        raise Unsupported("the ClickHouse server lacks what pulse needs: " + ", ".join(missing))
    return Capabilities(frozenset(functions), frozenset(types), frozenset(settings))
