"""A collector whose storage hangs listens at once and says so in /healthz (item 18); a port in use
is one line and exit 1 (item 19)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

from collector_helpers import Clock, make_config
from servers import free_port

from capmon.collector.app import create_app
from capmon.collector.config import StorageConfig
from capmon.collector.storage import describe


async def test_healthz_answers_degraded_while_storage_hangs(aiohttp_client):
    accepted: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # never answers

    hanging = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = hanging.sockets[0].getsockname()[1]
    storage = StorageConfig(
        kind="influxdb_v1", url=f"http://127.0.0.1:{port}", create_database=True, timeout_s=600.0
    )
    client = await aiohttp_client(create_app(make_config(storage), clock=Clock()))
    resp = await client.get("/healthz")
    health = await resp.json()
    assert resp.status == 200
    assert health["status"] == "degraded"
    assert health["storage"] == {"kind": "influxdb_v1", "ready": False, "last_error": None}
    await client.close()
    hanging.close()
    for w in accepted:
        w.close()


async def test_a_storage_error_always_says_why(aiohttp_client):
    storage = StorageConfig(
        kind="influxdb_v1", url=f"http://127.0.0.1:{free_port()}", create_database=True, timeout_s=1.0
    )
    client = await aiohttp_client(create_app(make_config(storage), clock=Clock()))
    for _ in range(200):
        health = await (await client.get("/healthz")).json()
        if health["storage"]["last_error"]:
            break
        await asyncio.sleep(0.02)
    error = health["storage"]["last_error"]
    assert error.startswith("CREATE DATABASE capmon failed: ") and len(error) > len(
        "CREATE DATABASE capmon failed: "
    )
    assert describe(TimeoutError()) == "TimeoutError"


def test_collector_run_on_a_port_in_use_is_one_line_and_exit_1(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "collector.toml"
        config.write_text(f"[collector]\nport = {port}\n")
        proc = subprocess.run(
            [sys.executable, "-m", "capmon.collector.cli", "run", "-c", str(config), "--log-level", "error"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1, proc.stderr
    assert (
        proc.stderr.strip() == f"capmon collector: cannot listen on 127.0.0.1:{port}: address already in use"
    )
