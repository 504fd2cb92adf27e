"""MIG through the real NvmlProbe and the fake pynvml: health inherited from the GPU, fractions, first ticks."""

from __future__ import annotations

import time

import pytest
from fakes.fake_pynvml import FakeGpu, FakeMig, FakeNvml

from capmon.plugins.nvml import NvmlConfig, NvmlProbe
from capmon.plugins.nvml.probe import MIG_WITHOUT_INSTANCES


def mig_gpu(profiles: list[str] | None = None) -> FakeGpu:
    """An H100 in MIG mode; seven 1g.10gb instances unless `profiles` says otherwise."""
    gpu = FakeGpu(uuid="GPU-80079787-2286-22f7-d75b-8f72cfce78f9", bus_id="00000000:1F:00.0")
    gpu.mig_slots = [
        FakeMig(
            uuid=f"MIG-1c0e0b5a-0f3e-5b6e-8a1d-00000000000{i}",
            gpu_instance_id=7 + i,
            name=f"NVIDIA H100 80GB HBM3 MIG {profile}",
            profile=profile,
        )
        for i, profile in enumerate(profiles or ["1g.10gb"] * 7)
    ]
    return gpu


@pytest.fixture
def probes():
    made: list[NvmlProbe] = []

    def make(nvml: FakeNvml, **config) -> NvmlProbe:
        config.setdefault("xid_events", False)
        probe = NvmlProbe(NvmlConfig(**config), nvml=nvml)
        made.append(probe)
        probe.setup()
        return probe

    yield make
    for probe in made:
        probe.close()


def test_instances_of_a_gpu_with_a_pending_row_remap_are_unhealthy_with_its_error(probes):
    gpu = mig_gpu()
    gpu.remap_pending = True
    nvml = FakeNvml([gpu])
    probe = probes(nvml)
    nvml.advance(1)
    parent, *children = probe.sample()
    assert not parent.healthy and "reset" in parent.error
    assert len(children) == 7
    # Rentable slices of a GPU that needs a reset would be a lie: they share its verdict.
    assert [(c.healthy, c.error) for c in children] == [(False, parent.error)] * 7


def test_instances_of_a_gpu_within_a_fatal_xid_hold_are_unhealthy():
    gpu = mig_gpu()
    nvml = FakeNvml([gpu])
    probe = NvmlProbe(nvml=nvml)
    probe.setup()
    try:
        nvml.raise_xid(gpu, 95)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            parent, *children = probe.sample()
            if parent.extra["xid_errors"]:
                break
            time.sleep(0.01)
        assert not parent.healthy and parent.error.startswith("XID 95 ")
        assert len(children) == 7
        assert all(not c.healthy and c.error == parent.error for c in children)
    finally:
        probe.close()


def test_instances_of_a_lost_gpu_are_reported_unhealthy_not_dropped(probes):
    gpu = mig_gpu()
    nvml = FakeNvml([gpu])
    probe = probes(nvml)
    nvml.advance(1)
    assert all(s.healthy for s in probe.sample())
    gpu.lost = True
    nvml.advance(1)
    parent, *children = probe.sample()
    assert not parent.healthy and "GPU is lost" in parent.error
    assert [c.device_id for c in children] == [m.uuid for m in gpu.mig_slots]
    assert all(c.parent_id == gpu.uuid and not c.healthy and "GPU is lost" in c.error for c in children)
    # While NVML cannot be initialised again, the instances are still there, unhealthy.
    nvml.driver_loaded = False
    nvml.advance(1)
    samples = probe.sample()
    assert len(samples) == 8 and not any(s.healthy for s in samples)


def test_mig_enabled_without_instances_is_unhealthy_with_its_reason(probes):
    gpu = mig_gpu()
    gpu.mig_slots = [None] * 7
    nvml = FakeNvml([gpu])
    probe = probes(nvml)
    nvml.advance(1)
    [parent] = probe.sample()
    assert parent.info["mig"] == "enabled" and parent.extra["mig_instances"] == 0
    assert not parent.healthy
    assert parent.error == MIG_WITHOUT_INSTANCES
    assert parent.error == "MIG enabled, no instances: nothing can run until instances are created"


def test_instances_carry_their_share_of_the_gpu_and_their_profile(probes):
    gpu = mig_gpu(["3g.40gb", "2g.20gb", "1g.10gb", "1g.20gb"])
    nvml = FakeNvml([gpu])
    probe = probes(nvml)
    nvml.advance(1)
    parent, *children = probe.sample()
    assert "gpu_fraction" not in parent.extra
    assert [c.info["mig_profile"] for c in children] == ["3g.40gb", "2g.20gb", "1g.10gb", "1g.20gb"]
    assert [c.extra["gpu_fraction"] for c in children] == pytest.approx([3 / 7, 2 / 7, 1 / 7, 1 / 7])

    seven = mig_gpu()
    probe = probes(FakeNvml([seven]))
    children = probe.sample()[1:]
    assert [c.extra["gpu_fraction"] for c in children] == pytest.approx([1 / 7] * 7)
    assert sum(c.extra["gpu_fraction"] for c in children) == pytest.approx(1.0)


def test_first_tick_of_an_instance_that_reuses_a_gpu_instance_id_is_unknown(probes):
    gpu = mig_gpu()
    nvml = FakeNvml([gpu])
    probe = probes(nvml)
    for _ in range(2):
        nvml.advance(1)
        samples = probe.sample()
    assert all(c.util_pct == pytest.approx(0) for c in samples[1:])

    # Reconfigured to 2 x 3g.40gb; the driver hands out GPU instance ids 7 and 8 again. GPM counters
    # run on the hardware, not per instance: comparing the destroyed instance's sample with the new
    # one's gives a number measured over nothing.
    gpu.mig_slots = [
        FakeMig(
            uuid=f"MIG-2d0e0b5a-0f3e-5b6e-8a1d-00000000000{i}",
            gpu_instance_id=7 + i,
            name="NVIDIA H100 80GB HBM3 MIG 3g.40gb",
            profile="3g.40gb",
            load_pct=100,
            elapsed_us=5_000_000,
        )
        for i in range(2)
    ]
    nvml.advance(1)
    first = probe.sample()[1:]
    assert [c.device_id for c in first] == [m.uuid for m in gpu.mig_slots]
    assert [c.util_pct for c in first] == [None, None]
    assert all("sm_active_pct" not in c.extra for c in first)
    nvml.advance(1)
    second = probe.sample()[1:]
    assert [c.util_pct for c in second] == pytest.approx([100, 100])
