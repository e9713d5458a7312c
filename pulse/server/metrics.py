"""GET /metrics in Prometheus' text format: ingest, the writer, the live feed, requests by status."""

from __future__ import annotations

import collections

from aiohttp import web

from pulse.server.errors import ApiError
from pulse.server.keys import KEYRING, LIVE, METRICS, WRITER
from pulse.server.limits import is_loopback
from pulse.storage.writer import BATCH_BUCKETS, COMMIT_BUCKETS

routes = web.RouteTableDef()


class Counters:
    """What the middleware and the ingest handler count; the writer and the live hub keep their own."""

    def __init__(self) -> None:
        self.requests: collections.Counter[int] = collections.Counter()  # by status
        self.ingest_rejected: collections.Counter[int] = collections.Counter()  # ingest requests, by status


def _histogram(lines: list[str], name: str, help_text: str, bounds: tuple, counts: list[int], total: float) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    running = 0
    for bound, count in zip(bounds, counts):
        running += count
        lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
    running += counts[-1]
    lines += [f'{name}_bucket{{le="+Inf"}} {running}', f"{name}_sum {total}", f"{name}_count {running}"]


def _metric(lines: list[str], name: str, kind: str, help_text: str, value: float) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]


def render(app: web.Application) -> str:
    stats = app[WRITER].stats
    counters = app[METRICS]
    hub = app[LIVE]
    lines: list[str] = []
    _metric(lines, "pulse_queue_events", "gauge", "Events waiting for the writer.", stats.queued_events)
    _metric(lines, "pulse_writer_lag_seconds", "gauge", "Age of the oldest request waiting for its commit.",
            round(app[WRITER].writer_lag_seconds, 6))
    _metric(lines, "pulse_writer_stalled", "gauge", "1 while a request has waited past the write deadline.",
            int(app[WRITER].stalled))
    _metric(lines, "pulse_writer_stalled_requests_total", "counter",
            "Ingest and read requests answered 503 because the writer missed the write deadline.",
            stats.stalled_requests)
    _metric(lines, "pulse_wal_bytes", "gauge", "Size of the database's write-ahead log file.", app[WRITER].wal_bytes)
    _metric(lines, "pulse_last_commit_timestamp_seconds", "gauge", "When the writer last committed.",
            stats.last_commit_at or 0)
    _metric(lines, "pulse_events_accepted_total", "counter", "Events stored.", stats.events_written)
    _metric(lines, "pulse_events_deduplicated_total", "counter", "Events ignored as duplicates of a stored uuid.",
            stats.duplicates)
    lines += ["# HELP pulse_ingest_rejected_requests_total Ingest requests refused, by status.",
              "# TYPE pulse_ingest_rejected_requests_total counter"]
    lines += [f'pulse_ingest_rejected_requests_total{{status="{s}"}} {n}'
              for s, n in sorted(counters.ingest_rejected.items())]
    _metric(lines, "pulse_writer_commits_total", "counter", "Transactions committed by the writer.", stats.commits)
    _metric(lines, "pulse_writer_failures_total", "counter", "Batches the writer could not store.", stats.failures)
    _metric(lines, "pulse_writer_restarts_total", "counter", "Times the writer process was restarted.",
            stats.restarts)
    _histogram(lines, "pulse_commit_seconds", "Time to write and commit one batch.", COMMIT_BUCKETS,
               stats.commit_latency_counts, round(stats.commit_latency_sum, 6))
    _histogram(lines, "pulse_commit_batch_events", "Events per commit.", BATCH_BUCKETS, stats.batch_size_counts,
               stats.batch_size_sum)
    _metric(lines, "pulse_live_clients", "gauge", "Open live-feed WebSockets.", hub.client_count)
    _metric(lines, "pulse_live_dropped_events_total", "counter", "Events not sent to live clients that fell behind.",
            hub.dropped_total)
    lines += ["# HELP pulse_http_requests_total Requests answered, by status.",
              "# TYPE pulse_http_requests_total counter"]
    lines += [f'pulse_http_requests_total{{status="{s}"}} {n}' for s, n in sorted(counters.requests.items())]
    return "\n".join(lines) + "\n"


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """For a scraper on this host, or anyone with the operator token; counts only, never keys or events."""
    header = request.headers.get("Authorization", "")
    local = is_loopback(request.remote or "") and "X-Forwarded-For" not in request.headers
    keyring = request.app[KEYRING]
    if not local and not (header[:7].lower() == "bearer " and keyring.is_operator_secret(header[7:].strip())):
        raise ApiError(403, "metrics are served to this host only (or with the operator token)")
    return web.Response(text=render(request.app), content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "no-store"})
