"""Issue 19 item 9: durations come from the accounting (monotonic) clock; the wall clock only names windows."""

from __future__ import annotations

from capmon.agent import DeviceSample
from capmon.agent.classifier import IdleClassifier

GIB = 1024**3
T0 = 1_000_000_000
IDLE = DeviceSample("GPU-0", "nvidia", util_pct=0.0, processes=0, memory_used_bytes=GIB // 2)
BUSY = DeviceSample("GPU-0", "nvidia", util_pct=97.0, processes=1, memory_used_bytes=40 * GIB)


def seconds(w):
    return w.busy_s + w.allocated_idle_s + w.free_s + w.unavailable_s


def test_a_wall_clock_step_forward_credits_no_time_that_did_not_pass():
    c = IdleClassifier()
    for i in range(5):
        c.observe_probe("nvml", T0 + i, [IDLE], mono=100.0 + i)
    [w1] = c.close_window(T0, T0 + 5, mono_end=105.0)
    # NTP steps the wall clock 40 s forward; half a second really passes before the daemon's
    # overdue window [T0+5, T0+10] closes, then its empty catch-up windows.
    c.observe_probe("nvml", T0 + 45.2, [IDLE], mono=105.2)
    [w2] = c.close_window(T0 + 5, T0 + 10, mono_end=105.5)
    catch_up = [c.close_window(T0 + 5 * k, T0 + 5 * (k + 1), mono_end=105.5)[0] for k in range(2, 9)]
    assert seconds(w1) == 5 and seconds(w2) == 0.5  # was 44.5 s of free_s in one 5 s window
    assert all(seconds(w) == 0 for w in catch_up)


def test_a_wall_clock_step_back_does_not_freeze_the_accounting():
    c = IdleClassifier()
    for i in range(600):
        c.observe(T0 + i, IDLE, mono=float(i))
    [idle] = c.close_window(T0, T0 + 600, mono_end=600.0)
    assert idle.idle_since == T0
    # The wall clock steps back 900 s; the device works at 97 % for 300 s.
    back = T0 + 600 - 900
    for i in range(300):
        c.observe(back + i, BUSY, mono=600.0 + i)
    [w] = c.close_window(back, back + 300, mono_end=900.0)
    assert w.busy_s == 300 and w.free_s == 0  # was 0 state seconds: the old wall timestamps were ahead
    assert w.idle_since is None and w.state == "busy"  # was: still "idle since T0"
    assert w.state_since == back  # since when, on the wall clock it now reads


def test_without_a_monotonic_time_the_wall_time_is_the_accounting_clock():
    c = IdleClassifier()
    for i in range(60):
        c.observe(T0 + i, IDLE)
    [w] = c.close_window(T0, T0 + 60)
    assert w.free_s == 60 and w.idle_since == T0 and w.state_since == T0
