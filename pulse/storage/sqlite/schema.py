"""Numbered migrations on PRAGMA user_version, each applied in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import apsw

from pulse.storage.model import SchemaTooNew

MIGRATIONS: list[str | Callable[[apsw.Connection], None]] = [
    # 1: the first schema
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO meta(key, value) VALUES ('catalog', 0);

    CREATE TABLE projects (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        domain TEXT,
        timezone TEXT NOT NULL DEFAULT 'UTC',
        retention_days INTEGER NOT NULL DEFAULT 180,
        created_at INTEGER NOT NULL
    );

    -- secrets are stored as SHA-256 digests; `prefix` is the first characters, for listing
    CREATE TABLE keys (
        id INTEGER PRIMARY KEY,
        project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('ingest', 'read')),
        digest BLOB NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER
    );
    CREATE INDEX keys_project ON keys(project_id);

    -- interned strings: event names, URLs, paths, referrers, UTM values
    CREATE TABLE strings (
        id INTEGER PRIMARY KEY,
        value TEXT NOT NULL UNIQUE
    );

    CREATE TABLE agents (
        id INTEGER PRIMARY KEY,
        ua TEXT NOT NULL UNIQUE,
        browser TEXT NOT NULL,
        os TEXT NOT NULL,
        device TEXT NOT NULL,
        is_bot INTEGER NOT NULL
    );

    CREATE TABLE persons (
        id INTEGER PRIMARY KEY,
        project_id INTEGER NOT NULL,
        distinct_id TEXT NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        event_count INTEGER NOT NULL DEFAULT 0,
        traits TEXT
    );
    CREATE INDEX persons_project ON persons(project_id, last_seen);

    -- every distinct_id ever seen, mapped to its person (identify links several ids to one)
    CREATE TABLE person_ids (
        project_id INTEGER NOT NULL,
        distinct_id TEXT NOT NULL,
        person_id INTEGER NOT NULL,
        PRIMARY KEY (project_id, distinct_id)
    ) WITHOUT ROWID;

    CREATE TABLE sessions (
        id INTEGER PRIMARY KEY,
        project_id INTEGER NOT NULL,
        session_key TEXT NOT NULL,
        person_id INTEGER NOT NULL,
        first_ts INTEGER NOT NULL,
        last_ts INTEGER NOT NULL,
        events INTEGER NOT NULL DEFAULT 0,
        pageviews INTEGER NOT NULL DEFAULT 0,
        entry_ts INTEGER,
        entry_path_id INTEGER,
        exit_ts INTEGER,
        exit_path_id INTEGER,
        referrer_id INTEGER,
        utm_source_id INTEGER,
        utm_medium_id INTEGER,
        utm_campaign_id INTEGER,
        agent_id INTEGER,
        UNIQUE (project_id, session_key)
    );
    CREATE INDEX sessions_project_first ON sessions(project_id, first_ts);

    -- raw events, append-only; ts and received are epoch milliseconds
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        project_id INTEGER NOT NULL,
        uuid BLOB NOT NULL,
        ts INTEGER NOT NULL,
        received INTEGER NOT NULL,
        name_id INTEGER NOT NULL,
        person_id INTEGER NOT NULL,
        session_id INTEGER,
        url_id INTEGER,
        path_id INTEGER,
        referrer_id INTEGER,
        referrer_domain_id INTEGER,
        agent_id INTEGER,
        ip_hash BLOB,
        props TEXT
    );
    CREATE UNIQUE INDEX events_uuid ON events(project_id, uuid);
    CREATE INDEX events_ts ON events(project_id, ts);

    -- hourly rollups; name_id 0 is every event of the hour. user_set and session_set are serialized
    -- roaring bitmaps of person and session ids. A key may have several rows (one per commit until the
    -- writer compacts them): their sets are disjoint, so events, users and sessions add up exactly,
    -- and the union of the sets over any range of hours gives exact unique counts
    CREATE TABLE hourly (
        project_id INTEGER NOT NULL,
        hour INTEGER NOT NULL,
        name_id INTEGER NOT NULL,
        bot INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        events INTEGER NOT NULL,
        users INTEGER NOT NULL,
        sessions INTEGER NOT NULL,
        user_set BLOB NOT NULL,
        session_set BLOB NOT NULL,
        PRIMARY KEY (project_id, hour, name_id, bot, seq)
    ) WITHOUT ROWID;

    -- the daily salt of the IP hash; deleted once its day is over
    CREATE TABLE salts (
        day INTEGER PRIMARY KEY,
        salt BLOB NOT NULL
    );
    """,
]


_HOURLY_DIMS = """
CREATE TABLE hourly_dims (
    project_id INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    hour INTEGER NOT NULL,
    value_id INTEGER NOT NULL,
    bot INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    events INTEGER NOT NULL,
    users INTEGER NOT NULL,
    user_set BLOB NOT NULL,
    PRIMARY KEY (project_id, dim, hour, value_id, bot, seq)
) WITHOUT ROWID;
"""


def _hourly_dims(conn: apsw.Connection) -> None:
    """2: per-hour rollups by dimension, so breakdowns need no raw scan: dim 1 is the user agent (browser,
    OS and device follow from it) over every event, dim 2 the path of page views. Rows of a key are
    disjoint, like hourly's. Events stored before this migration are rolled up here, once."""
    from pyroaring import BitMap

    conn.execute(_HOURLY_DIMS)
    groups: dict[tuple[int, int, int, int, int], list] = {}
    page_view = conn.execute("SELECT id FROM strings WHERE value = 'page_view'").fetchone()
    for project_id, hour, agent_id, bot, person_id, path_id, name_id in conn.execute(
        "SELECT e.project_id, e.ts / 3600000, e.agent_id, coalesce(a.is_bot, 0), e.person_id, e.path_id, e.name_id"
        " FROM events e LEFT JOIN agents a ON a.id = e.agent_id"
    ):
        keys = [(project_id, 1, hour, agent_id, bot)]
        if page_view is not None and name_id == page_view[0] and path_id is not None:
            keys.append((project_id, 2, hour, path_id, bot))
        for key in keys:
            group = groups.get(key)
            if group is None:
                group = groups[key] = [0, []]
            group[0] += 1
            group[1].append(person_id)
    rows = []
    for key, (count, people) in groups.items():
        users = BitMap(people)
        rows.append((*key, 0, count, len(users), users.serialize()))
    conn.executemany("INSERT INTO hourly_dims VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


MIGRATIONS.append(_hourly_dims)

# 3: hosts whose pages may send a project events (NULL: any)
MIGRATIONS.append("ALTER TABLE projects ADD COLUMN allowed_origins TEXT;")

# 4: events per rollup row without its sets, for the readers' day cache (sums read from the index alone)
MIGRATIONS.append("CREATE INDEX IF NOT EXISTS hourly_events ON hourly(project_id, name_id, bot, hour, events);")

# 5: per project and UTC day of a session's start, the commit that last changed a session starting then;
# readers keep their per-day session aggregates while it is unchanged. The highest event id stands for
# every commit before this migration (the writer's later commits are numbered above it).
MIGRATIONS.append("""
CREATE TABLE session_days (
    project_id INTEGER NOT NULL,
    day INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    PRIMARY KEY (project_id, day)
) WITHOUT ROWID;
INSERT INTO session_days(project_id, day, generation)
    SELECT project_id, first_ts / 86400000, (SELECT coalesce(max(id), 0) FROM events) FROM sessions GROUP BY 1, 2;
""")

# 6: the highest event id whose session and person changes are written; the writer keeps those of later
# events in memory and rebuilds them from the events after a crash. Every earlier commit wrote them.
MIGRATIONS.append(
    "INSERT OR IGNORE INTO meta(key, value) SELECT 'derived_through', coalesce(max(id), 0) FROM events;"
)

# 7: the sessions the writer infers for events without a session id, by person: it finds a person's
# current one here when its cache does not hold it (identities.py); partial, so no other session pays for it
MIGRATIONS.append(
    "CREATE INDEX IF NOT EXISTS sessions_inferred ON sessions(project_id, person_id) WHERE session_key GLOB '$auto:*';"
)


def _site_ids(conn: apsw.Connection) -> None:
    """8: every project's site id, a UUID that names it to trackers that send one rather than a key (Umami's
    `website`); existing projects get theirs here. The column may be there already when an older schema
    number was set over a newer database: it is then only filled where empty."""

    if not any(column[1] == "site_id" for column in conn.execute("PRAGMA table_info(projects)")):
        conn.execute("ALTER TABLE projects ADD COLUMN site_id TEXT")
    for (project_id,) in list(conn.execute("SELECT id FROM projects WHERE site_id IS NULL")):
        conn.execute("UPDATE projects SET site_id = ? WHERE id = ?", (str(uuid.uuid4()), project_id))
    conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS projects_site_id ON projects(site_id)")


MIGRATIONS.append(_site_ids)

# 9: the goals an operator declares per project (`pulse goals add`): page-view paths, and event names that
# are listed even before they happen
MIGRATIONS.append("""
CREATE TABLE IF NOT EXISTS goals (
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    goal TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, goal)
) WITHOUT ROWID;
""")


def _visitor_dimensions(conn: apsw.Connection) -> None:
    """10: the visitor's country (from the IP at ingest), the browser's base language and the screen class of
    each event, as ids of interned strings; events stored before have none (NULL) and are left out of their
    breakdowns and rollups (hourly_dims dims 3, 4, 5). Like 8, a column already there is left as it is."""
    present = {column[1] for column in conn.execute("PRAGMA table_info(events)")}
    for column in ("country_id", "language_id", "screen_id"):
        if column not in present:
            conn.execute(f"ALTER TABLE events ADD COLUMN {column} INTEGER")


MIGRATIONS.append(_visitor_dimensions)

# 11: share links: tokens that read one project's dashboard aggregates (`pulse share create`), kept as digests
# like keys; `prefix` names one to the operator (`pulse share list`, `revoke`)
MIGRATIONS.append("""
CREATE TABLE IF NOT EXISTS shares (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    digest BLOB NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);
""")


def _row_marks(conn: apsw.Connection) -> None:
    """12: each session's and person's mark, the last event whose changes to it are written (the writer writes a
    busy site's sessions and persons in slices, some before others: see write_behind), and `rows_through`, the
    last event whose session and person changes are all written. Every row starts at 0 (it holds none of the
    events after derived_through, which every earlier writer wrote whole), and rows_through at derived_through."""
    for table in ("sessions", "persons"):
        if not any(column[1] == "derived_through" for column in conn.execute(f"PRAGMA table_info({table})")):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN derived_through INTEGER NOT NULL DEFAULT 0")
    conn.execute("INSERT OR IGNORE INTO meta(key, value) SELECT 'rows_through', value FROM meta"
                 " WHERE key = 'derived_through'")


MIGRATIONS.append(_row_marks)


def current_version(conn: apsw.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: apsw.Connection) -> int:
    """Bring the database up to the newest schema; refuse one newer than this code."""
    version = current_version(conn)
    if version > len(MIGRATIONS):
        raise SchemaTooNew(
            f"database schema version {version} is newer than this pulse ({len(MIGRATIONS)}); upgrade pulse"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if callable(script):
                script(conn)
            else:
                conn.execute(script)
            conn.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return len(MIGRATIONS)
