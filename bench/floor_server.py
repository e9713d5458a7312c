"""The floor: a bare aiohttp + uvloop handler that decodes the same body with the same decoder and answers 202."""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web

from pulse.protocol import IngestAck, batch_decoder, json_encoder


async def ingest(request: web.Request) -> web.Response:
    batch = batch_decoder.decode(await request.read())
    return web.Response(status=202, body=json_encoder.encode(IngestAck(len(batch.events), 0)),
                        content_type="application/json")


def main() -> None:
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/api/v1/events/ingest", ingest)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), loop=uvloop.new_event_loop(), access_log=None,
                print=lambda _: print("ready", flush=True))


if __name__ == "__main__":
    main()
