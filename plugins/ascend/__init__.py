"""ascend probe: Huawei Ascend NPUs through `npu-smi info`."""

from __future__ import annotations

from capmon.agent import hookimpl
from capmon.plugins.ascend.parser import NpuChip, NpuProcess, NpuSmiInfo, parse_npu_smi_info
from capmon.plugins.ascend.probe import AscendConfig, AscendProbe

__all__ = [
    "AscendConfig",
    "AscendProbe",
    "NpuChip",
    "NpuProcess",
    "NpuSmiInfo",
    "capmon_probe_types",
    "parse_npu_smi_info",
]


@hookimpl
def capmon_probe_types() -> list[type]:
    return [AscendProbe]
