"""Issue 16 item 1: per-window energy and idle energy, from the energy counter's delta where the
probe reads one, else power x time (sample-and-hold, like the state seconds)."""

from __future__ import annotations

import dataclasses
import types

import pytest

from capmon.agent import DeviceSample
from capmon.agent.classifier import MAX_POWER_W, IdleClassifier
from capmon.agent.sampler import check_samples
from capmon.agent.wire import Report, check_report

GIB = 1024**3
T0 = 1_700_000_000
FREE = DeviceSample("GPU-0", "nvidia", util_pct=0.0, processes=0, memory_used_bytes=0, power_w=70.0)
HELD = dataclasses.replace(FREE, processes=1, memory_used_bytes=20 * GIB)
BUSY = dataclasses.replace(HELD, util_pct=97.0, power_w=300.0)


def run(c: IdleClassifier, samples, start: float = 0.0):
    """Observe `samples` one second apart from `start` (seconds after T0)."""
    for i, s in enumerate(samples):
        c.observe(T0 + start + i, s)


def close(c: IdleClassifier, start: float, end: float):
    [w] = c.close_window(T0 + start, T0 + end)
    assert check_report(Report(seq=1, start=T0 + int(start), end=T0 + int(end), devices=[w])) is None
    return w


def counting(sample: DeviceSample, first_j: float, watts: float, n: int, power_w: float = 90.0):
    """`n` samples one second apart whose energy counter climbs at `watts` (the board reads `power_w`)."""
    return [dataclasses.replace(sample, power_w=power_w, energy_j=first_j + watts * i) for i in range(n)]


def test_without_a_counter_energy_is_the_held_power_over_time_and_idle_energy_the_idle_part():
    c = IdleClassifier()
    run(c, [BUSY] * 30 + [FREE] * 30)
    w = close(c, 0, 60)
    assert w.busy_s == 30 and w.free_s == 30
    assert w.energy_j == 30 * 300 + 30 * 70  # each second holds the power read at its start
    assert w.idle_energy_j == 30 * 70


def test_allocated_idle_counts_as_idle_energy_busy_and_unavailable_do_not():
    sick = dataclasses.replace(FREE, healthy=False, error="XID 79", power_w=50.0)
    c = IdleClassifier()
    run(c, [HELD] * 20 + [BUSY] * 20 + [sick] * 20)
    w = close(c, 0, 60)
    assert (w.allocated_idle_s, w.busy_s, w.unavailable_s) == (20, 20, 20)
    assert w.energy_j == 20 * 70 + 20 * 300 + 20 * 50
    assert w.idle_energy_j == 20 * 70


def test_the_counter_delta_is_the_energy_where_the_probe_reads_one():
    c = IdleClassifier()
    run(c, counting(FREE, 5e6, watts=100.0, n=61))  # the board's 90 W reading undercounts
    w = close(c, 0, 60)
    assert w.energy_j == 60 * 100 and w.idle_energy_j == 60 * 100


def test_a_counter_reset_gives_no_negative_energy_that_interval_is_power_times_time():
    # A driver reload at 30 s: the counter starts again from 0.
    c = IdleClassifier()
    run(c, counting(FREE, 5e6, 100.0, 30) + counting(FREE, 0.0, 100.0, 31), start=0)
    w = close(c, 0, 60)
    assert w.energy_j == 59 * 100 + 1 * 90  # the reset interval: 90 W read x 1 s, never 0 - 5e6 J
    assert 0 <= w.idle_energy_j <= w.energy_j <= 100 * 60


def test_an_impossible_jump_of_the_counter_is_not_energy():
    # A counter that comes back from a reload above its old reading (or a garbage value): 1e12 J in
    # one second would be a petawatt; that interval is power x time, and the window stays in bounds.
    readings = counting(FREE, 5e6, 100.0, 30) + counting(FREE, 1e12, 100.0, 31)
    c = IdleClassifier()
    run(c, readings)
    w = close(c, 0, 60)
    assert w.energy_j == 59 * 100 + 90
    assert w.energy_j <= MAX_POWER_W * 60


def test_a_missing_reading_is_power_times_time_and_nothing_counts_twice():
    readings = counting(FREE, 5e6, 100.0, 61)
    readings[10] = dataclasses.replace(readings[10], energy_j=None)  # one read failed
    c = IdleClassifier()
    run(c, readings)
    w = close(c, 0, 60)
    # [9, 10] and [10, 11] by the held 90 W; the counter's delta from 9 to 11 is not added on top.
    assert w.energy_j == 58 * 100 + 2 * 90


def test_a_window_end_inside_an_interval_splits_it_without_counting_twice():
    c = IdleClassifier()
    run(c, counting(FREE, 5e6, 100.0, 31))  # 0 .. 30 s
    w1 = close(c, 0, 30.5)
    run(c, counting(FREE, 5e6 + 3100, 100.0, 30), start=31)  # 31 .. 60 s
    w2 = close(c, 30.5, 60)
    # The tail [30, 30.5] is held at the 90 W read (its counter reading is not known yet); the next
    # window gets the rest of the interval's delta by its share of the time.
    assert w1.energy_j == 30 * 100 + 0.5 * 90
    assert w2.energy_j == 0.5 * 100 + 29 * 100


def test_a_vanished_device_gets_no_energy_and_its_counter_on_return_is_not_a_delta():
    c = IdleClassifier()
    first = counting(FREE, 5e6, 100.0, 10)
    for i, s in enumerate(first):
        c.observe_probe("nvml", T0 + i, [s])
    for i in range(10, 40):
        c.observe_probe("nvml", T0 + i, [])  # the probe stops listing it: "no longer reported"
    back = counting(FREE, 5e6 + 1e6, 100.0, 21)  # returns with 1 MJ more on its counter
    for i, s in enumerate(back):
        c.observe_probe("nvml", T0 + 40 + i, [s])
    w = close(c, 0, 60)
    assert w.unavailable_s == 30
    # [0, 10] by the counter, [40, 41] by the held 90 W, then the counter: never the 1 MJ.
    assert w.energy_j == 10 * 100 + 90 + 19 * 100
    assert w.idle_energy_j == w.energy_j


def test_no_power_and_no_counter_is_unknown_energy_not_zero():
    mig = dataclasses.replace(FREE, device_id="MIG-0", power_w=None)
    c = IdleClassifier()
    run(c, [mig] * 60)
    w = close(c, 0, 60)
    assert w.energy_j is None and w.idle_energy_j is None


@pytest.mark.parametrize("counter", [False, True])
def test_the_exporters_energy_since_start_is_the_sum_of_the_windows(counter):
    c = IdleClassifier()
    samples = counting(FREE, 5e6, 100.0, 300) if counter else [BUSY] * 100 + [FREE] * 200
    windows = []
    for k in range(5):
        run(c, samples[60 * k : 60 * (k + 1)], start=60 * k)
        windows.append(close(c, 60 * k, 60 * (k + 1)))
    [view] = c.snapshot()
    assert view.energy_joules == pytest.approx(sum(w.energy_j for w in windows))
    # Each window's last second is held at the 90 W read: its counter reading comes after the end.
    assert sum(w.energy_j for w in windows) == (300 * 100 - 5 * 10 if counter else 100 * 300 + 200 * 70)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "12", True])
def test_the_sampler_drops_an_energy_reading_that_is_not_a_finite_non_negative_number(bad):
    probe = types.SimpleNamespace(name="p")
    [kept], _, notes = check_samples(probe, [dataclasses.replace(FREE, energy_j=bad)])
    assert kept.energy_j is None
    assert notes == [f"GPU-0: energy_j={bad!r} out of range, dropped"]
    [good], _, notes = check_samples(probe, [dataclasses.replace(FREE, energy_j=2.5e12)])
    assert good.energy_j == 2.5e12 and notes == []
