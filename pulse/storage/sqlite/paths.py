"""Paths: from a starting event or page, the steps sessions took next, as a tree of counts and drop-offs.

Only the sessions that hold the starting step in the window (under the filters) are read, in one bulk scan of
the columns a path needs. Each session is followed from its first starting step, in time order, through its
next steps in the window; a step repeated right after itself (a reload) counts once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from pulse.protocol import PathNode
from pulse.storage.model import PAGE_VIEW, Filters, Window
from pulse.storage.sqlite.day_cache import Snapshot
from pulse.storage.sqlite.scans import scan_sql, strings


def step_name(name: str, path: str | None) -> str:
    """What a path calls an event: `page_view:/path` for a page view, else its name."""
    return f"{name}:{path}" if name == PAGE_VIEW and path is not None else name


class _Node:
    __slots__ = ("sessions", "dropped", "other", "next")

    def __init__(self) -> None:
        self.sessions = self.dropped = self.other = 0
        self.next: dict[str, _Node] = {}


def _answer(step: str, node: _Node, limit: int) -> PathNode:
    """The node with its `limit` most taken next steps (then by name); sessions to the others add to `other`."""
    ranked = sorted(node.next.items(), key=lambda item: (-item[1].sessions, item[0]))
    other = node.other + sum(child.sessions for _, child in ranked[limit:])
    return PathNode(step=step, sessions=node.sessions, dropped=node.dropped, other=other,
                    next=[_answer(name, child, limit) for name, child in ranked[:limit]])


def paths(snap: Snapshot, project_id: int, window: Window, filters: Filters, start: tuple[str, str | None],
          label: str, depth: int, limit: int) -> PathNode:
    """The tree of the steps after `start` ((event, path or None for any)), shown as `label`, up to `depth` steps
    deep and `limit` next steps per step, over the window's events that match the filters."""
    source, where, params = scan_sql(snap, project_id, window.start, window.end, filters)
    name, path = start
    starts = f"e.name_id = (SELECT id FROM strings WHERE value = ?)"
    start_params: list = [name]
    if path is not None:
        starts += " AND e.path_id = (SELECT id FROM strings WHERE value = ?)"
        start_params.append(path)
    sessions: dict[int, list[tuple[int, int, int, int | None]]] = defaultdict(list)
    for session_id, ts, event_id, name_id, path_id in snap.conn.execute(
        f"SELECT e.session_id, e.ts, e.id, e.name_id, e.path_id {source} WHERE {where} AND e.session_id IN"
        f" (SELECT e.session_id {source} WHERE {where} AND {starts})",
        [*params, *params, *start_params],
    ):
        sessions[session_id].append((ts, event_id, name_id, path_id))
    named = strings(snap, {row[2] for rows in sessions.values() for row in rows}
                    | {row[3] for rows in sessions.values() for row in rows if row[3] is not None})
    root = _Node()
    for rows in sessions.values():
        rows.sort()
        add_session(root, ((named[name_id], None if path_id is None else named[path_id])
                           for _, _, name_id, path_id in rows), name, path, depth)
    return _answer(label, root, limit)


def add_session(root: _Node, events: Iterable[tuple[str, str | None]], name: str, path: str | None,
                depth: int) -> None:
    """Count one session into the tree: its (event name, path) pairs in time order, walked from the first start
    event (`name`, and `path` when given), immediate repeats collapsed, at most `depth` steps on."""
    steps: list[str] = []
    for event_name, event_path in events:
        if not steps:
            if event_name == name and (path is None or event_path == path):
                steps.append(step_name(event_name, event_path))
            continue
        step = step_name(event_name, event_path)
        if step != steps[-1]:
            steps.append(step)
        if len(steps) > depth + 1:
            break
    node = root
    node.sessions += 1
    for taken, step in enumerate(steps[1:], start=1):
        if taken > depth:
            node.other += 1
            break
        node = node.next.setdefault(step, _Node())
        node.sessions += 1
    else:
        node.dropped += 1
