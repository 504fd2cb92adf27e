"""`capmon.testing`: fakes, fixtures and a probe conformance suite for testing capmon plugins and
configurations without a GPU (README: "Testing with mock devices").

A pytest plugin: installed with capmon it registers itself (`-p no:capmon.testing` turns it off);
`-p capmon.testing` loads it explicitly. Fixtures: `capmon_clock`, `mock_devices`, `mock_fleet`,
`capmon_agent`, `capmon_collector`. Modules: `capmon.testing.nvml` (a fake pynvml),
`capmon.testing.npu_smi` (a replaying npu-smi runner). Works with pytest-asyncio in auto and strict
mode (the async fixtures are `pytest_asyncio.fixture`s).
"""

from __future__ import annotations

from typing import Any

from capmon.testing.clock import CapmonClock
from capmon.testing.plugin import capmon_agent, capmon_clock, capmon_collector, mock_devices, mock_fleet

__all__ = [
    "CapmonClock",
    "InProcessAgent",
    "InProcessCollector",
    "MemorySink",
    "ProbeContract",
    "agent_config",
    "capmon_agent",
    "capmon_clock",
    "capmon_collector",
    "check_sample_list",
    "collector_config",
    "mock_devices",
    "mock_fleet",
]

_LAZY = {
    "InProcessAgent": "capmon.testing.agent",
    "MemorySink": "capmon.testing.agent",
    "agent_config": "capmon.testing.agent",
    "InProcessCollector": "capmon.testing.collector",
    "collector_config": "capmon.testing.collector",
    "ProbeContract": "capmon.testing.contract",
    "check_sample_list": "capmon.testing.contract",
}


def __getattr__(name: str) -> Any:
    # Loaded on first use, so registering the plugin never imports the agent or the collector.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'capmon.testing' has no attribute {name!r}")
