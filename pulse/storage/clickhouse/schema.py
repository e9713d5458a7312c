"""The ClickHouse store's tables, made at connect (every statement `IF NOT EXISTS`, so any node may run them).

Per shard (on a single server, the one shard):

- `events`: every event, MergeTree partitioned by month of its time and ordered by (project_id, ts): a
  question reads one project's time range. Each row carries the person and the session the ingesting node
  gave it (see `store`): a person is the first distinct id it was known by (an identify links a new id to
  an existing person, never moves events), a session is the client's session id or an inferred `$auto:` one.
- `event_ids` (materialized view of events): (project_id, uuid), ordered by them: the uuids a retried batch
  is checked against before it is inserted.
- `hourly` (AggregatingMergeTree, materialized view of events): per project, bot flag, UTC hour and event
  name, the events (`countState`) and the exact sets of persons and sessions (`uniqExactState`); states of
  several hours or names merge exactly (`uniqExactMerge`), so totals, series and top events over whole hours
  read no raw rows.
- `sessions` (AggregatingMergeTree, materialized view of events): per session its first and last time,
  events, page views, bot flag (of its first event), entry and exit page, referrer and UTM values of its first
  page view: bounce rate, duration and pages per session without a scan.
- `person_sessions` (AggregatingMergeTree, materialized view of the events without a client session id):
  per person and inferred session its first and last time: what ingest joins a keyless event to.
- `person_ids` (ReplacingMergeTree by `version`): distinct id -> person, one row per id, written once when the
  id is first seen (by an event or an identify), read with argMax(person, version) so that two nodes that
  raced on one id agree on the row merges keep.
- `person_traits` (ReplacingMergeTree by `seq`): per person and trait key each value an event set (its JSON,
  `null` when the event removed the key), `seq` rising in commit order: the newest is the trait now, as the
  SQLite store's json_patch of each event's traits into the person's leaves it.
- `person_names` (ReplacingMergeTree by `seq`): the distinct id a person is shown by when an identify named an
  anonymous person by a new id (the SQLite store renames the person); without a row, the person's own id.

The catalog (`projects`, `keys`, `shares`, `goals`: ReplacingMergeTree by `version`, a `deleted` flag, read
with argMax; `catalog_changes`: one row per change, its version; `salts`: the day's salt of ip hashes) lives
on the first shard only. In a cluster every table above has a Distributed table beside it (`NAME_all`); the
catalog's are sharded by the constant 0, which puts every row on the cluster's first shard whichever node
writes it, and reads it from there: one copy, so a change is seen by every node at its next poll and never
needs reconciling. Events are sharded by sipHash64(person), so a person's events, sessions and inferred
sessions are on one shard; person_ids by sipHash64(distinct_id). Writes go through the Distributed tables with
`insert_distributed_sync=1`: an insert returns once every shard has its rows.

ClickHouse 18.16 is the oldest server this is written for: no LowCardinality, DateTime64, TTL, codecs or
`ON CLUSTER` without ZooKeeper (the DDL runs on every shard instead). Replication (ReplicatedMergeTree) needs
ZooKeeper and is the operator's choice; without it a shard is one server.
"""

from __future__ import annotations

INFERRED_PREFIX = "$auto:"

EVENT_COLUMNS = (
    ("project_id", "UInt32"), ("ts", "Int64"), ("received", "Int64"), ("uuid", "FixedString(16)"),
    ("name", "String"), ("distinct_id", "String"), ("person", "String"), ("session", "String"),
    ("url", "String"), ("path", "String"), ("referrer", "String"), ("referrer_domain", "String"),
    ("utm_source", "String"), ("utm_medium", "String"), ("utm_campaign", "String"),
    ("props", "String"), ("traits", "String"), ("country", "String"), ("language", "String"),
    ("screen", "String"), ("browser", "String"), ("os", "String"), ("device", "String"), ("bot", "UInt8"),
    ("ip_hash", "FixedString(8)"), ("page", "UInt8"),
)
PERSON_ID_COLUMNS = (("project_id", "UInt32"), ("distinct_id", "String"), ("person", "String"), ("version", "UInt64"))
PERSON_TRAIT_COLUMNS = (("project_id", "UInt32"), ("person", "String"), ("key", "String"), ("value", "String"),
                        ("seq", "UInt64"))
PERSON_NAME_COLUMNS = (("project_id", "UInt32"), ("person", "String"), ("distinct_id", "String"), ("seq", "UInt64"))

_MONTH = "toYYYYMM(toDateTime(intDiv(ts, 1000)))"


def _columns(columns: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{name} {kind}" for name, kind in columns)


def shard_tables(db: str) -> list[str]:
    """The per-shard tables and their materialized views, in the order they are made."""
    return [
        f"CREATE TABLE IF NOT EXISTS {db}.events ({_columns(EVENT_COLUMNS)})"
        f" ENGINE = MergeTree PARTITION BY {_MONTH} ORDER BY (project_id, ts)",

        f"CREATE TABLE IF NOT EXISTS {db}.event_ids (project_id UInt32, uuid FixedString(16), ts Int64)"
        " ENGINE = MergeTree ORDER BY (project_id, uuid)",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.event_ids_mv TO {db}.event_ids"
        f" AS SELECT project_id, uuid, ts FROM {db}.events",

        f"CREATE TABLE IF NOT EXISTS {db}.hourly (project_id UInt32, bot UInt8, hour UInt32, name String,"
        " events AggregateFunction(count), users AggregateFunction(uniqExact, String),"
        " sessions AggregateFunction(uniqExact, String))"
        " ENGINE = AggregatingMergeTree PARTITION BY toYYYYMM(toDateTime(hour * 3600))"
        " ORDER BY (project_id, bot, hour, name)",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.hourly_mv TO {db}.hourly"
        " AS SELECT project_id, bot, toUInt32(intDiv(ts, 3600000)) AS hour, name, countState() AS events,"
        " uniqExactState(person) AS users, uniqExactState(session) AS sessions"
        f" FROM {db}.events GROUP BY project_id, bot, hour, name",

        f"CREATE TABLE IF NOT EXISTS {db}.sessions (project_id UInt32, session String,"
        " person AggregateFunction(any, String), first AggregateFunction(min, Int64),"
        " last AggregateFunction(max, Int64), events AggregateFunction(count),"
        " pageviews AggregateFunction(sum, UInt8), bot AggregateFunction(argMin, UInt8, Int64),"
        " entry AggregateFunction(argMinIf, String, Int64, UInt8),"
        " exit AggregateFunction(argMaxIf, String, Int64, UInt8),"
        " referrer AggregateFunction(argMinIf, String, Int64, UInt8),"
        " utm_source AggregateFunction(argMinIf, String, Int64, UInt8),"
        " utm_medium AggregateFunction(argMinIf, String, Int64, UInt8),"
        " utm_campaign AggregateFunction(argMinIf, String, Int64, UInt8))"
        " ENGINE = AggregatingMergeTree ORDER BY (project_id, session)",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.sessions_mv TO {db}.sessions"
        " AS SELECT project_id, session, anyState(person) AS person, minState(ts) AS first, maxState(ts) AS last,"
        " countState() AS events, sumState(page) AS pageviews, argMinState(bot, ts) AS bot,"
        " argMinIfState(path, ts, page) AS entry, argMaxIfState(path, ts, page) AS exit,"
        " argMinIfState(referrer_domain, ts, page) AS referrer, argMinIfState(utm_source, ts, page) AS utm_source,"
        " argMinIfState(utm_medium, ts, page) AS utm_medium, argMinIfState(utm_campaign, ts, page) AS utm_campaign"
        f" FROM {db}.events GROUP BY project_id, session",

        f"CREATE TABLE IF NOT EXISTS {db}.person_sessions (project_id UInt32, person String, session String,"
        " first AggregateFunction(min, Int64), last AggregateFunction(max, Int64))"
        " ENGINE = AggregatingMergeTree ORDER BY (project_id, person, session)",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.person_sessions_mv TO {db}.person_sessions"
        " AS SELECT project_id, person, session, minState(ts) AS first, maxState(ts) AS last"
        f" FROM {db}.events WHERE startsWith(session, '{INFERRED_PREFIX}') GROUP BY project_id, person, session",

        f"CREATE TABLE IF NOT EXISTS {db}.person_ids ({_columns(PERSON_ID_COLUMNS)})"
        " ENGINE = ReplacingMergeTree(version) ORDER BY (project_id, distinct_id)",

        f"CREATE TABLE IF NOT EXISTS {db}.person_traits ({_columns(PERSON_TRAIT_COLUMNS)})"
        " ENGINE = ReplacingMergeTree(seq) ORDER BY (project_id, person, key)",
        f"CREATE TABLE IF NOT EXISTS {db}.person_names ({_columns(PERSON_NAME_COLUMNS)})"
        " ENGINE = ReplacingMergeTree(seq) ORDER BY (project_id, person)",
    ]


def catalog_tables(db: str) -> list[str]:
    """The catalog's tables: made on every shard (so the Distributed tables over them resolve everywhere),
    written and read on the first shard only."""
    return [
        f"CREATE TABLE IF NOT EXISTS {db}.projects (id UInt32, name String, domain String, timezone String,"
        " retention_days UInt32, created_at Int64, allowed_origins String, site_id String, deleted UInt8,"
        " version UInt64) ENGINE = ReplacingMergeTree(version) ORDER BY id",
        f"CREATE TABLE IF NOT EXISTS {db}.keys (digest FixedString(32), project_id UInt32, kind String,"
        " prefix String, created_at Int64, expires_at Int64, deleted UInt8, version UInt64)"
        " ENGINE = ReplacingMergeTree(version) ORDER BY digest",
        f"CREATE TABLE IF NOT EXISTS {db}.shares (digest FixedString(32), id UInt64, project_id UInt32,"
        " prefix String, created_at Int64, expires_at Int64, deleted UInt8, version UInt64)"
        " ENGINE = ReplacingMergeTree(version) ORDER BY digest",
        f"CREATE TABLE IF NOT EXISTS {db}.goals (project_id UInt32, goal String, created_at Int64, deleted UInt8,"
        " version UInt64) ENGINE = ReplacingMergeTree(version) ORDER BY (project_id, goal)",
        f"CREATE TABLE IF NOT EXISTS {db}.catalog_changes (version UInt64) ENGINE = MergeTree ORDER BY version",
        f"CREATE TABLE IF NOT EXISTS {db}.salts (day UInt32, salt FixedString(16), created Int64)"
        " ENGINE = MergeTree ORDER BY day",
    ]


# Distributed tables of a cluster: the table, and its sharding key
SHARDED = {"events": "sipHash64(person)", "event_ids": None, "hourly": None, "sessions": None,
           "person_sessions": None, "person_ids": "sipHash64(distinct_id)", "person_traits": "sipHash64(person)",
           "person_names": "sipHash64(person)"}
CATALOG = ("projects", "keys", "shares", "goals", "catalog_changes", "salts")
FIRST_SHARD = "0"  # a constant sharding key: every row on the cluster's first shard


def distributed_tables(db: str, cluster: str) -> list[str]:
    """`NAME_all` over NAME on every shard of `cluster`; tables written only by materialized views get
    a random key, never used."""
    statements = []
    for table, key in [*SHARDED.items(), *((name, FIRST_SHARD) for name in CATALOG)]:
        statements.append(f"CREATE TABLE IF NOT EXISTS {db}.{table}_all AS {db}.{table}"
                          f" ENGINE = Distributed({cluster}, {db}, {table}, {key or 'rand()'})")
    return statements


LIVE_COLUMNS = (
    ("committed", "Int64"), ("node", "String"), ("project_id", "UInt32"), ("uuid", "FixedString(16)"),
    ("ts", "Int64"), ("name", "String"), ("distinct_id", "String"), ("path", "String"), ("props", "String"),
    ("user_agent", "String"),
)


def ops_tables(db: str, cluster: str | None) -> list[str]:
    """Made after every other table (existing stores gain them at their next connect):

    - `live` (per shard): what the live feed of every node needs of each committed event, stamped with the
      committing node and its commit time, partitioned by day of that time, ordered by it; a node reads the
      other nodes' rows after the last it saw (see `live`), and its days before yesterday are dropped.
    - `pruned` (catalog, first shard): per project the time before which `prune` deleted raw events, read
      with max(); `verify` compares rollups with raw events only after it.
    """
    statements = [
        f"CREATE TABLE IF NOT EXISTS {db}.live ({_columns(LIVE_COLUMNS)}) ENGINE = MergeTree"
        " PARTITION BY toYYYYMMDD(toDateTime(intDiv(committed, 1000))) ORDER BY committed",
        f"CREATE TABLE IF NOT EXISTS {db}.pruned (project_id UInt32, before Int64)"
        " ENGINE = ReplacingMergeTree(before) ORDER BY project_id",
    ]
    if cluster is not None:
        statements += [
            f"CREATE TABLE IF NOT EXISTS {db}.live_all AS {db}.live"
            f" ENGINE = Distributed({cluster}, {db}, live, rand())",
            f"CREATE TABLE IF NOT EXISTS {db}.pruned_all AS {db}.pruned"
            f" ENGINE = Distributed({cluster}, {db}, pruned, {FIRST_SHARD})",
        ]
    return statements


def period_tables(db: str, cluster: str | None) -> list[str]:
    """Made after every other table: what overviews, series and session questions read instead of merging the
    per-name hourly states of a whole month or grouping every session the project ever had (see `periods`).

    - `people_hourly`, `people_daily` (AggregatingMergeTree, materialized views of events): per project, bot
      flag and UTC hour or day, the exact sets of persons and sessions over every event name (`hourly` keeps
      them per name: a month of them merged holds each person once per hour and name it was seen in).
    - `session_starts` (MergeTree, materialized view of events): per session the UTC hour of its earliest
      event in each insert, ordered by (project_id, hour): a session that started in a window has a row in
      the window's hours, so session questions group only those sessions instead of the whole `sessions`
      table.
    - `backfills`: one row per shard once the tables above hold what was stored before they existed (see
      `periods.backfill`).
    """
    statements = [
        f"CREATE TABLE IF NOT EXISTS {db}.people_hourly (project_id UInt32, bot UInt8, hour UInt32,"
        " users AggregateFunction(uniqExact, String), sessions AggregateFunction(uniqExact, String))"
        " ENGINE = AggregatingMergeTree PARTITION BY toYYYYMM(toDateTime(hour * 3600))"
        " ORDER BY (project_id, bot, hour)",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.people_hourly_mv TO {db}.people_hourly"
        " AS SELECT project_id, bot, toUInt32(intDiv(ts, 3600000)) AS hour, uniqExactState(person) AS users,"
        f" uniqExactState(session) AS sessions FROM {db}.events GROUP BY project_id, bot, hour",
        f"CREATE TABLE IF NOT EXISTS {db}.people_daily (project_id UInt32, bot UInt8, day UInt32,"
        " users AggregateFunction(uniqExact, String), sessions AggregateFunction(uniqExact, String))"
        " ENGINE = AggregatingMergeTree PARTITION BY toYYYYMM(toDateTime(day * 86400))"
        " ORDER BY (project_id, bot, day)",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.people_daily_mv TO {db}.people_daily"
        " AS SELECT project_id, bot, toUInt32(intDiv(ts, 86400000)) AS day, uniqExactState(person) AS users,"
        f" uniqExactState(session) AS sessions FROM {db}.events GROUP BY project_id, bot, day",
        f"CREATE TABLE IF NOT EXISTS {db}.session_starts (project_id UInt32, hour UInt32, session String)"
        " ENGINE = MergeTree PARTITION BY toYYYYMM(toDateTime(hour * 3600)) ORDER BY (project_id, hour)",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.session_starts_mv TO {db}.session_starts"
        " AS SELECT project_id, toUInt32(intDiv(min(ts), 3600000)) AS hour, session"
        f" FROM {db}.events GROUP BY project_id, session",
        f"CREATE TABLE IF NOT EXISTS {db}.backfills (name String, done Int64) ENGINE = MergeTree ORDER BY name",
    ]
    if cluster is not None:
        statements += [f"CREATE TABLE IF NOT EXISTS {db}.{table}_all AS {db}.{table}"
                       f" ENGINE = Distributed({cluster}, {db}, {table}, rand())"
                       for table in ("people_hourly", "people_daily", "session_starts")]
    return statements


def create_statements(db: str, cluster: str | None) -> list[str]:
    statements = [f"CREATE DATABASE IF NOT EXISTS {db}", *shard_tables(db), *catalog_tables(db)]
    if cluster is not None:
        statements += distributed_tables(db, cluster)
    return statements + ops_tables(db, cluster) + period_tables(db, cluster)
