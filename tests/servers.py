"""Real `pulse` processes for tests: the CLI, and `pulse serve` on a free port."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
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
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    async def start(self) -> None:
        self.log = open(self.data_dir.parent / "server.log", "ab")  # a file: a full pipe would block the server
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pulse.cli", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"{self.url}/health") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("server did not start: " + (self.data_dir.parent / "server.log").read_text())

    def stop(self, sig: int) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.log.close()
