"""What the server derives from an event: browser/OS/device from the user agent, URL parts, referrer domain,
the language's base subtag and the screen's class.

Pure functions with bounded caches; user agents are parsed by ua-parser (maintained rules), not by regexes here.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

from ua_parser import parse as parse_user_agent

from pulse.protocol import LANGUAGE_PATTERN


class Agent(NamedTuple):
    browser: str
    os: str
    device: str  # desktop | mobile | tablet | bot | other
    is_bot: bool


class UrlParts(NamedTuple):
    host: str | None
    path: str | None
    utm_source: str | None
    utm_medium: str | None
    utm_campaign: str | None


_TABLET_HINTS = ("ipad", "tablet", "kindle", "silk", "playbook")


@functools.lru_cache(maxsize=4096)
def parse_agent(user_agent: str) -> Agent:
    if not user_agent:
        return Agent("Unknown", "Unknown", "other", False)
    result = parse_user_agent(user_agent)
    browser = result.user_agent.family if result.user_agent else "Other"
    os_name = result.os.family if result.os else "Other"
    device_family = result.device.family if result.device else ""
    lowered = user_agent.lower()
    if device_family == "Spider":
        return Agent(browser, os_name, "bot", True)
    if any(hint in lowered for hint in _TABLET_HINTS) or (os_name == "Android" and "mobile" not in lowered):
        device = "tablet"
    elif "mobi" in lowered or os_name in ("iOS", "Android"):
        device = "mobile"
    elif os_name in ("Windows", "Mac OS X", "macOS", "Linux", "Ubuntu", "Chrome OS", "Fedora", "FreeBSD"):
        device = "desktop"
    else:
        device = "other"
    return Agent(browser, os_name, device, False)


def load_agent_rules() -> None:
    """Compile ua-parser's rules now (about 0.15 s) rather than inside the first request that needs them."""
    parse_agent.__wrapped__("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0"
                            " Safari/537.36")


@functools.lru_cache(maxsize=65536)
def split_url(url: str) -> UrlParts:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return UrlParts(None, None, None, None, None)
    path = parts.path or "/"
    source = medium = campaign = None
    if "utm_" in parts.query:
        for key, value in parse_qsl(parts.query):
            if key == "utm_source":
                source = value[:200] or None
            elif key == "utm_medium":
                medium = value[:200] or None
            elif key == "utm_campaign":
                campaign = value[:200] or None
    return UrlParts(_strip_www(host), path, source, medium, campaign)


@functools.lru_cache(maxsize=16384)
def referrer_host(referrer: str) -> str | None:
    try:
        host = urlsplit(referrer).hostname
    except ValueError:
        return None
    return _strip_www(host)


def _strip_www(host: str | None) -> str | None:
    if not host:
        return None
    return host[4:] if host.startswith("www.") else host


# Plausible's screen classes, by the screen's width in CSS pixels: each holds the widths from its bound up
SCREEN_CLASSES = ((1440, "desktop"), (992, "laptop"), (576, "tablet"), (0, "mobile"))
_LANGUAGE_TAG = re.compile(LANGUAGE_PATTERN)


def screen_class(width: int | None) -> str | None:
    if width is None:
        return None
    for bound, name in SCREEN_CLASSES:
        if width >= bound:
            return name
    return None


def base_language(tag: str | None) -> str | None:
    """The first subtag of a language tag, lowercased ("en" of "en-US"); None for no tag, or one that is not
    letters, digits and hyphens (what a client sends as a header is not checked before it comes here)."""
    if not tag or _LANGUAGE_TAG.match(tag) is None:
        return None
    return tag.split("-", 1)[0].lower() or None


def header_language(accept_language: str | None) -> str | None:
    """The base language of an Accept-Language header's first tag ("en" of "en-US,en;q=0.9")."""
    if not accept_language:
        return None
    return base_language(accept_language.split(",", 1)[0].split(";", 1)[0].strip())
