"""What one tick of NvmlProbe costs in NVML calls, and that slow values still refresh (injected clock)."""

from __future__ import annotations

import time

import pytest
from fakes.fake_pynvml import FakeGpu, FakeMig, FakeNvml

from capmon.agent.probe import config_from_mapping
from capmon.plugins.nvml import NvmlConfig, NvmlProbe

# What changes every second, and so is read every tick.
PER_TICK = {
    "nvmlDeviceGetSamples",
    "nvmlDeviceGetUtilizationRates",  # only when the sample buffer has nothing new
    "nvmlGpmSampleGet",
    "nvmlGpmMigSampleGet",
    "nvmlGpmMetricsGet",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetGraphicsRunningProcesses",
    "nvmlDeviceGetTotalEnergyConsumption",  # the energy counter (whole GPUs)
}
# What changes in minutes: read every slow_interval_s.
SLOW = {
    "nvmlDeviceGetCount",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetName",
    "nvmlDeviceGetPciInfo",
    "nvmlDeviceGetMinorNumber",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceGetRemappedRows",
    "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex",
    "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetGpuInstanceById",
    "nvmlGpuInstanceGetInfo",
    "nvmlDeviceGetGpuInstanceProfileInfo",
    "nvmlGpmQueryDeviceSupport",
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def h100s(n: int) -> list[FakeGpu]:
    return [
        FakeGpu(uuid=f"GPU-8007978{i}-2286-22f7-d75b-8f72cfce78f9", bus_id=f"00000000:{0x18 + i:02X}:00.0")
        for i in range(n)
    ]


def mig_gpu() -> FakeGpu:
    gpu = FakeGpu(uuid="GPU-80079789-2286-22f7-d75b-8f72cfce78f9", bus_id="00000000:20:00.0")
    gpu.mig_slots = [
        FakeMig(uuid=f"MIG-1c0e0b5a-0f3e-5b6e-8a1d-00000000000{i}", gpu_instance_id=7 + i) for i in range(7)
    ]
    return gpu


@pytest.fixture
def probes():
    made: list[NvmlProbe] = []

    def make(nvml: FakeNvml, clock: Clock, **config) -> NvmlProbe:
        config.setdefault("xid_events", False)
        probe = NvmlProbe(NvmlConfig(**config), nvml=nvml, clock=clock)
        made.append(probe)
        probe.setup()
        return probe

    yield make
    for probe in made:
        probe.close()


def tick(nvml: FakeNvml, clock: Clock, probe: NvmlProbe):
    nvml.advance(1)
    clock.now += 1
    return probe.sample()


def test_a_tick_reads_only_what_changes_every_second(probes):
    gpus = h100s(8)
    nvml, clock = FakeNvml(gpus), Clock()
    probe = probes(nvml, clock)
    for _ in range(3):
        tick(nvml, clock, probe)
    nvml.calls.clear()
    for _ in range(20):  # well inside slow_interval_s (30 s)
        tick(nvml, clock, probe)
    assert set(nvml.calls) <= PER_TICK, set(nvml.calls) - PER_TICK
    assert not set(nvml.calls) & SLOW
    per_gpu_tick = sum(nvml.calls.values()) / (20 * len(gpus))
    # samples, GPM get + compare, memory, power, temperature, 2 process lists, energy counter
    assert per_gpu_tick == 9
    assert nvml.calls["nvmlGpmSampleAlloc"] == 0  # GPM buffers are reused, not allocated per tick


def test_a_mig_tick_reads_the_instances_without_enumerating_them(probes):
    gpu = mig_gpu()
    nvml, clock = FakeNvml([gpu]), Clock()
    probe = probes(nvml, clock)
    for _ in range(3):
        tick(nvml, clock, probe)
    nvml.calls.clear()
    for _ in range(10):
        assert len(tick(nvml, clock, probe)) == 8
    assert not set(nvml.calls) & SLOW, set(nvml.calls) & SLOW
    # The GPU: memory, power, temperature, 2 process lists; each instance: memory, GPM x2, compute processes.
    assert sum(nvml.calls.values()) == 10 * (5 + 7 * 4)


def test_slow_values_are_read_again_after_the_interval(probes):
    gpus = h100s(2)
    nvml, clock = FakeNvml(gpus), Clock()
    probe = probes(nvml, clock, slow_interval_s=30.0)
    tick(nvml, clock, probe)
    gpus[1].remap_pending = True
    gpus[1].name = "NVIDIA H100 80GB HBM3 (renamed)"
    for _ in range(29):
        samples = tick(nvml, clock, probe)
    assert samples[1].healthy  # 29 s since the slow read: still the cached health
    samples = tick(nvml, clock, probe)  # 30 s
    assert not samples[1].healthy and "reset" in samples[1].error
    assert samples[0].healthy
    # The name is identity: read once, not on every slow read.
    assert samples[1].model == "NVIDIA H100 80GB HBM3"


def test_a_new_mig_instance_appears_after_the_interval_a_destroyed_one_disappears_at_once(probes):
    gpu = mig_gpu()
    created = gpu.mig_slots[6]
    gpu.mig_slots[6] = None
    nvml, clock = FakeNvml([gpu]), Clock()
    probe = probes(nvml, clock, slow_interval_s=30.0)
    assert len(tick(nvml, clock, probe)) == 7
    gpu.mig_slots[6] = created
    destroyed, gpu.mig_slots[0] = gpu.mig_slots[0], None
    ids = [s.device_id for s in tick(nvml, clock, probe)[1:]]
    # The destroyed instance stopped answering: the layout was read again on the spot.
    assert destroyed.uuid not in ids and created.uuid in ids
    gpu.mig_slots[0] = FakeMig(uuid="MIG-3e0e0b5a-0f3e-5b6e-8a1d-000000000000", gpu_instance_id=20)
    assert len(tick(nvml, clock, probe)) == 7
    clock.now += 30
    ids = [s.device_id for s in tick(nvml, clock, probe)[1:]]
    assert "MIG-3e0e0b5a-0f3e-5b6e-8a1d-000000000000" in ids and len(ids) == 7


def test_an_xid_reads_the_health_again_at_once():
    gpus = h100s(2)
    nvml, clock = FakeNvml(gpus), Clock()
    probe = NvmlProbe(nvml=nvml, clock=clock)
    probe.setup()
    try:
        assert all(s.healthy for s in probe.sample())
        gpus[0].remap_pending = True
        nvml.raise_xid(gpus[0], 63)  # row remapping recorded: not fatal, but the health changed
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            samples = probe.sample()  # the injected clock does not move: no slow read is due
            if samples[0].extra["xid_errors"]:
                break
            time.sleep(0.01)
        assert not samples[0].healthy and "row remapping pending" in samples[0].error
        assert samples[1].healthy
    finally:
        probe.close()


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_slow_interval_must_be_positive(value):
    # nan is refused by the loader itself (every float must be finite), the rest by NvmlConfig.
    with pytest.raises(ValueError, match=r"slow_interval_s:? must be a (positive|finite) number"):
        config_from_mapping(NvmlConfig, {"slow_interval_s": value}, "agent.toml [probes.nvml]")
