"""Fixed past traffic for the web dashboard's tests: the same events every run, in March 2025 (UTC)."""

from __future__ import annotations

import random

import aiohttp

FIRST_DAY = 3  # 2025-03-03 .. 2025-03-16: two whole weeks, so a week's view has a previous week to compare with
DAYS = 14
AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1"
    " Mobile/15E148 Safari/604.1",
)
PATHS = ("/", "/pricing", "/docs", "/blog/launch", "/signup")
REFERRERS = ("https://google.com/", "https://news.ycombinator.com/", None)


def fixed_events(seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    events = []
    for day in range(FIRST_DAY, FIRST_DAY + DAYS):
        for visit in range(8 + day % 5):
            user = f"u{rng.randrange(60)}"
            hour = rng.randrange(24)
            agent = rng.choice(AGENTS)
            referrer = rng.choice(REFERRERS)
            for step in range(rng.randrange(1, 5)):
                path = rng.choice(PATHS)
                stamp = f"2025-03-{day:02d}T{hour:02d}:{10 + visit:02d}:{step * 7:02d}Z"
                events.append({"event": "page_view", "distinct_id": user, "timestamp": stamp, "user_agent": agent,
                               "page_url": f"https://site.example{path}", "referrer": referrer if step == 0 else None,
                               "language": rng.choice(("en-US", "de-DE")), "screen_width": rng.choice((390, 1440))})
                if rng.random() < 0.3:
                    events.append({"event": rng.choice(("click", "signup")), "distinct_id": user, "timestamp": stamp,
                                   "user_agent": agent, "page_url": f"https://site.example{path}"})
    return [{k: v for k, v in e.items() if v is not None} for e in events]


async def ingest(url: str, ingest_key: str, events: list[dict]) -> None:
    async with aiohttp.ClientSession() as session:
        for start in range(0, len(events), 500):
            async with session.post(f"{url}/api/v1/events/ingest", json={"events": events[start:start + 500]},
                                    headers={"X-API-Key": ingest_key}) as response:
                assert response.status == 202, await response.text()
