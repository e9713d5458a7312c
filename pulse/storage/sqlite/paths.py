"""Paths: from a starting event or page, the steps sessions took next, as a tree of counts and drop-offs.

Only the sessions that hold the starting step in the window (under the filters) are read, in one bulk scan of
the columns a path needs. Each session is followed from its first starting step, in time order, through its
next steps in the window; a step repeated right after itself (a reload) counts once.

When the server keeps event columns, the same is worked out on arrays: the sessions with a start event among the
window's events that match the filters, their events sorted by (session, ts, id), cut before each session's
first start event, repeats collapsed and cut after `depth` + 1 steps; then each level of the tree is the distinct
(parent, step) pairs of the sessions that reached it, and only the nodes shown are made.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from pulse.protocol import PathNode
from pulse.storage.model import PAGE_VIEW, Filters, Window
from pulse.storage.sqlite import column_scans
from pulse.storage.sqlite.connection import checkpoint
from pulse.storage.sqlite.day_cache import Snapshot
from pulse.storage.sqlite.funnels import picked
from pulse.storage.sqlite.lookups import string_ids
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
    found = column_scans.matched(snap, project_id, window.start, window.end, filters)
    if found is not None:
        return _from_columns(snap, found, start, label, depth, limit)
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


# -- from the event columns ----------------------------------------------------------------------------------------

_PATH_BITS = 32  # a step as one integer: its name id << _PATH_BITS | its path id (page views only)


def _step_keys(snap: Snapshot, names: np.ndarray, paths: np.ndarray, page_view: int) -> np.ndarray:
    """Each event's step as one integer, equal for two events exactly when `step_name` names them alike (an
    event named like `page_view:/path` is that page's view)."""
    distinct = np.flatnonzero(np.bincount(names)).tolist()
    names = names.astype(np.int64)
    keys = (names << _PATH_BITS) | np.where(names == page_view, paths, 0)
    named = strings(snap, distinct)
    prefix = f"{PAGE_VIEW}:"
    lookalikes = {name_id: text[len(prefix):] for name_id, text in named.items()
                  if name_id != page_view and text.startswith(prefix)}
    if lookalikes and page_view > 0:
        path_ids = string_ids(snap, list(set(lookalikes.values())))
        for name_id, path in lookalikes.items():
            if path in path_ids:
                keys[names == name_id] = page_view << _PATH_BITS | path_ids[path]
    return keys


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """The stable sort order of non-negative keys below 2**32, in radix passes of 16 bits (linear time)."""
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    if len(keys) and int(keys.max()) > 0xFFFF:
        order = order[np.argsort((keys[order] >> 16).astype(np.uint16), kind="stable")]
    return order


def _from_columns(snap: Snapshot, found: column_scans.Matched, start: tuple[str, str | None], label: str,
                  depth: int, limit: int) -> PathNode:
    """`paths`, answered from the events that matched, in the columns."""
    name, path = start
    ids = string_ids(snap, [text for text in (name, path, PAGE_VIEW) if text is not None])
    start_name, start_path = ids.get(name, -1), None if path is None else ids.get(path, -1)
    if not found.parts or start_name < 0 or start_path is not None and start_path < 0:
        return _answer(label, _Node(), limit)
    # segments in id order: within each, events are in (ts, id) order, so events of equal time are in id order
    # in the parts taken one after the other
    parts = sorted(found.parts, key=lambda part: part[0].lo)
    # each session's first start event
    hits = {field: [] for field in ("session", "ts", "id")}
    for segment, rows in parts:
        at = picked(rows, segment.at("name", rows) == np.int64(start_name))
        if start_path is not None:
            at = at[segment.cols["path"][at] == np.int64(start_path)]
        for field, gathered in hits.items():
            gathered.append(segment.cols[field][at].astype(np.int64))
    session, ts, event_id = (np.concatenate(hits[field]) for field in ("session", "ts", "id"))
    order = np.lexsort((event_id, ts, session))
    order = order[session[order] > 0]
    firsts = order[np.r_[True, session[order][1:] != session[order][:-1]]] if len(order) else order
    started, first_ts, first_id = session[firsts], ts[firsts], event_id[firsts]  # started: ascending
    if not len(started):
        return _answer(label, _Node(), limit)
    # each session's index in `started`, looked up by its id less one below the lowest (the sessions of a window
    # have ids close together); -1 at both ends of the table for every other session
    below = int(started[0]) - 1
    index = np.full(int(started[-1]) - below + 2, -1, dtype=np.int32)
    index[started - below] = np.arange(len(started), dtype=np.int32)
    checkpoint()
    # the events of those sessions from their first start event on
    columns = {field: [] for field in ("which", "ts", "name", "path")}
    for segment, rows in parts:
        sessions = segment.at("session", rows)
        if sessions.dtype.itemsize <= 4:  # ids below `below` wrap around past the table's end
            offsets = sessions - np.uint32(below)
        else:
            offsets = np.maximum(sessions.astype(np.int64) - below, 0)
        which = np.take(index, offsets, mode="clip")
        inside = np.flatnonzero(which >= 0)
        taken, which = picked(rows, inside), which[inside]
        times, event_ids = segment.cols["ts"][taken], segment.cols["id"][taken]
        after = (times > first_ts[which]) | ((times == first_ts[which]) & (event_ids >= first_id[which]))
        taken = taken[after]
        columns["which"].append(which[after])
        columns["ts"].append(times[after])
        columns["name"].append(segment.cols["name"][taken])
        columns["path"].append(segment.cols["path"][taken].astype(np.int64))
    in_time = all(len(a) == 0 or len(b) == 0 or a[-1] <= b[0] for a, b in zip(columns["ts"], columns["ts"][1:]))
    which, ts, names, paths = (np.concatenate(columns[field]) for field in columns)
    checkpoint()
    # in (session, ts, id) order: by time across the segments (a stable merge of their runs, unless they follow
    # one another), then by session
    order = np.arange(len(ts)) if in_time else np.argsort(ts, kind="stable")
    order = order[_stable_order(which[order])]
    which, names, paths = which[order], names[order], paths[order]
    keys = _step_keys(snap, names, paths, ids.get(PAGE_VIEW, -1))
    checkpoint()
    # each session's first start event, then its steps with repeats collapsed, at most depth + 2 of them
    changed = np.flatnonzero(np.r_[True, (which[1:] != which[:-1]) | (keys[1:] != keys[:-1])])
    which, keys = which[changed], keys[changed]
    opens = np.r_[True, which[1:] != which[:-1]]
    rank = np.arange(len(which)) - np.flatnonzero(opens)[np.cumsum(opens) - 1]
    shown = rank <= depth + 1
    which, keys, rank = which[shown], keys[shown], rank[shown]
    count = len(started)
    lengths = np.bincount(which, minlength=count)
    step_keys, codes = np.unique(keys, return_inverse=True)
    sequence = np.full((count, depth + 2), -1, dtype=np.int64)
    sequence[which, rank] = codes.reshape(-1)
    # the tree, level by level: (parent, code, sessions, dropped, other) of each node
    root = (count, int((lengths == 1).sum()), int((lengths > 1).sum()) if depth == 0 else 0)
    levels = []
    parent = np.zeros(count, dtype=np.int64)
    for level in range(1, depth + 1):
        going = np.flatnonzero(lengths > level)
        if not len(going):
            break
        pairs = parent[going] * len(step_keys) + sequence[going, level]
        nodes, node_of, sessions = np.unique(pairs, return_inverse=True, return_counts=True)
        node_of = node_of.reshape(-1)
        dropped = np.bincount(node_of[lengths[going] == level + 1], minlength=len(nodes))
        other = (np.bincount(node_of[lengths[going] > depth + 1], minlength=len(nodes)) if level == depth
                 else np.zeros(len(nodes), dtype=np.int64))
        levels.append((nodes // len(step_keys), nodes % len(step_keys), sessions, dropped, other))
        parent = np.zeros(count, dtype=np.int64)
        parent[going] = node_of
    named = strings(snap, {int(key) >> _PATH_BITS for key in step_keys}
                    | {int(key) & ((1 << _PATH_BITS) - 1) for key in step_keys} - {0})
    step_names = []
    for key in step_keys.tolist():
        path_id = key & ((1 << _PATH_BITS) - 1)
        step_names.append(step_name(named[key >> _PATH_BITS], named[path_id] if path_id else None))
    return _shown(label, root, 0, 0, levels, step_names, limit)


def _shown(step: str, node: tuple[int, int, int], level: int, index: int, levels: list, step_names: list[str],
           limit: int) -> PathNode:
    """`_answer` of the node `index` of `level` ((sessions, dropped, other)), over the tree's level arrays."""
    sessions, dropped, other = node
    children = []
    if level < len(levels):
        parents, codes, counts, drops, others = levels[level]
        first, last = np.searchsorted(parents, index, "left"), np.searchsorted(parents, index, "right")
        children = sorted(((step_names[codes[i]], i) for i in range(first, last)),
                          key=lambda child: (-counts[child[1]], child[0]))
    other += sum(int(counts[i]) for _, i in children[limit:])
    return PathNode(step=step, sessions=int(sessions), dropped=int(dropped), other=int(other), next=[
        _shown(name, (counts[i], drops[i], others[i]), level + 1, i, levels, step_names, limit)
        for name, i in children[:limit]])
