"""The fake `pynvml` now ships in the kit as `capmon.testing.nvml`; this module keeps existing imports working."""

from __future__ import annotations

from capmon.testing.nvml import (
    GIB,
    H100_GI_PROFILES,
    H100_MIG_SLOTS,
    SAMPLE_PERIOD_US,
    FakeGpu,
    FakeMig,
    FakeNvml,
)

__all__ = ["GIB", "H100_GI_PROFILES", "H100_MIG_SLOTS", "SAMPLE_PERIOD_US", "FakeGpu", "FakeMig", "FakeNvml"]
