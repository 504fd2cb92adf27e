"""The host itself through psutil: CPU, memory and load, reported as a host record."""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from capmon.agent import HostSample, Probe, ProbeConfig, ProbeUnavailable


class HostProbe(Probe):
    name = "host"
    vendor = "host"
    Config = ProbeConfig

    def __init__(self, config: ProbeConfig | None = None, psutil: ModuleType | Any = None) -> None:
        super().__init__(config)
        self._psutil = psutil

    def setup(self) -> None:
        if self._psutil is None:
            try:
                import psutil
            except ImportError as exc:  # psutil is a dependency; only a broken install lands here
                raise ProbeUnavailable(f"psutil not importable: {exc}") from exc
            self._psutil = psutil
        # The first cpu_percent() call only starts the measurement (psutil returns a meaningless 0.0).
        self._psutil.cpu_percent(interval=None)

    def sample(self) -> Sequence[HostSample]:
        ps = self._psutil
        mem = ps.virtual_memory()
        try:
            load1, load5, load15 = os.getloadavg() if not hasattr(ps, "getloadavg") else ps.getloadavg()
        except (OSError, AttributeError):
            load1 = load5 = load15 = None
        return [
            HostSample(
                cpu_pct=float(ps.cpu_percent(interval=None)),
                memory_used_bytes=int(mem.total - mem.available),
                memory_total_bytes=int(mem.total),
                load1=load1,
                load5=load5,
                load15=load15,
                cpu_count=ps.cpu_count(),
            )
        ]
