"""The visitor's country from the IP, at ingest (the IP is then hashed and dropped, never stored), and the names
of countries and languages for the read API.

Two sources. By default the offline data bundled with the `geoip2fast` package: its IPv4 table is loaded when
the server starts (a tenth of a second), its IPv6 table (tens of MB) only when the first IPv6 address needs it,
once per process, in a thread, with the requests that need it waiting for it. With `--geoip PATH`, a MaxMind
GeoLite2-Country / GeoIP2 or DB-IP country database (`.mmdb`), read with `maxminddb`; `--geoip off`: none.
Addresses that are private, loopback or otherwise not global have no country.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections.abc import Callable
from pathlib import Path

OFF = "off"
_V4_DATA = "geoip2fast.dat.gz"
_V6_DATA = "geoip2fast-ipv6.dat.gz"
_UNKNOWN = "--"  # geoip2fast's country code for an address it has no country for
RECENT_MAX = 16_384  # addresses whose country is kept (then all are forgotten at once): a few MB
_NOT_KEPT = object()


class GeoipUnavailable(Exception):
    """The country database the operator named cannot be read."""


class Countries:
    """Looks up the country (ISO 3166 alpha-2, "GB") of a visitor's IP address."""

    def __init__(self, setting: str) -> None:
        self._by_v4: Callable[[str], str | None] | None = None
        self._by_v6: Callable[[str], str | None] | None = None
        self._loading_v6: asyncio.Future | None = None
        # the countries of recent addresses: a visitor sends many requests, each looked up once per address
        self._recent: dict[str, str | None] = {}
        self.source = setting or "builtin"
        if setting == OFF:
            return
        if setting:
            self._by_v4 = self._by_v6 = _mmdb(Path(setting))
        else:
            self._by_v4 = _builtin(_V4_DATA)

    async def country(self, ip: str) -> str | None:
        found = self._recent.get(ip, _NOT_KEPT)
        if found is _NOT_KEPT:
            found = await self._country(ip)
            if len(self._recent) >= RECENT_MAX:
                self._recent.clear()
            self._recent[ip] = found
        return found

    async def _country(self, ip: str) -> str | None:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_global:
            return None
        lookup = self._by_v4 if address.version == 4 else self._by_v6
        if lookup is None and address.version == 6 and self.source == "builtin":
            lookup = await self._load_v6()
        return None if lookup is None else lookup(str(address))

    async def _load_v6(self) -> Callable[[str], str | None]:
        """The IPv6 table, loaded off the event loop once; every request that needs it meanwhile waits for it."""
        if self._loading_v6 is None:
            self._loading_v6 = asyncio.ensure_future(asyncio.to_thread(_builtin, _V6_DATA))
        self._by_v6 = await asyncio.shield(self._loading_v6)
        return self._by_v6


def _builtin(data_file: str) -> Callable[[str], str | None]:
    from geoip2fast import GeoIP2Fast

    table = GeoIP2Fast(geoip2fast_data_file=data_file, verbose=False)

    def lookup(ip: str) -> str | None:
        code = table.lookup(ip).country_code
        return None if not code or code == _UNKNOWN or len(code) != 2 else code

    return lookup


def _mmdb(path: Path) -> Callable[[str], str | None]:
    import maxminddb
    from maxminddb.errors import InvalidDatabaseError

    try:
        reader = maxminddb.open_database(str(path))
    except (OSError, ValueError, InvalidDatabaseError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise GeoipUnavailable(f"--geoip: cannot read the country database {str(path)!r}: {reason}") from None

    def lookup(ip: str) -> str | None:
        try:
            record = reader.get(ip)
        except ValueError:  # an IPv6 address in an IPv4-only database
            return None
        country = record.get("country") if isinstance(record, dict) else None
        code = country.get("iso_code") if isinstance(country, dict) else None
        return code.upper() if isinstance(code, str) and len(code) == 2 else None

    return lookup


@functools.lru_cache(maxsize=1024)
def country_name(code: str) -> str | None:
    """"United Kingdom" for "GB": pycountry's common name where it has one ("Taiwan"), else its name."""
    import pycountry

    found = pycountry.countries.get(alpha_2=code) if len(code) == 2 else None
    return None if found is None else getattr(found, "common_name", None) or found.name


@functools.lru_cache(maxsize=1024)
def language_name(code: str) -> str | None:
    """"English" for "en" (ISO 639-1, or ISO 639-3 for three letters)."""
    import pycountry

    if len(code) == 2:
        found = pycountry.languages.get(alpha_2=code)
    elif len(code) == 3:
        found = pycountry.languages.get(alpha_3=code)
    else:
        found = None
    return None if found is None else found.name


def load_names() -> None:
    """Read pycountry's tables now (about 0.05 s) rather than inside the first read that names a country."""
    country_name.__wrapped__("GB")
    language_name.__wrapped__("en")
