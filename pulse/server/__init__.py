"""The aiohttp server: ingest, the read API, health. Never imports Textual."""
