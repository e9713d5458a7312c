"""Ingest in the formats of the trackers and SDKs people already run: PostHog's capture API, Plausible's
Events API and Umami's. Each module decodes its product's requests into pulse's events and stores them
through the same steps as pulse's own endpoint (`server/ingest.py`), then answers as its product does."""

from __future__ import annotations

from pulse.server.dropin import plausible, posthog, umami

ROUTES = (*posthog.routes, *plausible.routes, *umami.routes)
