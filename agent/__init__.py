"""capmon agent: probes, sampling, idle classification, delivery.

The public API for probe plugins is what this module exports; nothing else in `capmon.agent` is a
contract.
"""

from __future__ import annotations

import pluggy

from capmon.agent.allocation import Allocation, AllocationSource
from capmon.agent.probe import (
    CommandRunner,
    DeviceSample,
    Holder,
    HostSample,
    Probe,
    ProbeConfig,
    ProbeUnavailable,
    Sample,
    run_command,
)

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("capmon")

__all__ = [
    "Allocation",
    "AllocationSource",
    "CommandRunner",
    "DeviceSample",
    "Holder",
    "HostSample",
    "Probe",
    "ProbeConfig",
    "ProbeUnavailable",
    "Sample",
    "__version__",
    "hookimpl",
    "run_command",
]
