"""Issue 19: the cases where the classifier told an operator the wrong thing, as exact traces.

Each test names the issue's item; each failed on the classifier before the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from capmon.agent import DeviceSample
from capmon.agent.classifier import ClassifierConfig, IdleClassifier
from capmon.plugins.ascend import AscendProbe

GIB = 1024**3
MIB = 1024**2
T0 = 1_000_000_000
FIXTURES = Path(__file__).parent.parent / "fixtures" / "ascend"


def gpu(util=0.0, processes=0, memory=GIB // 2, device_id="GPU-0", **kw):
    return DeviceSample(
        device_id=device_id,
        vendor="nvidia",
        model="NVIDIA H100 80GB HBM3",
        util_pct=util,
        memory_used_bytes=memory,
        memory_total_bytes=80 * GIB,
        processes=processes,
        **kw,
    )


def mig(i, parent="GPU-P", util=0.0, processes=0, slices=1):
    return DeviceSample(
        device_id=f"MIG-{parent}-{i}",
        vendor="nvidia",
        model="NVIDIA H100 80GB HBM3 MIG 1g.10gb",
        parent_id=parent,
        util_pct=util,
        memory_used_bytes=13 * MIB,
        memory_total_bytes=10 * GIB,
        processes=processes,
        extra={"gpu_fraction": slices / 7},
    )


def parent_gpu(healthy=True, error=None, device_id="GPU-P"):
    return DeviceSample(device_id, "nvidia", model="NVIDIA H100 80GB HBM3", healthy=healthy, error=error)


def by_id(windows):
    return {w.device_id: w for w in windows}


def windows_of(c, phases, t0=T0, window=60, step=1):
    """Replay (seconds, sample) phases, one tick per `step` seconds, closing a window every `window`."""
    out = []
    t = start = t0
    for seconds, sample in phases:
        for _ in range(0, seconds, step):
            c.observe(t, sample)
            t += step
            if t - start >= window:
                out.append(c.close_window(start, t)[0])
                start = t
    return out, t


# -- item 1: MIG instances inherit their parent's health ---------------------------------------


def test_mig_instances_of_an_unhealthy_gpu_are_unavailable_not_free():
    c = IdleClassifier()
    sick = parent_gpu(healthy=False, error="row remap pending: needs a reset")
    c.observe_probe("nvml", T0, [sick, *(mig(i) for i in range(7))])
    windows = by_id(c.close_window(T0, T0 + 60))
    assert len(windows) == 7 and "GPU-P" not in windows  # the parent still counts once, as its instances
    for w in windows.values():
        assert w.state == "unavailable" and w.unavailable_s == 60 and w.free_s == 0
        assert w.error == "parent GPU GPU-P unhealthy: row remap pending: needs a reset"
        assert w.fraction == pytest.approx(1 / 7) and "gpu_fraction" not in w.extra


def test_mig_instances_of_a_healthy_gpu_are_classified_on_their_own():
    c = IdleClassifier()
    c.observe_probe("nvml", T0, [parent_gpu(), mig(0), mig(1, processes=1), mig(2, util=80, processes=1)])
    states = {d: w.state for d, w in by_id(c.close_window(T0, T0 + 60)).items()}
    assert states == {"MIG-GPU-P-0": "free", "MIG-GPU-P-1": "allocated_idle", "MIG-GPU-P-2": "busy"}


# -- item 2: held memory with no listed process -------------------------------------------------


def test_memory_held_with_no_process_listed_is_allocated_idle_and_never_the_baseline():
    c = IdleClassifier()
    held = DeviceSample(
        "GPU-0",
        "nvidia",
        model="NVIDIA H100 80GB HBM3",
        util_pct=2.0,
        processes=0,
        memory_used_bytes=int(71.7 * GIB),
        memory_total_bytes=int(79.6 * GIB),
    )
    [w] = windows_of(c, [(60, held)])[0]
    assert w.state == "allocated_idle" and (w.allocated_idle_s, w.free_s) == (60, 0)
    assert w.reason.startswith("memory held, no process visible")
    assert c.remember()["GPU-0"][1] is None  # 71.7 GiB did not become the idle baseline
    # The job exits: the driver's own reservation is free, and that is what the baseline learns.
    [w] = windows_of(c, [(60, gpu(util=0, processes=0, memory=300 * MIB))], t0=T0 + 60)[0]
    assert w.state == "free" and c.remember()["GPU-0"][1] == 300 * MIB


def _npu_smi_without_the_process_row() -> str:
    text = (FIXTURES / "info_910b3_8npu_v25.2.0_with_process_empty_name.txt").read_text()
    row = next(line for line in text.splitlines() if "No running processes found in NPU 1 " in line)
    replaced, n = re.subn(r"^\| 2 +0 +\| 1333928 .*$", row.replace("NPU 1 ", "NPU 2 "), text, flags=re.M)
    assert n == 1
    return replaced


def test_ascend_hbm_held_without_a_process_row_is_allocated_idle():
    # npu-smi (in or outside containers) can show HBM in use with "No running processes found".
    text = _npu_smi_without_the_process_row()
    probe = AscendProbe(run=lambda argv, timeout: (0, text, "") if len(argv) == 2 else (255, "", "no"))
    probe.setup()
    c = IdleClassifier()
    c.observe_probe("ascend", T0, probe.sample())
    windows = by_id(c.close_window(T0, T0 + 60))
    held = windows["npu2-chip0"]
    assert held.processes == 0 and held.memory_used_bytes == 41052 * MIB
    assert held.state == "allocated_idle"
    assert held.reason.startswith("memory held, no process visible")
    # The idle chips (≈3.4 of 64 GB) are free, and their first zero-process sample taught the baseline.
    assert {d for d, w in windows.items() if w.state == "free"} == {f"npu{i}-chip0" for i in range(8)} - {
        "npu2-chip0"
    }
    saved = c.remember()
    assert saved["npu2-chip0"][1] is None and saved["npu3-chip0"][1] == 3390 * MIB


def test_a_learned_baseline_below_the_default_makes_small_jobs_visible():
    c = IdleClassifier()
    chip = {"vendor": "ascend", "model": "910A", "memory_total_bytes": 32 * GIB, "util_pct": 0.0}
    c.observe(T0, DeviceSample("npu0-chip0", processes=0, memory_used_bytes=10 * MIB, **chip))
    obs = c.observe(T0 + 1, DeviceSample("npu0-chip0", processes=0, memory_used_bytes=2 * GIB, **chip))
    # 2 GiB on a chip that idles at 10 MiB is held, though it is below the 3 GB default for 32 GB parts.
    assert obs.state == "allocated_idle"


# -- item 3: devices the probe stops listing ----------------------------------------------------


def test_a_chip_dropping_out_of_the_table_is_unavailable_until_forgotten():
    c = IdleClassifier(ClassifierConfig(forget_vanished_s=3600))

    def chip(i):
        return DeviceSample(f"npu{i}-chip0", "ascend", model="910B3", util_pct=0.0, processes=0)

    c.observe_probe("ascend", T0, [chip(0), chip(1)])
    c.observe_probe("ascend", T0 + 30, [chip(0)])
    w = by_id(c.close_window(T0, T0 + 60))
    assert (w["npu1-chip0"].free_s, w["npu1-chip0"].unavailable_s) == (30, 30)
    assert (
        w["npu1-chip0"].state == "unavailable" and w["npu1-chip0"].error == "no longer reported by its probe"
    )
    for k in range(1, 60):
        c.observe_probe("ascend", T0 + 60 * k, [chip(0)])
        w = by_id(c.close_window(T0 + 60 * k, T0 + 60 * (k + 1)))
        assert w["npu1-chip0"].state == "unavailable" and w["npu1-chip0"].unavailable_s == 60
        assert w["npu1-chip0"].free_s == 0
    c.observe_probe("ascend", T0 + 3600, [chip(0)])
    assert set(by_id(c.close_window(T0 + 3600, T0 + 3660))) == {"npu0-chip0"}  # an hour unseen: gone


def test_a_vanished_device_that_comes_back_is_classified_again():
    c = IdleClassifier()
    c.observe_probe("nvml", T0, [gpu(device_id="GPU-0"), gpu(device_id="GPU-1")])
    c.observe_probe("nvml", T0 + 10, [gpu(device_id="GPU-0")])
    c.observe_probe("nvml", T0 + 20, [gpu(device_id="GPU-0"), gpu(device_id="GPU-1")])
    w = by_id(c.close_window(T0, T0 + 60))["GPU-1"]
    assert (w.free_s, w.unavailable_s, w.state, w.error) == (50, 10, "free", None)


def test_mig_instances_of_a_lost_gpu_are_gone_and_the_gpu_is_one_unavailable_device():
    c = IdleClassifier()
    c.observe_probe("nvml", T0, [parent_gpu(), *(mig(i) for i in range(3))])
    assert len(c.close_window(T0, T0 + 60)) == 3
    lost = parent_gpu(healthy=False, error="GPU is lost")
    c.observe_probe("nvml", T0 + 60, [lost])
    windows = c.close_window(T0 + 60, T0 + 120)
    assert [(w.device_id, w.state) for w in windows] == [("GPU-P", "unavailable")]


def test_mig_reconfiguration_forgets_the_destroyed_instances_at_once():
    c = IdleClassifier()
    c.observe_probe("nvml", T0, [parent_gpu(), *(mig(i) for i in range(7))])
    c.close_window(T0, T0 + 60)
    new = [mig(10 + i, slices=3) for i in range(2)]
    c.observe_probe("nvml", T0 + 60, [parent_gpu(), *new])
    windows = by_id(c.close_window(T0 + 60, T0 + 120))
    assert set(windows) == {"MIG-GPU-P-10", "MIG-GPU-P-11"}
    assert all(w.fraction == pytest.approx(3 / 7) for w in windows.values())


def test_a_gpu_split_into_mig_instances_is_no_longer_a_device_of_its_own():
    c = IdleClassifier()
    c.observe_probe("nvml", T0, [gpu(device_id="GPU-P")])
    c.observe_probe("nvml", T0 + 30, [parent_gpu(), mig(0)])
    assert set(by_id(c.close_window(T0, T0 + 60))) == {"MIG-GPU-P-0"}


# -- item 5: the grace works in both directions -------------------------------------------------

TRAINING = gpu(util=92, processes=1, memory=60 * GIB)
STALLED = gpu(util=0, processes=1, memory=60 * GIB)
IDLE = gpu(util=0, processes=0)
CHECK = gpu(util=100, processes=1, memory=GIB)


@pytest.mark.parametrize(
    "busy_s,idle_s",
    [(55, 5), (50, 10), (42, 5)],  # a 5 s stall per minute; requests with gaps; unaligned with windows
)
def test_short_idleness_inside_busy_work_never_starts_a_streak(busy_s, idle_s):
    c = IdleClassifier()
    windows, _ = windows_of(c, [(busy_s, TRAINING), (idle_s, STALLED)] * (3 * 3600 // (busy_s + idle_s)))
    assert len(windows) >= 179
    assert [w for w in windows if w.idle_since is not None] == []
    # Busy since the first tick, across the stalls; a window ending in a stall says since when it stalled.
    for k, w in enumerate(windows):
        end = T0 + 60 * (k + 1)
        assert w.state_since == T0 if w.state == "busy" else end - idle_s <= w.state_since < end


def test_a_3s_health_check_every_10_minutes_keeps_the_idle_streak():
    c = IdleClassifier()
    windows, _ = windows_of(c, [(597, IDLE), (3, CHECK)] * 18)
    assert all(w.idle_since == T0 for w in windows[1:])
    assert windows[-1].state == "busy" and windows[-1].idle_since == T0  # the check itself ends nothing


def test_idleness_after_busy_work_starts_a_streak_dated_from_its_first_idle_tick():
    c = IdleClassifier()
    windows, _ = windows_of(c, [(120, TRAINING), (120, IDLE)])
    assert [w.idle_since for w in windows] == [None, None, T0 + 120, T0 + 120]


def test_busy_for_more_than_half_the_grace_period_ends_the_streak_though_it_is_broken_up():
    c = IdleClassifier()
    # Idle for an hour, then work with 4 s pauses every 8 s: no unbroken busy run ever lasts the
    # grace, which kept the old streak alive for ever.
    windows, _ = windows_of(c, [(3600, IDLE)] + [(8, TRAINING), (4, STALLED)] * 30)
    assert windows[59].idle_since == T0
    assert all(w.idle_since is None for w in windows[61:])


# -- item 6: state_since ------------------------------------------------------------------------


def test_a_free_gpu_a_job_took_two_minutes_ago_is_allocated_idle_for_two_minutes():
    c = IdleClassifier()
    t = T0
    for _ in range(3 * 24 * 60):  # three days free, sampled once a minute
        c.observe(t, IDLE)
        t += 60
    held = gpu(util=0, processes=1, memory=20 * GIB)
    for _ in range(120):
        c.observe(t, held)
        t += 1
    [w] = c.close_window(t - 60, t)
    assert w.state == "allocated_idle"
    assert w.idle_since == T0  # idle for three days…
    assert w.state_since == T0 + 3 * 86400  # …but allocated idle only since the job took it


def test_a_notebook_that_exits_after_days_is_free_since_it_exited():
    c = IdleClassifier()
    held = gpu(util=0, processes=1, memory=20 * GIB)
    windows, _ = windows_of(c, [(3600, held), (120, IDLE)])
    assert windows[-1].state == "free" and windows[-1].state_since == T0 + 3600
    assert windows[-1].idle_since == T0


def test_a_one_second_blip_does_not_reset_state_since():
    c = IdleClassifier()
    held = gpu(util=0, processes=1, memory=20 * GIB)
    windows, _ = windows_of(c, [(600, held), (1, CHECK), (59, held)])
    assert windows[-1].state == "allocated_idle" and windows[-1].state_since == T0


# -- item 7: a restart followed by a short blip; the first tick without utilisation ----------


def _saved_a_week_idle():
    before = IdleClassifier()
    held = gpu(util=0, processes=1, memory=20 * GIB)
    windows_of(before, [(120, held)], t0=T0)
    saved = before.remember()
    week = 7 * 86400
    # What a week-old streak looks like on disk (the same format remember() writes).
    return {d: (v[0] - week, v[1], v[2], v[3] - week) for d, v in saved.items()}, held


@pytest.mark.parametrize(
    "first",
    [
        DeviceSample("GPU-0", "nvidia", healthy=False, error="NVML: GPU is busy initialising"),
        gpu(util=60, processes=1, memory=20 * GIB),
        gpu(util=None, processes=1, memory=20 * GIB),  # GPM has no previous sample on the first tick
    ],
    ids=["unreadable", "busy", "util-unknown"],
)
def test_a_restart_followed_by_a_short_blip_keeps_the_saved_streak(first):
    saved, held = _saved_a_week_idle()
    after = IdleClassifier()
    after.restore(saved)
    t = T0 + 200
    after.observe(t, first)
    windows, _ = windows_of(after, [(59, held)], t0=t + 1)
    [w] = windows or after.close_window(t, t + 60)
    assert w.state == "allocated_idle"
    assert w.idle_since == T0 - 7 * 86400 and w.state_since == T0 - 7 * 86400


def test_streaks_saved_by_the_older_agent_are_taken_back():
    after = IdleClassifier()
    after.restore({"GPU-0": [T0 - 86400, 300 * MIB]})  # idle-streaks.json of the older agent
    windows, _ = windows_of(after, [(60, IDLE)], t0=T0)
    assert windows[0].idle_since == T0 - 86400
    assert windows[0].state_since == T0  # not saved then: since the agent saw it
    assert after.remember()["GPU-0"][1] == 300 * MIB


def test_a_held_device_without_a_utilisation_reading_is_allocated_idle():
    c = IdleClassifier()
    a100_slice = DeviceSample(
        "MIG-1", "nvidia", parent_id="GPU-A", util_pct=None, processes=1, memory_used_bytes=GIB
    )
    windows, _ = windows_of(c, [(60, a100_slice)])
    assert windows[0].state == "allocated_idle" and windows[0].busy_s == 0
    assert windows[0].reason == "utilisation unknown, 1 process(es)"


# -- item 8: spin -------------------------------------------------------------------------------


def _with_sm(util, sm, processes=1):
    return gpu(util=util, processes=processes, memory=40 * GIB, extra={"sm_active_pct": sm})


@pytest.mark.parametrize(
    "util,sm,state,spin",
    [
        (100, 2, "busy", True),  # an NCCL hang: a kernel resident, SMs doing nothing
        (100, 40, "busy", False),
        (100, 7, "allocated_idle", False),  # SM activity decides where it is known
        (5, 50, "busy", False),
        (30, 3, "allocated_idle", False),
    ],
)
def test_sm_activity_decides_and_a_spin_is_flagged(util, sm, state, spin):
    c = IdleClassifier()
    windows, _ = windows_of(c, [(60, _with_sm(util, sm))])
    [w] = windows
    assert w.state == state
    assert w.spin_s == (60 if spin else 0)
    assert w.busy_s == (60 if state == "busy" else 0)


def test_spin_is_part_of_busy_seconds():
    c = IdleClassifier()
    windows, _ = windows_of(c, [(20, _with_sm(100, 1)), (40, _with_sm(100, 60))])
    assert (windows[0].busy_s, windows[0].spin_s) == (60, 20)


# -- item 12: Ascend without a process table ----------------------------------------------------


def _npu(model, total_gib, used, util=0.0, processes=None):
    return DeviceSample(
        "npu0-chip0",
        "ascend",
        model=model,
        util_pct=util,
        memory_used_bytes=int(used),
        memory_total_bytes=total_gib * GIB,
        processes=processes,
    )


@pytest.mark.parametrize(
    "model,total,used,state",
    [
        ("910B", 32, 3.3 * GIB, "free"),  # idling at 3.3 of 32 GB (was allocated_idle: 8 % default)
        ("910B4", 32, 2871 * MIB, "free"),  # the recorded 910B4 fixture
        ("910B4", 32, 4.5 * GIB, "allocated_idle"),
        ("910B3", 64, 3445 * MIB, "free"),
        ("910B3", 64, 6 * GIB, "allocated_idle"),
        ("910B", 96, 4.8 * GIB, "free"),
        ("910B", 96, 7 * GIB, "allocated_idle"),  # a small job (was free: 8 % of 96 GB is 7.7 GB)
    ],
)
def test_per_size_idle_baselines_for_ascend(model, total, used, state):
    assert IdleClassifier().classify(_npu(model, total, used)).state == state


def test_without_a_process_table_the_baseline_is_learned_from_long_quiet_periods():
    c = IdleClassifier(ClassifierConfig(learn_quiet_s=600))
    idle, small_job = _npu("910A", 32, 10 * MIB), _npu("910A", 32, 2 * GIB)
    assert c.observe(T0, small_job).state == "free"  # 2 GiB is below the 3 GB default: no telling yet
    windows_of(c, [(600, idle)], t0=T0 + 1)
    assert c.observe(T0 + 700, small_job).state == "allocated_idle"  # after 10 min quiet at 10 MiB
    assert c.remember()["npu0-chip0"][1] == 10 * MIB


def test_a_notebook_holding_hbm_at_zero_percent_never_teaches_the_baseline():
    c = IdleClassifier(ClassifierConfig(learn_quiet_s=600))
    notebook = _npu("910B3", 64, 20 * GIB)
    windows, _ = windows_of(c, [(3600, notebook)])
    assert {w.state for w in windows} == {"allocated_idle"}
    assert c.remember()["npu0-chip0"][1] is None


def test_the_cli_view_of_a_listing_counts_what_the_agent_reports():
    sick = parent_gpu(healthy=False, error="needs a reset")
    counted = IdleClassifier.counted([sick, mig(0), mig(1)])
    assert [d.device_id for d in counted] == ["MIG-GPU-P-0", "MIG-GPU-P-1"]
    assert {IdleClassifier().classify(d).state for d in counted} == {"unavailable"}


def test_a_device_that_never_came_back_after_a_restart_is_not_saved_again():
    c = IdleClassifier()
    c.restore({"GPU-gone": [T0, None, "free", T0], "GPU-0": [T0, None]})
    c.observe(T0 + 10, IDLE)
    assert set(c.remember()) == {"GPU-0"}


def test_a_device_idle_from_its_first_tick_is_idle_at_once():
    # Time before the agent first saw it is no evidence of work: no grace to wait out.
    c = IdleClassifier()
    windows, _ = windows_of(c, [(5, IDLE)], window=5)
    assert windows[0].idle_since == T0 and windows[0].state_since == T0


@pytest.mark.parametrize("profile", ["inference", "training"])
def test_the_mock_busy_profiles_are_never_idle_for_long(profile):
    # The mock `inference` profile (10 s bursts every 30 s, process resident) was "idle for 60 min"
    # after an hour, through the real probe.
    from capmon.plugins.mock import MockConfig, MockProbe

    now = [float(T0)]
    probe = MockProbe(MockConfig(devices=1, profiles=(profile,)), clock=lambda: now[0])
    probe.setup()
    c = IdleClassifier()
    longest = 0
    for _window in range(60):
        for _ in range(60):
            c.observe_probe("mock", now[0], probe.sample())
            now[0] += 1
        [w] = c.close_window(now[0] - 60, now[0])
        if w.idle_since is not None:
            longest = max(longest, now[0] - w.idle_since)
    assert longest <= 120  # at most a first tick in a gap, until the bursts end it
    assert w.idle_since is None


def test_an_idle_since_on_a_whole_second_survives_a_restart_whatever_the_clock_offset():
    """The accounting clock is monotonic and wall times are mono + offset, an offset that moves by
    microseconds between readings (time.time() and time.monotonic() are read apart). A streak that
    started on a whole second (a window boundary) was reported `int(...)`: 1 s earlier whenever the
    offset after a restart was a microsecond smaller (a flaky agent-restart test showed it)."""
    mono0 = 5_000.0
    before = IdleClassifier()
    for k in range(3):  # idle from T0, a whole second, read with an offset 1 µs larger each tick
        before.observe(T0 + k, gpu(), mono=mono0 + k - 1e-6 * k)
    [w] = before.close_window(T0, T0 + 3, mono_end=mono0 + 3 - 3e-6)
    assert w.idle_since == T0
    saved = before.remember()
    for jitter in (-2e-5, -1e-5, -1e-6, 0.0, 1e-6, 1e-5, 2e-5):
        after = IdleClassifier()
        after.restore(saved)
        # The agent after the restart: another monotonic origin, and the offset read when the
        # window closes a jitter apart from the one read when the streak was taken back.
        for k in range(2):
            after.observe(T0 + 10 + k, gpu(), mono=100.0 + k)
        [w] = after.close_window(T0 + 10, T0 + 12, mono_end=102.0 - jitter)
        assert w.idle_since == T0, jitter
