"""Share links: tokens that read one project's dashboard aggregates and nothing else (`pulse share`).

A share token is shown once, at creation, and stored as its SHA-256 digest like a key; the keyring loads it
with the keys (`load_grants`, kind SHARE) and the server decides what that kind may read. Revoking deletes the
row and bumps the catalog version, so a running server stops honouring the token within a poll.
"""

from __future__ import annotations

import secrets

import apsw

from pulse.storage.model import SHARE, KeyGrant, Project, ProjectError, digest, now_ms
from pulse.storage.sqlite.connection import immediate
from pulse.storage.sqlite.projects import bump_catalog

TOKEN_PREFIX = "sh_"
PREFIX_CHARS = 9  # what `pulse share list` shows of a token and `revoke` accepts: "sh_" and six characters


def create_share(conn: apsw.Connection, project: Project, *, expires_in_s: int | None = None) -> tuple[dict, str]:
    """A new share token of the project; returns its row (as `list_shares` gives it) and the secret."""
    if expires_in_s is not None and expires_in_s <= 0:
        raise ProjectError("a share link's lifetime must be positive")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(24)
    created = now_ms()
    expires = None if expires_in_s is None else created + expires_in_s * 1000
    with immediate(conn):
        conn.execute("INSERT INTO shares(project_id, digest, prefix, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                     (project.id, digest(secret), secret[:PREFIX_CHARS], created, expires))
        share_id = conn.last_insert_rowid()
        bump_catalog(conn)
    return _row(share_id, secret[:PREFIX_CHARS], created, expires, created), secret


def _row(share_id: int, prefix: str, created: int, expires: int | None, now: int) -> dict[str, object]:
    return {"id": share_id, "prefix": prefix + "…", "created_at": created, "expires_at": expires,
            "active": expires is None or expires > now}


def list_shares(conn: apsw.Connection, project: Project) -> list[dict[str, object]]:
    now = now_ms()
    return [_row(*row, now) for row in conn.execute(
        "SELECT id, prefix, created_at, expires_at FROM shares WHERE project_id = ? ORDER BY id", (project.id,))]


def revoke_share(conn: apsw.Connection, project: Project, ref: str) -> dict[str, object]:
    """Delete one share token, named by its id, its prefix (as listed, the … optional) or the whole token."""
    ref = ref.strip().rstrip("…")
    with immediate(conn):
        if ref.isdigit():
            found = list(conn.execute("SELECT id, prefix, created_at, expires_at FROM shares"
                                      " WHERE project_id = ? AND id = ?", (project.id, int(ref))))
        elif len(ref) > PREFIX_CHARS:
            found = list(conn.execute("SELECT id, prefix, created_at, expires_at FROM shares"
                                      " WHERE project_id = ? AND digest = ?", (project.id, digest(ref))))
        else:
            found = list(conn.execute("SELECT id, prefix, created_at, expires_at FROM shares"
                                      " WHERE project_id = ? AND prefix = ?", (project.id, ref)))
        if not found:
            raise ProjectError(f"project {project.name} has no share link {ref!r} (see pulse share list)")
        if len(found) > 1:
            raise ProjectError(f"{ref!r} names {len(found)} share links of project {project.name}; give the id")
        conn.execute("DELETE FROM shares WHERE id = ?", (found[0][0],))
        bump_catalog(conn)
    return _row(*found[0], now_ms())


def load_grants(conn: apsw.Connection) -> dict[bytes, KeyGrant]:
    """Every share token's grant, by digest, beside the keys' (`projects.load_grants`)."""
    return {token_digest: KeyGrant(project_id, SHARE, expires)
            for token_digest, project_id, expires in conn.execute("SELECT digest, project_id, expires_at FROM shares")}
