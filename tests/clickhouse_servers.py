"""Real ClickHouse servers for tests: private `clickhouse-server` instances on free loopback ports, each with a
config of its own in a temporary directory, alone or as two shards of one cluster (no ZooKeeper: every
instance names both in `remote_servers`, and the DDL runs on each). Stopped by their PID."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.servers import free_port

BINARY = shutil.which("clickhouse-server") or "/usr/bin/clickhouse-server"
MISSING = None if Path(BINARY).exists() else (
    "clickhouse-server is not installed here: apt-get install clickhouse-server clickhouse-client (scripts/test does)")
CLUSTER = "pulse_test"
START_TIMEOUT_S = 60

_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{dir}/server.log</log><errorlog>{dir}/error.log</errorlog></logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>{http}</http_port>
  <tcp_port>{tcp}</tcp_port>
  <path>{dir}/data/</path>
  <tmp_path>{dir}/tmp/</tmp_path>
  <user_files_path>{dir}/user_files/</user_files_path>
  <format_schema_path>{dir}/format_schemas/</format_schema_path>
  <users_config>{dir}/users.xml</users_config>
  <timezone>UTC</timezone>
  <mlock_executable>false</mlock_executable>
  <keep_alive_timeout>3</keep_alive_timeout>
  <mark_cache_size>67108864</mark_cache_size>
  <uncompressed_cache_size>67108864</uncompressed_cache_size>
  <remote_servers><{cluster}>{shards}</{cluster}></remote_servers>
</yandex>
"""
_SHARD = ("<shard><internal_replication>false</internal_replication>"
          "<replica><host>127.0.0.1</host><port>{tcp}</port></replica></shard>")
_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
    <profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
"""


class ClickHouse:
    """One `clickhouse-server` in `directory`, listening on free ports of 127.0.0.1."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.http_port = free_port()
        self.tcp_port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self, shards: list[ClickHouse]) -> None:
        for sub in ("data", "tmp", "user_files", "format_schemas"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        (self.directory / "users.xml").write_text(_USERS)
        (self.directory / "config.xml").write_text(_CONFIG.format(
            dir=self.directory, http=self.http_port, tcp=self.tcp_port, cluster=CLUSTER,
            shards="".join(_SHARD.format(tcp=shard.tcp_port) for shard in shards)))
        if os.geteuid() == 0:  # the server refuses to run as root on a directory another user owns: keep it root's
            shutil.chown(self.directory, pwd.getpwuid(0).pw_name)

    def start(self) -> None:
        self.log = open(self.directory / "stdout.log", "ab")
        self.process = subprocess.Popen([BINARY, f"--config-file={self.directory / 'config.xml'}"],
                                        stdout=self.log, stderr=subprocess.STDOUT, cwd=self.directory)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as response:
                    if response.read().startswith(b"Ok."):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        logs = "".join(path.read_text(errors="replace")[-2000:] for path in self.directory.glob("*.log"))
        raise RuntimeError(f"clickhouse-server did not start in {self.directory}: {logs}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self.log.close()


def start_servers(directory: Path, count: int) -> list[ClickHouse]:
    """`count` servers under `directory`, each naming all of them as the shards of CLUSTER."""
    servers = [ClickHouse(directory / f"shard{i + 1}") for i in range(count)]
    for server in servers:
        server.write_config(servers)
    for server in servers:
        server.start()
    try:
        for server in servers:
            server.wait_ready()
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def stop_servers(servers: list[ClickHouse]) -> None:
    for server in servers:
        server.stop()
