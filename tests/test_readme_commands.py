"""The README's curl lines work when pasted against `capmon demo`."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import socket
from pathlib import Path

import pytest

from capmon.collector.demo import default_args, run_demo

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_readme_curl_lines_work_against_the_demo():
    block = README.split("## See it work in one command", 1)[1].split("## Install", 1)[0]
    lines = [ln for ln in re.findall(r"^curl .*$", block, re.M)]
    assert len(lines) == 5
    port = free_port()
    args = default_args(hosts=2, devices=4, window=1, port=port, seconds=30)
    demo = asyncio.create_task(run_demo(args, io.StringIO()))
    try:
        await asyncio.sleep(3.5)  # two 1 s windows delivered
        for line in lines:
            cmd = line.replace("8900", str(port)).replace("curl -s", "curl -sf")
            proc = await asyncio.create_subprocess_shell(cmd, stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            assert proc.returncode == 0, line
            if "/metrics" in line:
                assert b"capmon_collector" in out
                continue
            body = json.loads(out)
            if "/api/v1/fleet" in line:
                assert body["totals"]["devices"] == 8
            if "state=idle" in line:
                assert body["devices"] and all(
                    d["state"] in ("free", "allocated_idle") for d in body["devices"]
                )
            if "site=ams1" in line:
                assert len(body["devices"]) == 1  # sim-000 (ams1, H100, training pool) has one idle device
                assert all(d["labels"]["site"] == "ams1" for d in body["devices"])
                assert all(
                    d["model"] == "NVIDIA H100 80GB HBM3" and d["state"] == "free" for d in body["devices"]
                )
    finally:
        demo.cancel()
        await asyncio.gather(demo, return_exceptions=True)
