"""JSON error responses: every error the API gives is {"error": ..., "field"?: ..., "index"?: ...}."""

from __future__ import annotations

import re

from aiohttp import web

from pulse.protocol import ErrorBody, json_encoder

_PATH_RE = re.compile(r"^(?P<message>.*) - at `\$(?P<path>[^`]*)`$", re.S)
_INDEX_RE = re.compile(r"^\.events\[(\d+)\]")


def json_error(
    status: int,
    message: str,
    *,
    field: str | None = None,
    index: int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = json_encoder.encode(ErrorBody(message, field, index))
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


class ApiError(Exception):
    """Raised by handlers; the error middleware turns it into a JSON response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        index: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.index = index
        self.headers = headers

    def response(self) -> web.Response:
        return json_error(self.status, self.message, field=self.field, index=self.index, headers=self.headers)


def validation_error(text: str) -> ApiError:
    """Turn msgspec's 'Expected ... - at `$.events[3].event`' into a 400 naming the field and event index."""
    match = _PATH_RE.match(text)
    if match is None:
        return ApiError(400, text)
    path = match.group("path").lstrip(".")
    index_match = _INDEX_RE.match(match.group("path"))
    index = int(index_match.group(1)) if index_match else None
    return ApiError(400, f"{path}: {match.group('message')}", field=path or None, index=index)
