"""Allocation sources in the agent (issue 13 items 1, 4, 5): registry, containment, matching, and the
classification traces — allocated with no process is allocated_idle, released is free, a source that
cannot answer makes the devices it covers unavailable ("allocation unknown"), never free."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import threading
import types

import pytest
import tomllib

from capmon.agent import DeviceSample, ProbeUnavailable, hookimpl
from capmon.agent.allocation import Allocation, AllocationSource
from capmon.agent.config import AgentConfig, AgentSection, sample_config
from capmon.agent.daemon import Agent, checked_report, match_allocations
from capmon.agent.holders import parse_cgroup
from capmon.agent.registry import ProbeRegistry
from capmon.plugins.mock import MockConfig, MockProbe
from capmon.testing import CapmonClock, MemorySink

WINDOW_S = 60
SINCE = 1_700_000_000


class FakeScheduler(AllocationSource):
    """A scheduler the test steers: `answer` is what allocations() returns, or an exception to raise;
    `hang` blocks it until released."""

    name = "fakesched"
    default_interval_s = 1.0
    default_timeout_s = 0.2

    def __init__(self, config=None, **boundary):
        super().__init__(config)
        self.answer: object = []
        self.hang = threading.Event()
        self.release = threading.Event()
        self.closed = False

    def allocations(self):
        if self.hang.is_set():
            self.release.wait(10)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    def covers(self, vendor):
        return vendor == "mock"

    def close(self):
        self.closed = True


def pod(device_id, name="notebook-0", uid="0b6c2f7e-0000-4000-8000-000000000001"):
    return Allocation(
        "fakesched",
        device_id,
        device_id=device_id,
        namespace="ml",
        pod=name,
        container="main",
        pod_uid=uid,
        since=SINCE,
    )


class Stepped:
    """The real Agent stepped second by second on a test clock (the sources first, as the daemon
    primes them), its windows closed where `Agent.run()` closes them."""

    def __init__(self, probe_config: MockConfig, source: AllocationSource, **agent) -> None:
        self.clock = CapmonClock(1_800_000_000)
        self.probe = MockProbe(probe_config, clock=self.clock)
        self.probe.setup()
        config = AgentConfig(agent=AgentSection(id="n", host="n", window_s=WINDOW_S), **agent)
        self.agent = Agent(
            config,
            probes=[self.probe],
            sources=[source],
            clock=self.clock,
            sink=MemorySink(None),  # type: ignore[arg-type]
        )
        self.start = int(self.clock())
        self.due = [self.clock()] * len(self.agent.sampler.tasks)
        self.seq = 0

    async def run(self, seconds: int) -> list:
        reports = []
        for _ in range(seconds):
            now = self.clock()
            for i, task in enumerate(self.agent.sampler.tasks):
                if now >= self.due[i]:
                    await task.tick()
                    self.due[i] = now + task.probe.interval_s
            self.clock.advance(1)
            while self.clock() >= self.agent.window_end(self.start):
                end = self.agent.window_end(self.start)
                self.seq += 1
                reports.append(checked_report(self.agent.close_window(self.seq, self.start, end)))
                self.start = end
        return reports

    def close(self):
        self.probe.close()


def devices_of(report):
    return {d.device_id: d for d in report.devices}


async def test_a_pod_allocated_a_device_with_no_process_is_allocated_idle_and_named():
    source = FakeScheduler()
    source.answer = [pod("MOCK-000-01")]
    run = Stepped(MockConfig(devices=2, profiles=("idle",)), source)
    [report] = await run.run(WINDOW_S)
    d = devices_of(report)
    assert d["MOCK-000-00"].state == "free" and d["MOCK-000-00"].free_s == pytest.approx(60)
    held = d["MOCK-000-01"]
    assert (held.state, held.allocated_idle_s, held.free_s) == ("allocated_idle", 60.0, 0.0)
    assert held.reason == "allocated to ml/notebook-0, no process"
    [h] = held.holders
    assert (h.source, h.namespace, h.pod, h.container, h.pod_uid, h.since, h.held_s, h.pid) == (
        "fakesched",
        "ml",
        "notebook-0",
        "main",
        "0b6c2f7e-0000-4000-8000-000000000001",
        SINCE,
        60.0,
        None,
    )
    run.close()


async def test_a_released_allocation_leaves_the_device_free_and_its_idle_streak_unbroken():
    source = FakeScheduler()
    source.answer = [pod("MOCK-000-00")]
    run = Stepped(MockConfig(devices=1, profiles=("idle",)), source)
    await run.run(30)
    source.answer = []  # the pod ended
    [report] = await run.run(30)
    d = devices_of(report)["MOCK-000-00"]
    assert (d.state, d.allocated_idle_s, d.free_s) == ("free", 30.0, 30.0)
    assert d.idle_since == run.start - WINDOW_S  # idle all along: allocated-idle then free
    assert d.state_since == run.start - 30
    [h] = d.holders
    assert h.pod == "notebook-0" and h.held_s == 30.0
    run.close()


async def test_a_source_that_cannot_answer_makes_the_devices_it_covers_unavailable_never_free():
    source = FakeScheduler()
    run = Stepped(MockConfig(devices=2, profiles=("idle", "notebook")), source)
    [before] = await run.run(WINDOW_S)
    assert devices_of(before)["MOCK-000-00"].free_s == pytest.approx(60)
    idle_since = devices_of(before)["MOCK-000-00"].idle_since
    source.answer = RuntimeError("kubelet socket gone")
    await run.run(10)
    source.answer = []
    [gap] = await run.run(WINDOW_S - 10)
    d = devices_of(gap)["MOCK-000-00"]
    # Ten seconds when the source could not say whether the device was given away: not capacity.
    assert (d.unavailable_s, d.free_s) == (10.0, 50.0)
    # A blip within the grace: the idle streak survives it.
    assert d.idle_since == idle_since
    # A device a process holds is allocated-idle whatever the scheduler says.
    held = devices_of(gap)["MOCK-000-01"]
    assert (held.allocated_idle_s, held.unavailable_s) == (60.0, 0.0)
    stats = {p.name: p for p in gap.agent.probes}
    assert stats["alloc:fakesched"].errors == 10 and stats["alloc:fakesched"].status == "active"
    run.close()


async def test_the_reason_names_the_source_and_why_and_a_hung_source_stops_nothing():
    source = FakeScheduler()
    run = Stepped(MockConfig(devices=1, profiles=("idle",)), source)
    await run.run(2)
    source.answer = RuntimeError("kubelet socket gone")
    await run.run(1)
    view = run.agent.classifier.snapshot()[0]
    assert (view.state, view.reason) == (
        "unavailable",
        "allocation unknown: fakesched: RuntimeError: kubelet socket gone",
    )
    source.answer = []
    source.hang.set()
    await run.run(3)  # one 0.2 s timeout, then "still running" without waiting
    view = run.agent.classifier.snapshot()[0]
    assert view.state == "unavailable" and view.reason.startswith(
        "allocation unknown: fakesched: allocations() "
    )
    assert run.agent.sampler.probe_tasks[0].health.samples == 6  # the probe sampled every second
    source.hang.clear()
    source.release.set()
    task = run.agent.sampler.sources[0]
    await asyncio.wait_for(asyncio.shield(task._inflight), 5)  # the released call, finishing on its thread
    await run.run(2)
    assert run.agent.classifier.snapshot()[0].state == "free"
    assert task.health.timeouts == 1 and task.health.skipped_ticks >= 1
    run.close()


async def test_garbage_from_a_source_is_allocation_unknown():
    source = FakeScheduler()
    source.answer = {"not": "a list"}
    run = Stepped(MockConfig(devices=1, profiles=("idle",)), source)
    await run.run(2)
    view = run.agent.classifier.snapshot()[0]
    assert view.state == "unavailable" and "not a list of Allocation" in view.reason
    run.close()


async def test_processes_of_the_allocated_pod_and_job_carry_the_schedulers_names():
    clock = CapmonClock()
    profiles = ("training", "inference", "notebook", "idle", "training", "inference")
    mock = MockProbe(MockConfig(devices=6, profiles=profiles), clock=clock)
    mock.setup()
    owners = {
        i: parse_cgroup(p.cgroup) for i, pr in enumerate(mock.config.profiles) for p in mock.processes(i, pr)
    }
    mock.close()
    jobs = {i: o.slurm_job_id for i, o in owners.items() if o.slurm_job_id}
    pods = {i: o.pod_uid for i, o in owners.items() if o.pod_uid}
    assert jobs and pods, "seed 0 gives both"
    source = FakeScheduler()
    source.answer = [
        *(
            Allocation(
                "fakesched", f"gpu:{i}", vendor="mock", index=i, job_id=j, user="alice", partition="gpu"
            )
            for i, j in jobs.items()
        ),
        *(pod(f"MOCK-000-{i:02d}", name=f"serve-{i}", uid=u.upper()) for i, u in pods.items()),
    ]
    run = Stepped(MockConfig(devices=6, profiles=profiles), source)
    [report] = await run.run(WINDOW_S)
    d = devices_of(report)
    for i, job in jobs.items():
        holders = d[f"MOCK-000-{i:02d}"].holders
        assert holders and all(
            h.source == "process" and h.slurm_job_id == job and h.partition == "gpu" for h in holders
        )
    for i in pods:
        holders = d[f"MOCK-000-{i:02d}"].holders
        assert holders and all(
            h.source == "process" and h.pod == f"serve-{i}" and h.namespace == "ml" for h in holders
        )
    run.close()


def test_allocations_match_by_id_or_by_vendor_and_minor_number():
    class Answered:
        def __init__(self, allocations, error=None):
            self.source, self.allocations, self.error = FakeScheduler(), tuple(allocations), error

    devices = [
        DeviceSample("GPU-a", "mock", index=0, info={"minor_number": "3"}),
        DeviceSample("GPU-b", "mock", index=1),
        DeviceSample("GPU-c", "mock", index=2),
        DeviceSample("MIG-c1", "mock", parent_id="GPU-c"),
        DeviceSample("MIG-c2", "mock", parent_id="GPU-c"),
    ]
    by_minor = [Allocation("fakesched", "gpu:3", vendor="mock", index=3, job_id="7")]
    by_index = [Allocation("fakesched", "gpu:1", vendor="mock", index=1, job_id="8")]
    no_such = [Allocation("fakesched", "gpu:0", vendor="mock", index=0, job_id="9")]  # GPU-a is minor 3
    other_vendor = [Allocation("fakesched", "gpu:1", vendor="nvidia", index=1, job_id="10")]
    parent = [Allocation("fakesched", "GPU-c", device_id="GPU-c", job_id="11")]
    held, unknown = match_allocations(
        devices, [Answered(by_minor + by_index + no_such + other_vendor + parent)]
    )
    assert {d: [a.job_id for a in al] for d, al in held.items()} == {
        "GPU-a": ["7"],
        "GPU-b": ["8"],
        "MIG-c1": ["11"],
        "MIG-c2": ["11"],
    }
    assert unknown == {}
    held, unknown = match_allocations(devices, [Answered([], error="timed out")])
    assert held == {} and set(unknown) == {d.device_id for d in devices}
    assert unknown["GPU-a"] == "fakesched: timed out"
    nvidia_only = [DeviceSample("GPU-x", "nvidia", index=0)]
    assert match_allocations(nvidia_only, [Answered([], error="down")]) == ({}, {})  # not covered


# -- the registry --------------------------------------------------------------------------


class Absent(AllocationSource):
    name = "absent"

    def setup(self):
        raise ProbeUnavailable("no scheduler here")


class Broken(AllocationSource):
    name = "broken"

    def __init__(self, config=None, **boundary):
        super().__init__(config)
        self.closed = False

    def setup(self):
        raise OSError("permission denied")


class OptIn(FakeScheduler):
    name = "optin"
    auto = False


def plugin():
    module = types.ModuleType("fake_sched_plugin")
    module.capmon_allocation_sources = hookimpl(lambda: [FakeScheduler, Absent, Broken, OptIn])
    return module


def test_sources_are_listed_active_skipped_failed_and_disabled():
    registry = ProbeRegistry(entry_points=[], plugins=[("fakesched-plugin", plugin())])
    statuses = {s.name: s for s in registry.activate_sources()}
    assert statuses["fakesched"].status == "active" and isinstance(
        statuses["fakesched"].source, FakeScheduler
    )
    assert (statuses["absent"].status, statuses["absent"].reason) == ("skipped", "no scheduler here")
    assert (statuses["broken"].status, statuses["broken"].reason) == ("failed", "OSError: permission denied")
    assert statuses["optin"].status == "disabled" and "allocations.enable" in statuses["optin"].reason
    statuses = {s.name: s for s in registry.activate_sources(enable=["optin"], disable=["fakesched"])}
    assert statuses["optin"].status == "active" and statuses["fakesched"].status == "disabled"


def test_unknown_source_or_option_is_a_startup_error():
    registry = ProbeRegistry(entry_points=[], plugins=[("fakesched-plugin", plugin())])
    with pytest.raises(ValueError, match=r"agent.toml: unknown allocation source 'fakeshed'"):
        registry.activate_sources(disable=["fakeshed"], where="agent.toml")
    with pytest.raises(
        ValueError, match=r"\[allocations.fakesched\]: unknown key 'allocations.fakesched.intervall_s'"
    ):
        registry.activate_sources(options={"fakesched": {"intervall_s": 3}}, where="agent.toml")
    [status] = [
        s
        for s in registry.activate_sources(options={"fakesched": {"interval_s": 3}})
        if s.name == "fakesched"
    ]
    assert status.source.interval_s == 3.0


def test_a_broken_allocation_plugin_is_reported_not_fatal(tmp_path, monkeypatch):
    (tmp_path / "broken_sched.py").write_text("import not_a_module_that_exists\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("sched", "broken_sched", "capmon.allocations")
    registry = ProbeRegistry(entry_points=[], allocation_entry_points=[ep])
    [status] = registry.activate_sources()
    assert status.status == "failed" and "ModuleNotFoundError" in status.reason


def test_a_raising_hook_is_reported_and_the_other_plugins_sources_still_load():
    bad = types.ModuleType("bad_plugin")

    def raising():
        raise RuntimeError("boom")

    bad.capmon_allocation_sources = hookimpl(raising)
    registry = ProbeRegistry(entry_points=[], plugins=[("bad", bad), ("good", plugin())])
    statuses = {s.name: s for s in registry.activate_sources()}
    assert statuses["bad"].status == "failed" and "RuntimeError: boom" in statuses["bad"].reason
    assert statuses["fakesched"].status == "active"


def test_capmon_agent_probes_lists_the_allocation_sources(capsys, monkeypatch):
    from capmon.agent import cli

    monkeypatch.setattr(
        cli, "ProbeRegistry", lambda: ProbeRegistry(entry_points=[], plugins=[("fakesched-plugin", plugin())])
    )
    assert cli.main(["agent", "probes", "--json"]) == 0
    listed = {(p["kind"], p["name"]): p for p in json.loads(capsys.readouterr().out)}
    assert listed["allocations", "absent"]["status"] == "skipped"
    assert listed["allocations", "absent"]["reason"] == "no scheduler here"
    assert listed["allocations", "fakesched"]["status"] == "active"
    assert listed["allocations", "broken"]["status"] == "failed"
    assert cli.main(["agent", "probes"]) == 0
    table = capsys.readouterr().out
    assert "ALLOCATION SOURCE" in table and "no scheduler here" in table


def test_a_source_not_yet_asked_is_in_the_self_metrics_with_why():
    source = FakeScheduler()
    config = AgentConfig(agent=AgentSection(id="n", host="n", window_s=WINDOW_S))
    agent = Agent(config, probes=[], sources=[source], clock=lambda: 1_800_000_000.0, sink=MemorySink(None))
    [stats] = agent.agent_stats(1_800_000_000).probes
    assert (stats.name, stats.status, stats.reason) == ("alloc:fakesched", "active", "no answer yet")


def test_the_built_in_sources_samples_map_onto_their_config():
    eps = [
        importlib.metadata.EntryPoint(n, f"capmon.plugins.{n}", "capmon.allocations")
        for n in ("kubernetes", "slurm")
    ]
    registry = ProbeRegistry(entry_points=[], allocation_entry_points=eps)
    shown = tomllib.loads(sample_config()).get("allocations", {})
    options = {k: v for k, v in shown.items() if isinstance(v, dict)}
    # Every [allocations.<name>] table the sample shows names a source and decodes onto its config
    # (activate_sources raises on an unknown source or key).
    assert "slurm" in options and set(options) <= set(registry.source_types)
    registry.activate_sources(disable=list(registry.source_types), options=options, where="sample")


def test_ascend_allocations_match_by_physical_id_then_logic_id():
    """Huawei's device plugin names a chip by its physical id (Ascend910-<phyID>, /dev/davinciN), not
    npu-smi's NPU id: a 310P Duo host has NPU ids 1, 2, 4, 5 with two chips each."""

    class Answered:
        def __init__(self, allocations):
            self.source, self.allocations, self.error = FakeScheduler(), tuple(allocations), None

    devices = [
        DeviceSample("npu1-chip0", "ascend", index=1, info={"logic_id": "0", "phy_id": "0"}),
        DeviceSample("npu1-chip1", "ascend", index=1, info={"logic_id": "1", "phy_id": "1"}),
        DeviceSample("npu2-chip0", "ascend", index=2, info={"logic_id": "2"}),  # no phy id printed
        DeviceSample("npu2-chip1", "ascend", index=2, info={"logic_id": "3"}),
    ]
    allocations = [
        Allocation("fakesched", "Ascend310P-1", vendor="ascend", index=1, pod="a"),
        Allocation("fakesched", "Ascend310P-3", vendor="ascend", index=3, pod="b"),
    ]
    held, _ = match_allocations(devices, [Answered(allocations)])
    assert {d: [a.pod for a in al] for d, al in held.items()} == {"npu1-chip1": ["a"], "npu2-chip1": ["b"]}
