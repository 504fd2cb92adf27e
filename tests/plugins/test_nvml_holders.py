"""NvmlProbe's holders (who the driver says holds a GPU) through the fake pynvml: the same processes
that `processes` counts, with their device memory."""

from __future__ import annotations

import pynvml as real
import pytest
from fakes.fake_pynvml import GIB, FakeGpu, FakeMig, FakeNvml

from capmon.agent.probe import Holder
from capmon.plugins.nvml import NvmlConfig, NvmlProbe

MIB = 1024**2


class PerProcessMemoryNvml(FakeNvml):
    """The fake pynvml with each PID's `usedGpuMemory` chosen by the test (the fake gives 1 GiB to all)."""

    def __init__(self, gpus, memory: dict[int, int | None], **kwargs) -> None:
        super().__init__(gpus, **kwargs)
        self.memory = memory

    def _processes(self, handle, pids):
        listed = super()._processes(handle, pids)
        for p in listed:
            p.usedGpuMemory = self.memory.get(p.pid, p.usedGpuMemory)
        return listed


def gpus(n: int) -> list[FakeGpu]:
    return [
        FakeGpu(uuid=f"GPU-5a1e0000-2286-22f7-d75b-8f72cfce78f{i}", bus_id=f"00000000:{0x18 + i:02X}:00.0")
        for i in range(n)
    ]


@pytest.fixture
def probes():
    made: list[NvmlProbe] = []

    def make(nvml, **options) -> NvmlProbe:
        proc_root = options.pop("proc_root", "/proc")
        probe = NvmlProbe(NvmlConfig(xid_events=False, **options), nvml=nvml, proc_root=proc_root)
        made.append(probe)
        probe.setup()
        return probe

    yield make
    for probe in made:
        probe.close()


def test_holders_are_the_compute_and_graphics_processes_with_their_memory(probes):
    gpu, idle = gpus(2)
    gpu.compute_pids, gpu.graphics_pids = [4242, 4343], [4343, 5000]
    nvml = PerProcessMemoryNvml([gpu, idle], {4242: 70 * GIB, 4343: 512 * MIB, 5000: 64 * MIB})
    held, free = probes(nvml).sample()
    # 4343 is listed as compute and as graphics (nvidia-smi's "C+G"): one holder, not two.
    assert held.holders == (Holder(4242, 70 * GIB), Holder(4343, 512 * MIB), Holder(5000, 64 * MIB))
    assert held.processes == 3
    # Nothing on it: known to be nobody (an empty tuple), not unknown.
    assert (free.holders, free.processes) == ((), 0)


def test_graphics_holders_are_left_out_when_graphics_processes_is_off(probes):
    [gpu] = gpus(1)
    gpu.compute_pids, gpu.graphics_pids = [10, 11], [11, 12]
    [s] = probes(FakeNvml([gpu]), graphics_processes=False).sample()
    assert [h.pid for h in s.holders] == [10, 11] and s.processes == 2


@pytest.mark.parametrize(
    "not_available",
    [None, real.NVML_VALUE_NOT_AVAILABLE_ulonglong.value],
    ids=["none-as-nvidia-ml-py-gives-it", "raw-not-available-value"],
)
def test_memory_nvml_cannot_tell_is_unknown_not_zero(probes, not_available):
    # nvidia-ml-py turns NVML_VALUE_NOT_AVAILABLE into None (WDDM, some vGPUs); a binding that does
    # not leaves 2**64-1, which is not 16 EiB of device memory either.
    [gpu] = gpus(1)
    gpu.compute_pids = [700, 701]
    [s] = probes(PerProcessMemoryNvml([gpu], {700: not_available, 701: 3 * GIB})).sample()
    assert s.holders == (Holder(700, None), Holder(701, 3 * GIB))


def test_a_pid_in_both_lists_takes_the_memory_whichever_list_knows_it(probes):
    [gpu] = gpus(1)
    gpu.compute_pids, gpu.graphics_pids = [900], [900]

    class GraphicsKnowsMemory(PerProcessMemoryNvml):
        def nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle):
            listed = super().nvmlDeviceGetGraphicsRunningProcesses_v3(handle)
            for p in listed:
                p.usedGpuMemory = 2 * GIB
            return listed

    nvml = GraphicsKnowsMemory([gpu], {900: None})
    nvml.nvmlDeviceGetGraphicsRunningProcesses = real.throwOnVersionMismatch(
        nvml.nvmlDeviceGetGraphicsRunningProcesses_v3
    )
    [s] = probes(nvml).sample()
    assert s.holders == (Holder(900, 2 * GIB),)


def test_display_servers_are_not_holders_as_they_are_not_processes(probes, tmp_path):
    [gpu] = gpus(1)
    gpu.graphics_pids, gpu.compute_pids = [1500, 2100, 2300], [2100]
    for pid, name in {1500: "Xorg", 2100: "blender"}.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(name + "\n")
    [s] = probes(FakeNvml([gpu]), proc_root=tmp_path).sample()
    # Xorg alone on the graphics list holds nothing; 2300 has no readable name and stays a holder.
    assert [h.pid for h in s.holders] == [2100, 2300] and s.processes == 2


def test_mig_instances_report_their_own_processes(probes):
    [gpu] = gpus(1)
    gpu.mig_slots = [
        FakeMig(uuid=f"MIG-1c0e0b5a-0f3e-5b6e-8a1d-00000000000{i}", gpu_instance_id=7 + i) for i in range(3)
    ]
    gpu.mig_slots[1].pids = [31337, 31338]
    gpu.mig_slots[2].pids = [4000]
    nvml = PerProcessMemoryNvml([gpu], {31337: 9 * GIB, 31338: None, 4000: GIB})
    parent, *instances = probes(nvml).sample()
    assert [s.holders for s in instances] == [
        (),
        (Holder(31337, 9 * GIB), Holder(31338, None)),
        (Holder(4000, GIB),),
    ]
    assert [s.processes for s in instances] == [0, 2, 1]
    assert parent.processes == len(parent.holders)


def test_old_driver_lists_holders_through_the_v2_process_calls(probes):
    [gpu] = gpus(1)
    gpu.compute_pids = [77, 78]
    [s] = probes(FakeNvml([gpu], driver="r470")).sample()
    assert s.holders == (Holder(77, GIB), Holder(78, GIB)) and s.processes == 2


def test_a_driver_that_cannot_list_processes_gives_holders_unknown_not_empty(probes):
    [gpu] = gpus(1)
    gpu.compute_pids = [77]
    [s] = probes(FakeNvml([gpu], driver="r450")).sample()
    assert (s.holders, s.processes) == (None, None)
    assert s.healthy


def test_an_unreadable_gpu_has_no_holders_known(probes):
    [gpu] = gpus(1)
    gpu.compute_pids = [77]
    nvml = FakeNvml([gpu])
    probe = probes(nvml)
    gpu.lost = True
    [s] = probe.sample()
    assert not s.healthy and (s.holders, s.processes) == (None, None)
