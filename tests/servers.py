"""Real `pulse` processes for tests: the CLI, and `pulse serve` on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pulse(*args: str, data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pulse.cli", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, check=True)


class Server:
    """`pulse serve [OPTIONS]` (`options`) on a free port, with `env` added to the environment (`PULSE_…`
    settings); its output in `log_path` (server.log beside the data)."""

    def __init__(self, data_dir: Path, *options: str, log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.options = options
        self.env = None if env is None else {**os.environ, **env}
        self.log_path = log_path or data_dir.parent / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    async def start(self) -> None:
        self.log = open(self.log_path, "ab")  # a file: a full pipe would block the server
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pulse.cli", "serve", *self.options, "--port", str(self.port),
             "--data-dir", str(self.data_dir)],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
        )
        async with aiohttp.ClientSession() as session:
            for _ in range(400):
                try:
                    async with session.get(f"{self.url}/health") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("server did not start: " + self.log_path.read_text())

    def stop(self, sig: int) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.log.close()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@contextlib.asynccontextmanager
async def serving(data_dir: Path, *create: str) -> AsyncIterator[tuple[Server, dict]]:
    """A project made by `pulse projects create NAME [OPTIONS]` (`create`), and `pulse serve` on its data."""
    project = json.loads(pulse("projects", "create", *create, "--json", data_dir=data_dir).stdout)
    server = Server(data_dir)
    await server.start()
    try:
        yield server, project
    finally:
        if server.process.poll() is None:
            server.stop(15)


async def read_api(server: Server, project: dict, endpoint: str, **params: str) -> dict:
    """One read-API answer of the project's (range 24h unless `params` say otherwise), with its read token."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/api/v1/projects/{project['id']}/{endpoint}",
                               params={"range": "24h", **params},
                               headers={"Authorization": f"Bearer {project['read_token']}"}) as response:
            assert response.status == 200, await response.text()
            return await response.json()


@contextlib.asynccontextmanager
async def chromium():
    """Headless Chromium (Debian's package) under Playwright."""
    from playwright.async_api import async_playwright

    assert Path(CHROMIUM).exists(), "Chromium is needed: apt-get install chromium (scripts/test does)"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            yield browser
        finally:
            await browser.close()
