"""`capmon collector run --workers 2` with a real influxd (issue 14 item 3): every answer over a new
connection is the whole fleet, the same as one memory-view collector fed the same reports; a worker
that dies is restarted and counted; SIGTERM drains them all; the memory view refuses to be shared."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from collector_helpers import (
    AGENT_TOKEN,
    JSON,
    RACK_TOKEN,
    READ_TOKEN,
    Clock,
    auth,
    batch,
    body,
    device,
    hash_token,
    make_config,
    report,
)
from servers import free_port, stop_process

from capmon.collector.app import FLEET, create_app
from capmon.collector.config import StorageConfig
from capmon.collector.liveview import MemoryLiveView
from capmon.collector.published import decode_live

pytestmark = pytest.mark.integration

CAPMON = [sys.executable, "-m", "capmon.collector.cli"]
DEADLINE_S = 30.0


def toml(port: int, influx_url: str, db: str, live_view: str = "storage", reuse_port: bool = False) -> str:
    return f"""
[collector]
port = {port}
live_view = "{live_view}"
live_view_cache_s = 0.5
live_publish_interval_s = 0.5
reuse_port = {"true" if reuse_port else "false"}
drain_timeout_s = 5.0

[auth]
agent_tokens = [
  {{ sha256 = "{hash_token(AGENT_TOKEN)}", agents = ["node-1"] }},
  {{ sha256 = "{hash_token(RACK_TOKEN)}", agents = ["rack2-*"] }},
]
read_tokens = [{{ sha256 = "{hash_token(READ_TOKEN)}" }}]

[storage]
kind = "influxdb_v1"
url = "{influx_url}"
db = "{db}"
create_database = true
flush_interval_s = 0.0

[pricing]
default = 0.5
models = {{ H100 = 2.5 }}
"""


def six_agents(end: int) -> list[tuple[str, dict]]:
    """(token, batch): six agents of eight devices, two windows each, on two sites."""
    out = []
    states = ("free", "allocated_idle", "busy", "free", "unavailable", "free", "busy", "allocated_idle")
    for n in range(6):
        agent_id = "node-1" if n == 0 else f"rack2-n{n}"
        token = AGENT_TOKEN if n == 0 else RACK_TOKEN
        for seq, e in enumerate((end - 60, end), start=1):
            devices = [
                device(
                    f"GPU-{i}", states[(i + n) % 8], index=i, idle_since=e - 600 - i, state_since=e - 60 - i
                )
                for i in range(8)
            ]
            b = batch(
                [report(seq=seq, end=e, devices=devices)],
                agent_id=agent_id,
                host=f"host-{n}",
                labels={"site": "ams1" if n % 2 else "fra1", "pool": "train"},
            )
            b["agent"]["window_s"] = 60
            out.append((token, b))
    return out


def http(method: str, url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """One request on a new connection (urllib does not keep connections alive)."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, b""


def wait_for(what: str, check, timeout: float = DEADLINE_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout:g}s")


def fleet(base: str) -> dict | None:
    status, data = http("GET", f"{base}/api/v1/fleet", headers=auth(READ_TOKEN))
    return json.loads(data) if status == 200 else None


def worker_pids(proc: subprocess.Popen) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(proc.pid).children() if c.is_running()}
    except psutil.NoSuchProcess:
        return set()


async def memory_reference(aiohttp_client, batches: list[tuple[str, dict]], end: int) -> dict:
    """What one memory-view collector answers after the same reports."""
    clock = Clock(end - 3600)
    app = create_app(make_config(StorageConfig(kind="none")), clock=clock)
    clock.now = time.time()
    client = await aiohttp_client(app)
    for token, payload in batches:
        resp = await client.post("/api/v1/reports", data=body(payload), headers={**JSON, **auth(token)})
        assert resp.status == 200, await resp.text()
    return await MemoryLiveView(app[FLEET]).summary()


@pytest.fixture
def workers(tmp_path: Path, influxd):
    port = free_port()
    path = tmp_path / "collector.toml"
    influxd.query('DROP DATABASE "capmon_workers"', method="POST")  # nothing published by earlier tests
    path.write_text(toml(port, influxd.url, "capmon_workers"))
    proc = subprocess.Popen([*CAPMON, "run", "--config", str(path), "--workers", "2"])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            "two workers listening", lambda: len(worker_pids(proc)) == 2 and http("GET", base + "/healthz")[0]
        )
        yield proc, base
    finally:
        stop_process(proc, timeout=20)


async def test_two_workers_give_the_whole_fleet_on_every_connection(aiohttp_client, workers):
    _, base = workers
    now = int(time.time())
    end = now - now % 60
    batches = six_agents(end)
    for token, payload in batches:
        status, answer = http("POST", f"{base}/api/v1/reports", body(payload), {**JSON, **auth(token)})
        assert status == 200, answer
    want = await memory_reference(aiohttp_client, batches, end)
    # Each worker publishes what it received within live_publish_interval_s (0.5 s) and answers from
    # a cache of 0.5 s: wait for the whole fleet once, then for any answer cached before it to expire.
    wait_for("the whole fleet", lambda: (f := fleet(base)) and f["agents"]["total"] == 6)
    await asyncio.sleep(0.6)
    for _ in range(20):
        got = fleet(base)
        assert got is not None
        assert got["agents"] == {"total": 6, "stale": 0}
        assert got["totals"]["devices"] == 48
        for key in ("totals", "by_model", "by_label", "folded", "agents"):
            assert got[key] == want[key], key

    # Own metrics say which worker they come from; both answer on the one port. A worker whose
    # socket is not listening yet gets no connections (SO_REUSEPORT spreads over listening ones), so
    # ask until both have answered, within a bound.
    seen = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, text = http("GET", f"{base}/metrics", headers=auth(READ_TOKEN))
        assert status == 200
        # Any of its own series: a worker that took none of the six reports has no reports_total.
        seen |= set(re.findall(r'\bworker="(\d)"', text.decode()))
        assert "capmon_collector_live_devices 48" in text.decode()  # the fleet, from the store
        if seen == {"1", "2"}:
            break
    assert seen == {"1", "2"}


def published_agents(influxd, db: str) -> dict[int, set[str]]:
    """pid → the agents in the latest view that worker published (its collector id names its pid)."""
    answer = influxd.query("SELECT * FROM capmon_live GROUP BY collector ORDER BY time DESC LIMIT 1", db)
    out = {}
    for series in answer["results"][0].get("series", []):
        payload = decode_live(dict(zip(series["columns"], series["values"][0], strict=True)))
        pid = int(series["tags"]["collector"].split(":")[2])
        out[pid] = set(payload.agents.id) if payload else set()
    return out


async def test_a_dead_worker_is_restarted_and_counted_and_sigterm_drains_all(workers, influxd):
    proc, base = workers
    before = worker_pids(proc)
    now = int(time.time())
    for token, payload in six_agents(now - now % 60):
        status, answer = http("POST", f"{base}/api/v1/reports", body(payload), {**JSON, **auth(token)})
        assert status == 200, answer
    # Kill (no shutdown, no last publish) a worker that holds some of the agents, once both published.
    held = wait_for(
        "both workers published",
        lambda: (
            (p := published_agents(influxd, "capmon_workers"))
            and set(p) == before
            and len(set().union(*p.values())) == 6
            and p
        ),
    )
    await asyncio.sleep(0.6)  # any answer cached before both published has expired
    whole = fleet(base)
    assert whole["agents"] == {"total": 6, "stale": 0} and whole["totals"]["devices"] == 48
    victim = max(before, key=lambda pid: len(held[pid]))
    psutil.Process(victim).kill()
    after = wait_for(
        "a new worker", lambda: (p := worker_pids(proc)) and len(p) == 2 and victim not in p and p
    )
    assert len(after & before) == 1
    # Its agents are still in every answer, from what it published before it died.
    await asyncio.sleep(1.1)  # a cached answer from before the kill has expired
    for _ in range(10):
        got = fleet(base)
        assert got is not None and got["agents"] == {"total": 6, "stale": 0}
        assert got["totals"] == whole["totals"]

    def restart_counted():
        status, text = http("GET", f"{base}/metrics", headers=auth(READ_TOKEN))
        return status == 200 and re.search(
            r'capmon_collector_worker_restarts\{worker="\d"\} 1\b', text.decode()
        )

    wait_for("the restart counted", restart_counted)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=DEADLINE_S) == 0
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in after)


@pytest.mark.parametrize(
    ("args", "reuse_port", "expected"),
    [
        (["--workers", "2"], False, r'\[collector\] live_view: --workers 2 needs live_view = "storage"'),
        ([], True, r'\[collector\] reuse_port: needs live_view = "storage"'),
    ],
)
def test_the_memory_view_cannot_be_shared(tmp_path: Path, args, reuse_port, expected):
    path = tmp_path / "collector.toml"
    path.write_text(toml(free_port(), "http://127.0.0.1:9", "x", live_view="memory", reuse_port=reuse_port))
    done = subprocess.run([*CAPMON, "run", "--config", str(path), *args], capture_output=True, timeout=60)
    assert done.returncode == 2
    assert re.search(expected, done.stderr.decode()), done.stderr.decode()
