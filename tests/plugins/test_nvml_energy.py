"""NVML's total-energy counter as `DeviceSample.energy_j` (issue 16 item 1), through the fake pynvml."""

from __future__ import annotations

import pytest
from fakes.fake_pynvml import FakeGpu, FakeNvml

from capmon.agent.classifier import IdleClassifier
from capmon.agent.wire import Report, check_report
from capmon.plugins.nvml import NvmlConfig, NvmlProbe

T0 = 1_700_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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


def test_each_gpu_reads_its_energy_counter_in_joules(probes):
    nvml = FakeNvml().gpu(power_w=70.0).gpu(power_w=300.0)
    nvml.gpus[0].energy_mj = 5_000_000.0  # 5 kJ since the driver loaded
    probe = probes(nvml)
    first = probe.sample()
    nvml.advance(10)
    second = probe.sample()
    assert [s.energy_j for s in first] == [5000.0, 0.0]
    assert [b.energy_j - a.energy_j for a, b in zip(first, second, strict=True)] == [700.0, 3000.0]
    assert nvml.calls["nvmlDeviceGetTotalEnergyConsumption"] == 4  # every tick, like power


def test_a_gpu_without_the_counter_has_none_and_is_not_asked_every_tick(probes):
    nvml = FakeNvml(
        [FakeGpu(uuid="GPU-old", bus_id="00000000:18:00.0", name="Tesla P100", energy_supported=False)]
    )
    clock = Clock()
    probe = probes(nvml, clock, slow_interval_s=30.0)
    for _ in range(10):
        [s] = probe.sample()
        assert s.energy_j is None and s.power_w == 70.0
        clock.now += 1
    assert nvml.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1
    clock.now += 30  # asked again at the next slow read: an error once is not "unsupported" for ever
    probe.sample()
    assert nvml.calls["nvmlDeviceGetTotalEnergyConsumption"] == 2


def test_a_binding_without_the_call_gives_none(probes):
    class OldBinding(FakeNvml):
        @property
        def nvmlDeviceGetTotalEnergyConsumption(self):
            raise AttributeError("nvmlDeviceGetTotalEnergyConsumption")

    [s] = probes(OldBinding().gpu()).sample()
    assert s.energy_j is None and s.power_w == 70.0


def test_mig_instances_have_no_energy_and_their_gpu_is_not_asked(probes):
    # The counter is the whole GPU's; an instance's share of it is not measurable, and a GPU in MIG
    # mode counts only through its instances, so asking would cost a call per tick for nothing.
    nvml = FakeNvml().gpu(mig=["3g.40gb", "3g.40gb"])
    parent, *instances = probes(nvml).sample()
    assert len(instances) == 2 and all(s.energy_j is None for s in [parent, *instances])
    assert nvml.calls["nvmlDeviceGetTotalEnergyConsumption"] == 0


def test_a_driver_reload_gives_no_negative_energy_and_the_window_stays_within_power_bounds(probes):
    nvml = FakeNvml().gpu(power_w=70.0)
    nvml.gpus[0].energy_mj = 9e9  # 9 MJ: a GPU up for a while
    probe = probes(nvml)
    classifier = IdleClassifier()
    for i in range(61):
        if i == 30:
            nvml.reload_driver()  # the counter starts again from 0
        classifier.observe_probe("nvml", T0 + i, probe.sample())
        nvml.advance(1)
    [w] = classifier.close_window(T0, T0 + 60)
    assert check_report(Report(seq=1, start=T0, end=T0 + 60, devices=[w])) is None
    assert w.free_s == 60
    # 59 one-second intervals measured by the counter at 70 W, the reload's by 70 W x 1 s.
    assert w.energy_j == pytest.approx(60 * 70.0)
    assert 0 <= w.idle_energy_j <= w.energy_j <= 70.0 * 60
