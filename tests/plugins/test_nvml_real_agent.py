"""What the whole agent printed on a real H100 (benchmarks/gpu_agent_capture.sh, driver 580.159.04).

`capmon agent probe --json` idle and under a bf16 matmul load, next to `nvidia-smi -q -x` taken right
after; and `capmon agent run` with 5 s windows across the load starting and stopping (grace 4 s).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import msgspec
import pytest

from capmon.agent import wire

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "nvml"
MIB = 1024 * 1024


def _mib(text: str) -> float:
    return float(re.match(r"([\d.]+) MiB", text).group(1))


def test_probe_under_load_agrees_with_nvidia_smi():
    probe = json.loads((FIXTURES / "h100_agent_probe_busy.json").read_text())
    [gpu] = probe["devices"]
    smi = ET.parse(FIXTURES / "h100_agent_probe_busy_smi.xml").getroot().find("gpu")
    assert gpu["device_id"] == smi.findtext("uuid")
    assert gpu["model"] == smi.findtext("product_name")
    assert gpu["state"] == "busy" and gpu["processes"] == len(smi.findall("processes/process_info"))
    fb = smi.find("fb_memory_usage")
    # v2 memory info: used excludes the driver's reservation, as nvidia-smi's "Used" does.
    assert gpu["memory_used_bytes"] / MIB == pytest.approx(_mib(fb.findtext("used")), abs=64)
    assert gpu["extra"]["memory_reserved_bytes"] / MIB == pytest.approx(_mib(fb.findtext("reserved")))
    assert gpu["memory_total_bytes"] / MIB == pytest.approx(
        _mib(fb.findtext("total"))
    )  # reservation excluded
    smi_util = float(smi.findtext("utilization/gpu_util").rstrip(" %"))
    assert gpu["util_pct"] >= 90 and smi_util >= 90
    smi_power = float(smi.findtext("gpu_power_readings/average_power_draw").rstrip(" W"))
    assert gpu["power_w"] == pytest.approx(smi_power, rel=0.15)


def test_probe_idle_is_free_with_nothing_held():
    probe = json.loads((FIXTURES / "h100_agent_probe_idle.json").read_text())
    [gpu] = probe["devices"]
    assert (gpu["state"], gpu["util_pct"], gpu["processes"]) == ("free", 0.0, 0)
    assert probe["host"]["cpu_count"] == 16
    assert probe["probes_not_running"]["ascend"] == "skipped: npu-smi not on PATH"


def test_agent_run_follows_the_load_and_restarts_the_idle_streak():
    batches = [
        msgspec.json.decode(line, type=wire.Batch)
        for line in (FIXTURES / "h100_agent_run_load.jsonl").read_bytes().splitlines()
    ]
    reports = [r for b in batches for r in b.reports]
    assert [r.seq for r in reports] == list(range(1, len(reports) + 1))
    rows = [(r, r.devices[0]) for r in reports]
    for r, d in rows[1:-1]:  # full windows: every second is in exactly one state
        assert d.busy_s + d.allocated_idle_s + d.free_s + d.unavailable_s == pytest.approx(
            r.end - r.start, abs=0.01
        )
    states = [d.state for _, d in rows]
    first_busy = states.index("busy")
    last_busy = len(states) - 1 - states[::-1].index("busy")
    assert set(states[:first_busy]) == {"free"} and set(states[last_busy + 1 :]) == {"free"}
    assert set(states[first_busy : last_busy + 1]) == {"busy"}
    before, after = rows[first_busy - 1][1], rows[last_busy + 1][1]
    # The load lasted far longer than the 4 s grace: the streak ended, and a new one began after it.
    assert (
        before.idle_since is not None
        and after.idle_since is not None
        and after.idle_since > before.idle_since
    )
    assert all(d.idle_since is None for _, d in rows[first_busy + 1 : last_busy + 1])
    full_busy = [d for _, d in rows if d.busy_s == 5.0]
    assert len(full_busy) >= 3
    assert all(d.util_mean_pct >= 95 and d.power_mean_w > 500 for d in full_busy)
    assert max(d.extra["sm_active_pct"] for d in full_busy) > 90  # GPM SM activity, Hopper
    # While torch started up, the process held the GPU without computing: allocated-idle, really seen.
    assert any(d.allocated_idle_s > 0 for _, d in rows)
