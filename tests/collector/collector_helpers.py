"""Shared helpers for the collector tests: a config with known tokens, report bodies, a recording writer."""

from __future__ import annotations

import dataclasses
import gzip
import json
import time
from collections.abc import Sequence
from typing import Any

from capmon.collector.config import (
    AuthConfig,
    CollectorConfig,
    Config,
    PricingConfig,
    StorageConfig,
    TokenConfig,
    hash_token,
)
from capmon.collector.storage import StorageError

AGENT_TOKEN = "agent-token-9f3c2b7a1e"
RACK_TOKEN = "rack-token-77aa55bb"
READ_TOKEN = "read-token-51d0c4e8aa"
NOW = 1_760_000_000


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_config(storage: StorageConfig | None = None, **collector: Any) -> Config:
    return Config(
        collector=dataclasses.replace(CollectorConfig(), **collector),
        auth=AuthConfig(
            agent_tokens=(
                TokenConfig(sha256=hash_token(AGENT_TOKEN), agents=("node-1",), name="node-1"),
                TokenConfig(sha256=hash_token(RACK_TOKEN), agents=("rack2-*",), name="rack2"),
            ),
            read_tokens=(TokenConfig(sha256=hash_token(READ_TOKEN), name="grafana"),),
        ),
        storage=storage or StorageConfig(flush_interval_s=0.0),
        pricing=PricingConfig(default=0.5, models={"H100": 2.5, "910B": 1.25}),
        source="test.toml",
    )


def device(device_id: str = "GPU-0", state: str = "free", **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "device_id": device_id,
        "vendor": "nvidia",
        "model": "NVIDIA H100 80GB HBM3",
        "index": 0,
        "state": state,
        "busy_s": 60.0 if state == "busy" else 0.0,
        "allocated_idle_s": 60.0 if state == "allocated_idle" else 0.0,
        "free_s": 60.0 if state == "free" else 0.0,
        "unavailable_s": 60.0 if state == "unavailable" else 0.0,
        "util_mean_pct": 0.0 if state != "busy" else 90.0,
        "util_max_pct": 1.0 if state != "busy" else 100.0,
        "memory_used_bytes": 1024,
        "memory_total_bytes": 80 * 2**30,
        "power_mean_w": 70.5,
        "temp_max_c": 33.0,
        "processes": 0,
    }
    d.update(kw)
    return d


def report(
    seq: int = 1, end: int = NOW, window: int = 60, devices: Sequence[dict] | None = None, **kw: Any
) -> dict:
    r: dict[str, Any] = {
        "seq": seq,
        "start": end - window,
        "end": end,
        "devices": list(devices) if devices is not None else [device()],
        "host": {"cpu_mean_pct": 12.5, "memory_used_bytes": 2**30, "memory_total_bytes": 2**34, "load1": 0.5},
        "agent": {
            "uptime_s": 3600.0,
            "spool_reports": 2,
            "spool_bytes": 4096,
            "probes": [{"name": "nvml", "status": "active", "samples": 60, "last_duration_s": 0.01}],
        },
    }
    r.update(kw)
    return r


def batch(
    reports: Sequence[dict] | None = None,
    agent_id: str = "node-1",
    host: str = "gpu-node-1",
    labels: dict[str, str] | None = None,
    instance: str | None = "spool-a",
) -> dict:
    agent: dict[str, Any] = {"id": agent_id, "host": host, "version": "0.1.0"}
    agent["labels"] = labels if labels is not None else {"site": "fra1", "cluster": "c1", "pool": "train"}
    if instance is not None:
        agent["instance"] = instance
    return {"protocol": 1, "agent": agent, "reports": list(reports) if reports is not None else [report()]}


def body(obj: Any, compress: bool = False) -> bytes:
    data = json.dumps(obj).encode()
    return gzip.compress(data) if compress else data


JSON = {"Content-Type": "application/json"}


class RecordingWriter:
    """A storage writer for unit tests: keeps every write; `fail` makes the next writes raise."""

    name = "recording"

    def __init__(self) -> None:
        self.writes: list[list[str]] = []
        self.fail: StorageError | None = None
        self.started = self.closed = False

    @property
    def lines(self) -> list[str]:
        return [line for w in self.writes for line in w]

    @property
    def report_lines(self) -> list[str]:
        """The lines of reports: without the collector's own `capmon_refusal` records."""
        return [line for line in self.lines if not line.startswith("capmon_refusal")]

    async def start(self) -> None:
        self.started = True

    async def write(self, lines: Sequence[str]) -> None:
        if self.fail is not None:
            raise self.fail
        self.writes.append(list(lines))

    async def close(self) -> None:
        self.closed = True


class Clock:
    """An injected clock (unix seconds) that tests move by hand."""

    def __init__(self, now: float = NOW + 1) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wall_now() -> int:
    return int(time.time())
