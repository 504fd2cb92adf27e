"""The agent's Prometheus exporter: scraped by a real Prometheus, and its series one by one."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from capmon.agent import wire
from capmon.agent.classifier import IdleClassifier
from capmon.agent.config import AgentConfig, AgentSection, ConfigError, ExporterSection, load_config
from capmon.agent.daemon import Agent
from capmon.agent.exporter import AgentExporter
from capmon.agent.holders import HoldersConfig, parse_cgroup
from capmon.agent.probe import DeviceSample, Holder
from capmon.plugins.mock import MockConfig, MockProbe
from capmon.plugins.mock.probe import USERS

T0 = 1_760_000_000.0


def config(tmp_path=None, **agent) -> AgentConfig:
    section = AgentSection(id="node-1", host="gpu-node-1", labels={"site": "ams1"}, **agent)
    if tmp_path is not None:
        section = dataclasses.replace(section, output=str(tmp_path / "windows.jsonl"))
    return AgentConfig(agent=section, exporter=ExporterSection(listen="127.0.0.1:0"))


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Parsed exposition: (sample name, labels) → value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def by(parsed, name: str, **match) -> dict[str, float]:
    """Values of `name` whose labels include `match`, keyed by device (or probe)."""
    out = {}
    for (n, labels), value in parsed.items():
        d = dict(labels)
        if n == name and all(d.get(k) == v for k, v in match.items()):
            out[d.get("device") or d.get("probe") or ""] = value
    return out


class Ticks:
    """A classifier fed one probe's samples at chosen times (no sleeping)."""

    def __init__(self) -> None:
        self.classifier = IdleClassifier()
        self.t = T0

    def run(self, seconds: int, *devices: DeviceSample) -> None:
        for _ in range(seconds):
            self.classifier.observe_probe("mock", self.t, devices)
            self.t += 1


def gpu(device_id: str, util: float = 0.0, processes: int = 0, **kw) -> DeviceSample:
    return DeviceSample(
        device_id,
        "nvidia",
        "NVIDIA H100 80GB HBM3",
        util_pct=util,
        processes=processes,
        memory_used_bytes=2**20,
        memory_total_bytes=80 * 2**30,
        power_w=100.0,
        temp_c=40.0,
        **kw,
    )


async def test_a_real_prometheus_scrapes_a_running_agent(tmp_path, prometheus):
    cfg = config(tmp_path, window_s=60)
    probe = MockProbe(
        MockConfig(devices=4, profiles=("idle", "training", "notebook", "lost"), interval_s=0.1)
    )
    # The agent starts its own exporter from [exporter] listen (port 0: any free one).
    cfg = dataclasses.replace(cfg, exporter=ExporterSection(listen="127.0.0.1:0"))
    agent = Agent(cfg, probes=[probe])
    exporter = agent.exporter
    assert exporter is not None
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    for _ in range(500):
        if exporter.address is not None:
            break
        await asyncio.sleep(0.01)
    try:
        assert exporter.address is not None
        target = f"127.0.0.1:{exporter.address[1]}"
        prometheus.scrape([target], interval_s=0.5)
        busy = 'capmon_device_state_seconds_total{device="MOCK-000-01",state="busy"}'
        # Three scrapes of the busy device's counter: enough for increase().
        await asyncio.to_thread(prometheus.wait_for, f"count_over_time({busy}[1m]) >= 3")

        job = f'{{job="capmon-agent",instance="{target}"}}'
        assert prometheus.values(f"up{job}", by="instance") == {target: 1.0}
        state = prometheus.values('capmon_device_state{state="free"}')
        assert state == {"MOCK-000-00": 1.0, "MOCK-000-01": 0.0, "MOCK-000-02": 0.0, "MOCK-000-03": 0.0}
        assert prometheus.values('capmon_device_state{state="allocated_idle"}')["MOCK-000-02"] == 1.0
        assert prometheus.values('capmon_device_state{state="unavailable"}')["MOCK-000-03"] == 1.0
        assert set(prometheus.values("sum by (device) (capmon_device_state)").values()) == {1.0}
        # The counters grow with the time in each state, and only that state's.
        assert prometheus.values(f"increase({busy}[1m])")["MOCK-000-01"] > 0
        free = 'capmon_device_state_seconds_total{device="MOCK-000-01",state="free"}'
        assert prometheus.values(f"increase({free}[1m])")["MOCK-000-01"] == 0
        assert prometheus.values("capmon_device_idle_since_seconds").keys() == {"MOCK-000-00", "MOCK-000-02"}
        assert prometheus.values("capmon_device_utilization_ratio")["MOCK-000-01"] > 0.9
        assert prometheus.values('capmon_agent_probe_samples_total{probe="mock"}', by="probe")["mock"] > 0
        (row,) = prometheus.query('capmon_device_info{device="MOCK-000-00"}')
        labels = row["metric"]
        assert (labels["host"], labels["agent"], labels["site"], labels["vendor"]) == (
            "gpu-node-1",
            "node-1",
            "ams1",
            "mock",
        )
        assert labels["model"] == "NVIDIA H100 80GB HBM3"
    finally:
        prometheus.scrape([])
        stop.set()
        await asyncio.wait_for(running, 30)
    assert exporter.address is None or not _listening(exporter.address)  # stopped with the agent


HOLDING = ("training", "inference", "notebook", "training", "idle", "training")


async def scrape_running_agent(tmp_path, holders: HoldersConfig, until_holders: bool = True):
    """A real Agent on the mock probe (its holders resolved through the mock's simulated /proc),
    scraped over HTTP as text once its exporter has seen a tick: the parsed samples, and the probe."""
    cfg = dataclasses.replace(config(tmp_path, window_s=60), holders=holders)
    probe = MockProbe(MockConfig(devices=len(HOLDING), profiles=HOLDING, interval_s=0.1, seed=7))
    probe.setup()
    agent = Agent(cfg, probes=[probe])
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(1000):
                if agent.exporter.address is not None:
                    url = f"http://127.0.0.1:{agent.exporter.address[1]}/metrics"
                    async with http.get(url) as resp:
                        text = await resp.text()
                    ticked = "capmon_device_state{" in text
                    if ticked and (not until_holders or "capmon_device_holder_info{" in text):
                        return samples(text), probe
                await asyncio.sleep(0.01)
        raise AssertionError("the exporter served no tick")
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        probe.close()


def holder_infos(parsed) -> dict[str, set[tuple[str, ...]]]:
    out: dict[str, set[tuple[str, ...]]] = {}
    for name, labels in parsed:
        if name == "capmon_device_holder_info":
            d = dict(labels)
            assert "pid" not in d
            out.setdefault(d["device"], set()).add(
                tuple(
                    d[k]
                    for k in ("source", "user", "namespace", "pod", "container", "slurm_job_id", "command")
                )
            )
    return out


async def test_holder_info_names_the_resolved_owners_never_pids(tmp_path):
    parsed, probe = await scrape_running_agent(tmp_path, HoldersConfig())
    want = {}
    for i, profile in enumerate(HOLDING):
        if profile == "idle":
            continue
        want[f"MOCK-000-{i:02d}"] = {
            ("process", USERS[p.uid], "", "", "", parse_cgroup(p.cgroup).slurm_job_id or "", p.command)
            for p in probe.processes(i, profile)
        }
    assert holder_infos(parsed) == want
    # The seed holds devices for Slurm jobs and for users: the owners, not only process names.
    assert {k[5] for ks in want.values() for k in ks} - {""}
    assert {k[1] for ks in want.values() for k in ks} <= set(USERS.values())
    memory = by(parsed, "capmon_device_holder_memory_bytes")
    assert set(memory) == set(want) and all(v > 0 for v in memory.values())


async def test_holder_privacy_settings_reach_the_exporter(tmp_path):
    parsed, _ = await scrape_running_agent(tmp_path, HoldersConfig(users="uid", commands=False))
    infos = holder_infos(parsed)
    assert infos and {k[6] for ks in infos.values() for k in ks} == {""}  # no process names
    assert {k[1] for ks in infos.values() for k in ks} <= {str(uid) for uid in USERS}
    # [holders] enabled = false: no holder series at all, not the probe's raw process names.
    parsed, _ = await scrape_running_agent(tmp_path, HoldersConfig(enabled=False), until_holders=False)
    assert by(parsed, "capmon_device_state", state="allocated_idle")  # held devices, still classified
    assert not holder_infos(parsed) and not by(parsed, "capmon_device_holder_memory_bytes")


def test_state_seconds_keep_counting_across_windows():
    # A counter a window's end reset would make rate() read a restart every minute.
    ticks = Ticks()
    ticks.run(30, gpu("GPU-0"))
    ticks.classifier.close_window(int(T0), int(T0) + 30)
    ticks.run(30, gpu("GPU-0", util=95.0, processes=1))
    (view,) = ticks.classifier.snapshot()
    assert view.state == "busy"
    assert view.state_seconds == {"busy": 29.0, "allocated_idle": 0.0, "free": 30.0, "unavailable": 0.0}
    assert view.energy_joules == pytest.approx(59 * 100.0)


def render(ticks: Ticks, cfg: AgentConfig | None = None, stats=None, accept: str = "") -> tuple[str, str]:
    exporter = AgentExporter(cfg or config(), ticks.classifier.snapshot, lambda: stats, clock=lambda: ticks.t)
    body, content_type = exporter.render(accept)
    return body.decode(), content_type


def test_series_names_units_and_labels():
    ticks = Ticks()
    mig = gpu("MIG-1", extra={"gpu_fraction": 1 / 7}, parent_id="GPU-9")
    ticks.run(120, gpu("GPU-0"), mig)
    stats = wire.AgentStats(
        uptime_s=120,
        dropped_reports=2,
        lost_windows=1,
        probes=[wire.ProbeStats(name="nvml", status="active", samples=120, errors=3, timeouts=1)],
    )
    parsed = samples(render(ticks, stats=stats)[0])
    assert by(parsed, "capmon_device_state", state="free") == {"GPU-0": 1.0, "MIG-1": 1.0}
    assert by(parsed, "capmon_device_state_seconds_total", state="free") == {"GPU-0": 119.0, "MIG-1": 119.0}
    assert by(parsed, "capmon_device_gpu_fraction") == {"GPU-0": 1.0, "MIG-1": pytest.approx(1 / 7)}
    assert by(parsed, "capmon_device_idle_since_seconds")["GPU-0"] == T0
    assert by(parsed, "capmon_device_idle_for_seconds")["GPU-0"] == 120.0
    assert by(parsed, "capmon_device_memory_total_bytes")["GPU-0"] == 80 * 2**30
    assert by(parsed, "capmon_device_power_watts")["GPU-0"] == 100.0
    assert by(parsed, "capmon_device_temperature_celsius")["GPU-0"] == 40.0
    assert by(parsed, "capmon_device_energy_joules_total")["GPU-0"] == 119 * 100.0
    assert by(parsed, "capmon_device_info", parent="GPU-9") == {"MIG-1": 1.0}
    assert by(parsed, "capmon_agent_lost_windows_total") == {"": 1.0}
    assert by(parsed, "capmon_agent_dropped_reports_total") == {"": 2.0}
    assert by(parsed, "capmon_agent_probe_errors_total") == {"nvml": 3.0}
    assert by(parsed, "capmon_agent_probe_timeouts_total") == {"nvml": 1.0}
    assert by(parsed, "capmon_agent_probe_up") == {"nvml": 1.0}
    for _, labels in parsed:
        assert {"host", "agent", "site"} <= dict(labels).keys()


def test_holders_are_bounded_identities_never_pids():
    ticks = Ticks()
    holders = (*(Holder(1000 + i, 2**30, "python") for i in range(3)), Holder(7, None, None))
    ticks.run(5, gpu("GPU-0", processes=len(holders), holders=holders))
    parsed = samples(render(ticks)[0])
    infos = [dict(labels) for name, labels in parsed if name == "capmon_device_holder_info"]
    # Four processes, two identities; pids never become labels (a series per process).
    assert sorted(i["command"] for i in infos) == ["", "python"]
    assert all("pid" not in i and i["source"] == "process" for i in infos)
    assert by(parsed, "capmon_device_holder_memory_bytes", command="python") == {"GPU-0": 3.0 * 2**30}


def test_holders_are_at_most_the_wire_bound_most_memory_first():
    ticks = Ticks()
    holders = tuple(Holder(1000 + i, (i + 1) * 2**20, f"worker{i}") for i in range(40))
    ticks.run(5, gpu("GPU-0", processes=len(holders), holders=holders))
    parsed = samples(render(ticks)[0])
    commands = {dict(labels)["command"] for name, labels in parsed if name == "capmon_device_holder_info"}
    assert commands == {f"worker{i}" for i in range(40 - wire.MAX_HOLDERS, 40)}


def test_a_label_key_the_exporter_sets_itself_is_left_out():
    ticks = Ticks()
    ticks.run(2, gpu("GPU-0"))
    cfg = config()
    cfg = dataclasses.replace(
        cfg, agent=dataclasses.replace(cfg.agent, labels={"site": "a", "device": "x", "job": "y"})
    )
    parsed = samples(render(ticks, cfg)[0])
    (labels,) = [dict(lab) for name, lab in parsed if name == "capmon_device_info"]
    assert labels["device"] == "GPU-0" and labels["site"] == "a" and "job" not in labels


def test_a_vanished_device_is_unavailable_with_no_readings():
    ticks = Ticks()
    ticks.run(5, gpu("GPU-0"), gpu("GPU-1"))
    ticks.run(5, gpu("GPU-0"))
    parsed = samples(render(ticks)[0])
    assert by(parsed, "capmon_device_state", state="unavailable") == {"GPU-0": 0.0, "GPU-1": 1.0}
    assert "GPU-1" not in by(parsed, "capmon_device_power_watts")


def test_openmetrics_when_the_scraper_asks():
    ticks = Ticks()
    ticks.run(2, gpu("GPU-0"))
    text, content_type = render(ticks, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert render(ticks)[1].startswith("text/plain; version=0.0.4")


async def test_a_port_in_use_is_one_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = dataclasses.replace(config(), exporter=ExporterSection(listen=f"127.0.0.1:{port}"))
        exporter = AgentExporter(cfg, list, lambda: None)
        with pytest.raises(OSError, match=f"exporter cannot listen on 127.0.0.1:{port}"):
            await exporter.start()
        await exporter.stop()


def test_exporter_config(tmp_path):
    assert load_config(None).exporter.listen == ""
    path = tmp_path / "agent.toml"
    path.write_text('[exporter]\nlisten = "[::1]:9477"\n')
    assert load_config(path, env={}).exporter.listen == "[::1]:9477"
    for bad in ("9477", "127.0.0.1:0", "127.0.0.1:70000", ":9477"):
        path.write_text(f'[exporter]\nlisten = "{bad}"\n')
        with pytest.raises(ConfigError, match=r"agent.toml: \[exporter\] listen: "):
            load_config(path, env={})


def _listening(address: tuple) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", address[1])) == 0
