"""The host probe: CPU % is a real figure or absent, never psutil's meaningless first 0.0."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import namedtuple
from types import SimpleNamespace

from capmon.plugins.host import HostProbe

CpuTimes = namedtuple("CpuTimes", "user system idle iowait")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakePsutil:
    """psutil on a 4-CPU host loaded to `load_pct`: cpu_times() advance with the clock;
    cpu_percent(interval=None) is psutil's (>= 5.9.6): the share since the previous call *in the
    same thread*, 0.0 on a thread's first call."""

    cpus = 4

    def __init__(self, clock: FakeClock, load_pct: float = 62.5) -> None:
        self.clock, self.load_pct = clock, load_pct
        self.last_percent: dict[int, float] = {}

    def cpu_times(self):
        cpu_s = (self.clock() - 1000.0) * self.cpus
        busy = cpu_s * self.load_pct / 100
        return CpuTimes(
            user=busy * 0.75, system=busy * 0.25, idle=(cpu_s - busy) * 0.9, iowait=(cpu_s - busy) * 0.1
        )

    def cpu_percent(self, interval=None):
        tid = threading.get_ident()
        last, self.last_percent[tid] = self.last_percent.get(tid), self.clock()
        return 0.0 if last is None or self.clock() == last else self.load_pct

    def virtual_memory(self):
        return SimpleNamespace(total=64 * 2**30, available=48 * 2**30)

    def getloadavg(self):
        return (1.5, 1.0, 0.5)

    def cpu_count(self):
        return self.cpus


def on_a_fresh_thread(fn):
    """As the sampler calls sample(): each call on a new thread."""
    result = []
    t = threading.Thread(target=lambda: result.append(fn()))
    t.start()
    t.join()
    return result[0]


def test_the_first_sample_after_setup_has_no_cpu_figure_not_zero():
    clock = FakeClock()
    probe = HostProbe(psutil=FakePsutil(clock), clock=clock)
    probe.setup()
    [first] = on_a_fresh_thread(probe.sample)
    assert first.cpu_pct is None
    assert first.memory_total_bytes == 64 * 2**30 and first.cpu_count == 4


def test_every_later_sample_on_its_own_thread_measures_the_load():
    clock = FakeClock()
    probe = HostProbe(psutil=FakePsutil(clock), clock=clock)
    probe.setup()
    for _ in range(3):
        clock.now += 1.0
        assert on_a_fresh_thread(probe.sample)[0].cpu_pct == 62.5


def test_a_sample_too_soon_is_absent_and_the_next_measures_from_the_earlier_reading():
    clock = FakeClock()
    probe = HostProbe(psutil=FakePsutil(clock, load_pct=20.0), clock=clock)
    probe.setup()
    clock.now += 0.05
    assert probe.sample()[0].cpu_pct is None
    clock.now += 0.2
    assert probe.sample()[0].cpu_pct == 20.0


def test_agent_probe_on_a_loaded_host_never_says_zero_cpu():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = subprocess.run(
            [sys.executable, "-m", "capmon.agent.cli", "agent", "probe", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        table = subprocess.run(
            [sys.executable, "-m", "capmon.agent.cli", "agent", "probe"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    finally:
        busy.kill()
        busy.wait()
    cpu = json.loads(out)["host"]["cpu_pct"]
    # A CPU-bound child runs, so a measured figure is above 0; absent (null) is honest too.
    assert cpu is None or cpu > 0
    host_line = table.splitlines()[0]
    assert host_line.startswith("host ") and " cpu " in host_line
    assert " cpu 0.0% " not in host_line
