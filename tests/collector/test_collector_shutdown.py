"""SIGTERM drains: the collector process finishes an in-flight request (its write reaches influxd) and exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from collector_helpers import AGENT_TOKEN, auth, batch, body, report
from servers import free_port

from capmon.collector.config import hash_token

pytestmark = pytest.mark.integration


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("collector did not start")


def test_sigterm_flushes_in_flight_writes_then_exits(tmp_path, influxd):
    import threading

    influxd.create_database("capmon_drain")
    port = free_port()
    config = tmp_path / "collector.toml"
    # A long flush interval keeps the request's write queued when SIGTERM arrives.
    config.write_text(
        f"""
[collector]
port = {port}
[auth]
agent_tokens = [{{ sha256 = "{hash_token(AGENT_TOKEN)}", agents = ["node-1"] }}]
[storage]
kind = "influxdb_v1"
url = "{influxd.url}"
db = "capmon_drain"
flush_interval_s = 1.5
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "capmon.collector.cli", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        end = int(time.time()) // 60 * 60
        result: dict = {}

        def send() -> None:
            req = urllib.request.Request(
                url + "/api/v1/reports",
                data=body(batch([report(end=end)])),
                headers={"Content-Type": "application/json", **auth(AGENT_TOKEN)},
            )
            with urllib.request.urlopen(req, timeout=20) as resp:
                result["status"] = resp.status
                result["body"] = json.loads(resp.read())

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        sender.join(20)
        assert proc.wait(20) == 0, proc.stderr.read().decode()
        assert result["status"] == 200
        assert len(influxd.rows("SELECT * FROM capmon_device", "capmon_drain")) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
