"""What the dashboard tests share: the storage schema (from the collector's own line protocol), the
dashboards, Grafana's macro and template-variable expansion, and a scripted mock fleet run through
the real agent → collector → influxd pipeline.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from capmon.agent import wire
from capmon.agent.config import AgentConfig, AgentSection
from capmon.agent.daemon import Agent, identity_of
from capmon.agent.holders import HolderWindows
from capmon.agent.probe import DeviceSample, Probe
from capmon.collector.app import FLEET as FLEET_VIEW
from capmon.collector.app import create_app
from capmon.collector.config import (
    AuthConfig,
    CollectorConfig,
    Config,
    PricingConfig,
    StorageConfig,
    TokenConfig,
    hash_token,
)
from capmon.collector.fleet import Pricing
from capmon.collector.lineproto import batch_lines
from capmon.plugins.host.probe import HostProbe
from capmon.plugins.mock import MockConfig, MockProbe
from capmon.plugins.mock.probe import GIB, profile_at

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
LABEL_KEYS = CollectorConfig().label_keys

# --------------------------------------------------------------------------------------------------
# The storage schema, derived from what the collector's line-protocol code writes for a batch that
# sets every optional field, so a field the collector stops writing fails the structure tests.


@dataclass
class Schema:
    tags: dict[str, set[str]] = field(default_factory=dict)
    fields: dict[str, dict[str, str]] = field(default_factory=dict)  # measurement → field → float|string


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, cur, i, quoted = [], [], 0, False
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur += (c, text[i + 1])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        if c == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def schema_lines() -> list[str]:
    """The line protocol the collector writes for a batch that sets every optional field."""
    device = wire.DeviceWindow(
        device_id="MIG-1",
        vendor="nvidia",
        model="NVIDIA H100 80GB HBM3",
        index=0,
        parent_id="GPU-0",
        state="allocated_idle",
        allocated_idle_s=60.0,
        util_mean_pct=1.0,
        util_max_pct=2.0,
        memory_used_bytes=1,
        memory_total_bytes=2,
        power_mean_w=3.0,
        energy_j=180.0,
        idle_energy_j=180.0,
        temp_max_c=4.0,
        processes=0,
        idle_since=1_760_000_000,
        state_since=1_760_000_000,
        fraction=1 / 7,
        error="x",
        reason="y",
        holders=[
            wire.HolderWindow(
                pid=1,
                user="u",
                uid=1000,
                command="c",
                runtime="containerd",
                container_id="0123456789ab",
                pod_uid="p",
                namespace="n",
                pod="p",
                container="c",
                slurm_job_id="1",
                partition="gpu",
                memory_bytes=1,
                held_s=60.0,
                since=1_760_000_000,
            )
        ],
    )
    report = wire.Report(
        seq=1,
        start=1_760_000_000,
        end=1_760_000_060,
        devices=[device],
        host=wire.HostWindow(
            cpu_mean_pct=1.0,
            cpu_max_pct=2.0,
            memory_used_bytes=1,
            memory_total_bytes=2,
            load1=0.1,
            load5=0.2,
            load15=0.3,
            cpu_count=8,
        ),
        agent=wire.AgentStats(
            probes=[wire.ProbeStats(name="nvml", status="failed", last_duration_s=0.1, reason="why")]
        ),
    )
    identity = wire.AgentIdentity(id="a", host="h", version="1.0", labels={k: "v" for k in LABEL_KEYS})
    # Priced, so that `idle_value` and `idle_energy_cost` are written.
    pricing = Pricing(PricingConfig(default=1.0, energy_price_per_kwh=0.25))
    return batch_lines(
        wire.Batch(agent=identity, reports=[report]), LABEL_KEYS, pricing.for_device, pricing.energy_cost
    )


def storage_schema() -> Schema:
    """Measurements, tags and fields as `capmon.collector.lineproto` writes them."""
    schema = Schema()
    for line in schema_lines():
        series, fieldset, _ts = _split_unescaped(line, " ")
        measurement, *tags = _split_unescaped(series, ",")
        schema.tags.setdefault(measurement, set()).update(t.split("=", 1)[0] for t in tags)
        fields = schema.fields.setdefault(measurement, {})
        for kv in _split_unescaped(fieldset, ","):
            key, value = kv.split("=", 1)
            fields[key] = "string" if value.startswith('"') else "float"
    return schema


def remote_write_series() -> dict[str, set[str]]:
    """Metric name → label names, as the collector's remote write sends the same batch."""
    from capmon.collector.remote_write import series_of_lines

    out: dict[str, set[str]] = {}
    for labels, _value, _ms in series_of_lines(schema_lines()):
        names = dict(labels)
        out.setdefault(names.pop("__name__"), set()).update(names)
    return out


# --------------------------------------------------------------------------------------------------
# Dashboards


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load_dashboards(language: str = "influxql") -> dict[str, dict]:
    """uid → dashboard model, of the dashboards in one query language (`influxql`, `promql`, `all`)."""
    out = {}
    for path in dashboard_files():
        model = json.loads(path.read_text(encoding="utf-8"))
        promql = model["uid"].endswith("-prometheus")
        if language == "all" or promql == (language == "promql"):
            out[model["uid"]] = model
    return out


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict]:
    """Every panel that shows data (rows and their collapsed children included, rows themselves not)."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_targets(boards: Mapping[str, Mapping[str, Any]]) -> list[Any]:
    """One pytest param (uid, panel title, refId) per query of every panel of `boards`."""
    return [
        pytest.param(uid, p["title"], t["refId"], id=f"{uid}:{p['title']}:{t['refId']}")
        for uid, d in boards.items()
        for p in panels(d)
        for t in p["targets"]
    ]


# --------------------------------------------------------------------------------------------------
# Grafana's expansion of an InfluxQL raw query, as the InfluxDB data source does it:
#  * template variables (`$v`, `${v}`, `[[v]]`): "All" with a custom all value is inserted as is
#    (unescaped); any other value is regex-escaped, one value alone, several as `(a|b)`. A single-value
#    variable too, wherever it stands: Grafana 9.x–10.x interpolate raw InfluxQL with the `regex` format
#    (grafana/grafana#80242), Grafana 11 escapes a non-numeric single value whenever the query holds
#    a `=~ /…/` (so `"host" = '$host'` next to one gets `'gpu\.example'`), older versions not at all.
#    The strictest of these is what is modelled: a variable belongs inside `=~ /^$v$/`, where escaped
#    and unescaped values both match, never inside a string literal;
#  * `$timeFilter` / `$__timeFilter` → `time >= <from>ms and time <= <to>ms` (backend, Grafana ≥ 8);
#  * `$__interval` / `$__interval_ms`: range / max data points, rounded (Grafana's `roundInterval`),
#    never below the panel's min interval; `${__from}` / `${__to}`: epoch milliseconds.

_ROUND_INTERVAL_MS = [
    (15, 10),
    (35, 20),
    (75, 50),
    (150, 100),
    (350, 200),
    (750, 500),
    (1500, 1000),
    (3500, 2000),
    (7500, 5000),
    (12500, 10000),
    (17500, 15000),
    (25000, 20000),
    (45000, 30000),
    (90000, 60000),
    (210000, 120000),
    (450000, 300000),
    (750000, 600000),
    (1050000, 900000),
    (1500000, 1200000),
    (2700000, 1800000),
    (5400000, 3600000),
    (9000000, 7200000),
    (16200000, 10800000),
    (32400000, 21600000),
    (86400000, 43200000),
    (604800000, 86400000),
]

_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration_ms(text: str) -> int:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d|w)", text.strip())
    if not m:
        raise ValueError(f"not a Grafana interval: {text!r}")
    return int(m.group(1)) * _DURATION_MS[m.group(2)]


def round_interval(ms: float) -> int:
    for below, rounded in _ROUND_INTERVAL_MS:
        if ms < below:
            return rounded
    return 604_800_000


def format_duration(ms: int) -> str:
    for unit in ("w", "d", "h", "m", "s"):
        size = _DURATION_MS[unit]
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def panel_interval_ms(panel: Mapping[str, Any], datasource_min: str, from_s: int, to_s: int) -> int:
    points = panel.get("maxDataPoints") or 1000  # a wide panel: Grafana uses its pixel width
    interval = round_interval((to_s - from_s) * 1000 / points)
    low = parse_duration_ms(panel.get("interval") or datasource_min)
    return max(interval, low)


def grafana_escape_regex(value: str) -> str:
    """@grafana/data `escapeRegex`."""
    return re.sub(r"[\\^$*+?.()|\[\]{}/]", lambda m: "\\" + m.group(0), value)


@dataclass(frozen=True)
class Selection:
    """The current value of one template variable."""

    values: Sequence[str]
    multi: bool = False
    include_all: bool = False
    all_value: str | None = None
    is_all: bool = False


def default_selection(dashboard: dict, **chosen: list[str] | str) -> dict[str, Selection]:
    """The variables' values: "All" unless chosen; a single-value variable takes its chosen value."""
    out = {}
    for var in dashboard["templating"]["list"]:
        name = var["name"]
        if var["type"] == "datasource":
            continue
        multi, include_all = var.get("multi", False), var.get("includeAll", False)
        if name in chosen:
            value = chosen[name]
            values = [value] if isinstance(value, str) else list(value)
            out[name] = Selection(values, multi, include_all, var.get("allValue"))
        elif var["type"] in ("custom", "constant"):
            out[name] = Selection([var["current"]["value"]])
        elif include_all:
            out[name] = Selection([], multi, include_all, var.get("allValue"), is_all=True)
    return out


_VAR = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?::([^}]+))?\}")


def expand(
    query: str,
    variables: Mapping[str, Selection],
    from_s: int,
    to_s: int,
    interval_ms: int,
) -> str:
    builtins = {
        "timeFilter": f"time >= {from_s * 1000}ms and time <= {to_s * 1000}ms",
        "__timeFilter": f"time >= {from_s * 1000}ms and time <= {to_s * 1000}ms",
        "__interval": format_duration(interval_ms),
        "interval": format_duration(interval_ms),
        "__interval_ms": str(interval_ms),
        "__from": str(from_s * 1000),
        "__to": str(to_s * 1000),
    }

    def replace(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        if name in builtins:
            return builtins[name]
        if name not in variables:
            raise KeyError(f"query uses ${name}, which the dashboard does not define: {query}")
        sel = variables[name]
        if sel.is_all and sel.all_value is not None:
            return sel.all_value
        escaped = [grafana_escape_regex(v) for v in sel.values]
        if sel.multi or sel.include_all:
            return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
        (value,) = escaped
        return value

    return _VAR.sub(replace, query)


# Grafana's expansion of a PromQL query, as the Prometheus data source does it
# (public/app/plugins/datasource/prometheus: `interpolateQueryExpr`, `prometheusRegularEscape`,
# `prometheusSpecialRegexEscape`; the backend's `$__range`, `$__rate_interval`):
#  * a multi-value or "All"-able variable: "All" with a custom all value as is, otherwise each value
#    regex-escaped with two backslashes (a PromQL string holding a regex escape), several as `(a|b)`;
#  * a single-value variable: only backslashes and single quotes escaped;
#  * `$__range` = the range in whole seconds (`10800s`), `$__range_s`, `$__range_ms`; `$__interval`,
#    `$__interval_ms` as for InfluxQL; `$__rate_interval` = max($__interval + scrape interval,
#    4 × scrape interval), the scrape interval being the data source's `timeInterval`.


def prometheus_regex_escape(value: str) -> str:
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value)


def prometheus_regular_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\\\'")


def expand_promql(
    query: str,
    variables: Mapping[str, Selection],
    from_s: int,
    to_s: int,
    interval_ms: int,
    scrape_interval_ms: int = 60_000,
) -> str:
    rate_ms = max(interval_ms + scrape_interval_ms, 4 * scrape_interval_ms)
    builtins = {
        "__range": f"{to_s - from_s}s",
        "__range_s": str(to_s - from_s),
        "__range_ms": str((to_s - from_s) * 1000),
        "__interval": format_duration(interval_ms),
        "__interval_ms": str(interval_ms),
        "__rate_interval": format_duration(rate_ms),
        "__from": str(from_s * 1000),
        "__to": str(to_s * 1000),
    }

    def replace(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        if name in builtins:
            return builtins[name]
        if name not in variables:
            raise KeyError(f"query uses ${name}, which the dashboard does not define: {query}")
        sel = variables[name]
        if sel.is_all and sel.all_value is not None:
            return sel.all_value
        if sel.multi or sel.include_all:
            escaped = [prometheus_regex_escape(v) for v in sel.values]
            return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
        (value,) = sel.values
        return prometheus_regular_escape(value)

    return _VAR.sub(replace, query)


# --------------------------------------------------------------------------------------------------
# The scripted fleet: 3 hosts × 8 mock devices and one host with a MIG GPU and a spinning GPU, over 3
# hours of simulated time, sampled every 30 s, reported in 60 s windows. Phase lists run on the
# absolute clock; T0 is a multiple of every cycle, so each phase starts exactly at T0 + its offset.
# HOLDERS says who holds which device; the agent's HolderWindows turns them into window records.

T0 = 1_760_054_400  # a multiple of 86 400 s
DURATION_S = 3 * 3600
SAMPLE_S = 30
WINDOW_S = 60

H100, A100, ASCEND = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "910B3"


@dataclass(frozen=True)
class ScriptedDevice:
    """A device of `ScriptedProbe`: NVIDIA-like, with what the NVML probe reports for a MIG instance."""

    device_id: str
    profile: str  # phase list over "idle", "notebook", "training", "spin"
    parent_id: str | None = None
    fraction: float | None = None  # a MIG instance's share of its GPU (extra["gpu_fraction"])


@dataclass(frozen=True)
class ScriptedHost:
    host: str
    labels: dict[str, str]
    model: str
    profiles: tuple[str, ...]  # the mock probe's devices
    host_index: int
    scripted: tuple[ScriptedDevice, ...] = ()  # ScriptedProbe's devices


FLEET = (
    ScriptedHost(
        "gpu-a01.ams1.example.com",  # dotted, as real host names are: Grafana regex-escapes it
        {"site": "ams1", "cluster": "c1", "pool": "training"},
        H100,
        (
            "training",
            "training",
            "idle",
            "notebook",
            "training:3600,idle:7200",  # idle since T0+1h
            "idle:5400,training:5400",  # idle for 1.5 h, then busy to the end
            "idle",
            "lost",
        ),
        0,
    ),
    ScriptedHost(
        "gpu-b01",
        {"site": "ams1", "cluster": "c2", "pool": "inference"},
        A100,
        (
            "training",
            "training",
            "training:7200,idle:3600",  # idle since T0+2h
            "notebook",
            "training:1800,notebook:9000",  # allocated-idle since T0+30min
            "idle",
            "training",
            "training",
        ),
        1,
    ),
    ScriptedHost(
        "npu-c01",
        {"site": "fra2", "cluster": "c3", "pool": "research"},
        ASCEND,
        (
            "training",
            "idle:9000,training:1800",  # idle for 2.5 h, then busy to the end
            "idle",
            "idle",
            "notebook",
            "idle",
            "idle",
            "training:10200,idle:600",  # idle for the last 10 minutes
        ),
        2,
    ),
    ScriptedHost(
        "gpu-d01",
        {"site": "ams1", "cluster": "c4", "pool": "shared"},
        H100,
        (),
        3,
        (
            # One H100 split into 7 × 1g.10gb: four free, two held by notebooks, one training.
            *(ScriptedDevice(f"MIG-d01-0-{k}", "idle", "GPU-d01-0", 1 / 7) for k in range(4)),
            # Free for 2 h, then a notebook took it: idle for 3 h, allocated idle for 1 h.
            ScriptedDevice("MIG-d01-0-4", "idle:7200,notebook:3600", "GPU-d01-0", 1 / 7),
            ScriptedDevice("MIG-d01-0-5", "notebook", "GPU-d01-0", 1 / 7),
            ScriptedDevice("MIG-d01-0-6", "training", "GPU-d01-0", 1 / 7),
            # A whole H100 whose job hangs for 1.5 h: utilisation 100 %, SM activity 2 %.
            ScriptedDevice("GPU-d01-1", "training:3600,spin:5400,training:1800"),
        ),
    ),
)

MIG_HOST = FLEET[3].host


@dataclass(frozen=True)
class ScriptedHolder:
    """Who holds a scripted device while its profile holds it (notebook, training, spin): a holder
    record as the agent's `HolderWindows` accumulates them (`capmon.agent.holders.HolderRecord`),
    with the names an allocation source adds (namespace, pod, Slurm job)."""

    user: str
    pid: int
    command: str
    memory_bytes: int
    runtime: str | None = None
    namespace: str | None = None
    pod: str | None = None
    container: str | None = None
    container_id: str | None = None
    slurm_job_id: str | None = None
    partition: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        return ("process", self.pid)

    def window(self, held_s: float, memory_bytes: int | None) -> wire.HolderWindow:
        return wire.HolderWindow(
            pid=self.pid,
            user=self.user,
            uid=1000 + self.pid % 1000,
            command=self.command,
            runtime=self.runtime,
            container_id=self.container_id,
            namespace=self.namespace,
            pod=self.pod,
            container=self.container,
            slurm_job_id=self.slurm_job_id,
            partition=self.partition,
            memory_bytes=memory_bytes,
            held_s=held_s,
            since=T0 - 3600,
        )


_ALICE = {"user": "alice", "runtime": "containerd", "namespace": "research", "container": "jupyter"}
_BOB_JOB = {"user": "bob", "runtime": "slurm", "slurm_job_id": "81234", "partition": "gpu"}
_CAROL = {"user": "carol", "runtime": "containerd", "namespace": "inference", "pod": "llm-serve-7f9"}
# (host, device) → who holds it whenever its profile holds it; every other device: holders unknown.
HOLDERS: dict[tuple[str, str], tuple[ScriptedHolder, ...]] = {
    (FLEET[0].host, "MOCK-000-00"): (
        ScriptedHolder("erin", 9001, "torchrun", 60 * GIB, "slurm", slurm_job_id="90001", partition="gpu"),
    ),
    (FLEET[0].host, "MOCK-000-03"): (
        ScriptedHolder(pid=4242, command="python3", memory_bytes=20 * GIB, pod="nb-alice-0", **_ALICE),
    ),
    (FLEET[1].host, "MOCK-001-03"): (
        ScriptedHolder(pid=777, command="python", memory_bytes=8 * GIB, **_BOB_JOB),
    ),
    # The same job holds a second GPU: training for 30 min, then idle with its memory held.
    (FLEET[1].host, "MOCK-001-04"): (
        ScriptedHolder(pid=778, command="python", memory_bytes=8 * GIB, **_BOB_JOB),
    ),
    # Two processes of one user on one NPU: the device's idle time is split between them.
    (FLEET[2].host, "MOCK-002-04"): (
        ScriptedHolder(pid=100, command="vllm", memory_bytes=12 * GIB, container="engine", **_CAROL),
        ScriptedHolder(pid=101, command="vllm-worker", memory_bytes=4 * GIB, container="engine", **_CAROL),
    ),
    (MIG_HOST, "MIG-d01-0-4"): (
        ScriptedHolder("dave", 31337, "python", 2 * GIB, "docker", container_id="4f3c2b1a0e9d8c7b6a5f"),
    ),
    (MIG_HOST, "MIG-d01-0-5"): (
        ScriptedHolder(pid=4343, command="python3", memory_bytes=2 * GIB, pod="nb-alice-1", **_ALICE),
    ),
    (MIG_HOST, "GPU-d01-1"): (
        ScriptedHolder("frank", 5150, "torchrun", 64 * GIB, "slurm", slurm_job_id="90002", partition="gpu"),
    ),
}
HOLDING_PROFILES = ("notebook", "training", "spin")
SPIN_S = 5400  # GPU-d01-1's spin phase
PROFILE_STATE = {
    "idle": "free",
    "notebook": "allocated_idle",
    "training": "busy",
    "spin": "busy",
    "lost": "unavailable",
}


def _phases(spec: str) -> list[tuple[str, int]]:
    if ":" not in spec:
        return [(spec, DURATION_S)]
    return [(name, int(secs)) for name, secs in (p.split(":") for p in spec.split(","))]


@dataclass(frozen=True)
class ExpectedDevice:
    host: str
    device: str
    model: str
    labels: dict[str, str]
    state_now: str
    seconds: dict[str, int]  # state → seconds over the run
    idle_since: int | None  # at the end of the run
    state_since: int  # at the end of the run
    fraction: float  # the share of a GPU it is: 1, or a MIG instance's 1/7
    spec: str  # its phase list

    def gpu_seconds(self, *states: str) -> float:
        """Seconds in these states, in GPU-equivalents."""
        return sum(self.seconds[s] for s in states) * self.fraction

    def profile_at(self, offset: int) -> str:
        """The phase running over (offset - 1, offset] seconds after T0 (a window ending there)."""
        t = 0
        for name, secs in _phases(self.spec):
            if t < offset <= t + secs:
                return name
            t += secs
        raise ValueError(offset)


def expected_devices() -> list[ExpectedDevice]:
    """What the script says, worked out from the phase lists alone (no classifier involved)."""
    out = []
    for h in FLEET:
        devices = [(f"MOCK-{h.host_index:03d}-{i:02d}", spec, 1.0) for i, spec in enumerate(h.profiles)]
        devices += [(d.device_id, d.profile, d.fraction or 1.0) for d in h.scripted]
        for device_id, spec, fraction in devices:
            seconds = dict.fromkeys(PROFILE_STATE.values(), 0)
            t = 0
            timeline: list[tuple[int, str]] = []
            for name, secs in _phases(spec):
                state = PROFILE_STATE[name]
                seconds[state] += secs
                if not timeline or timeline[-1][1] != state:
                    timeline.append((t, state))
                t += secs
            assert t == DURATION_S, spec
            state_now = timeline[-1][1]
            idle_since = None  # the start of the trailing run of idle states
            for start, state in reversed(timeline):
                if state not in wire.IDLE_STATES:
                    break
                idle_since = T0 + start
            out.append(
                ExpectedDevice(
                    h.host,
                    device_id,
                    h.model,
                    h.labels,
                    state_now,
                    seconds,
                    idle_since,
                    T0 + timeline[-1][0],
                    fraction,
                    spec,
                )
            )
    return out


@dataclass(frozen=True)
class ExpectedEnergy:
    """Idle power and energy, replayed from the probes the script runs (their power is a function of
    the clock): the agent holds each sample's power until the next sample (every SAMPLE_S), so a
    device's idle energy is Σ power × SAMPLE_S over its samples in an idle state, and a window's
    power its samples' mean."""

    idle_energy_j: dict[tuple[str, str], float]  # (host, device) → idle joules over the run
    idle_power_now_w: dict[tuple[str, str], float]  # devices idle now → their last window's mean power

    def kwh(self, devices: Sequence[ExpectedDevice]) -> float:
        return sum(self.idle_energy_j[(d.host, d.device)] for d in devices) / 3.6e6

    def watts_now(self, devices: Sequence[ExpectedDevice]) -> float:
        return sum(self.idle_power_now_w.get((d.host, d.device), 0.0) for d in devices)


def expected_energy() -> ExpectedEnergy:
    states = {(d.host, d.device): d for d in expected_devices()}
    energy = dict.fromkeys(states, 0.0)
    last: dict[tuple[str, str], list[float]] = {key: [] for key in states}
    for h in FLEET:
        clock = FakeClock(T0)
        mock = MockProbe(
            MockConfig(
                devices=len(h.profiles), profiles=h.profiles, models=(h.model,), host_index=h.host_index
            ),
            clock=clock,
        )
        probes: list[Probe] = [mock, ScriptedProbe(h.model, h.scripted, clock)]
        for k in range(DURATION_S // SAMPLE_S):
            clock.now = T0 + k * SAMPLE_S
            for sample in (s for p in probes for s in p.sample()):
                key = (h.host, sample.device_id)
                if key not in states or sample.power_w is None:
                    continue  # a MIG parent, or a lost device
                d = states[key]
                if PROFILE_STATE[profile_at(d.spec, clock.now)] in wire.IDLE_STATES:
                    energy[key] += sample.power_w * SAMPLE_S
                if clock.now >= T0 + DURATION_S - WINDOW_S:
                    last[key].append(sample.power_w)
    now = {key: sum(w) / len(w) for key, w in last.items() if w and states[key].state_now in wire.IDLE_STATES}
    return ExpectedEnergy(energy, now)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


LOST_WINDOWS = 3


class ScriptedSpool:
    """A report sink that keeps reports in memory and tells the agent scripted spool counters.

    npu-c01's collector link is "down" for windows 60–89: its spool fills, two reports are dropped,
    one is dead-lettered and three windows are lost (could not be written); the other hosts' spools
    stay empty.
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self.reports: list[wire.Report] = []

    async def start(self) -> None:
        pass

    def next_seq(self) -> int:
        return len(self.reports) + 1

    async def put(self, report: wire.Report) -> None:
        self.reports.append(report)

    def stats(self) -> dict[str, int]:
        n = len(self.reports) + 1  # the window being closed
        if self.host != "npu-c01":
            return {}
        backlog = n - 59 if 60 <= n < 90 else 0
        return {
            "spool_reports": backlog,
            "spool_bytes": backlog * 9000,
            "dropped_reports": 2 if n >= 75 else 0,
            "dead_letter_reports": 1 if n >= 80 else 0,
            "lost_windows": LOST_WINDOWS if n >= 85 else 0,
        }

    async def close(self, timeout_s: float) -> None:
        pass


class ScriptedProbe(Probe):
    """NVIDIA-like devices on a script: MIG instances as the NVML probe reports them (the parent GPU
    listed too, `parent_id` and `extra["gpu_fraction"]` on each instance) and a spinning GPU."""

    name = "scripted_nvml"
    vendor = "nvidia"

    def __init__(self, model: str, devices: tuple[ScriptedDevice, ...], clock: FakeClock) -> None:
        super().__init__()
        self.model, self.devices, self.clock = model, devices, clock

    def sample(self) -> list[DeviceSample]:
        t = self.clock()
        out = []
        parents = sorted({d.parent_id for d in self.devices if d.parent_id})
        for i, parent in enumerate(parents):
            out.append(DeviceSample(parent, "nvidia", self.model, i, memory_total_bytes=80 * GIB))
        for d in self.devices:
            profile = profile_at(d.profile, t)
            total = 10 * GIB if d.fraction else 80 * GIB
            util, sm, procs, used = {
                "idle": (0.0, 0.0, 0, 0),
                "notebook": (0.0, 0.0, 1, total // 4),
                "training": (95.0, 80.0, 1, total * 8 // 10),
                "spin": (100.0, 2.0, 1, total * 8 // 10),
            }[profile]
            extra = {"sm_active_pct": sm}
            if d.fraction:
                extra["gpu_fraction"] = d.fraction
            out.append(
                DeviceSample(
                    d.device_id,
                    "nvidia",
                    self.model,
                    parent_id=d.parent_id,
                    util_pct=util,
                    memory_used_bytes=used,
                    memory_total_bytes=total,
                    power_w=100.0 + util * 5,
                    temp_c=40.0,
                    processes=procs,
                    extra=extra,
                    info={"mig_profile": "1g.10gb"} if d.fraction else {},
                )
            )
        return out


class FailingProbe(MockProbe):
    """A second probe on npu-c01 that raises on every third call: probe errors in the Agents dashboard."""

    name = "flaky_driver"


class HangingProbe(MockProbe):
    """A probe that takes longer than its timeout: probe timeouts in the Agents dashboard."""

    name = "slow_driver"


PROBE_ERRORS_EXPECTED = DURATION_S // WINDOW_S // 3  # FailingProbe is called once per window
PROBE_TIMEOUTS_EXPECTED = 3  # HangingProbe is called on three ticks only, after the first window
_HANGING_TICKS = range(10, 10 + PROBE_TIMEOUTS_EXPECTED)


async def _run_agent(h: ScriptedHost) -> tuple[wire.AgentIdentity, list[wire.Report]]:
    clock = FakeClock(T0)
    mock = MockProbe(
        MockConfig(devices=len(h.profiles), profiles=h.profiles, models=(h.model,), host_index=h.host_index),
        clock=clock,
    )
    probes: list[Probe] = [mock, HostProbe()] if h.profiles else [HostProbe()]
    if h.scripted:
        probes.append(ScriptedProbe(h.model, h.scripted, clock))
    if h.host == "npu-c01":
        probes.append(FailingProbe(MockConfig(devices=0, raise_every=3), clock=clock))
        probes.append(HangingProbe(MockConfig(devices=0, hang_s=0.02, timeout_s=0.005), clock=clock))
    for p in probes:
        p.setup()
    config = AgentConfig(agent=AgentSection(id=h.host, host=h.host, labels=h.labels, window_s=WINDOW_S))
    sink = ScriptedSpool(h.host)
    agent = Agent(config, sink=sink, probes=probes, clock=clock)
    specs = {f"MOCK-{h.host_index:03d}-{i:02d}": spec for i, spec in enumerate(h.profiles)}
    specs.update((d.device_id, d.profile) for d in h.scripted)
    held = {device: holders for (host, device), holders in HOLDERS.items() if host == h.host}
    windows = HolderWindows()
    tasks = agent.sampler.tasks
    start = T0
    for k in range(DURATION_S // SAMPLE_S):
        clock.now = T0 + k * SAMPLE_S
        end = clock.now + SAMPLE_S
        for task in tasks:
            name = task.probe.name
            # The mock every tick; the others once per window (each tick is a thread: keep them few).
            if name == "slow_driver" and k not in _HANGING_TICKS:
                continue
            if name in ("host", "flaky_driver") and end % WINDOW_S:
                continue
            await task.tick()
            if name == "slow_driver" and task._inflight is not None:
                # Let the hung call return, so that the next tick times out again instead of skipping.
                await asyncio.wait([task._inflight])
        for device, holders in held.items():
            holding = profile_at(specs[device], clock.now) in HOLDING_PROFILES
            windows.observe(device, clock.now, holders if holding else ())
        if end % WINDOW_S == 0:
            clock.now = end
            report = agent.close_window(sink.next_seq(), start, end)
            await sink.put(_with_holders(report, windows.close(None, end)))
            start = end
    # The agent's own identity (id, host, labels, version), with the spool instance a spool would give.
    return msgspec.structs.replace(identity_of(config), instance="spool-1"), sink.reports


def _with_holders(report: wire.Report, closed: Mapping[str, tuple[list[wire.HolderWindow] | None, int]]):
    """The report with the script's holders: what the agent's holder windows made of them, and
    "cannot tell" for every other device, whatever the mock reports."""
    devices = []
    for d in report.devices:
        records, omitted = closed.get(d.device_id, (None, 0))
        devices.append(msgspec.structs.replace(d, holders=records, holders_omitted=omitted))
    return msgspec.structs.replace(report, devices=devices)


AGENT_TOKEN = "dashboard-agent-token"
READ_TOKEN = "dashboard-read-token"
# Different per model, as in a real [pricing]: "910B3" is an exact key, the others substrings.
PRICES = {"H100": 2.10, "A100": 1.20, "910B3": 0.90}
# Electricity per kWh and the site's PUE: an idle kWh costs 0.30 × 1.4 = 0.42.
ENERGY_PRICE_PER_KWH, PUE = 0.30, 1.4


def collector_config(influx_url: str, db: str, storage: StorageConfig | None = None) -> Config:
    return Config(
        collector=CollectorConfig(),
        auth=AuthConfig(
            agent_tokens=(TokenConfig(sha256=hash_token(AGENT_TOKEN), agents=("*",), name="fleet"),),
            read_tokens=(TokenConfig(sha256=hash_token(READ_TOKEN), name="grafana"),),
        ),
        storage=storage or StorageConfig(kind="influxdb_v1", url=influx_url, db=db, flush_interval_s=0.0),
        pricing=PricingConfig(default=0.0, models=PRICES, energy_price_per_kwh=ENERGY_PRICE_PER_KWH, pue=PUE),
        source="dashboard tests",
    )


async def run_pipeline(
    influx_url: str, db: str, storage: StorageConfig | None = None, per_post: int = 100
) -> dict[str, Any]:
    """Agents → collector (aiohttp test client, influxdb_v1 storage unless `storage`) → the store;
    returns /api/v1/fleet. The agents' reports are posted `per_post` at a time, in rounds over the
    agents, so that the store receives them in time order as from a live fleet (Prometheus refuses
    samples more than an hour behind its newest)."""
    outputs = await asyncio.gather(*(_run_agent(h) for h in FLEET))
    app = create_app(collector_config(influx_url, db, storage), clock=lambda: T0 + DURATION_S + 5)
    # The collector has been up since before the fleet's first window: its since-start totals
    # (which count only windows ending after it started) cover the whole script.
    app[FLEET_VIEW].started_at = T0
    async with TestClient(TestServer(app)) as client:
        rounds = max(len(reports) for _, reports in outputs)
        for i in range(0, rounds, per_post):
            for identity, reports in outputs:
                batch = wire.Batch(agent=identity, reports=reports[i : i + per_post])
                resp = await client.post(
                    "/api/v1/reports",
                    data=wire.encode(batch),
                    headers={"Authorization": f"Bearer {AGENT_TOKEN}", "Content-Type": "application/json"},
                )
                assert resp.status == 200, await resp.text()
        resp = await client.get("/api/v1/fleet", headers={"Authorization": f"Bearer {READ_TOKEN}"})
        assert resp.status == 200, await resp.text()
        fleet = await resp.json()
        resp = await client.get(
            "/api/v1/devices?state=idle&limit=1000", headers={"Authorization": f"Bearer {READ_TOKEN}"}
        )
        assert resp.status == 200, await resp.text()
        fleet["_devices"] = await resp.json()
        fleet["_holders"] = {}
        for by in ("user", "namespace", "job"):
            resp = await client.get(
                f"/api/v1/holders?by={by}&state=all&limit=1000",
                headers={"Authorization": f"Bearer {READ_TOKEN}"},
            )
            assert resp.status == 200, await resp.text()
            fleet["_holders"][by] = await resp.json()
    return fleet


def fill(influx_url: str, db: str) -> dict[str, Any]:
    return asyncio.run(run_pipeline(influx_url, db))
