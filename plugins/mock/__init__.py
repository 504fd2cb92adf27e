"""The `mock` probe: simulated devices and whole fleets for tests and demos (runs only when enabled)."""

from __future__ import annotations

from capmon.agent import hookimpl
from capmon.plugins.mock.probe import PROFILES, MockConfig, MockProbe, SimulatedHost, mock_fleet, profile_at

__all__ = ["PROFILES", "MockConfig", "MockProbe", "SimulatedHost", "mock_fleet", "profile_at"]


@hookimpl
def capmon_probe_types():
    return [MockProbe]
