"""Settings from flags and environment: the one place defaults live."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
from pathlib import Path

DB_FILENAME = "pulse.db"
LOCK_FILENAME = "serve.lock"
SERVER_FILENAME = "server.json"


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path("pulse-data")
    # where events are kept: "" the SQLite database in data_dir; clickhouse://HOST:8123/DB (a cluster:
    # clickhouse://H1:P1,H2:P2/DB?cluster=NAME), or chdb://PATH (ClickHouse in this process)
    store: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    # the address sites use to reach this server (for the script tag); default http://host:port
    public_url: str = ""
    # the demo project's ingest key, put into /demo/ by `pulse serve --demo`
    demo_ingest_key: str = ""
    # ingest limits
    max_body_bytes: int = 1024 * 1024
    # token buckets on ingest, requests per second (0: off). Per client IP (loopback exempt: the
    # operator's own tools), and per ingest key
    rate_per_ip: float = 100.0
    burst_per_ip: float = 200.0
    rate_per_key: float = 0.0
    burst_per_key: float = 4000.0
    # slow clients: a request body must arrive within this; idle keep-alive connections are closed after
    body_timeout_s: float = 10.0
    keepalive_timeout_s: float = 15.0
    # one log line per request at most: 5xx at error, 4xx at info, the rest at debug
    log_level: str = "info"
    # single writer
    queue_max_events: int = 100_000
    write_batch_max_events: int = 20_000
    ack: str = "commit"  # "commit": 202 after the commit; "enqueue": 202 when queued
    synchronous: str = "FULL"  # SQLite synchronous pragma for the writer
    # an ingest request (or a read waiting for the writer) gets 503 after waiting this long for a commit;
    # while one has, new ingest is refused at once
    write_timeout_s: float = 5.0
    # a size cap on the database (MiB, 0: none); past it ingest answers 503, as on a full disk
    max_db_mb: int = 0
    # live feed: events buffered per WebSocket client before it starts losing them
    live_buffer_events: int = 10_000
    # readers
    reader_threads: int = 2
    query_timeout_s: float = 10.0
    # days of numbers computed at start for the readers' cache (0: none)
    warm_days: int = 31
    # event columns beside the database, which answer filtered reads (see README, "How it works")
    columns: bool = True
    # the readers' cache of per-day results (MiB, as estimated from what it holds; 0: none)
    cache_mib: int = 96
    # network: with trust_proxy, the client's address is the right-most one in Forwarded, X-Forwarded-For or
    # X-Real-IP that is not one of these proxies' (comma-separated CIDRs), when the direct peer is one of them
    trust_proxy: bool = False
    trusted_proxies: str = "127.0.0.0/8,::1/128"
    # where visitors' countries come from: "" the data bundled with geoip2fast, a path to a MaxMind or DB-IP
    # country database (.mmdb), or "off"
    geoip: str = ""
    catalog_poll_s: float = 0.25
    # a token that reads every project, for tools on this host (`pulse tui`); `pulse serve` makes a fresh
    # one at each start and writes it to server.json in the data directory, readable by its owner only
    operator_token: str = ""

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_FILENAME

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def script_tag(self, ingest_key: str) -> str:
        return f'<script src="{self.base_url}/static/sdk/tracker.js" data-project="{ingest_key}" defer></script>'

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Defaults, then PULSE_* environment variables, then explicit overrides (flags)."""
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = os.environ.get(f"PULSE_{field.name.upper()}")
            if raw is None:
                continue
            values[field.name] = _coerce(field.type, raw, field.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])  # type: ignore[arg-type]
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.ack not in ("commit", "enqueue"):
            raise ValueError(f"ack must be 'commit' or 'enqueue', not {self.ack!r}")
        if self.synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {self.synchronous!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log level must be debug, info, warning or error, not {self.log_level!r}")
        if self.cache_mib < 0:
            raise ValueError("cache_mib must be 0 or more")
        if self.write_timeout_s <= 0:
            raise ValueError("write_timeout_s must be more than 0")
        if self.queue_max_events < 1000:
            raise ValueError("queue_max_events must be at least 1000 (one full batch)")
        proxy_networks(self.trusted_proxies)


@functools.lru_cache(maxsize=8)
def proxy_networks(cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The networks of a comma-separated list of CIDRs (a bare address is one host); ValueError names a bad one."""
    networks = []
    for part in cidrs.split(","):
        if part.strip():
            try:
                networks.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise ValueError(f"trusted_proxies: not an IP network: {part.strip()!r}") from None
    return tuple(networks)


def _coerce(kind: object, raw: str, name: str) -> object:
    kind = str(kind)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return raw.strip().lower() in ("1", "true", "yes", "on")
    except ValueError:
        raise ValueError(f"PULSE_{name.upper()}: expected {kind}, got {raw!r}") from None
    return raw
