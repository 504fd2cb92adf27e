"""Who holds a device, through the real agent: mock probe → holders resolved on the probe's thread →
per-window HolderWindow records on the classifier's clock (issue 12, items 2-3 wiring and 8)."""

from __future__ import annotations

import asyncio
import json
import threading

from capmon.agent import DeviceSample, Probe
from capmon.agent.cli import main
from capmon.agent.holders import HoldersConfig, parse_cgroup
from capmon.agent.probe import Holder
from capmon.agent.sampler import ProbeTask
from capmon.plugins.mock import MockConfig, MockProbe
from capmon.plugins.mock.probe import USERS
from capmon.testing import CapmonClock, InProcessAgent, agent_config

PROFILES = ("training", "inference", "notebook", "idle", "training", "inference")


def mock(clock, seed=0, **options) -> MockProbe:
    options.setdefault("profiles", PROFILES)
    probe = MockProbe(MockConfig(devices=len(options["profiles"]), seed=seed, **options), clock=clock)
    probe.setup()
    return probe


def expected(probe: MockProbe) -> dict[str, set[tuple]]:
    """Who the simulation says holds each device: (pid, user, command, pod uid, job), from the plan
    and its cgroup text, not from the agent."""
    out = {}
    for i, profile in enumerate(probe.config.profiles):
        rows = set()
        for p in probe.processes(i, profile):
            owner = parse_cgroup(p.cgroup)
            rows.add((p.pid, USERS[p.uid], p.command, owner.pod_uid, owner.slurm_job_id))
        out[f"MOCK-000-{i:02d}"] = rows
    return out


async def one_window(probe: Probe, **sections) -> dict:
    clock = probe.clock
    agent = InProcessAgent(clock, agent_config(window_s=60, **sections), [probe])
    [report] = await agent.run_until_window()
    return {d.device_id: d for d in report.devices}


async def test_windows_name_the_mock_users_pods_and_jobs_with_exact_held_seconds():
    clock = CapmonClock()
    probe = mock(clock)
    want = expected(probe)
    kinds = {("pod" if r[3] else "job" if r[4] else "other") for rows in want.values() for r in rows}
    assert {"pod", "job"} <= kinds, "the seed gives both pods and Slurm jobs"
    devices = await one_window(probe)
    for device_id, rows in want.items():
        d = devices[device_id]
        got = {(h.pid, h.user, h.command, h.pod_uid, h.slurm_job_id) for h in d.holders}
        assert got == rows, device_id
        # Seen on every tick of the whole window: held all 60 s of it.
        assert [h.held_s for h in d.holders] == [60.0] * len(rows)
        assert all(h.source == "process" and h.uid is not None for h in d.holders)
        assert d.holders_omitted == 0
    assert devices["MOCK-000-03"].holders == []  # idle: known to be held by nobody, not unknown
    probe.close()


async def test_a_holder_that_leaves_mid_window_held_the_device_only_while_it_was_there():
    clock = CapmonClock(1_800_000_000)  # a window boundary: phases line up with the window
    probe = mock(clock, profiles=("training:20,idle:40",))
    devices = await one_window(probe)
    [*holders] = devices["MOCK-000-00"].holders
    assert holders and [h.held_s for h in holders] == [20.0] * len(holders)
    probe.close()


async def test_holders_disabled_sends_none_but_the_process_count_still_travels():
    clock = CapmonClock()
    probe = mock(clock)
    on = await one_window(probe)
    off = await one_window(probe, holders=HoldersConfig(enabled=False))
    assert all(d.holders is not None for d in on.values()) and on["MOCK-000-00"].holders
    assert all(d.holders is None for d in off.values())
    assert off["MOCK-000-00"].processes == len(on["MOCK-000-00"].holders)
    probe.close()


async def test_users_none_sends_no_user_and_no_uid_and_commands_false_no_process_name():
    clock = CapmonClock()
    probe = mock(clock)
    devices = await one_window(probe, holders=HoldersConfig(users="none", commands=False))
    held = [h for d in devices.values() for h in d.holders]
    assert held and all(h.user is None and h.uid is None and h.command is None for h in held)
    assert any(h.pod_uid for h in held) and any(h.slurm_job_id for h in held)  # the cgroup still says
    probe.close()


async def test_users_uid_sends_the_uid_as_the_user():
    clock = CapmonClock()
    probe = mock(clock)
    devices = await one_window(probe, holders=HoldersConfig(users="uid"))
    held = [h for d in devices.values() for h in d.holders]
    assert held and all(h.user == str(h.uid) and int(h.user) in USERS for h in held)
    probe.close()


async def test_a_probe_that_cannot_tell_sends_no_holders():
    clock = CapmonClock()
    blind = mock(clock, count_processes=False)
    devices = await one_window(blind)
    assert all(d.holders is None for d in devices.values())
    blind.close()
    # Whereas the same devices counted say exactly who holds them, and that an idle one is held by none.
    seeing = mock(clock)
    devices = await one_window(seeing)
    assert devices["MOCK-000-03"].holders == [] and devices["MOCK-000-00"].holders
    seeing.close()


class Vanishing(Probe):
    """Lists two held devices, then only one: the other vanished."""

    name, vendor = "vanishing", "test"
    default_interval_s = 1.0

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.calls = 0

    def sample(self):
        self.calls += 1
        ids = ("V-0", "V-1") if self.calls <= 10 else ("V-0",)
        return [
            DeviceSample(i, "test", util_pct=0.0, processes=1, holders=(Holder(2**22 + 5, 1024),))
            for i in ids
        ]


async def test_a_device_its_probe_stops_listing_holds_nothing_from_then_on():
    clock = CapmonClock()
    agent = InProcessAgent(clock, agent_config(window_s=60), [Vanishing(clock)])
    [first, second] = await agent.run_until_window(2)
    by_id = {d.device_id: d for d in first.devices}
    assert [h.held_s for h in by_id["V-0"].holders] == [60.0]
    assert [h.held_s for h in by_id["V-1"].holders] == [10.0]
    assert by_id["V-1"].state == "unavailable"
    # The next window: still tracked (unavailable, "no longer reported"), holders unknown.
    assert {d.device_id: d.holders for d in second.devices}["V-1"] is None


class Slow(Probe):
    name, vendor = "slow", "test"
    default_timeout_s = 0.2

    def sample(self):
        return [DeviceSample("S-0", "test", util_pct=0.0, processes=1, holders=(Holder(1),))]


async def test_holder_resolution_runs_on_the_probe_thread_under_its_timeout():
    """Blocking /proc reads never run on the event loop: the post step runs on the worker thread,
    and one that hangs is the probe's timeout, not the agent's hang."""
    loop_thread = threading.get_ident()
    threads = []
    release = threading.Event()

    def post(devices):
        threads.append(threading.get_ident())
        if len(threads) > 1:
            release.wait(10)
        return {d.device_id: None for d in devices}

    seen = []
    task = ProbeTask(Slow(), lambda n, t, d, h, resolved: seen.append((d, resolved)), post=post)
    await task.tick()
    assert threads and threads[0] != loop_thread
    assert seen[0][1] == {"S-0": None}
    await asyncio.wait_for(task.tick(), 5)  # the hung step times out like a hung sample()
    release.set()
    assert task.health.timeouts == 1
    assert [d.healthy for d in seen[-1][0]] == [False] and seen[-1][1] is None


def test_capmon_agent_probe_mock_shows_who_holds_each_device(capsys):
    assert main(["agent", "probe", "--mock", "--disable", "host"]) == 0
    out = capsys.readouterr().out
    [header] = [line for line in out.splitlines() if "HELD BY" in line]
    assert header.split() == ["DEVICE", "PID", "USER", "COMMAND", "MEM", "MiB", "HELD", "BY"]
    probe = MockProbe(MockConfig())
    probe.setup()
    want = expected(probe)
    probe.close()
    for device_id, rows in want.items():
        for pid, user, command, pod_uid, job in rows:
            line = next(x for x in out.splitlines() if x.startswith(device_id) and f" {pid} " in x)
            assert user in line and command in line
            assert (f"pod uid {pod_uid}" if pod_uid else f"job {job}" if job else "") in line


def test_capmon_agent_probe_json_carries_the_resolved_owners_and_never_a_command_line(capsys):
    assert main(["agent", "probe", "--json", "--mock", "--disable", "host"]) == 0
    out = json.loads(capsys.readouterr().out)
    devices = {d["device_id"]: d for d in out["devices"]}
    held = devices["MOCK-000-00"]["holders"]
    assert held and all(h["user"] in USERS.values() and h["pid"] >= 2**22 for h in held)
    assert all(h.get("slurm_job_id") or h.get("pod_uid") or h.get("container_id") for h in held)
    assert devices["MOCK-000-04"]["holders"] == []
    text = json.dumps(out)
    assert "cmdline" not in text and "environ" not in text


def test_capmon_agent_probe_applies_the_holders_privacy_options(tmp_path, capsys):
    assert main(["agent", "probe", "--json", "--mock", "--disable", "host"]) == 0
    default = [h for d in json.loads(capsys.readouterr().out)["devices"] for h in d["holders"] or ()]
    assert default and all(h["user"] and h["uid"] and h["command"] for h in default)
    path = tmp_path / "agent.toml"
    path.write_text('[holders]\nusers = "none"\ncommands = false\n')
    assert main(["agent", "probe", "--json", "--mock", "--disable", "host", "--config", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    held = [h for d in out["devices"] for h in d["holders"] or ()]
    assert held and all("user" not in h and "uid" not in h and "command" not in h for h in held)
