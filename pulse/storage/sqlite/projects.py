"""Projects and their keys. Secrets are returned once, at creation or rotation, and stored as digests."""

from __future__ import annotations

import re
import secrets
import uuid
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import apsw

from pulse.storage.model import INGEST, READ, KeyGrant, Project, ProjectError, ProjectNotFound, digest, now_ms
from pulse.storage.sqlite.connection import immediate

KEY_PREFIX = {INGEST: "pk_", READ: "sk_"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(:\d{1,5})?$")


def new_secret(kind: str) -> str:
    return KEY_PREFIX[kind] + secrets.token_urlsafe(18 if kind == INGEST else 24)


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ProjectError(f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin)") from None
    return name


def check_domain(domain: str | None) -> str | None:
    if domain is None or domain == "":
        return None
    domain = domain.strip().lower()
    if domain.startswith(("http://", "https://")):
        domain = domain.split("://", 1)[1].rstrip("/")
    if not _DOMAIN_RE.match(domain):
        raise ProjectError(f"invalid domain {domain!r} (expected a host name such as example.com)")
    return domain


def check_origins(raw: str | None) -> str | None:
    """Hosts, separated by spaces or commas ("example.com app.example.org"); "" or None: any origin."""
    if raw is None:
        return None
    hosts = [h.strip().lower() for h in raw.replace(",", " ").split() if h.strip()]
    for host in hosts:
        if "://" in host or "/" in host or not all(part for part in host.split(".")):
            raise ProjectError(f"allowed origins: {host!r} is not a host name (like example.com)")
    return " ".join(hosts) or None


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ProjectError(
            f"invalid project name {name!r}: 1-64 characters, letters, digits, space, dot, dash, underscore"
        )
    if name.isdigit():
        raise ProjectError("a project name cannot be only digits (digits refer to project ids)")
    return name


def bump_catalog(conn: apsw.Connection) -> None:
    """Tell a running server that projects or keys changed (it polls this counter)."""
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'catalog'")


def catalog_version(conn: apsw.Connection) -> int:
    return conn.execute("SELECT value FROM meta WHERE key = 'catalog'").fetchone()[0]


def _row_to_project(row: tuple) -> Project:
    return Project(*row)


_PROJECT_COLUMNS = "id, name, domain, timezone, retention_days, created_at, allowed_origins, site_id"


def list_projects(conn: apsw.Connection) -> list[Project]:
    return [_row_to_project(r) for r in conn.execute(f"SELECT {_PROJECT_COLUMNS} FROM projects ORDER BY id")]


def get_project(conn: apsw.Connection, ref: str | int) -> Project:
    """A project by id or by name."""
    if isinstance(ref, int) or str(ref).isdigit():
        row = conn.execute(f"SELECT {_PROJECT_COLUMNS} FROM projects WHERE id = ?", (int(ref),)).fetchone()
    else:
        row = conn.execute(f"SELECT {_PROJECT_COLUMNS} FROM projects WHERE name = ?", (ref,)).fetchone()
    if row is None:
        raise ProjectNotFound(f"no project {ref!r}")
    return _row_to_project(row)


def _insert_key(conn: apsw.Connection, project_id: int, kind: str) -> str:
    secret = new_secret(kind)
    conn.execute(
        "INSERT INTO keys(project_id, kind, digest, prefix, created_at) VALUES (?, ?, ?, ?, ?)",
        (project_id, kind, digest(secret), secret[:7], now_ms()),
    )
    return secret


def create_project(
    conn: apsw.Connection,
    name: str,
    *,
    domain: str | None = None,
    timezone: str = "UTC",
    retention_days: int = 180,
    allowed_origins: str | None = None,
) -> tuple[Project, str, str]:
    """Create a project with one ingest key and one read token; returns both secrets."""
    checked = checked_changes(name=name, domain=domain, timezone=timezone, retention_days=retention_days,
                              allowed_origins=allowed_origins)
    domain, allowed_origins = checked.get("domain"), checked.get("allowed_origins")
    with immediate(conn):
        if conn.execute("SELECT 1 FROM projects WHERE name = ?", (name,)).fetchone():
            raise ProjectError(f"a project named {name!r} already exists")
        # ids are never reused, so nothing cached about a deleted project can be taken for a new one's
        project_id = conn.execute(
            "SELECT max(coalesce((SELECT max(id) FROM projects), 0),"
            " coalesce((SELECT value FROM meta WHERE key = 'last_project_id'), 0)) + 1").fetchone()[0]
        conn.execute(
            "INSERT INTO projects(id, name, domain, timezone, retention_days, created_at, allowed_origins, site_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (project_id, name, domain, timezone, retention_days, now_ms(), allowed_origins, str(uuid.uuid4())),
        )
        conn.execute("INSERT INTO meta(key, value) VALUES ('last_project_id', ?)"
                     " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (project_id,))
        ingest_key = _insert_key(conn, project_id, INGEST)
        read_token = _insert_key(conn, project_id, READ)
        bump_catalog(conn)
    return get_project(conn, project_id), ingest_key, read_token


def checked_changes(*, name: str | None, domain: str | None, timezone: str | None, retention_days: int | None,
                    allowed_origins: str | None) -> dict[str, object]:
    """The project's columns an update changes (those given), each checked; ProjectError for a bad one."""
    changes: dict[str, object] = {}
    if allowed_origins is not None:
        changes["allowed_origins"] = check_origins(allowed_origins)
    if name is not None:
        changes["name"] = _check_name(name)
    if domain is not None:
        changes["domain"] = check_domain(domain)
    if timezone is not None:
        changes["timezone"] = check_timezone(timezone)
    if retention_days is not None:
        if retention_days < 1:
            raise ProjectError("retention must be at least 1 day")
        changes["retention_days"] = retention_days
    return changes


def update_project(
    conn: apsw.Connection,
    project: Project,
    *,
    name: str | None = None,
    domain: str | None = None,
    timezone: str | None = None,
    retention_days: int | None = None,
    allowed_origins: str | None = None,
) -> Project:
    changes = checked_changes(name=name, domain=domain, timezone=timezone, retention_days=retention_days,
                              allowed_origins=allowed_origins)
    if changes:
        assignments = ", ".join(f"{column} = ?" for column in changes)
        with immediate(conn):
            try:
                conn.execute(f"UPDATE projects SET {assignments} WHERE id = ?", (*changes.values(), project.id))
            except apsw.ConstraintError:
                raise ProjectError(f"a project named {name!r} already exists") from None
            bump_catalog(conn)
    return get_project(conn, project.id)


PROJECT_DATA_TABLES = ("events", "hourly", "hourly_dims", "sessions", "session_days", "person_ids", "persons")


def delete_project(conn: apsw.Connection, project: Project) -> None:
    """Delete a project, its keys and all its data.

    Batches for it that the server's writer has not committed yet are refused, not written: the writer
    looks the project up in its own transaction, which waits for this one.
    """
    with immediate(conn):
        for table in PROJECT_DATA_TABLES:
            conn.execute(f"DELETE FROM {table} WHERE project_id = ?", (project.id,))
        conn.execute("DELETE FROM meta WHERE key IN (?, ?)", (f"pruned_before:{project.id}", f"traits:{project.id}"))
        conn.execute("DELETE FROM projects WHERE id = ?", (project.id,))
        bump_catalog(conn)


def rotate_key(conn: apsw.Connection, project: Project, kind: str, *, grace_seconds: int = 0) -> str:
    """A new key of `kind`; the old ones stop working now, or after the grace period."""
    if kind not in KEY_PREFIX:
        raise ProjectError(f"unknown key kind {kind!r}")
    if grace_seconds < 0:
        raise ProjectError("grace period cannot be negative")
    now = now_ms()
    expires = now + grace_seconds * 1000
    with immediate(conn):
        if grace_seconds == 0:
            conn.execute("DELETE FROM keys WHERE project_id = ? AND kind = ?", (project.id, kind))
        else:
            conn.execute(
                "UPDATE keys SET expires_at = min(coalesce(expires_at, ?), ?) WHERE project_id = ? AND kind = ?",
                (expires, expires, project.id, kind),
            )
            conn.execute("DELETE FROM keys WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
        secret = _insert_key(conn, project.id, kind)
        bump_catalog(conn)
    return secret


def list_keys(conn: apsw.Connection, project: Project) -> list[dict[str, object]]:
    rows = conn.execute(
        "SELECT kind, prefix, created_at, expires_at FROM keys WHERE project_id = ? ORDER BY kind, created_at",
        (project.id,),
    )
    now = now_ms()
    return [
        {"kind": kind, "prefix": prefix + "…", "created_at": created, "expires_at": expires,
         "active": expires is None or expires > now}
        for kind, prefix, created, expires in rows
    ]


def load_grants(conn: apsw.Connection) -> dict[bytes, KeyGrant]:
    """Every key, by digest: the server keeps these in memory and reloads them when the catalog changes."""
    return {
        key_digest: KeyGrant(project_id, kind, expires)
        for key_digest, project_id, kind, expires in conn.execute(
            "SELECT digest, project_id, kind, expires_at FROM keys"
        )
    }
