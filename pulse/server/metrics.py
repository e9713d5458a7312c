"""GET /metrics in Prometheus' text format: ingest, the writer, the live feed, requests by status."""

from __future__ import annotations

import collections

from aiohttp import web

from pulse.server.errors import ApiError
from pulse.server.keys import KEYRING, LIVE, METRICS, STORE
from pulse.server.limits import is_loopback
from pulse.storage.model import Histogram

routes = web.RouteTableDef()


class Counters:
    """What the middleware and the ingest handler count; the writer and the live hub keep their own."""

    def __init__(self) -> None:
        self.requests: collections.Counter[int] = collections.Counter()  # by status
        self.ingest_rejected: collections.Counter[int] = collections.Counter()  # ingest requests, by status


def _histogram(lines: list[str], name: str, help_text: str, histogram: Histogram) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    running = 0
    for bound, count in zip(histogram.bounds, histogram.counts):
        running += count
        lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
    running += histogram.counts[-1]
    total = round(histogram.total, 6) if isinstance(histogram.total, float) else histogram.total
    lines += [f'{name}_bucket{{le="+Inf"}} {running}', f"{name}_sum {total}", f"{name}_count {running}"]


def _metric(lines: list[str], name: str, kind: str, help_text: str, value: float) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]


def render(app: web.Application) -> str:
    stats = app[STORE].ingest_stats()
    counters = app[METRICS]
    hub = app[LIVE]
    lines: list[str] = []
    _metric(lines, "pulse_queue_events", "gauge", "Events waiting for the writer.", stats.queued_events)
    _metric(lines, "pulse_writer_lag_seconds", "gauge", "Age of the oldest request waiting for its commit.",
            round(stats.lag_seconds, 6))
    _metric(lines, "pulse_writer_stalled", "gauge", "1 while a request has waited past the write deadline.",
            int(stats.state == "stalled"))
    _metric(lines, "pulse_writer_stalled_requests_total", "counter",
            "Ingest and read requests answered 503 because the writer missed the write deadline.",
            stats.stalled_requests)
    _metric(lines, "pulse_wal_bytes", "gauge", "Size of the database's write-ahead log file.", stats.wal_bytes)
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
    _histogram(lines, "pulse_commit_seconds", "Time to write and commit one batch.", stats.commit_seconds)
    _histogram(lines, "pulse_commit_batch_events", "Events per commit.", stats.batch_events)
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
