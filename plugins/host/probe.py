"""The host itself through psutil: CPU, memory and load, reported as a host record."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, ClassVar

from capmon.agent import HostSample, Probe, ProbeConfig, ProbeUnavailable


class HostProbe(Probe):
    name = "host"
    vendor = "host"
    Config = ProbeConfig
    # CPU % is a rate over the time between two readings of the CPU counters, and over a few
    # milliseconds (/proc/stat counts in 10 ms ticks) it says nothing. A sample this soon after the
    # previous reading has no CPU figure (None), never a made-up 0.0.
    cpu_min_interval_s: ClassVar[float] = 0.2
    # Seconds after setup() before a sample has every field: `capmon agent probe` waits this long.
    warmup_s: ClassVar[float] = 0.25

    def __init__(
        self,
        config: ProbeConfig | None = None,
        psutil: ModuleType | Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config)
        self._psutil = psutil
        self._clock = clock
        self._cpu_last: tuple[float, float, float] | None = None  # (when, busy, total) CPU seconds

    def setup(self) -> None:
        if self._psutil is None:
            try:
                import psutil
            except ImportError as exc:  # psutil is a dependency; only a broken install lands here
                raise ProbeUnavailable(f"psutil not importable: {exc}") from exc
            self._psutil = psutil
        self._cpu_last = (self._clock(), *_busy_total(self._psutil.cpu_times()))

    def _cpu_pct(self) -> float | None:
        # Not psutil.cpu_percent(interval=None): since psutil 5.9.6 it remembers the previous reading
        # per thread, and every sample() runs on a fresh thread, so it read 0.0 on a loaded host.
        now = self._clock()
        last = self._cpu_last
        if last is not None and now - last[0] < self.cpu_min_interval_s:
            return None  # too soon; the reading stays, so the next sample measures from it
        busy, total = _busy_total(self._psutil.cpu_times())
        self._cpu_last = (now, busy, total)
        if last is None or total - last[2] <= 0:
            return None
        return round(min(100.0, max(0.0, 100.0 * (busy - last[1]) / (total - last[2]))), 3)

    def sample(self) -> Sequence[HostSample]:
        ps = self._psutil
        mem = ps.virtual_memory()
        try:
            load1, load5, load15 = os.getloadavg() if not hasattr(ps, "getloadavg") else ps.getloadavg()
        except (OSError, AttributeError):
            load1 = load5 = load15 = None
        return [
            HostSample(
                cpu_pct=self._cpu_pct(),
                memory_used_bytes=int(mem.total - mem.available),
                memory_total_bytes=int(mem.total),
                load1=load1,
                load5=load5,
                load15=load15,
                cpu_count=ps.cpu_count(),
            )
        ]


def _busy_total(times: Any) -> tuple[float, float]:
    """Busy and total CPU seconds from `psutil.cpu_times()`, as psutil's own cpu_percent counts them:
    idle and iowait are not busy; guest time is already inside user time."""
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return total - times.idle - getattr(times, "iowait", 0.0), total
