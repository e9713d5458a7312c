"""Event columns: every project's non-bot events as numpy columns, in segments kept on disk beside the database,
so that any filter is a few comparisons of columns instead of a read of the rows.

A segment holds every non-bot event of one project whose id is in [lo, hi], sorted by (ts, id): one array per
field (event id, time, person, session, and the interned ids of name, path, referrer domain, user agent, country,
language and screen class; 0 for none), and per property key the rows that have it with the code of its value
(the value as text, as `prop.KEY=VALUE` compares it). A child process of the server builds segments behind the
writer (the events after the last one built, every second), merges small ones into larger ones, and writes each
segment's arrays as .npy files that are read through the page cache (memory-mapped), never all held. A read
takes the segments of its project that overlap the window and builds the few events the builder has not yet
reached from the table (`delta`), so answers are exact at the read's snapshot.

Events never change once written; they are deleted only by a prune (the read cuts the columns at the project's
pruned_before, and merges drop those rows) or with their project (the segments are dropped when the project is
gone or its id was taken again by a newer project).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import apsw
import numpy as np

from pulse.storage.sqlite.connection import connect

log = logging.getLogger(__name__)

# the columns of a segment and the SQL each is read with (0 stands for NULL: interned ids start at 1)
FIELDS = {
    "id": "e.id",
    "ts": "e.ts",
    "person": "e.person_id",
    "session": "coalesce(e.session_id, 0)",
    "name": "e.name_id",
    "path": "coalesce(e.path_id, 0)",
    "referrer": "coalesce(e.referrer_domain_id, 0)",
    "agent": "coalesce(e.agent_id, 0)",
    "country": "coalesce(e.country_id, 0)",
    "language": "coalesce(e.language_id, 0)",
    "screen": "coalesce(e.screen_id, 0)",
}
_WIDE = ("id", "ts")  # kept as int64; the others as the narrowest unsigned type their values fit
_ROWS_SQL = ("SELECT e.project_id, " + ", ".join(FIELDS.values()) +
             " FROM events e LEFT JOIN agents a ON a.id = e.agent_id"
             " WHERE e.id > ? AND e.id <= ? AND coalesce(a.is_bot, 0) = 0{project} ORDER BY e.id")
# each top-level property of each event, as text the way CAST(json_extract(props, '$."k"') AS TEXT) reads it;
# a JSON null is kept as the value None: the key is there (property keys count it), no filter matches it
_PROPS_SQL = ("SELECT e.project_id, e.id, j.key, CAST(j.value AS TEXT) FROM events e JOIN json_each(e.props) j"
              " LEFT JOIN agents a ON a.id = e.agent_id"
              " WHERE e.id > ? AND e.id <= ? AND e.props IS NOT NULL AND coalesce(a.is_bot, 0) = 0{project}"
              " ORDER BY e.id")

BUILD_ROWS = 100_000  # events read by one pass of the builder at most (their rows are Python objects a while)
MERGE_FANOUT = 4  # this many segments of about one size are merged into one
MERGE_MAX_ROWS = 2_000_000  # merges make no larger segment (a merge holds about 60 bytes per row a while)
DELTA_MAX_ROWS = 200_000  # a read builds at most this many events itself; past that, columns are not used
VERSION = 3  # of the files: segments of another version are built again
# a builder that ends on its own (killed, out of memory) is started again after RESTART_AFTER_S, twice as long
# after each time it ends again within RESTART_BACKOFF_MAX_S of its start, up to that
RESTART_AFTER_S = 1.0
RESTART_BACKOFF_MAX_S = 60.0


def narrow(values: np.ndarray) -> np.ndarray:
    """Non-negative ids in the narrowest unsigned type that holds them."""
    top = int(values.max()) if len(values) else 0
    for kind in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(kind).max:
            return values.astype(kind)
    return values.astype(np.int64)


@dataclass(frozen=True, slots=True, eq=False)
class Prop:
    """One property key in a segment: the rows that have it (ascending) and the code of each one's value, and
    the same rows by value (`postings[starts[c]:starts[c + 1]]` are the rows of value c, ascending)."""

    rows: np.ndarray
    codes: np.ndarray
    values: list[str | None]  # None: a JSON null
    index: dict[str | None, int]
    postings: np.ndarray
    starts: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray, codes: np.ndarray, values: list[str], postings: np.ndarray | None = None,
           starts: np.ndarray | None = None) -> Prop:
        if postings is None:
            postings = rows[np.argsort(codes, kind="stable")]
            starts = np.searchsorted(np.sort(codes), np.arange(len(values) + 1)).astype(np.int64)
        return cls(rows, codes, values, {value: code for code, value in enumerate(values)}, postings, starts)

    def rows_of(self, code: int) -> np.ndarray:
        """The rows whose value is `code`, ascending."""
        return self.postings[int(self.starts[code]):int(self.starts[code + 1])]


@dataclass(frozen=True, slots=True, eq=False)
class Segment:
    """Every non-bot event of `project` with lo <= id <= hi, sorted by (ts, id)."""

    project: int
    lo: int
    hi: int
    cols: dict[str, np.ndarray]
    props: dict[str, Prop]
    directory: Path | None = None

    @property
    def rows(self) -> int:
        return len(self.cols["ts"])

    @property
    def first_ts(self) -> int:
        return int(self.cols["ts"][0]) if self.rows else 0

    @property
    def last_ts(self) -> int:
        return int(self.cols["ts"][-1]) if self.rows else 0

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The rows with start <= ts < end."""
        ts = self.cols["ts"]
        return int(np.searchsorted(ts, start, "left")), int(np.searchsorted(ts, end, "left"))

    def at(self, field: str, rows: np.ndarray) -> np.ndarray:
        """One column at some rows (ascending): a view when they are consecutive (every row of a span, as when
        nothing is filtered), else a copy."""
        if len(rows) and int(rows[-1]) - int(rows[0]) + 1 == len(rows):
            return self.cols[field][int(rows[0]):int(rows[-1]) + 1]
        return self.cols[field][rows]

    @property
    def name(self) -> str:
        return f"p{self.project}-{self.lo}-{self.hi}"

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.cols.values()) + sum(p.rows.nbytes + p.codes.nbytes
                                                                for p in self.props.values())


def _segments(rows: list[tuple], prop_rows: list[tuple], lo: int, hi: int) -> dict[int, Segment]:
    """Segments per project from the rows of _ROWS_SQL and _PROPS_SQL (both in id order)."""
    if not rows:
        return {}
    table = np.array(rows, dtype=np.int64)
    found: dict[int, Segment] = {}
    by_project: dict[int, list[tuple]] = {}
    for row in prop_rows:
        by_project.setdefault(row[0], []).append(row)
    for project in np.unique(table[:, 0]).tolist():
        part = table[table[:, 0] == project]
        order = np.lexsort((part[:, 1], part[:, 2]))  # by ts, then id
        cols = {}
        for i, name in enumerate(FIELDS, start=1):
            column = part[order, i]
            cols[name] = column if name in _WIDE else narrow(column)
        found[project] = Segment(project, lo, hi, cols, _props(part[:, 1], order, by_project.get(project, [])))
    return found


def _props(ids: np.ndarray, order: np.ndarray, prop_rows: list[tuple]) -> dict[str, Prop]:
    """Per key, rows (positions in the sorted segment) and value codes; `ids` in id order, `order` the sort."""
    if not prop_rows:
        return {}
    where = np.empty(len(order), dtype=np.int64)
    where[order] = np.arange(len(order))  # id-order position -> sorted position
    keys: dict[str, tuple[list[int], list[int], dict[str, int]]] = {}
    event_ids = np.fromiter((row[1] for row in prop_rows), dtype=np.int64, count=len(prop_rows))
    positions = where[np.searchsorted(ids, event_ids)].tolist()
    for position, (_, _, key, value) in zip(positions, prop_rows):
        entry = keys.get(key)
        if entry is None:
            entry = keys[key] = ([], [], {})
        codes = entry[2]
        code = codes.get(value)
        if code is None:
            code = codes[value] = len(codes)
        entry[0].append(position)
        entry[1].append(code)
    found = {}
    for key, (rows, codes, values) in keys.items():
        rows_a = np.array(rows, dtype=np.uint32)
        codes_a = narrow(np.array(codes, dtype=np.int64))
        sort = np.argsort(rows_a, kind="stable")
        found[key] = Prop.of(rows_a[sort], codes_a[sort], list(values))
    return found


def read_segments(conn: apsw.Connection, lo: int, hi: int, project: int | None = None) -> dict[int, Segment]:
    """The segments of the events with lo < id <= hi (of one project, or all), read from the table."""
    where = "" if project is None else " AND e.project_id = ?"
    extra = () if project is None else (project,)
    rows = conn.execute(_ROWS_SQL.format(project=where), (lo, hi, *extra)).fetchall()
    props = conn.execute(_PROPS_SQL.format(project=where), (lo, hi, *extra)).fetchall() if rows else []
    return _segments(rows, props, lo + 1, hi)


def merge(parts: list[Segment], cut_ts: int = 0) -> Segment:
    """One segment of consecutive segments of a project (rows before `cut_ts`, pruned, left out)."""
    cols = {}
    ts = np.concatenate([p.cols["ts"] for p in parts])
    ids = np.concatenate([p.cols["id"] for p in parts])
    keep = ts >= cut_ts
    order = np.lexsort((ids, ts))
    order = order[keep[order]]
    for name in FIELDS:
        joined = np.concatenate([p.cols[name] for p in parts])[order]  # in the widest of the parts' types
        cols[name] = joined if name in _WIDE else narrow(joined)
    # old position (in the concatenation) -> new position, -1 when cut
    where = np.full(len(ts), -1, dtype=np.int64)
    where[order] = np.arange(len(order))
    offsets = np.cumsum([0] + [p.rows for p in parts])
    props: dict[str, Prop] = {}
    for key in sorted({key for p in parts for key in p.props}):
        values: dict[str, int] = {}
        rows, codes = [], []
        for part, offset in zip(parts, offsets):
            prop = part.props.get(key)
            if prop is None:
                continue
            remap = np.array([values.setdefault(v, len(values)) for v in prop.values], dtype=np.int64)
            rows.append(where[prop.rows.astype(np.int64) + offset])
            codes.append(remap[prop.codes.astype(np.int64)])
        rows_a, codes_a = np.concatenate(rows), np.concatenate(codes)
        kept = rows_a >= 0
        rows_a, codes_a = rows_a[kept], codes_a[kept]
        sort = np.argsort(rows_a, kind="stable")
        props[key] = Prop.of(rows_a[sort].astype(np.uint32), narrow(codes_a[sort]), list(values))
    return Segment(parts[0].project, parts[0].lo, parts[-1].hi, cols, props)


# -- on disk ---------------------------------------------------------------------------------------------------


def _save(segment: Segment, root: Path) -> Segment:
    target = root / segment.name
    scratch = root / f".{segment.name}.{os.getpid()}.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for name, values in segment.cols.items():
        np.save(scratch / f"{name}.npy", values)
    keys = []
    for i, (key, prop) in enumerate(segment.props.items()):
        np.save(scratch / f"k{i}.rows.npy", prop.rows)
        np.save(scratch / f"k{i}.codes.npy", prop.codes)
        np.save(scratch / f"k{i}.postings.npy", prop.postings)
        np.save(scratch / f"k{i}.starts.npy", prop.starts)
        keys.append({"key": key, "values": prop.values})
    (scratch / "props.json").write_text(json.dumps(keys))
    for path in scratch.iterdir():  # on disk before the manifest names the segment
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(target, ignore_errors=True)
    os.rename(scratch, target)
    return _load(target, segment.project, segment.lo, segment.hi)


def _mapped(path: Path) -> np.ndarray:
    """An .npy file read through the page cache, as a plain array (numpy's memmap type costs on every slice)."""
    return np.load(path, mmap_mode="r").view(np.ndarray)


def _load(directory: Path, project: int, lo: int, hi: int) -> Segment:
    cols = {name: _mapped(directory / f"{name}.npy") for name in FIELDS}
    props = {}
    for i, entry in enumerate(json.loads((directory / "props.json").read_text())):
        props[entry["key"]] = Prop.of(*(_mapped(directory / f"k{i}.{part}.npy") for part in ("rows", "codes")),
                                      entry["values"],
                                      *(_mapped(directory / f"k{i}.{part}.npy") for part in ("postings", "starts")))
    return Segment(project, lo, hi, cols, props, directory)


@dataclass(frozen=True, slots=True)
class View:
    """What the builder has made so far: every non-bot event with id <= `through` is in `segments`."""

    through: int
    segments: dict[int, tuple[Segment, ...]]  # per project, in id order
    created: dict[int, int]  # per project, its created_at when its segments were made


class ColumnIndex:
    """The segments of a database: built by a child process of the server (`start`), so that building never
    holds the server's interpreter, and read by the server's readers (`view`, loaded again whenever the builder
    has published a new manifest)."""

    def __init__(self, db_path: Path, directory: Path | None = None, interval_s: float = 1.0) -> None:
        self.db_path = db_path
        self.directory = directory or db_path.with_name(db_path.name + "-columns")
        self.interval_s = interval_s
        self._view = View(0, {}, {})
        self._seen: tuple[int, int, int] | None = None  # (mtime, size, inode) of the manifest `_view` was read from
        self._loaded: dict[str, Segment] = {}  # segments mapped already, by name
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._starting = threading.Lock()  # a restart and `stop` one at a time
        self._stopping = threading.Event()
        self.restarts = 0  # times the builder was started again after it ended on its own

    # -- the readers' side ----------------------------------------------------------------------------------

    @property
    def manifest(self) -> Path:
        return self.directory / "manifest.json"

    @property
    def view(self) -> View:
        """The segments the last manifest names (read again when it changed: one stat per call)."""
        try:
            stat = os.stat(self.manifest)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._seen:
            with self._lock:
                if stamp != self._seen:
                    self._reload()
        return self._view

    def _reload(self) -> None:
        """Read the manifest and map the segments it names that are not mapped yet. The builder removes the
        segments an older manifest named only after the new one is in place: a segment gone while being
        mapped means a newer manifest, read again."""
        for _ in range(5):
            try:
                stat = os.stat(self.manifest)
                manifest = json.loads(self.manifest.read_text())
                if manifest.get("version") != VERSION or manifest.get("database") != self._identity():
                    raise ValueError("another database's columns")
                segments: dict[int, list[Segment]] = {}
                loaded = {}
                for name in manifest["segments"]:
                    segment = self._loaded.get(name)
                    if segment is None:
                        project, lo, hi = (int(x) for x in name[1:].split("-"))
                        segment = _load(self.directory / name, project, lo, hi)
                    loaded[name] = segment
                    segments.setdefault(segment.project, []).append(segment)
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError):
                break
            self._loaded = loaded
            self._view = View(manifest["through"], {p: tuple(s) for p, s in segments.items()},
                              {int(p): c for p, c in manifest["created"].items()})
            self._seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            return
        self._loaded, self._view = {}, View(0, {}, {})
        try:
            stat = os.stat(self.manifest)
            self._seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            self._seen = None

    # -- the builder ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the builder process; it ends when `stop` is called or the server goes (its stdin closes), and
        is started again whenever it ends otherwise (see `_watch`)."""
        self._stopping.clear()
        with self._starting:
            self._process = self._spawn()
        threading.Thread(target=self._watch, args=(self._process,), name="pulse-columns-watch", daemon=True).start()

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "pulse.storage.sqlite.columns", str(self.db_path), str(self.directory),
             str(self.interval_s)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)

    def _watch(self, process: subprocess.Popen) -> None:
        """Start the builder again when it ends on its own. Reads stay exact without it (they build what it has
        not reached from the table), but past DELTA_MAX_ROWS unbuilt events filtered reads go back to the table."""
        backoff = RESTART_AFTER_S
        while True:
            started = time.monotonic()
            code = process.wait()
            if self._stopping.is_set():
                return
            with contextlib.suppress(OSError):
                process.stdin.close()
            if time.monotonic() - started > RESTART_BACKOFF_MAX_S:
                backoff = RESTART_AFTER_S  # it ran a good while: not the same failure over again
            log.warning("event columns: the builder ended (exit code %s); starting it again in %g s", code, backoff)
            if self._stopping.wait(backoff):
                return
            with self._starting:
                if self._stopping.is_set():
                    return
                process = self._process = self._spawn()
                self.restarts += 1
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)

    def stop(self) -> None:
        self._stopping.set()
        with self._starting:
            process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def poke(self) -> None:
        """Build now rather than at the next interval (tests)."""
        process = self._process
        if process is not None:
            with contextlib.suppress(OSError, ValueError):  # ValueError: it ended, its stdin is closed
                process.stdin.write(b"\n")
                process.stdin.flush()

    def serve(self, commands: int) -> None:
        """The builder process: a pass, then wait for the interval or a poke on `commands`, until it closes."""
        conn = connect(self.db_path, readonly=True)
        try:
            self._open()
            while True:
                try:
                    behind = self.build_once(conn)
                except Exception:  # noqa: BLE001 - the columns are an index: reads fall back to the table
                    log.exception("event columns: build failed; retrying")
                    behind, wait = False, 5.0
                else:
                    wait = 0.0 if behind else self.interval_s
                readable, _, _ = select.select([commands], [], [], wait)
                if readable and not os.read(commands, 4096):
                    return
        finally:
            conn.close()

    def _identity(self) -> str:
        stat = os.stat(self.db_path)
        return f"{stat.st_dev}:{stat.st_ino}"

    def _open(self) -> None:
        """At the builder's start: keep the segments of a manifest of this database, drop everything else in the
        folder (a manifest of another database or version goes first, so that no reader uses it meanwhile)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            manifest = json.loads(self.manifest.read_text())
            valid = manifest.get("version") == VERSION and manifest.get("database") == self._identity()
        except (OSError, ValueError):
            valid = False
        if not valid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.manifest)
        keep = {s.name for parts in self.view.segments.values() for s in parts}
        for path in self.directory.iterdir():
            if path.is_dir() and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _publish(self, view: View) -> None:
        manifest = {"version": VERSION, "database": self._identity(), "through": view.through,
                    "created": {str(p): c for p, c in view.created.items()},
                    "segments": [s.name for parts in view.segments.values() for s in parts]}
        scratch = self.directory / "manifest.json.tmp"
        with open(scratch, "w") as handle:
            json.dump(manifest, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(scratch, self.manifest)
        with self._lock:
            stat = os.stat(self.manifest)
            self._seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            self._loaded = {s.name: s for parts in view.segments.values() for s in parts}
            self._view = view
        # every other segment goes: those the view no longer names, and those a pass made and merged at once
        named = set(manifest["segments"])
        for path in self.directory.iterdir():
            if path.is_dir() and path.name not in named:
                shutil.rmtree(path, ignore_errors=True)

    def build_once(self, conn: apsw.Connection) -> bool:
        """Build the next events into segments and merge; True when more are waiting."""
        view = self.view
        conn.execute("BEGIN")  # one snapshot
        try:
            highest = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
            projects = dict(conn.execute("SELECT id, created_at FROM projects"))
            cuts = {int(key.split(":")[1]): value for key, value in conn.execute(
                "SELECT key, value FROM meta WHERE key LIKE 'pruned_before:%'")}
            target = min(highest, view.through + BUILD_ROWS)
            fresh = read_segments(conn, view.through, target) if target > view.through else {}
        finally:
            conn.execute("COMMIT")
        segments = {p: list(s) for p, s in view.segments.items()
                    if projects.get(p) is not None and view.created.get(p) == projects[p]}
        created = {p: projects[p] for p in segments}
        changed = len(segments) != len(view.segments) or target > view.through
        for project, segment in fresh.items():
            if project not in projects:
                continue
            segments.setdefault(project, []).append(_save(segment, self.directory))
            created[project] = projects[project]
        for project, parts in segments.items():
            merged = self._merged(parts, cuts.get(project, 0))
            if merged is not parts:
                segments[project] = merged
                changed = True
        if changed:
            self._publish(View(max(target, view.through), {p: tuple(s) for p, s in segments.items()}, created))
        return target < highest

    def _merged(self, parts: list[Segment], cut_ts: int) -> list[Segment]:
        """Merge runs of MERGE_FANOUT consecutive segments of about one size (tiered), and any segment holding
        pruned rows with its neighbour."""
        def tier(segment: Segment) -> int:
            return max(0, int(np.log(max(segment.rows, 1) / 4096) / np.log(MERGE_FANOUT)))

        result = list(parts)
        changed = False
        done = False
        while not done:
            done = True
            for i in range(len(result) - MERGE_FANOUT + 1):
                run = result[i:i + MERGE_FANOUT]
                if len({tier(s) for s in run}) == 1 and sum(s.rows for s in run) <= MERGE_MAX_ROWS:
                    result[i:i + MERGE_FANOUT] = [_save(merge(run, cut_ts), self.directory)]
                    changed = True
                    done = False
                    break
        for i, segment in enumerate(result):
            if segment.rows and segment.first_ts < cut_ts:
                result[i] = _save(merge([segment], cut_ts), self.directory)
                changed = True
        return result if changed else parts


# -- reads ---------------------------------------------------------------------------------------------------------


def project_view(index: ColumnIndex | None, conn: apsw.Connection, project_id: int
                 ) -> tuple[list[Segment], int] | None:
    """The segments of a project a read at `conn`'s snapshot may use, and the id they reach; None when the
    columns cannot answer (no index, or the builder too far behind)."""
    if index is None:
        return None
    view = index.view
    created = conn.execute("SELECT created_at FROM projects WHERE id = ?", (project_id,)).fetchone()
    if created is None:
        return [], view.through
    parts = view.segments.get(project_id, ())
    if parts and view.created.get(project_id) != created[0]:
        return None
    waiting = conn.execute("SELECT count(*) FROM (SELECT 1 FROM events WHERE id > ? LIMIT ?)",
                           (view.through, DELTA_MAX_ROWS + 1)).fetchone()[0]
    if waiting > DELTA_MAX_ROWS:
        return None
    found = list(parts)
    if waiting:
        delta = read_segments(conn, view.through, 1 << 62, project_id).get(project_id)
        if delta is not None:
            found.append(delta)
    return found, view.through


def main() -> None:
    """`python -m pulse.storage.sqlite.columns DB DIRECTORY INTERVAL`: the builder process of `ColumnIndex.start`."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    database, directory, interval = sys.argv[1:4]
    ColumnIndex(Path(database), Path(directory), float(interval)).serve(sys.stdin.fileno())


if __name__ == "__main__":
    main()
