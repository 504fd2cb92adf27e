"""The kit's fakes: the pynvml builder, the npu-smi runner and its shipped recordings, the clock."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from capmon.plugins.ascend import AscendProbe
from capmon.plugins.nvml import NvmlConfig, NvmlProbe
from capmon.testing import CapmonClock
from capmon.testing.npu_smi import Exit, Hang, NpuSmiRunner, fixtures, recorded
from capmon.testing.nvml import GIB, FakeNvml

TESTS_ASCEND = Path(__file__).resolve().parents[1] / "fixtures" / "ascend"
TABLE = "info_910b3_8npu_v25.2.0_with_process_empty_name.txt"


def sampled(nvml: FakeNvml):
    probe = NvmlProbe(NvmlConfig(xid_events=False), nvml=nvml)
    probe.setup()
    try:
        nvml.advance(1)
        probe.sample()
        nvml.advance(1)
        return {s.device_id: s for s in probe.sample()}
    finally:
        probe.close()


def test_the_nvml_builder_makes_gpus_the_real_probe_reads():
    nvml = (
        FakeNvml().gpu(util=95, processes=[(4242, 30 * GIB)]).gpu(model="NVIDIA A100-SXM4-80GB", power_w=None)
    )
    busy, a100 = sampled(nvml).values()
    assert (busy.util_pct, busy.processes, busy.memory_used_bytes) == (95.0, 1, 30 * GIB)
    assert [(h.pid, h.memory_bytes) for h in busy.holders] == [(4242, 30 * GIB)]
    assert (a100.model, a100.power_w, a100.processes, a100.memory_used_bytes) == (
        "NVIDIA A100-SXM4-80GB",
        None,
        0,
        0,
    )
    assert busy.device_id != a100.device_id and busy.device_id.startswith("GPU-")


def test_the_nvml_builder_makes_mig_instances_with_their_share_of_the_gpu():
    devices = sampled(FakeNvml().gpu(mig=["3g.40gb", "1g.10gb"]))
    parent, *instances = devices.values()
    assert [d.parent_id for d in instances] == [parent.device_id] * 2
    assert [d.extra["gpu_fraction"] for d in instances] == pytest.approx([3 / 7, 1 / 7])


def test_the_recordings_ship_with_the_package_and_match_the_project_fixtures():
    names = fixtures()
    assert TABLE in names and len(names) >= 50
    if TESTS_ASCEND.is_dir():  # until the project's tests read the shipped copy
        assert {p.name for p in TESTS_ASCEND.glob("*.txt")} == set(names)
        assert all(recorded(n) == (TESTS_ASCEND / n).read_text() for n in names)
    with pytest.raises(FileNotFoundError, match=r"no recorded npu-smi output 'nope\.txt'"):
        recorded("nope.txt")


def test_the_npu_smi_runner_replays_a_script_of_outputs_failures_and_hangs():
    runner = NpuSmiRunner(
        recorded(TABLE),
        Exit(187, "dcmi model initialized failed, because the device is used. ret is -8020\n"),
        Hang(),
        OSError(13, "Permission denied"),
        recorded(TABLE),
        t={"usages": Hang(), "board": Exit(1, ""), "health": Exit(1, "")},
    )
    probe = AscendProbe(run=runner)
    probe.setup()
    reasons = []
    for _ in range(5):
        samples = probe.sample()
        assert len(samples) == 8
        reasons.append({s.error for s in samples})
    assert reasons[0] == {None}
    assert "held by another container" in reasons[1].pop()
    assert "did not answer" in reasons[2].pop()
    assert "Permission denied" in reasons[3].pop()
    assert reasons[4] == {None}
    assert len(runner.info_calls()) == 5


def test_a_hang_with_a_wait_blocks_until_released_or_timed_out():
    runner = NpuSmiRunner(Hang(wait_s=30))
    runner.release()
    with pytest.raises(subprocess.TimeoutExpired):
        runner(["npu-smi", "info"], 0.01)


def test_the_clock_moves_only_when_told_and_its_monotonic_never_goes_back():
    clock = CapmonClock(1_000_000_000)
    assert clock() == 1_000_000_000 and clock.monotonic() == 0
    clock.advance(5)
    clock.set(999_999_000)  # an NTP step back
    clock.sleep(2)
    assert (clock(), clock.monotonic()) == (999_999_002, 7)
    with pytest.raises(ValueError, match="advance"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="unix seconds"):
        clock.set(float("nan"))
