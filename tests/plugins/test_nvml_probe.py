"""NvmlProbe against a fake pynvml that raises the real pynvml error classes."""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import sys
import time
from pathlib import Path

import pytest
from fakes.fake_pynvml import GIB, FakeGpu, FakeMig, FakeNvml

from capmon.agent import ProbeUnavailable
from capmon.agent.probe import config_from_mapping
from capmon.plugins.nvml import NvmlConfig, NvmlProbe, capmon_probe_types

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins" / "nvml"


def h100s(n: int = 8) -> list[FakeGpu]:
    return [
        FakeGpu(uuid=f"GPU-8007978{i}-2286-22f7-d75b-8f72cfce78f9", bus_id=f"00000000:{0x18 + i:02X}:00.0")
        for i in range(n)
    ]


def by_id(samples):
    return {s.device_id: s for s in samples}


@pytest.fixture
def probes():
    """Probes built by a test; closed afterwards so no XID thread outlives it."""
    made: list[NvmlProbe] = []

    def make(nvml: FakeNvml, **config) -> NvmlProbe:
        # The XID thread waits up to 0.5 s to notice close(); only the tests that need it start it.
        config.setdefault("xid_events", False)
        probe = NvmlProbe(NvmlConfig(**config), nvml=nvml)
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.close()


def test_eight_h100s_busy_notebook_and_free_are_told_apart(probes):
    gpus = h100s()
    busy, notebook = gpus[0], gpus[1]
    busy.load_pct, busy.memory_used, busy.compute_pids, busy.power_mw = 100, 70 * GIB, [4242], 690_000
    notebook.memory_used, notebook.compute_pids = 20 * GIB, [5151]
    nvml = FakeNvml(gpus)
    probe = probes(nvml)
    probe.setup()
    nvml.advance(1)
    probe.sample()
    nvml.advance(1)
    samples = probe.sample()

    assert [s.device_id for s in samples] == [g.uuid for g in gpus]
    assert [s.index for s in samples] == list(range(8))
    assert {s.model for s in samples} == {"NVIDIA H100 80GB HBM3"}
    assert samples[3].info["bus_id"] == "00000000:1B:00.0"
    assert all(s.vendor == "nvidia" and s.healthy for s in samples)

    b, nb, free = samples[0], samples[1], samples[2]
    assert (b.util_pct, b.processes, b.memory_used_bytes, b.power_w) == (100.0, 1, 70 * GIB, 690.0)
    assert b.extra["sm_active_pct"] == pytest.approx(80.0)
    # The notebook holds memory while computing nothing: util 0 but a process and memory in use.
    assert (nb.util_pct, nb.processes, nb.memory_used_bytes) == (0.0, 1, 20 * GIB)
    # A free GPU shows no memory used: the driver's own reservation is not someone's allocation.
    assert (free.util_pct, free.processes, free.memory_used_bytes) == (0.0, 0, 0)
    assert free.memory_total_bytes == 85_520_809_984
    assert free.extra["memory_reserved_bytes"] == 503_316_480
    assert (free.power_w, free.temp_c) == (70.0, 35.0)


def test_utilisation_is_the_mean_since_the_last_sample_not_the_instant(probes):
    gpus = h100s(1)
    nvml = FakeNvml(gpus)
    probe = probes(nvml)
    probe.setup()
    nvml.advance(1)
    probe.sample()
    gpus[0].load_pct = 100
    nvml.advance(0.5)
    gpus[0].load_pct = 0
    nvml.advance(0.5)
    # nvidia-smi would show 0 right now; half of the last second was busy.
    assert probe.sample()[0].util_pct == pytest.approx(50, abs=1)


def test_first_sample_only_averages_the_last_interval_of_the_driver_buffer(probes):
    gpus = h100s(1)
    nvml = FakeNvml(gpus)
    gpus[0].load_pct = 100
    nvml.advance(10)
    gpus[0].load_pct = 0
    nvml.advance(2)
    probe = probes(nvml)
    probe.setup()
    # The driver's buffer still holds the busy seconds; the mean over all of it would be ~83 %.
    assert probe.sample()[0].util_pct == pytest.approx(0)


def test_utilisation_falls_back_to_the_driver_rate_when_no_new_buffer_sample(probes):
    gpus = h100s(1)
    gpus[0].load_pct = 40
    nvml = FakeNvml(gpus)
    probe = probes(nvml)
    probe.setup()
    nvml.advance(1)
    probe.sample()
    # Two ticks closer together than the driver's sampling period: NVML answers NotFound.
    assert probe.sample()[0].util_pct == 40.0


def test_a_lost_gpu_is_unhealthy_the_others_keep_reporting_and_nvml_is_reinitialised(probes):
    gpus = h100s()
    for gpu in gpus:
        gpu.load_pct = 30
    nvml = FakeNvml(gpus)
    probe = probes(nvml, xid_events=True)
    probe.setup()
    nvml.advance(1)
    probe.sample()

    gpus[5].lost = True
    nvml.advance(1)
    samples = by_id(probe.sample())
    lost = samples[gpus[5].uuid]
    assert not lost.healthy
    assert "GPU is lost" in lost.error
    assert lost.index == 5 and lost.info["bus_id"] == gpus[5].bus_id
    others = [samples[g.uuid] for g in gpus if g is not gpus[5]]
    assert all(s.healthy and s.util_pct == 30.0 for s in others)
    assert nvml.init_calls == 1

    gpus[5].lost = False  # e.g. recovered by a reset
    nvml.advance(1)
    samples = by_id(probe.sample())
    assert nvml.init_calls == 2 and nvml.initialised == 1
    # The XID watcher was restarted on the new NVML session, not duplicated.
    assert len(nvml.event_threads) == 1 and len(nvml.event_sets) == 1
    assert all(s.healthy for s in samples.values())
    assert samples[gpus[5].uuid].util_pct == 30.0


def test_driver_unloaded_mid_run_marks_every_known_gpu_unavailable_until_it_returns(probes):
    gpus = h100s(2)
    nvml = FakeNvml(gpus)
    probe = probes(nvml)
    probe.setup()
    nvml.advance(1)
    probe.sample()

    nvml.driver_loaded = False
    for _ in range(2):  # the tick that notices, then a tick whose re-init fails
        nvml.advance(1)
        samples = probe.sample()
        assert [s.device_id for s in samples] == [g.uuid for g in gpus]
        assert not any(s.healthy for s in samples)
    assert "re-initialisation failed: Driver Not Loaded" in samples[0].error

    nvml.driver_loaded = True
    nvml.advance(1)
    assert all(s.healthy and s.util_pct == 0.0 for s in probe.sample())


def mig_gpu() -> FakeGpu:
    gpu = h100s(8)[7]  # its own UUID beside h100s(n < 8) in one fake
    gpu.mig_slots = [
        FakeMig(uuid=f"MIG-1c0e0b5a-0f3e-5b6e-8a1d-00000000000{i}", gpu_instance_id=7 + i) for i in range(7)
    ]
    return gpu


def test_mig_instances_are_devices_of_their_own(probes):
    gpu = mig_gpu()
    gpu.mig_slots[2].load_pct = 100
    gpu.mig_slots[2].pids = [31337]
    gpu.mig_slots[4].memory_used = 3 * GIB
    nvml = FakeNvml([gpu])
    probe = probes(nvml)
    probe.setup()
    nvml.advance(1)
    first = probe.sample()
    nvml.advance(1)
    samples = probe.sample()

    parent, children = samples[0], samples[1:]
    assert parent.device_id == gpu.uuid and parent.extra["mig_instances"] == 7
    # NVML has no whole-GPU utilisation in MIG mode: unknown, not idle.
    assert parent.util_pct is None
    assert [c.device_id for c in children] == [m.uuid for m in gpu.mig_slots]
    assert all(c.parent_id == gpu.uuid and c.memory_total_bytes == 10 * GIB for c in children)
    assert [c.processes for c in children] == [0, 0, 1, 0, 0, 0, 0]
    assert children[4].memory_used_bytes == 3 * GIB
    # Utilisation per instance comes from GPM, which needs two samples: unknown on the first tick.
    assert all(c.util_pct is None for c in first[1:])
    assert children[2].util_pct == pytest.approx(100) and children[0].util_pct == pytest.approx(0)


def test_an_emptied_mig_slot_is_skipped_and_later_slots_still_reported(probes):
    gpu = mig_gpu()
    nvml = FakeNvml([gpu])
    probe = probes(nvml)
    probe.setup()
    nvml.advance(1)
    assert len(probe.sample()) == 8
    destroyed = gpu.mig_slots[3]
    gpu.mig_slots[3] = None
    nvml.advance(1)
    ids = [s.device_id for s in probe.sample()[1:]]
    assert destroyed.uuid not in ids
    assert ids == [m.uuid for m in gpu.mig_slots if m is not None]
    assert len(ids) == 6


def test_mig_utilisation_without_gpm_is_unknown_never_zero(probes):
    gpu = mig_gpu()
    gpu.gpm = False
    gpu.mig_slots[0].load_pct = 100
    nvml = FakeNvml([gpu])
    probe = probes(nvml)
    probe.setup()
    for _ in range(2):
        nvml.advance(1)
        samples = probe.sample()
    assert [s.util_pct for s in samples] == [None] * 8
    assert all(s.healthy for s in samples)


def test_old_driver_without_v2_memory_and_v3_processes_still_counts_processes(probes):
    gpus = h100s(1)
    gpus[0].memory_used, gpus[0].compute_pids = 4 * GIB, [77, 78]
    nvml = FakeNvml(gpus, driver="r470")
    probe = probes(nvml)
    probe.setup()
    nvml.advance(1)
    s = probe.sample()[0]
    assert s.processes == 2
    # v1 memory info counts the driver reservation as used; there is nothing better on this driver.
    assert s.memory_used_bytes == 4 * GIB + gpus[0].memory_reserved
    assert "memory_reserved_bytes" not in s.extra
    assert s.healthy and s.util_pct == 0.0


def test_driver_without_any_process_query_reports_processes_unknown_not_zero(probes):
    gpus = h100s(1)
    nvml = FakeNvml(gpus, driver="r450")
    probe = probes(nvml)
    probe.setup()
    nvml.advance(1)
    s = probe.sample()[0]
    assert s.processes is None
    assert s.healthy and s.memory_total_bytes is not None


def test_graphics_processes_are_counted_once_alongside_compute(probes):
    gpus = h100s(1)
    gpus[0].compute_pids, gpus[0].graphics_pids = [10, 11], [11, 12]
    nvml = FakeNvml(gpus)
    counted = probes(nvml)
    counted.setup()
    compute_only = probes(nvml, graphics_processes=False)
    compute_only.setup()
    assert counted.sample()[0].processes == 3
    assert compute_only.sample()[0].processes == 2


def test_power_not_supported_is_none_and_the_rest_is_reported(probes):
    gpus = h100s(1)
    gpus[0].power_mw = None
    nvml = FakeNvml(gpus)
    probe = probes(nvml)
    probe.setup()
    nvml.advance(1)
    s = probe.sample()[0]
    assert s.power_w is None
    assert s.healthy and s.temp_c == 35.0 and s.util_pct == 0.0


def test_utilisation_not_supported_is_unknown_not_idle(probes):
    gpus = h100s(2)
    gpus[1].utilisation = False
    nvml = FakeNvml(gpus)
    probe = probes(nvml, gpm=False)
    probe.setup()
    nvml.advance(1)
    readable, unsupported = probe.sample()
    assert readable.util_pct == 0.0
    assert unsupported.util_pct is None
    assert unsupported.healthy and unsupported.memory_total_bytes is not None


def test_pending_row_remap_makes_the_gpu_unhealthy(probes):
    gpus = h100s(2)
    gpus[1].remap_pending = True
    nvml = FakeNvml(gpus)
    probe = probes(nvml)
    probe.setup()
    healthy, pending = probe.sample()
    assert healthy.healthy
    assert not pending.healthy and "reset" in pending.error
    assert pending.memory_total_bytes is not None


def test_xid_errors_are_counted_per_gpu_and_the_thread_stops_on_close():
    gpus = h100s(3)
    nvml = FakeNvml(gpus)
    probe = NvmlProbe(nvml=nvml)
    probe.setup()
    try:
        nvml.raise_xid(gpus[2], 79)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            samples = probe.sample()
            if samples[2].extra["xid_errors"]:
                break
            time.sleep(0.01)
        assert [s.extra["xid_errors"] for s in samples] == [0, 0, 1]
        assert samples[2].extra["last_xid"] == 79
        assert len(nvml.event_threads) == 1
    finally:
        probe.close()
    assert nvml.event_threads == []
    assert nvml.event_sets == {}
    assert nvml.initialised == 0


def test_gpm_samples_are_freed_not_leaked(probes):
    gpu = mig_gpu()
    nvml = FakeNvml([*h100s(2), gpu])
    probe = probes(nvml)
    probe.setup()
    for _ in range(5):
        nvml.advance(1)
        probe.sample()
    # Two reused per GPU and per MIG instance (the previous tick's and a spare), not two per tick.
    assert len(nvml.gpm_samples) == 2 * (2 + 7)
    assert nvml.calls["nvmlGpmSampleAlloc"] == 2 * (2 + 7)
    gpu.mig_slots[6] = None
    nvml.advance(1)
    probe.sample()
    assert len(nvml.gpm_samples) == 2 * (2 + 6)
    probe.close()
    assert nvml.gpm_samples == {}


def test_no_nvml_library_is_unavailable_with_a_reason():
    probe = NvmlProbe(nvml=FakeNvml(h100s(), library=False))
    with pytest.raises(ProbeUnavailable, match=r"libnvidia-ml\.so\.1 not found \(no NVIDIA driver"):
        probe.setup()


def test_driver_not_loaded_at_setup_is_unavailable_with_a_reason():
    probe = NvmlProbe(nvml=FakeNvml(h100s(), driver_loaded=False))
    with pytest.raises(ProbeUnavailable, match="driver not loaded"):
        probe.setup()


def test_real_pynvml_on_a_host_without_a_driver_is_unavailable():
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        pass
    else:
        pytest.skip("this host has an NVIDIA driver")
    with pytest.raises(ProbeUnavailable, match=r"libnvidia-ml\.so\.1 not found"):
        NvmlProbe().setup()


def test_without_pynvml_the_plugin_imports_and_the_probe_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    for name in [m for m in sys.modules if m.startswith("capmon.plugins.nvml")]:
        monkeypatch.delitem(sys.modules, name)
    plugin = importlib.import_module("capmon.plugins.nvml")
    [probe_type] = plugin.capmon_probe_types()
    with pytest.raises(ProbeUnavailable, match=r"pip install '\.\[nvidia\]' in a capmon checkout"):
        probe_type().setup()


def test_probe_identity_and_defaults():
    [probe_type] = capmon_probe_types()
    probe = probe_type()
    assert (probe_type.name, probe_type.vendor) == ("nvml", "nvidia")
    assert (probe.interval_s, probe.timeout_s) == (1.0, 5.0)


def test_sample_toml_maps_onto_the_config_with_the_defaults():
    table = tomllib.loads((PLUGIN_DIR / "sample.toml").read_text())["probes"]["nvml"]
    config = config_from_mapping(NvmlConfig, table, "sample.toml [probes.nvml]")
    assert config == NvmlConfig()
    # Every option is in the sample (commented values count), so none is undocumented.
    text = (PLUGIN_DIR / "sample.toml").read_text()
    for f in dataclasses.fields(NvmlConfig):
        assert f"{f.name} =" in text, f.name


def test_readme_documents_every_option_and_extra_field():
    readme = (PLUGIN_DIR / "README.md").read_text()
    for f in dataclasses.fields(NvmlConfig):
        assert f"`{f.name}`" in readme, f.name
    for key in [
        "sm_active_pct",
        "memory_reserved_bytes",
        "xid_errors",
        "last_xid",
        "mig_instances",
        "bus_id",
    ]:
        assert f'"{key}"' in readme, key


def _wait_for_xids(probe, index, count):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        samples = probe.sample()
        if samples[index].extra["xid_errors"] >= count:
            return samples
        time.sleep(0.01)
    raise AssertionError("XID events never arrived")


def test_a_fatal_xid_makes_the_gpu_unavailable_for_the_hold_then_it_recovers():
    gpus = h100s(3)
    nvml = FakeNvml(gpus)
    probe = NvmlProbe(NvmlConfig(fatal_xid_hold_s=0.5), nvml=nvml)
    probe.setup()
    try:
        nvml.raise_xid(gpus[0], 13)  # graphics engine exception: the application's fault, GPU fine
        nvml.raise_xid(gpus[1], 79)  # fallen off the bus
        samples = _wait_for_xids(probe, 1, 1)
        samples = _wait_for_xids(probe, 0, 1)
        assert samples[0].healthy and samples[2].healthy
        assert not samples[1].healthy
        assert samples[1].error.startswith("XID 79 ") and "needs a reset" in samples[1].error
        time.sleep(0.6)
        assert probe.sample()[1].healthy, "the hold expired"
    finally:
        probe.close()


def _proc(tmp_path: Path, names: dict[int, str]) -> Path:
    for pid, name in names.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(name + "\n")
    return tmp_path


def test_display_servers_alone_do_not_hold_a_gpu(tmp_path):
    gpus = h100s(3)
    gpus[0].graphics_pids = [1500, 1620]  # a workstation's display: Xorg and gnome-shell, a few MiB
    gpus[1].graphics_pids, gpus[1].compute_pids = [1500, 2100], [2100]  # Xorg beside a CUDA+GL app
    gpus[2].graphics_pids = [1500, 2200, 2300]  # Xorg, a GL application, a process already gone
    proc = _proc(tmp_path, {1500: "Xorg", 1620: "gnome-shell", 2100: "blender", 2200: "glxgears"})
    nvml = FakeNvml(gpus)
    probe = NvmlProbe(NvmlConfig(xid_events=False), nvml=nvml, proc_root=proc)
    everyone = NvmlProbe(NvmlConfig(xid_events=False, display_servers=()), nvml=nvml, proc_root=proc)
    probe.setup()
    everyone.setup()
    try:
        # A name that cannot be read counts as a holder: never hide a process by guessing.
        assert [s.processes for s in probe.sample()] == [0, 1, 2]
        assert [s.processes for s in everyone.sample()] == [2, 2, 3]
    finally:
        probe.close()
        everyone.close()


def test_display_server_names_are_read_only_for_graphics_only_processes(tmp_path, monkeypatch):
    gpus = h100s(1)
    gpus[0].compute_pids = [10, 11]
    gpus[0].graphics_pids = [11]
    nvml = FakeNvml(gpus)
    probe = NvmlProbe(NvmlConfig(xid_events=False), nvml=nvml, proc_root=_proc(tmp_path, {11: "Xorg"}))
    probe.setup()
    read = []
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: read.append(self) or "")
    try:
        assert probe.sample()[0].processes == 2  # a compute process is a holder whatever its name
        assert read == []
    finally:
        probe.close()


def test_a_spinning_gpu_reports_full_utilisation_beside_its_low_sm_activity(probes):
    gpus = h100s(1)
    gpus[0].load_pct, gpus[0].sm_active_ratio = 100, 0.02  # an NCCL hang: kernels resident, SMs idle
    nvml = FakeNvml(gpus)
    probe = probes(nvml)
    probe.setup()
    for _ in range(2):
        nvml.advance(1)
        s = probe.sample()[0]
    assert s.util_pct == pytest.approx(100)
    assert s.extra["sm_active_pct"] == pytest.approx(2)
