"""nvml probe: NVIDIA GPUs and MIG instances through NVML (pynvml is imported only in `setup()`)."""

from __future__ import annotations

from capmon.agent import hookimpl
from capmon.plugins.nvml.probe import NvmlConfig, NvmlProbe

__all__ = ["NvmlConfig", "NvmlProbe", "capmon_probe_types"]


@hookimpl
def capmon_probe_types() -> list[type]:
    return [NvmlProbe]
