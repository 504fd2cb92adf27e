"""The idle classifier on scripted traces, in simulated time: state seconds and idle_since are exact."""

from __future__ import annotations

import pytest

from capmon.agent import DeviceSample
from capmon.agent.classifier import ClassifierConfig, IdleClassifier

GIB = 1024**3


def gpu(util=0.0, processes=0, memory=GIB // 2, healthy=True, error=None, device_id="GPU-0"):
    return DeviceSample(
        device_id=device_id,
        vendor="nvidia",
        model="NVIDIA H100 80GB HBM3",
        util_pct=util,
        memory_used_bytes=memory,
        memory_total_bytes=80 * GIB,
        processes=processes,
        healthy=healthy,
        error=error,
    )


def run(classifier, trace, t0=1_000_000_000):
    """trace: list of (seconds, sample) phases, sampled once per second."""
    t = t0
    for seconds, sample in trace:
        for _ in range(seconds):
            classifier.observe(t, sample)
            t += 1
    return t


def test_busy_blip_within_grace_keeps_the_idle_streak():
    # Default grace: busy for up to 30 of the last 120 s keeps the streak.
    c = IdleClassifier(ClassifierConfig(busy_util_pct=10))
    t0 = 1_000_000_000
    end = run(c, [(100, gpu(util=0)), (30, gpu(util=80, processes=1)), (50, gpu(util=0))], t0)
    [w] = c.close_window(t0, end)
    assert (w.free_s, w.busy_s, w.allocated_idle_s, w.unavailable_s) == (150, 30, 0, 0)
    assert w.idle_since == t0
    assert w.state == "free"
    assert w.util_max_pct == 80


def test_busy_longer_than_grace_ends_the_streak():
    c = IdleClassifier(ClassifierConfig(busy_util_pct=10))
    t0 = 1_000_000_000
    end = run(c, [(100, gpu(util=0)), (90, gpu(util=80, processes=1)), (20, gpu(util=0))], t0)
    [w] = c.close_window(t0, end)
    assert (w.free_s, w.busy_s) == (120, 90)
    # 20 s of idleness after busy work is not a streak yet (issue 19, item 5: the grace works both ways)…
    assert w.idle_since is None
    end = run(c, [(10, gpu(util=0))], end)
    [w] = c.close_window(end - 10, end)
    assert w.idle_since == t0 + 190  # …once it lasted idle_grace_s, the streak dates from its first idle tick


def test_idle_since_survives_window_boundaries():
    c = IdleClassifier()
    t0 = 1_000_000_000
    run(c, [(60, gpu(util=0))], t0)
    c.close_window(t0, t0 + 60)
    run(c, [(60, gpu(util=0))], t0 + 60)
    [w] = c.close_window(t0 + 60, t0 + 120)
    assert w.free_s == 60
    assert w.idle_since == t0


def test_notebook_holding_memory_at_zero_util_is_allocated_idle():
    c = IdleClassifier()
    t0 = 1_000_000_000
    end = run(c, [(60, gpu(util=0.5, processes=1, memory=20 * GIB))], t0)
    [w] = c.close_window(t0, end)
    assert w.state == "allocated_idle"
    assert w.allocated_idle_s == 60 and w.free_s == 0
    assert w.idle_since == t0
    assert w.processes == 1


def test_probe_failure_is_unavailable_never_free_and_ends_the_streak_after_grace():
    c = IdleClassifier(ClassifierConfig(busy_grace_s=30))
    t0 = 1_000_000_000
    broken = DeviceSample("GPU-0", "nvidia", healthy=False, error="sample() timed out after 5s")
    end = run(c, [(20, gpu(util=0)), (40, broken)], t0)
    [w] = c.close_window(t0, end)
    assert (w.free_s, w.unavailable_s) == (20, 40)
    assert w.state == "unavailable"
    assert w.error == "sample() timed out after 5s"
    assert w.idle_since is None


def npu(memory, processes=None, util=0.0):
    return DeviceSample(
        "npu0-chip0",
        "ascend",
        model="910B3",
        util_pct=util,
        memory_used_bytes=memory,
        memory_total_bytes=64 * GIB,
        processes=processes,
    )


def test_unknown_processes_memory_above_the_vendor_baseline_is_held():
    c = IdleClassifier()
    t0 = 1_000_000_000
    # No process table (processes unknown): Ascend's default baseline is 8% of 64 GiB = 5.12 GiB,
    # the margin max(512 MiB, 2%) = 1.28 GiB; ~4 GiB reserved idle is free, 12 GiB in use is held.
    end = run(c, [(10, npu(4 * GIB)), (10, npu(5 * GIB)), (10, npu(12 * GIB))], t0)
    [w] = c.close_window(t0, end)
    assert (w.free_s, w.allocated_idle_s) == (20, 10)
    assert w.processes is None


def test_a_job_holding_memory_from_the_first_sample_is_not_its_own_baseline():
    c = IdleClassifier()
    t0 = 1_000_000_000
    end = run(c, [(300, npu(40 * GIB))], t0)
    [w] = c.close_window(t0, end)
    assert w.state == "allocated_idle" and w.allocated_idle_s == 300
    assert IdleClassifier().classify(npu(40 * GIB)).state == "allocated_idle"  # `capmon agent probe`


def test_baseline_is_learned_only_where_no_process_was_counted():
    c = IdleClassifier()
    t0 = 1_000_000_000
    base = GIB  # an idle H100 (3 GiB with no process would be held memory: issue 19, item 2)
    end = run(
        c,
        [
            (10, gpu(processes=1, memory=base // 4)),  # a process on it: never a baseline
            (10, gpu(processes=0, memory=base)),
            (10, gpu(processes=None, memory=base + 100 * 1024**2)),
            (10, gpu(processes=None, memory=base + 8 * GIB)),
        ],
        t0,
    )
    [w] = c.close_window(t0, end)
    # 100 MiB over the learned 1 GiB is within the margin (free); 8 GiB over is held.
    assert (w.free_s, w.allocated_idle_s) == (20, 20)


def test_a_late_result_is_not_credited_twice():
    c = IdleClassifier()
    t0 = 1_000_000_000
    c.observe(t0, gpu(util=0))
    c.observe(t0 + 50, gpu(util=0))
    [w1] = c.close_window(t0, t0 + 60)
    # A hung probe's failure, stamped when its sample began (t0 + 55), arrives after the window closed.
    c.observe(t0 + 55, DeviceSample("GPU-0", "nvidia", healthy=False, error="timed out"))
    c.observe(t0 + 70, gpu(util=0))
    [w2] = c.close_window(t0 + 60, t0 + 120)
    assert w1.free_s == 60
    assert w2.unavailable_s + w2.free_s == 60 and w2.unavailable_s == 10


def test_configured_baseline_overrides_the_learned_one():
    c = IdleClassifier(ClassifierConfig(memory_baseline_mib={"NVIDIA H100 80GB HBM3": 4096}))
    assert c.classify(gpu(processes=None, memory=4 * GIB)).state == "free"
    assert c.classify(gpu(processes=None, memory=6 * GIB)).state == "allocated_idle"


def test_unknown_util_with_processes_is_allocated_idle_and_says_so():
    # Was `busy` (issue 19, items 7 and 11): held A100 MIG slices were never allocated_idle.
    c = IdleClassifier()
    obs = c.classify(gpu(util=None, processes=2))
    assert obs.state == "allocated_idle" and obs.util_unknown
    assert "utilisation unknown" in obs.reason
    free = c.classify(gpu(util=None, processes=0))
    assert free.state == "free" and free.util_unknown


def test_busy_with_no_process_is_a_ghost():
    c = IdleClassifier()
    t0 = 1_000_000_000
    end = run(c, [(10, gpu(util=90, processes=0)), (5, gpu(util=90, processes=1))], t0)
    [w] = c.close_window(t0, end)
    assert w.busy_s == 15 and w.ghost_s == 10


@pytest.mark.parametrize("util,state", [(9.99, "free"), (10.0, "busy")])
def test_threshold_is_inclusive(util, state):
    assert IdleClassifier(ClassifierConfig(busy_util_pct=10)).classify(gpu(util=util)).state == state


def test_state_seconds_cover_the_window_with_sample_and_hold():
    c = IdleClassifier()
    t0 = 1_000_000_000
    c.observe(t0, gpu(util=0))
    c.observe(t0 + 7.5, gpu(util=50, processes=1))
    [w] = c.close_window(t0, t0 + 60)
    assert w.free_s == 7.5 and w.busy_s == 52.5
    assert w.free_s + w.busy_s + w.allocated_idle_s + w.unavailable_s == 60


def test_device_not_seen_for_a_whole_window_is_unavailable_not_forgotten():
    c = IdleClassifier()
    t0 = 1_000_000_000
    c.observe(t0, gpu(device_id="MIG-a"))
    assert [w.device_id for w in c.close_window(t0, t0 + 60)] == ["MIG-a"]
    c.observe(t0 + 61, gpu(device_id="MIG-b"))
    # A probe sampling less often than windows close (MIG-a) keeps its state and streak for a window…
    second = {w.device_id: w for w in c.close_window(t0 + 60, t0 + 120)}
    assert set(second) == {"MIG-a", "MIG-b"} and second["MIG-a"].free_s == 60
    assert second["MIG-a"].idle_since == t0
    c.observe(t0 + 121, gpu(device_id="MIG-b"))
    # …and once a whole window passed without it, it is unavailable, not silently dropped (issue 19,
    # item 3: it used to vanish from the report without ever being unavailable).
    third = {w.device_id: w for w in c.close_window(t0 + 120, t0 + 180)}
    assert set(third) == {"MIG-a", "MIG-b"}
    assert third["MIG-a"].state == "unavailable" and third["MIG-a"].unavailable_s == 60
    assert third["MIG-a"].error == "no longer reported by its probe"


def test_an_idle_streak_survives_a_restart_if_the_device_is_still_idle():
    t0 = 1_000_000_000
    before = IdleClassifier()
    run(before, [(600, gpu(util=0, processes=0, memory=GIB // 4))], t0)
    saved = before.remember()
    after = IdleClassifier()
    after.restore(saved)
    after.observe(t0 + 620, gpu(util=0, processes=None, memory=GIB // 4 + 10))
    after.observe(t0 + 620, gpu(util=80, processes=1, device_id="GPU-busy-now"))
    [w, _] = sorted(after.close_window(t0 + 600, t0 + 660), key=lambda w: w.device_id)
    assert w.idle_since == t0  # the streak goes on across the restart…
    assert w.state == "free"
    assert after.remember()["GPU-0"][1] == GIB // 4  # …and the learned baseline came back with it

    busy = IdleClassifier()
    busy.restore(saved)
    busy.observe(t0 + 620, gpu(util=80, processes=1))
    busy.observe(t0 + 700, gpu(util=0, processes=0))
    busy.observe(t0 + 730, gpu(util=0, processes=0))
    [w] = busy.close_window(t0 + 600, t0 + 740)
    assert w.idle_since == t0 + 700  # busy for longer than the grace after the restart: that streak is over
