"""Realistic fake traffic, sent through the real HTTP ingest API.

Users (some of whom sign up and identify with traits: age group and gender) come back in sessions of page
views over a small site map, click, submit forms, sign up and buy; they arrive from search, social sites,
campaigns (UTM) or directly, on desktop and mobile browsers, more by day than by night and on weekdays than
at weekends; from many countries (their IP addresses), in several languages and screen sizes; and a few
crawlers visit every day, which every number leaves out. The same --seed gives the same traffic.

    python scripts/seed_events.py --url http://127.0.0.1:8000 --key pk_… [--days 7] [--users 1500 | --events N] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from dataclasses import dataclass, field

import aiohttp

PAGES = ["/", "/", "/pricing", "/features", "/docs", "/docs/install", "/blog", "/blog/launch", "/about", "/signup"]
SOURCES = [  # (referrer, utm source, utm medium, utm campaign, weight)
    (None, None, None, None, 30),
    ("https://www.google.com/", None, None, None, 30),
    ("https://duckduckgo.com/", None, None, None, 6),
    ("https://news.ycombinator.com/", None, None, None, 8),
    ("https://twitter.com/", None, None, None, 6),
    ("https://www.reddit.com/r/selfhosted/", None, None, None, 6),
    ("https://www.google.com/", "google", "cpc", "spring_sale", 7),
    (None, "newsletter", "email", "march_digest", 7),
]
AGENTS = [  # (user agent, weight)
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 "
     "Safari/537.36", 34),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 "
     "Safari/605.1.15", 14),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0", 8),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.4 Mobile/15E148 Safari/604.1", 24),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 "
     "Mobile Safari/537.36", 16),
    ("Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 "
     "Mobile/15E148 Safari/604.1", 4),
]
# the screen width each of AGENTS' devices reports, in the same order
WIDTHS = [1920, 1440, 1366, 390, 412, 820]
# where visitors come from: the first byte of their IPv4 address (the rest drawn at random), by weight; these
# networks lie mostly in the United States, Canada, the United Kingdom, Germany, Western Europe, Brazil,
# Asia and Latin America in the country data pulse ships
NETWORKS = [(3, 22), (24, 12), (81, 6), (5, 8), (2, 10), (85, 8), (145, 5), (177, 7), (49, 6), (126, 5),
            (190, 6), (41, 3), (101, 2)]
LANGUAGES = [("en-US", 40), ("en-GB", 10), ("de-DE", 12), ("fr-FR", 9), ("es-ES", 8), ("pt-BR", 8),
             ("ja-JP", 5), ("it-IT", 4), ("nl-NL", 4)]
# crawlers' user agents: a few of their page views a day, which every number leaves out (the bots report
# shows them)
CRAWLERS = [
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
]
CRAWLS_PER_DAY = 6
HOUR_SHAPE = [0.2, 0.12, 0.08, 0.06, 0.06, 0.1, 0.25, 0.5, 0.8, 1.0, 1.0, 0.95,
              0.9, 0.95, 1.0, 1.0, 0.95, 0.85, 0.75, 0.7, 0.65, 0.55, 0.45, 0.3]
WEEKDAY_SHAPE = [1.0, 1.05, 1.05, 1.0, 0.9, 0.6, 0.55]  # Monday first
EVENTS_PER_PERSON = 11.1  # what the generator makes on average, for --events


@dataclass
class Person:
    anon_id: str
    user_id: str
    agent: str
    traits: dict
    ip: str = ""
    language: str = ""
    screen_width: int = 0
    identified: bool = False
    crawler: bool = False


@dataclass
class Report:
    events: int = 0  # every number below leaves out crawlers' events, as pulse's numbers do
    crawler_events: int = 0
    sessions: int = 0
    users: set = field(default_factory=set)
    by_event: dict = field(default_factory=dict)
    requests: int = 0


def _weighted(rng: random.Random, items: list[tuple]) -> tuple:
    return rng.choices(items, weights=[item[-1] for item in items])[0]


def _session_start(rng: random.Random, start_ms: int, days: int) -> int:
    """A moment in the period, drawn by the daily and weekly shape of traffic."""
    while True:
        ts = start_ms + rng.randrange(days * 86_400_000)
        moment = time.gmtime(ts / 1000)
        if rng.random() < HOUR_SHAPE[moment.tm_hour] * WEEKDAY_SHAPE[moment.tm_wday] / 1.05:
            return ts


def generate(seed: int, days: int, users: int, now_ms: int, site: str = "https://demo.pulse.example"):
    """Yield (user agent, events) per session, oldest sessions first across the period."""
    rng = random.Random(seed)
    people = [
        Person(f"anon-{uuid.UUID(int=rng.getrandbits(128))}", f"user_{i}", _weighted(rng, AGENTS)[0],
               {"age_group": rng.choices(["<18", "18-40", ">40"], weights=[15, 60, 25])[0],
                "gender": rng.choices(["Male", "Female", "Other"], weights=[47, 47, 6])[0]})
        for i in range(users)
    ]
    for person in people:
        agent = next(i for i, (ua, _) in enumerate(AGENTS) if ua == person.agent)
        person.screen_width = WIDTHS[agent]
        first = _weighted(rng, NETWORKS)[0]
        person.ip = f"{first}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        person.language = _weighted(rng, LANGUAGES)[0]
    start_ms = now_ms - days * 86_400_000
    sessions = []
    for person in people:
        for _ in range(max(1, min(12, int(rng.expovariate(1 / 2.2)) + 1))):
            sessions.append((_session_start(rng, start_ms, days), person))
    for day in range(days):
        for crawl in range(CRAWLS_PER_DAY):
            crawler = Person(f"crawler-{day}-{crawl}", "", rng.choice(CRAWLERS), {}, crawler=True)
            crawler.ip = f"66.249.{rng.randrange(64, 96)}.{rng.randrange(1, 255)}"
            sessions.append((start_ms + day * 86_400_000 + rng.randrange(86_400_000), crawler))
    sessions.sort(key=lambda item: item[0])
    for ts, person in sessions:
        if person.crawler:
            yield person, person.agent, [
                {"event": "page_view", "page_url": f"{site}{path}", "timestamp": ts + i * 1500, "ip": person.ip,
                 "uuid": str(uuid.UUID(int=rng.getrandbits(128)))}
                for i, path in enumerate(rng.sample(PAGES, 4)) if ts + i * 1500 < now_ms]
            continue
        referrer, source, medium, campaign, _ = _weighted(rng, SOURCES)
        session_id = f"s-{uuid.UUID(int=rng.getrandbits(128))}"
        path = rng.choice(PAGES[:6])
        events = []
        pages = max(1, int(rng.expovariate(1 / 3.0)))  # about one in three sessions bounces
        for page in range(pages):
            distinct = person.user_id if person.identified else person.anon_id
            query = (f"?utm_source={source}&utm_medium={medium}&utm_campaign={campaign}"
                     if page == 0 and source else "")
            event = {"event": "page_view", "distinct_id": distinct, "session_id": session_id,
                     "page_url": f"{site}{path}{query}", "timestamp": ts,
                     "uuid": str(uuid.UUID(int=rng.getrandbits(128)))}
            if page == 0 and referrer:
                event["referrer"] = referrer
            events.append(event)
            ts += rng.randrange(4_000, 180_000)
            if rng.random() < 0.35:
                events.append({"event": "click", "distinct_id": distinct, "session_id": session_id,
                               "page_url": f"{site}{path}", "timestamp": ts,
                               "properties": {"element": rng.choice(["cta", "nav", "footer", "video"])},
                               "uuid": str(uuid.UUID(int=rng.getrandbits(128)))})
                ts += rng.randrange(2_000, 60_000)
            if path == "/signup" and rng.random() < 0.6:
                events.append({"event": "form_submit", "distinct_id": distinct, "session_id": session_id,
                               "page_url": f"{site}{path}", "timestamp": ts, "properties": {"form": "signup"},
                               "uuid": str(uuid.UUID(int=rng.getrandbits(128)))})
                ts += 1000
                if not person.identified:  # identify first, so the new id joins the anonymous person
                    person.identified = True
                    events.append({"event": "$identify", "distinct_id": person.user_id,
                                   "anon_id": person.anon_id, "traits": person.traits, "session_id": session_id,
                                   "timestamp": ts, "uuid": str(uuid.UUID(int=rng.getrandbits(128)))})
                    events.append({"event": "signup", "distinct_id": person.user_id, "session_id": session_id,
                                   "page_url": f"{site}{path}", "timestamp": ts + 1,
                                   "properties": {"plan": rng.choice(["free", "free", "pro"])},
                                   "uuid": str(uuid.UUID(int=rng.getrandbits(128)))})
                    ts += 2000
            if person.identified and path == "/pricing" and rng.random() < 0.25:
                plan, amount = rng.choice([("pro", 29), ("team", 99), ("pro-yearly", 290)])
                events.append({"event": "purchase", "distinct_id": person.user_id, "session_id": session_id,
                               "page_url": f"{site}{path}", "timestamp": ts,
                               "properties": {"plan": plan, "amount": amount, "currency": "EUR"},
                               "uuid": str(uuid.UUID(int=rng.getrandbits(128)))})
                ts += 2000
            path = rng.choice(PAGES)
        visitor = {"ip": person.ip, "language": person.language, "screen_width": person.screen_width}
        yield person, person.agent, [{**e, **visitor} for e in events if e["timestamp"] < now_ms]


async def seed(url: str, key: str, *, days: int = 7, users: int = 1500, seed_value: int = 1,
               batch: int = 200, progress: bool = True) -> Report:
    """Send the generated traffic; returns what was sent (and accepted)."""
    report = Report()
    now_ms = time.time_ns() // 1_000_000
    endpoint = url.rstrip("/") + "/api/v1/events/ingest"
    # one queue and one sender per user agent: a person's events (and their identify) arrive in order
    queues: dict[str, asyncio.Queue] = {}
    started = time.monotonic()
    shown = 0

    async def sender(session: aiohttp.ClientSession, agent: str, queue: asyncio.Queue) -> None:
        nonlocal shown
        while (events := await queue.get()) is not None:
            for _ in range(5):
                async with session.post(endpoint, json={"events": events},
                                        headers={"X-API-Key": key, "User-Agent": agent}) as response:
                    if response.status == 202:
                        break
                    if response.status in (429, 503):
                        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                        continue
                    raise SystemExit(f"ingest refused a batch: {response.status} {await response.text()}")
            else:
                raise SystemExit("ingest kept answering 503; is the server overloaded?")
            report.requests += 1
            if progress and report.requests - shown >= 10:
                shown = report.requests
                print(f"\r  {report.requests} batches sent…", end="", file=sys.stderr)

    pending: dict[str, list] = {}
    async with aiohttp.ClientSession() as session:
        workers = []
        for person, agent, events in generate(seed_value, days, users, now_ms):
            if not events:
                continue
            if person.crawler:
                report.crawler_events += len(events)
            else:
                report.sessions += 1
                report.users.add(person.user_id)
                for event in events:
                    report.events += 1
                    report.by_event[event["event"]] = report.by_event.get(event["event"], 0) + 1
            if agent not in queues:
                queues[agent] = asyncio.Queue(maxsize=4)
                workers.append(asyncio.create_task(sender(session, agent, queues[agent])))
            waiting = pending.setdefault(agent, [])
            waiting.extend(events)
            if len(waiting) >= batch:
                await queues[agent].put(waiting)
                pending[agent] = []
        for agent, waiting in pending.items():
            if waiting:
                await queues[agent].put(waiting)
        for queue in queues.values():
            await queue.put(None)
        await asyncio.gather(*workers)
    if progress:
        elapsed = time.monotonic() - started
        print(f"\r  {report.events:,} events, {report.sessions:,} sessions, {len(report.users):,} users "
              f"(and {report.crawler_events:,} crawlers' events) in {elapsed:.1f}s", file=sys.stderr)
    return report


async def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url.rstrip("/") + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"no pulse server answered at {url}")
            await asyncio.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="pulse server (default %(default)s)")
    parser.add_argument("--key", required=True, help="the project's ingest key (pk_…)")
    parser.add_argument("--days", type=int, default=7, help="days of traffic, ending now (default %(default)s)")
    parser.add_argument("--users", type=int, default=1500, help="people visiting (default %(default)s)")
    parser.add_argument("--events", type=int, help="about this many events (sets --users: ~11 events a person)")
    parser.add_argument("--seed", type=int, default=1, help="same seed, same traffic (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--wait", type=float, default=0, help="wait up to this many seconds for the server")
    args = parser.parse_args(argv)
    if args.events is not None:
        args.users = max(1, round(args.events / EVENTS_PER_PERSON))
    if args.days < 1 or args.users < 1:
        parser.error("--days, --users and --events must be at least 1")
    if args.wait:
        asyncio.run(wait_for(args.url, args.wait))
    report = asyncio.run(seed(args.url, args.key, days=args.days, users=args.users, seed_value=args.seed))
    summary = {"events": report.events, "sessions": report.sessions, "users": len(report.users),
               "crawler_events": report.crawler_events, "requests": report.requests, "by_event": dict(sorted(report.by_event.items()))}
    if args.json:
        import json

        print(json.dumps(summary))
    else:
        print(f"sent {summary['events']:,} events in {summary['sessions']:,} sessions of "
              f"{summary['users']:,} users ({summary['requests']} requests)")
        for name, count in summary["by_event"].items():
            print(f"  {name:<12} {count:>8,}")


if __name__ == "__main__":
    main()
