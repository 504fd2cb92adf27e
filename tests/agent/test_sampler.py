"""Containment: a raising, hanging or garbage-returning probe never stops the others."""

from __future__ import annotations

import asyncio
import os
import threading

from capmon.agent import DeviceSample, Probe, ProbeConfig
from capmon.agent.config import AgentConfig, AgentSection
from capmon.agent.daemon import Agent
from capmon.agent.sampler import Sampler
from capmon.plugins.mock import MockConfig, MockProbe


class Hanging(Probe):
    name, vendor = "hanging", "test"
    default_interval_s, default_timeout_s = 0.05, 0.2

    def __init__(self, config=None):
        super().__init__(config)
        self.release = threading.Event()
        self.calls = 0
        self.closed = False

    def close(self):
        self.closed = True

    def sample(self):
        self.calls += 1
        if self.calls == 1:
            return [DeviceSample("HANG-0", "test", util_pct=0.0, processes=0)]
        self.release.wait(10)  # wedged like an NVML call on a dying GPU
        return []


class Raising(Probe):
    name, vendor = "raising", "test"
    default_interval_s = 0.05

    def __init__(self, config=None):
        super().__init__(config)
        self.calls = 0

    def sample(self):
        self.calls += 1
        if self.calls == 1:
            return [DeviceSample("RAISE-0", "test", util_pct=0.0, processes=0)]
        raise RuntimeError("driver exploded")


class Garbage(Probe):
    name, vendor = "garbage", "test"
    default_interval_s = 0.05

    def sample(self):
        return {"not": "a list"}


def fast_mock(devices=2):
    return MockProbe(MockConfig(devices=devices, profiles=("idle",), interval_s=0.05))


async def test_raising_hanging_and_garbage_probes_leave_the_others_reporting():
    seen: dict[str, list[tuple[float, list[DeviceSample]]]] = {}

    def collect(name, t, devices, host):
        seen.setdefault(name, []).append((t, devices))

    hanging, raising = Hanging(), Raising()
    sampler = Sampler([fast_mock(), hanging, raising, Garbage()], collect)
    stop = asyncio.Event()
    task = asyncio.create_task(sampler.run(stop))
    await asyncio.sleep(1.0)
    stop.set()
    hanging.release.set()
    await asyncio.wait_for(task, 5)

    good_ticks = seen["mock"]
    assert len(good_ticks) >= 8, "the mock probe kept its 50 ms rhythm despite its neighbours"
    assert all(len(devs) == 2 and all(d.healthy for d in devs) for _, devs in good_ticks)

    # The hanging probe's known device turns unavailable with the reason; it is never sampled twice at once.
    last_hang = seen["hanging"][-1][1]
    assert [d.device_id for d in last_hang] == ["HANG-0"]
    assert not last_hang[0].healthy
    assert "timed out" in last_hang[0].error or "still running" in last_hang[0].error
    assert hanging.calls == 2

    last_raise = seen["raising"][-1][1]
    assert last_raise[0].error == "RuntimeError: driver exploded" and not last_raise[0].healthy

    health = {h.name: h for h in sampler.health()}
    assert health["raising"].errors >= 5
    assert health["hanging"].timeouts == 1 and health["hanging"].skipped_ticks >= 1
    assert health["garbage"].errors >= 5 and "not a list" in health["garbage"].last_error
    assert "garbage" not in seen  # it never had a device to report


async def test_out_of_range_values_become_unknown_not_poison():
    class Odd(Probe):
        name, vendor = "odd", "test"

        def sample(self):
            return [
                DeviceSample(
                    "ODD-0",
                    "test",
                    util_pct=250.0,
                    temp_c=float("nan"),
                    power_w=300.0,
                    extra={"ok_field": 1.0, "Bad Key": 2.0},
                )
            ]

    seen = []
    sampler = Sampler([Odd()], lambda n, t, d, h: seen.extend(d))
    await sampler.tasks[0].tick()
    [d] = seen
    assert d.util_pct is None and d.temp_c is None and d.power_w == 300.0
    assert dict(d.extra) == {"ok_field": 1.0}


class ListSink:
    def __init__(self):
        self.reports = []
        self.closed = False

    async def start(self):
        pass

    def next_seq(self):
        return len(self.reports) + 1

    async def put(self, report):
        self.reports.append(report)

    def stats(self):
        return {"spool_reports": 0}

    async def close(self, timeout_s):
        self.closed = True


async def test_agent_reports_aligned_windows_with_increasing_seq():
    config = AgentConfig(agent=AgentSection(id="t", host="h", window_s=1))
    sink = ListSink()
    agent = Agent(config, sink=sink, probes=[fast_mock(3), Raising(ProbeConfig(interval_s=0.05))])
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.sleep(2.6)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert sink.closed
    seqs = [r.seq for r in sink.reports]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 2
    full = sink.reports[1]
    assert full.end - full.start == 1 and full.end % 1 == 0
    devices = {d.device_id: d for d in full.devices}
    assert {"MOCK-000-00", "MOCK-000-01", "MOCK-000-02", "RAISE-0"} == set(devices)
    assert devices["MOCK-000-00"].state == "free"
    assert devices["RAISE-0"].state == "unavailable"
    probes = {p.name: p for p in full.agent.probes}
    assert probes["raising"].errors >= 1 and probes["raising"].reason == "RuntimeError: driver exploded"


def test_a_mig_parent_is_not_counted_beside_its_instances():
    config = AgentConfig(agent=AgentSection(id="t", host="h", window_s=60))
    agent = Agent(config, sink=ListSink(), probes=[], clock=lambda: 1_000_000_000.0)
    parent = DeviceSample("GPU-1", "nvidia", model="NVIDIA A100", power_w=90.0, info={"mig": "enabled"})
    instances = [
        DeviceSample(f"MIG-{i}", "nvidia", parent_id="GPU-1", util_pct=None, processes=i % 2)
        for i in range(3)
    ]
    agent._on_samples("nvml", 1_000_000_000, [parent, *instances], None)
    windows = agent.classifier.close_window(1_000_000_000, 1_000_000_060)
    assert sorted(w.device_id for w in windows) == ["MIG-0", "MIG-1", "MIG-2"]
    assert {w.device_id: w.state for w in windows} == {
        "MIG-0": "free",
        "MIG-1": "allocated_idle",
        "MIG-2": "free",
    }


async def test_strings_beyond_the_wire_limits_are_mended_not_sent():
    class Sloppy(Probe):
        name, vendor = "sloppy", "test"

        def sample(self):
            return [
                DeviceSample(
                    "S-0",
                    "v" * 65,
                    model="",
                    parent_id="p" * 200,
                    extra={f"f{i}": float(i) for i in range(40)},
                    info={f"i{i}": "x" for i in range(20)},
                ),
                DeviceSample("S-1", "test", model="m" * 300),
            ]

    seen = []
    await Sampler([Sloppy()], lambda n, t, d, h: seen.extend(d)).tasks[0].tick()
    a, b = seen
    assert a.vendor == "v" * 64 and a.model is None and a.parent_id is None
    assert len(a.extra) == 32 and len(a.info) == 16
    assert b.model == "m" * 256


def test_a_record_the_collector_would_refuse_costs_only_that_record():
    from capmon.agent import wire
    from capmon.agent.daemon import checked_report

    good = wire.DeviceWindow(device_id="GPU-0", vendor="nvidia", state="free", free_s=60.0)
    bad = wire.DeviceWindow(device_id="GPU-1", vendor="nvidia", state="busy", busy_s=-1.0)  # built in-process
    report = wire.Report(seq=1, start=1_000_000_000, end=1_000_000_060, devices=[bad, good])
    kept = checked_report(report)
    assert [d.device_id for d in kept.devices] == ["GPU-0"]


class FailingSink(ListSink):
    async def put(self, report):
        if report.seq == 1:
            raise OSError(28, "No space left on device")
        await super().put(report)

    def next_seq(self):
        self.n = getattr(self, "n", 0) + 1
        return self.n


async def test_a_sink_failure_costs_one_window_not_the_agent():
    config = AgentConfig(agent=AgentSection(id="t", host="h", window_s=1))
    sink = FailingSink()
    hanging = Hanging()
    agent = Agent(config, sink=sink, probes=[fast_mock(1), hanging])
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.sleep(2.6)
    stop.set()
    await asyncio.wait_for(task, 5)
    hanging.release.set()
    assert [r.seq for r in sink.reports][:1] == [2] and agent.lost_windows == 1
    # The lost window is counted, never silent, and as lost (could not be kept), not as dropped.
    assert sink.reports[0].agent.lost_windows == 1 and sink.reports[0].agent.dropped_reports == 0
    assert hanging.calls == 2 and not hanging.closed  # close() never runs under a running sample()


def test_streak_file_is_trusted_only_while_recent(tmp_path):
    from capmon.agent.daemon import StreakFile

    now = [1_000_000_000.0]
    f = StreakFile(tmp_path / "idle-streaks.json", max_age_s=600, clock=lambda: now[0])
    f.save({"GPU-0": (999_000_000, 1024)})
    now[0] += 300
    assert f.load() == {"GPU-0": (999_000_000, 1024)}
    now[0] += 400
    assert f.load() == {}  # down for longer than it can vouch for
    (tmp_path / "idle-streaks.json").write_text("{not json")
    assert f.load() == {}


async def test_an_agent_restart_keeps_idle_since(tmp_path):
    from capmon.agent.config import load_config

    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nid = "t"\nhost = "h"\nwindow_s = 1\nshutdown_timeout_s = 0.2\n'
        f'[transport]\nurl = "http://127.0.0.1:9/api/v1/reports"\n[spool]\npath = "{tmp_path / "spool"}"\n'
    )
    config = load_config(path, env={})
    firsts = []
    for _ in range(2):
        agent = Agent(config, probes=[fast_mock(1)])
        reports = []
        real_keep = agent._keep

        async def keep(report, real_keep=real_keep, reports=reports):
            reports.append(report)
            await real_keep(report)

        agent._keep = keep
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.sleep(2.2)
        stop.set()
        await asyncio.wait_for(task, 10)
        firsts.append(next(r for r in reports if r.devices).devices[0].idle_since)
    assert firsts[0] is not None and firsts[1] == firsts[0]


def test_garbage_holders_cost_the_record_not_the_device():
    """A third-party probe's holders: a string or float pid, a non-string name, a negative pid, a
    dict instead of a Holder. Each bad record is dropped (counted), the good ones kept, and a
    holders value that is not a list is "cannot tell"."""
    from capmon.agent.probe import Holder
    from capmon.agent.sampler import check_samples

    class P:
        name = "plugin"

    bad = DeviceSample(
        "D0",
        "acme",
        processes=5,
        holders=(
            Holder(41, 2**20, "ok"),
            Holder(42.0, 1.0, 123),  # integral float pid, float memory, non-string name
            Holder("43"),
            Holder(-1),
            Holder(41),  # the same pid twice
            {"pid": 44},
        ),
    )
    not_a_list = DeviceSample("D1", "acme", holders=Holder(1))
    [d0, d1], _, notes = check_samples(P(), [bad, not_a_list])
    assert d0.holders == (Holder(41, 2**20, "ok"), Holder(42, 1, None))
    assert d1.holders is None
    assert any("4 invalid holder(s) dropped" in n for n in notes)


async def test_garbage_holders_from_a_plugin_never_stop_the_agent(tmp_path):
    """Through the real agent: windows keep coming, with the device and its good holders."""
    from capmon.agent.probe import Holder

    class Garbage:
        name, vendor, interval_s, timeout_s, proc_root = "garbage", "acme", 0.05, 1.0, None

        def sample(self):
            holders = (Holder(os.getpid()), Holder(str(os.getpid())), Holder(99999999, name=123), Holder(1.5))
            return [DeviceSample("ACME-0", "acme", util_pct=0.0, processes=4, holders=holders)]

        def close(self):
            pass

    config = AgentConfig(agent=AgentSection(id="t", host="h", window_s=1))
    sink = ListSink()
    agent = Agent(config, sink=sink, probes=[Garbage()])
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.sleep(2.5)
    stop.set()
    await asyncio.wait_for(task, 10)
    windows = [r for r in sink.reports if r.devices]
    assert len(windows) >= 2
    device = windows[-1].devices[0]
    assert device.device_id == "ACME-0"
    assert {h.pid for h in device.holders} == {os.getpid(), 99999999}
