"""The minor number of each GPU (the N of /dev/nvidiaN), which Slurm and GKE name GPUs by (injected clock)."""

from __future__ import annotations

import types

import pytest
from fakes.fake_pynvml import FakeGpu, FakeMig, FakeNvml

from capmon.agent.allocation import Allocation
from capmon.agent.daemon import match_allocations
from capmon.plugins.nvml import NvmlConfig, NvmlProbe


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gpus(minors: list[int]) -> list[FakeGpu]:
    return [
        FakeGpu(
            uuid=f"GPU-5a1c0000-2286-22f7-d75b-8f72cfce78f{i}",
            bus_id=f"00000000:{0x18 + i:02X}:00.0",
            minor_number=minor,
        )
        for i, minor in enumerate(minors)
    ]


@pytest.fixture
def probes():
    made: list[NvmlProbe] = []

    def make(nvml: FakeNvml, clock: Clock | None = None, **config) -> NvmlProbe:
        config.setdefault("xid_events", False)
        probe = NvmlProbe(NvmlConfig(**config), nvml=nvml, clock=clock or Clock())
        made.append(probe)
        probe.setup()
        return probe

    yield make
    for probe in made:
        probe.close()


def test_each_gpu_carries_its_minor_number_which_can_differ_from_its_index(probes):
    # NVML's index follows PCI bus order by default; the device files need not (hot-plug, a
    # driver reload after a GPU was removed): the probe reports what NVML says, never the index.
    probe = probes(FakeNvml(gpus([2, 0, 1])))
    samples = probe.sample()
    assert [(s.index, s.info["minor_number"]) for s in samples] == [(0, "2"), (1, "0"), (2, "1")]


def test_a_gpu_whose_minor_number_is_not_supported_has_none_and_is_otherwise_read(probes):
    listed = gpus([0, 1])
    listed[1].minor_supported = False
    samples = probes(FakeNvml(listed)).sample()
    assert samples[0].info["minor_number"] == "0"
    assert "minor_number" not in samples[1].info  # absent, never a made-up index
    assert samples[1].healthy and samples[1].info["bus_id"] == "00000000:19:00.0"


def test_a_mig_instance_carries_its_parents_minor_number_under_its_own_key(probes):
    gpu = gpus([3])[0]
    gpu.mig_slots = [
        FakeMig(uuid=f"MIG-1c0e0b5a-0f3e-5b6e-8a1d-00000000000{k}", gpu_instance_id=7 + k) for k in range(2)
    ]
    parent, *instances = probes(FakeNvml([gpu])).sample()
    assert parent.info["minor_number"] == "3"
    assert [i.info.get("parent_minor_number") for i in instances] == ["3", "3"]
    # Only the GPU owns /dev/nvidia3: an instance never claims the same minor number as its GPU.
    assert all("minor_number" not in i.info for i in instances)


def test_the_minor_number_is_read_on_the_slow_cadence(probes):
    listed = gpus([0, 1])
    nvml, clock = FakeNvml(listed), Clock()
    probe = probes(nvml, clock, slow_interval_s=30.0)
    probe.sample()
    assert nvml.calls["nvmlDeviceGetMinorNumber"] == 2
    listed[0].minor_number = 5  # the driver was reloaded with another numbering
    for _ in range(29):
        clock.now += 1
        samples = probe.sample()
    assert nvml.calls["nvmlDeviceGetMinorNumber"] == 2  # not once per tick
    assert samples[0].info["minor_number"] == "0"
    clock.now += 1
    samples = probe.sample()
    assert samples[0].info["minor_number"] == "5"
    assert nvml.calls["nvmlDeviceGetMinorNumber"] == 4


def test_a_lost_gpu_keeps_its_last_minor_number_so_its_allocation_still_finds_it(probes):
    listed = gpus([1, 0])
    nvml = FakeNvml(listed)
    probe = probes(nvml)
    probe.sample()
    listed[0].lost = True
    lost, other = probe.sample()
    assert not lost.healthy and lost.info["minor_number"] == "1"
    assert other.healthy and other.info["minor_number"] == "0"


def test_a_slurm_allocation_of_dev_nvidia2_holds_the_gpu_with_minor_2_not_index_2(probes):
    # gres.conf `File=/dev/nvidia2` → Allocation(index=2): the agent matches the minor number.
    samples = probes(FakeNvml(gpus([2, 0, 1]))).sample()
    task = types.SimpleNamespace(
        source=types.SimpleNamespace(name="slurm"),
        error=None,
        allocations=(Allocation(source="slurm", device="gpu:0", vendor="nvidia", index=2, job_id="4242"),),
    )
    held, unknown = match_allocations(samples, [task])
    assert list(held) == [samples[0].device_id]
    assert not unknown
