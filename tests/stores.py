"""One suite for both stores: a test asks `store_backend` for projects and for "the server", and runs once on the
SQLite store (the app in this process under aiohttp's test client, as everywhere else) and once on a two-shard
ClickHouse cluster behind two real `pulse serve` nodes. The cluster's two `clickhouse-server`s start once per
run; each test gets a database of its own, except the events a module's tests only read (`loaded`): those go
into one database per module, sent once. Requests to the nodes go to each in turn, so what one node wrote is
read from the other.

What a test checks in the SQLite file itself stays SQLite's; on ClickHouse the same fact is read through the
store's own API (`events_since`, `export`, `verify`), opened as the CLI opens it."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from itertools import cycle
from pathlib import Path

import aiohttp
import pytest

from pulse.config import Settings
from pulse.server.app import create_app
from pulse.storage.base import open_store
from tests.clickhouse_servers import CLUSTER, MISSING, start_servers, stop_servers
from tests.conftest import ProjectKeys
from tests.servers import Server

BACKENDS = ["sqlite", "cluster"]
NODES = 2
NODE_STOP_TIMEOUT_S = 15
_NOT_PASSED = ("data_dir", "store")  # a node's own, given on its command line


@pytest.fixture(scope="session")
def clickhouse_cluster(tmp_path_factory):
    """Two `clickhouse-server`s naming each other as the shards of CLUSTER, for the whole run."""
    if MISSING is not None:
        pytest.skip(MISSING)
    shards = start_servers(tmp_path_factory.mktemp("ch-suite"), 2)
    yield shards
    stop_servers(shards)


def _node_env(settings: Settings) -> dict[str, str]:
    """The settings that differ from the defaults, as a node's PULSE_… environment."""
    return {f"PULSE_{field.name.upper()}": str(getattr(settings, field.name))
            for field in dataclasses.fields(Settings)
            if field.name not in _NOT_PASSED and getattr(settings, field.name) != getattr(Settings(), field.name)}


def _cluster_url(shards) -> str:
    hosts = ",".join(f"127.0.0.1:{shard.http_port}" for shard in shards)
    return f"clickhouse://{hosts}/t{uuid.uuid4().hex[:12]}?cluster={CLUSTER}"


class SharedCluster:
    """A database of the cluster and its nodes for one module's tests, filled once by each `load` they ask
    for. It lives across the tests' event loops: its own work runs on a loop of its own, in a thread."""

    def __init__(self, shards, tmp_path: Path) -> None:
        self.shards = shards
        self.tmp_path = tmp_path
        self.settings = Settings(data_dir=tmp_path / "cli", synchronous="NORMAL", catalog_poll_s=0.05,
                                 store=_cluster_url(shards))
        self.servers: list[Server] = []
        self.loaded: dict[tuple, tuple[list[str], ProjectKeys]] = {}

    def load(self, load, project_kwargs: dict) -> tuple[list[str], ProjectKeys]:
        key = (load.__module__, load.__qualname__, tuple(sorted(project_kwargs.items())))
        if key not in self.loaded:
            with ThreadPoolExecutor(1) as thread:
                self.loaded[key] = thread.submit(asyncio.run, self._load(load, project_kwargs)).result()
        return self.loaded[key]

    async def _load(self, load, project_kwargs: dict) -> tuple[list[str], ProjectKeys]:
        async with open_store(self.settings, serve=False) as store:
            made, ingest_key, read_token = await store.create_project(**project_kwargs)
        project = ProjectKeys(made.id, made.name, ingest_key, read_token)
        if not self.servers:
            self.servers = [Server(self.tmp_path / f"node{i}", "--store", self.settings.store,
                                   log_path=self.tmp_path / f"node{i}.log", env=_node_env(self.settings))
                            for i in range(NODES)]
            await asyncio.gather(*(server.start() for server in self.servers))
        urls = [server.url for server in self.servers]
        async with aiohttp.ClientSession() as session:
            await load(Nodes(urls, session), project)
        return urls, project

    def close(self) -> None:
        for server in self.servers:
            if server.process is not None and server.process.poll() is None:
                server.stop(NODE_STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def shared_cluster(clickhouse_cluster, tmp_path_factory):
    shared = SharedCluster(clickhouse_cluster, tmp_path_factory.mktemp("shared"))
    yield shared
    shared.close()


class Nodes:
    """The `pulse serve` nodes on one store, spoken to like aiohttp's test client: paths, not URLs; each request
    goes to the next node in turn (`at` picks one)."""

    def __init__(self, urls: list[str], session: aiohttp.ClientSession) -> None:
        self.urls = urls
        self.session = session
        self._turn = cycle(range(len(urls)))

    def _url(self, path: str, at: int | None) -> str:
        return self.urls[next(self._turn) if at is None else at] + path

    def get(self, path: str, *, at: int | None = None, **kwargs):
        return self.session.get(self._url(path, at), **kwargs)

    def post(self, path: str, *, at: int | None = None, **kwargs):
        return self.session.post(self._url(path, at), **kwargs)

    def options(self, path: str, *, at: int | None = None, **kwargs):
        return self.session.options(self._url(path, at), **kwargs)

    def ws_connect(self, path: str, *, at: int | None = None, **kwargs):
        return self.session.ws_connect(self._url(path, at), **kwargs)


class StoreBackend:
    """A store for one test: `project(...)` makes projects, `client(settings)` starts the server(s) on it."""

    def __init__(self, name: str, settings: Settings, tmp_path: Path, aiohttp_client, request) -> None:
        self.name = name
        self.sqlite = name == "sqlite"
        self.tmp_path = tmp_path
        self.aiohttp_client = aiohttp_client
        self.request = request
        if self.sqlite:
            self.settings = settings
        else:
            self.settings = dataclasses.replace(
                settings, store=_cluster_url(request.getfixturevalue("clickhouse_cluster")))
        self.servers: list[Server] = []
        self.sessions: list[aiohttp.ClientSession] = []

    @property
    def db(self):
        """The SQLite file's connection (the `db` fixture), for what only SQLite's tables tell."""
        assert self.sqlite, "only the SQLite store has a file to read"
        return self.request.getfixturevalue("db")

    def store(self):
        """The store as the CLI opens it: no writer of its own, beside the running server(s)."""
        return open_store(dataclasses.replace(self.settings, data_dir=self.tmp_path / "cli") if not self.sqlite
                          else self.settings, serve=False)

    async def project(self, name: str = "site", **kwargs) -> ProjectKeys:
        async with self.store() as store:
            project, ingest_key, read_token = await store.create_project(name, **kwargs)
        return ProjectKeys(project.id, project.name, ingest_key, read_token)

    async def client(self, settings: Settings | None = None):
        """The server on this store: the app in this process for SQLite, NODES `pulse serve` processes for
        ClickHouse, with `settings`' values (the test's own) as their PULSE_… environment."""
        settings = settings or self.settings
        if self.sqlite:
            return await self.aiohttp_client(create_app(settings))
        started = [Server(self.tmp_path / f"node{len(self.servers) + i}", "--store", self.settings.store,
                          log_path=self.tmp_path / f"node{len(self.servers) + i}.log", env=_node_env(settings))
                   for i in range(NODES)]
        self.servers += started
        await asyncio.gather(*(server.start() for server in started))
        session = aiohttp.ClientSession()
        self.sessions.append(session)
        return Nodes([server.url for server in started], session)

    async def loaded(self, load, **project_kwargs):
        """The server, and a project made with `project_kwargs` whose events `await load(client, project)` sent.
        On the cluster this is done once per module and `load`: the tests asking for it only read."""
        if self.sqlite:
            project = await self.project(**project_kwargs)
            client = await self.client()
            await load(client, project)
            return client, project
        urls, project = self.request.getfixturevalue("shared_cluster").load(load, project_kwargs)
        session = aiohttp.ClientSession()
        self.sessions.append(session)
        return Nodes(urls, session), project

    async def count(self, project: ProjectKeys) -> int:
        """Every event the store holds for the project, bots' too."""
        async with self.store() as store:
            return await store.events_since(project.id, 0)

    async def exported(self, project: ProjectKeys) -> list[dict]:
        """The project's events as `pulse export --format jsonl` writes them, oldest first."""
        out = io.StringIO()
        async with self.store() as store:
            await store.export(project.id, 0, 2**53, "jsonl", out)
        return [json.loads(line) for line in out.getvalue().splitlines()]

    async def verify(self) -> list:
        async with self.store() as store:
            return await store.verify()

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()
        for server in self.servers:
            if server.process is not None and server.process.poll() is None:
                server.stop(NODE_STOP_TIMEOUT_S)


@pytest.fixture(params=BACKENDS)
async def store_backend(request, settings, tmp_path, aiohttp_client):
    """The test's store: SQLite in the test's data directory, or a fresh database on the ClickHouse cluster."""
    backend = StoreBackend(request.param, settings, tmp_path, aiohttp_client, request)
    try:
        yield backend
    finally:
        await backend.close()
