"""Simulated agents' reports, built with the wire structs: 8 H100s per host, the host record and the
agent's self-metrics, as the real agent sends them. Deterministic from (agent id, seq)."""

from __future__ import annotations

import gzip
import time

from capmon.agent import wire

MODEL = "NVIDIA H100 80GB HBM3"
GIB = 1024**3
WINDOW_S = 60
LABEL_SETS = [
    {"site": f"site{i % 3}", "cluster": f"c{i % 7}", "pool": ("training", "inference")[i % 2]}
    for i in range(42)
]


def base_end(now: float | None = None) -> int:
    """A window end six days back, so hours of consecutive windows stay inside max_past_s (7 days)."""
    now = time.time() if now is None else now
    return int(now - 6 * 86400) // WINDOW_S * WINDOW_S


def device_window(agent_no: int, dev: int, seq: int, end: int) -> wire.DeviceWindow:
    kind = (agent_no + dev + seq // 30) % 4  # 0 busy, 1 allocated_idle, 2 free, 3 mostly free
    uuid = f"GPU-{agent_no:08x}-{dev:04x}-22f7-d75b-8f72cfce78f9"
    common = dict(
        device_id=uuid,
        vendor="nvidia",
        model=MODEL,
        index=dev,
        memory_total_bytes=80 * GIB,
        temp_max_c=35.0 + 10 * (kind == 0) + dev,
        extra={"sm_active_pct": 71.5 if kind == 0 else 0.0, "xid_errors": 0.0},
        info={"bus_id": f"00000000:{0x18 + dev:02X}:00.0"},
    )
    if kind == 0:
        return wire.DeviceWindow(
            state="busy",
            busy_s=60.0,
            util_mean_pct=93.4,
            util_max_pct=100.0,
            memory_used_bytes=70 * GIB,
            power_mean_w=612.5,
            processes=1,
            **common,
        )
    if kind == 1:
        return wire.DeviceWindow(
            state="allocated_idle",
            allocated_idle_s=60.0,
            util_mean_pct=0.0,
            util_max_pct=2.0,
            memory_used_bytes=20 * GIB,
            power_mean_w=88.0,
            processes=1,
            idle_since=end - 3600,
            **common,
        )
    return wire.DeviceWindow(
        state="free",
        free_s=57.0 if kind == 3 else 60.0,
        busy_s=3.0 if kind == 3 else 0.0,
        util_mean_pct=0.4,
        util_max_pct=14.0,
        memory_used_bytes=0,
        power_mean_w=71.0,
        processes=0,
        idle_since=end - 7200,
        **common,
    )


def report(agent_no: int, seq: int, first_end: int, devices: int = 8) -> wire.Report:
    end = first_end + seq * WINDOW_S
    return wire.Report(
        seq=seq,
        start=end - WINDOW_S,
        end=end,
        devices=[device_window(agent_no, d, seq, end) for d in range(devices)],
        host=wire.HostWindow(
            cpu_mean_pct=31.0,
            cpu_max_pct=77.0,
            memory_used_bytes=300 * GIB,
            memory_total_bytes=2048 * GIB,
            load1=12.0,
            load5=11.5,
            load15=11.0,
            cpu_count=224,
        ),
        agent=wire.AgentStats(
            uptime_s=3600.0 + seq * WINDOW_S,
            probes=[
                wire.ProbeStats(name="nvml", status="active", samples=seq * 60, last_duration_s=0.004),
                wire.ProbeStats(name="host", status="active", samples=seq * 60, last_duration_s=0.0002),
            ],
        ),
    )


def agent_id(prefix: str, agent_no: int) -> str:
    return f"{prefix}-{agent_no:05d}"


def batch(prefix: str, agent_no: int, first_seq: int, reports: int, first_end: int) -> wire.Batch:
    return wire.Batch(
        agent=wire.AgentIdentity(
            id=agent_id(prefix, agent_no),
            host=f"gpu-node-{agent_no:05d}.example.net",
            instance=f"spool-{agent_no:05d}",
            version="0.1.0",
            labels=LABEL_SETS[agent_no % len(LABEL_SETS)],
        ),
        reports=[report(agent_no, s, first_end) for s in range(first_seq, first_seq + reports)],
    )


def gzip_body(b: wire.Batch) -> bytes:
    """As the agent's transport sends it: compact JSON, gzip."""
    return gzip.compress(wire.encode(b), compresslevel=6)
