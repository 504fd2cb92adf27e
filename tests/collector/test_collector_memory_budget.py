"""Memory stays bounded across concurrent requests (issue 11 item 9): 32 gzip bodies of 64 KB that
decode to 63 MB of valid JSON each, against the collector run as a process; its peak RSS (VmHWM)."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest
from collector_helpers import AGENT_TOKEN, auth, batch, report, wall_now
from servers import free_port, stop_process

from capmon.collector.config import hash_token

pytestmark = pytest.mark.integration

BUDGET_MIB = 128
BODY_MIB = 63


def vm_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(key)


def padded_body() -> bytes:
    """A valid batch with 63 MB of whitespace inside it: ~64 KB gzipped."""
    data = json.dumps(batch([report(end=wall_now())])).encode()
    return gzip.compress(data[:1] + b" " * (BODY_MIB * 2**20) + data[1:], compresslevel=9)


def test_peak_rss_stays_within_the_decoded_budget(tmp_path):
    port = free_port()
    config = tmp_path / "collector.toml"
    config.write_text(
        f"""
[collector]
port = {port}
max_inflight_decoded_bytes = {BUDGET_MIB * 2**20}
[auth]
agent_tokens = [{{ sha256 = "{hash_token(AGENT_TOKEN)}", agents = ["node-1"] }}]
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "capmon.collector.cli", "run", "-c", str(config), "--log-level", "warning"],
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "collector did not start"
                time.sleep(0.05)
        baseline_kib = vm_kib(proc.pid, "VmRSS")
        data = padded_body()
        assert len(data) < 100 * 1024

        async def send_all() -> list[int]:
            headers = {**auth(AGENT_TOKEN), "Content-Type": "application/json", "Content-Encoding": "gzip"}
            async with aiohttp.ClientSession() as session:

                async def one() -> int:
                    async with session.post(url + "/api/v1/reports", data=data, headers=headers) as resp:
                        if resp.status == 503:
                            assert resp.headers.get("Retry-After")
                        return resp.status

                return await asyncio.gather(*(one() for _ in range(32)))

        statuses = asyncio.run(send_all())
        peak_mib = vm_kib(proc.pid, "VmHWM") / 1024
    finally:
        stop_process(proc)
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    # Bound: what the process held before, plus the budget (decoded bodies and their decoded
    # objects), plus one request's body and the decoder's working memory beyond its reservation
    # (one 63 MB body), plus 64 MiB for allocator slack. Unbounded, 32 such bodies took 2.2 GiB.
    bound_mib = baseline_kib / 1024 + BUDGET_MIB + BODY_MIB + 64
    assert peak_mib < bound_mib, (
        f"peak RSS {peak_mib:.0f} MiB, bound {bound_mib:.0f} MiB, statuses {statuses}"
    )
