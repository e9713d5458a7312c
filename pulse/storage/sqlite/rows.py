"""What the server process does to each event before the writer sees it: the stateless part.

Timestamps and clock-skew correction, uuids, URL path and UTM parameters, the referrer's domain, the
language and screen class, and the encoded properties are all worked out here, on the server's side of the writer's socket, so the
single writer spends its time only on what needs the database: ids, aggregates and SQL.
"""

from __future__ import annotations

import os
import random


import msgspec

from pulse.enrich import base_language, referrer_host, screen_class, split_url
from pulse.protocol import to_ms
from pulse.storage.model import IngestJob

# a timestamp, after clock-skew correction, later than receipt plus MAX_FUTURE_MS or earlier than OLDEST_MS
# is a broken clock's (or a far `sent_at`'s): the event is kept at the time of receipt, where reads find it
MAX_FUTURE_MS = 60_000
OLDEST_MS = 946_684_800_000  # 2000-01-01

# A prepared event is a plain tuple of these fields, in this order:
#   uid              the client's uuid as 16 bytes; None: the writer makes a time-ordered one
#   ts               epoch milliseconds, after clock-skew correction
#   name             the event's name
#   distinct_id      None: the writer uses the anonymous id of the request's ip and user agent
#   anon_id          the anonymous id an `$identify` links to distinct_id, or None
#   session_key      the client's session id, or None
#   url, path        the page's URL and path (a path from the `path` property when there is no URL)
#   referrer         the referrer's URL, or None
#   referrer_domain  its host, None for a self-referral
#   utm_source, utm_medium, utm_campaign   from the page's URL
#   props, traits    JSON, or None
#   language         the base language subtag ("en"): the event's own, else the request's; or None
#   screen           the screen class (mobile, tablet, laptop, desktop), or None
# It is built per event on the server's event loop and crosses the writer's socket inside Submit as a
# msgpack array: a tuple is the cheapest to build, encode and decode there (a msgspec Struct of the same
# fields cost 8% more per event on each side, for no gain in the writer). The writer unpacks it by these
# names (BatchApplier._resolve_and_count); elsewhere one field is taken by its position:
(UID, TS, NAME, DISTINCT_ID, ANON_ID, SESSION_KEY, URL, PATH, REFERRER, REFERRER_DOMAIN,
 UTM_SOURCE, UTM_MEDIUM, UTM_CAMPAIGN, PROPS, TRAITS, LANGUAGE, SCREEN) = range(17)

_encode = msgspec.json.Encoder().encode
_random_bits = random.Random(os.urandom(32)).getrandbits  # uniqueness, not secrecy: no syscall per event


def time_uuid(ts_ms: int) -> bytes:
    """A UUIDv7: 48-bit millisecond time, version and variant bits, 74 random bits (index-friendly order)."""
    rand = _random_bits(74)
    return (
        (ts_ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | (rand & (1 << 62) - 1)
    ).to_bytes(16, "big")


def prepare(job: IngestJob) -> list[tuple]:
    """The job's events as prepared event tuples (see above)."""
    received = job.received_ms
    skew = job.skew_ms
    domain = job.project_domain
    request_language = job.language
    rows = []
    for ev in job.events:
        ts = ev.timestamp
        if ts is None:
            ts = received
        else:
            if ts.__class__ is not int:
                ts = to_ms(ts)
            ts += skew
            if ts > received + MAX_FUTURE_MS or ts < OLDEST_MS:
                ts = received
        url = ev.page_url or None
        path = page_host = source = medium = campaign = None
        if url is not None:
            parts = split_url(url)
            path, page_host = parts.path, parts.host
            source, medium, campaign = parts.utm_source, parts.utm_medium, parts.utm_campaign
        elif ev.properties:
            candidate = ev.properties.get("path")
            if isinstance(candidate, str) and candidate:
                path = candidate
        referrer = ev.referrer or None
        referrer_domain = None
        if referrer is not None:
            referrer_domain = referrer_host(referrer)
            if referrer_domain is not None and (referrer_domain == page_host or referrer_domain == domain):
                referrer_domain = None  # a self-referral is no referrer
        rows.append((
            ev.uuid.bytes if ev.uuid is not None else None, ts, ev.event, ev.distinct_id, ev.anon_id,
            ev.session_id, url, path, referrer, referrer_domain, source, medium, campaign,
            _encode(ev.properties).decode() if ev.properties else None,
            _encode(ev.traits).decode() if ev.traits else None,
            base_language(ev.language) or request_language, screen_class(ev.screen_width),
        ))
    return rows
