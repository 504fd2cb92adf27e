"""The four built-in probes pass capmon.testing's ProbeContract, each against its own fake boundary."""

from __future__ import annotations

import psutil

from capmon.plugins.ascend import AscendConfig, AscendProbe
from capmon.plugins.host.probe import HostProbe
from capmon.plugins.mock import MockConfig, MockProbe
from capmon.plugins.nvml import NvmlConfig, NvmlProbe
from capmon.testing import CapmonClock, ProbeContract
from capmon.testing.npu_smi import NpuSmiRunner, recorded
from capmon.testing.nvml import FakeNvml

GIB = 1024**3


class TestNvmlProbeConforms(ProbeContract):
    unknown_fields = frozenset({"power_w", "util_pct"})

    def make_probe(self):
        self.nvml = (
            FakeNvml()
            .gpu(util=95, processes=[(4242, 30 * GIB)])
            .gpu(processes=[5151])
            .gpu()
            .gpu(mig=["3g.40gb", "3g.40gb"])
        )
        return NvmlProbe(NvmlConfig(xid_events=False), nvml=self.nvml)

    def make_absent_probe(self):
        return NvmlProbe(NvmlConfig(xid_events=False), nvml=FakeNvml(library=False))

    def make_unknown_probe(self):
        # Some vGPU and passthrough setups support neither utilisation nor power.
        self.nvml = FakeNvml().gpu(power_w=None, utilisation=False, gpm=False)
        return NvmlProbe(NvmlConfig(xid_events=False), nvml=self.nvml)

    def advance(self, seconds):
        self.nvml.advance(seconds)


class TestAscendProbeConforms(ProbeContract):
    unknown_fields = frozenset({"power_w"})

    def make_probe(self):
        runner = NpuSmiRunner.recorded("info_910b3_8npu_v25.2.0_with_process_empty_name.txt")
        return AscendProbe(AscendConfig(), run=runner)

    def make_absent_probe(self):
        return AscendProbe(AscendConfig(npu_smi="/nonexistent/npu-smi"))

    def make_unknown_probe(self):
        # A 310P whose npu-smi prints NA for power.
        return AscendProbe(run=NpuSmiRunner(recorded("info_310p3_v25.3.rc1_power_NA_no_processes.txt")))


class TestHostProbeConforms(ProbeContract):
    # psutil is a dependency of capmon: there is no host without its boundary to refuse.

    def make_probe(self):
        self.clock = CapmonClock()
        return HostProbe(psutil=psutil, clock=self.clock)

    def advance(self, seconds):
        self.clock.advance(seconds)


class TestMockProbeConforms(ProbeContract):
    unknown_fields = frozenset({"processes"})

    def make_probe(self):
        self.clock = CapmonClock()
        return MockProbe(MockConfig(devices=8), clock=self.clock)

    def make_unknown_probe(self):
        self.clock = CapmonClock()
        return MockProbe(MockConfig(devices=4, count_processes=False), clock=self.clock)

    def advance(self, seconds):
        self.clock.advance(seconds)
