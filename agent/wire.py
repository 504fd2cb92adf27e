"""Wire protocol v1, agent → collector: the only module the agent and the collector share.

`POST /api/v1/reports` carries one `Batch`: the agent's identity and one or more `Report`s, each a
finished window with per-device records. The types carry their own limits (`msgspec.Meta`), so the
collector validates a body in one typed decode and answers with the JSON path of the first bad field.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

PROTOCOL_VERSION = 1

STATES: tuple[str, ...] = ("busy", "allocated_idle", "free", "unavailable")
IDLE_STATES: frozenset[str] = frozenset({"allocated_idle", "free"})
State = Literal["busy", "allocated_idle", "free", "unavailable"]

# Every bound of the protocol, once. The agent's config checks, the sampler's sanitising and the
# collector's checks import these; the collector's configurable limits may be tighter, never looser.
MAX_ID_LEN = 128
MAX_NAME_LEN = 256
MAX_VENDOR_LEN = 64
MAX_KEY_LEN = 64
MAX_TEXT_LEN = 1024
MAX_LABELS = 16
MAX_LABEL_VALUE_LEN = 128
MAX_EXTRA = 32
MAX_INFO = 16
MAX_DEVICES_PER_REPORT = 4096
MAX_REPORTS_PER_BATCH = 1000
MAX_PROBES = 64
MAX_HOLDERS = 32
MAX_COUNT = 1_000_000
MAX_WINDOW_S = 86_400
# State seconds may exceed the window by this much (sample-and-hold rounding, a late tick).
def window_slack_s(window_s: float) -> float:
    return max(2.0, 0.1 * window_s)


# A key is lower-case letters, digits and `_`, starting with a letter; `\Z`, not `$`, which would
# also match before a final newline ("zz\n") and let a newline into line protocol.
KEY_PATTERN = r"^[a-z][a-z0-9_]*\Z"

# Unix seconds between 2001 and 2100: anything else is a broken clock, not data.
Timestamp = Annotated[int, Meta(ge=1_000_000_000, le=4_102_444_800)]
Seconds = Annotated[float, Meta(ge=0, le=MAX_WINDOW_S)]
Percent = Annotated[float, Meta(ge=0, le=100)]
Bytes = Annotated[int, Meta(ge=0, le=2**53)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Finite = Annotated[float, Meta(ge=-1e15, le=1e15)]
Watts = Annotated[float, Meta(ge=0, le=100_000)]
# A day at 100 kW is 8.64e9 J: anything beyond is a broken counter, not energy.
Joules = Annotated[float, Meta(ge=0, le=1e10)]
Celsius = Annotated[float, Meta(ge=-100, le=300)]
Identifier = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LEN)]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LEN)]
FieldName = Annotated[str, Meta(min_length=1, max_length=MAX_KEY_LEN, pattern=KEY_PATTERN)]
LabelKey = Annotated[str, Meta(min_length=1, max_length=MAX_KEY_LEN, pattern=KEY_PATTERN)]
LabelValue = Annotated[str, Meta(max_length=MAX_LABEL_VALUE_LEN)]
Text = Annotated[str, Meta(max_length=MAX_TEXT_LEN)]
WindowLength = Annotated[int, Meta(ge=1, le=MAX_WINDOW_S)]
# The share of a physical GPU a device is (a MIG 1g instance of 7 slices: 1/7); whole devices: 1.
Fraction = Annotated[float, Meta(gt=0, le=1)]


class _Record(msgspec.Struct, kw_only=True, omit_defaults=True):
    pass


class HolderWindow(_Record, kw_only=True):
    """Who held a device during a window: a process (resolved from /proc on the agent's host) or a
    scheduler's allocation. Identities only; never a command line or an environment."""

    # "process" for a process the vendor tool listed; else the allocation source's name
    # ("kubernetes", "slurm").
    source: Identifier = "process"
    pid: Annotated[int, Meta(ge=0, le=2**31)] | None = None
    user: Name | None = None
    uid: Annotated[int, Meta(ge=0, le=2**32)] | None = None
    # The process name (`/proc/<pid>/comm`, or the vendor tool's name), never the command line.
    command: Name | None = None
    # docker, containerd, crio, podman, lxc, slurm, systemd-session, systemd-service.
    runtime: Identifier | None = None
    container_id: Identifier | None = None
    pod_uid: Identifier | None = None
    namespace: Name | None = None
    pod: Name | None = None
    container: Name | None = None
    slurm_job_id: Identifier | None = None
    partition: Name | None = None
    memory_bytes: Bytes | None = None
    # Seconds of the window the holder was seen on the device (sample-and-hold, like state seconds).
    held_s: Seconds = 0.0
    # Start of the holding as far as the agent knows (unix seconds): process start, allocation time.
    since: Timestamp | None = None


class DeviceWindow(_Record, kw_only=True):
    """One device over one window: seconds in each state, and statistics of what it did."""

    device_id: Identifier
    vendor: Annotated[str, Meta(min_length=1, max_length=MAX_VENDOR_LEN)]
    model: Name | None = None
    index: Annotated[int, Meta(ge=0, le=2**31)] | None = None
    parent_id: Identifier | None = None
    # The state at the window's end; the seconds below say how the whole window was spent.
    state: State
    busy_s: Seconds = 0.0
    allocated_idle_s: Seconds = 0.0
    free_s: Seconds = 0.0
    unavailable_s: Seconds = 0.0
    # Busy with no process at all: a broken driver state or a process in another PID namespace.
    ghost_s: Seconds = 0.0
    # Busy by utilisation but with almost no SM activity (an NCCL hang, a spin loop): "busy doing nothing".
    spin_s: Seconds = 0.0
    util_mean_pct: Percent | None = None
    util_max_pct: Percent | None = None
    memory_used_bytes: Bytes | None = None
    memory_total_bytes: Bytes | None = None
    power_mean_w: Watts | None = None
    # Energy the device used in the window (NVML's total-energy counter where supported, else power
    # x time, sample-and-hold), and the part spent while allocated_idle or free. None: not known.
    energy_j: Joules | None = None
    idle_energy_j: Joules | None = None
    temp_max_c: Celsius | None = None
    processes: Count | None = None
    # Start of the current idle streak (unix seconds), None when the device is not idle.
    idle_since: Timestamp | None = None
    # Since when the device has been in `state` (unix seconds): a GPU free for days that a job took two
    # minutes ago is allocated-idle for two minutes. None when not known.
    state_since: Timestamp | None = None
    # The share of a physical accelerator this device is: a MIG instance its slices of the parent.
    # Device-hours and prices are GPU-equivalents: multiplied by this. Absent: a whole device (1).
    fraction: Fraction | None = None
    # Why the device is unavailable (unreadable, unhealthy), for people.
    error: Text | None = None
    # Why it is in its state when that is not obvious ("memory held, no process visible"), for people.
    reason: Text | None = None
    extra: Annotated[dict[FieldName, Finite], Meta(max_length=MAX_EXTRA)] = {}
    info: Annotated[dict[FieldName, Text], Meta(max_length=MAX_INFO)] = {}
    # Who held the device in the window, most memory / longest held first; at most MAX_HOLDERS,
    # the rest counted in `holders_omitted`. Absent: the probe cannot tell who holds it.
    holders: Annotated[list[HolderWindow], Meta(max_length=MAX_HOLDERS)] | None = None
    holders_omitted: Count = 0


class HostWindow(_Record, kw_only=True):
    """The host over one window (psutil)."""

    cpu_mean_pct: Percent | None = None
    cpu_max_pct: Percent | None = None
    memory_used_bytes: Bytes | None = None
    memory_total_bytes: Bytes | None = None
    load1: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    load5: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    load15: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    cpu_count: Count | None = None


class ProbeStats(_Record, kw_only=True):
    """One probe's health as the agent saw it: counters are cumulative since the agent started."""

    name: Identifier
    status: Literal["active", "skipped", "failed", "disabled"]
    samples: Count = 0
    errors: Count = 0
    timeouts: Count = 0
    last_duration_s: Seconds | None = None
    reason: Text | None = None


class AgentStats(_Record, kw_only=True):
    """The agent's self-metrics (measurement `capmon_agent`); counters are cumulative."""

    # A century at most: anything longer is a broken clock.
    uptime_s: Annotated[float, Meta(ge=0, le=3.2e9)] = 0.0
    spool_reports: Count = 0
    spool_bytes: Bytes = 0
    # Windows the spool's size/age bound dropped before delivery (durable across restarts).
    dropped_reports: Count = 0
    # Windows that could not be kept at all (disk full, I/O error), durable across restarts.
    lost_windows: Count = 0
    dead_letter_reports: Count = 0
    probes: Annotated[list[ProbeStats], Meta(max_length=MAX_PROBES)] = []


class Report(_Record, kw_only=True):
    """One finished window. `seq` increases by one per window per agent; `end` is the points' timestamp."""

    seq: Annotated[int, Meta(ge=1, le=2**53)]
    start: Timestamp
    end: Timestamp
    devices: Annotated[list[DeviceWindow], Meta(max_length=MAX_DEVICES_PER_REPORT)] = []
    host: HostWindow | None = None
    agent: AgentStats | None = None


class AgentIdentity(_Record, kw_only=True):
    id: Identifier
    host: Name
    # Random id of the spool that numbers `seq`: a new instance (fresh spool) restarts `seq` at 1.
    instance: Identifier | None = None
    version: Annotated[str, Meta(max_length=64)] = ""
    labels: Annotated[dict[LabelKey, LabelValue], Meta(max_length=MAX_LABELS)] = {}
    # The agent's configured window length: staleness is judged by it, never by a short first or
    # last window's length. Absent from older agents.
    window_s: WindowLength | None = None


class Batch(_Record, kw_only=True):
    """The body of `POST /api/v1/reports`."""

    protocol: Literal[1] = PROTOCOL_VERSION
    agent: AgentIdentity
    reports: Annotated[list[Report], Meta(min_length=1, max_length=MAX_REPORTS_PER_BATCH)]


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """Every error the collector answers: what went wrong, the detail, and the path of the offending field."""

    error: str
    detail: str = ""
    path: str | None = None


_encoder = msgspec.json.Encoder()
_batch_decoder = msgspec.json.Decoder(Batch)
_report_decoder = msgspec.json.Decoder(Report)


def encode(obj: msgspec.Struct) -> bytes:
    return _encoder.encode(obj)


def decode_batch(body: bytes) -> Batch:
    """Decode and validate a request body; raises `msgspec.ValidationError` / `msgspec.DecodeError`."""
    return _batch_decoder.decode(body)


def decode_report(data: bytes) -> Report:
    return _report_decoder.decode(data)


def check_report(report: Report, where: str = "$") -> tuple[str, str] | None:
    """What typed decoding cannot check: values that contradict each other or the window.

    Returns `(reason, path)` of the first impossible value, else None. The agent runs this before it
    spools a window and the collector before it stores one, so both judge a report alike.
    """
    if report.end <= report.start:
        return "end must be after start", f"{where}.end"
    window = report.end - report.start
    slack = window_slack_s(window)
    ids: set[str] = set()
    for j, d in enumerate(report.devices):
        dw = f"{where}.devices[{j}]"
        if d.device_id in ids:
            return "device_id repeated in one report", f"{dw}.device_id"
        ids.add(d.device_id)
        if d.busy_s + d.allocated_idle_s + d.free_s + d.unavailable_s > window + slack:
            return f"state seconds exceed the {window}s window", f"{dw}.busy_s"
        # Rounded to the millisecond on the agent: allow that much.
        if d.ghost_s > d.busy_s + 0.01:
            return "ghost_s is part of busy_s and cannot exceed it", f"{dw}.ghost_s"
        if d.spin_s > d.busy_s + 0.01:
            return "spin_s is part of busy_s and cannot exceed it", f"{dw}.spin_s"
        if d.util_mean_pct is not None and d.util_max_pct is not None and d.util_max_pct < d.util_mean_pct - 0.01:
            return "util_max_pct is below util_mean_pct", f"{dw}.util_max_pct"
        if (
            d.memory_used_bytes is not None
            and d.memory_total_bytes is not None
            and d.memory_used_bytes > d.memory_total_bytes
        ):
            return "memory_used_bytes exceeds memory_total_bytes", f"{dw}.memory_used_bytes"
        if d.energy_j is not None and d.idle_energy_j is not None and d.idle_energy_j > d.energy_j + 0.01:
            return "idle_energy_j is part of energy_j and cannot exceed it", f"{dw}.idle_energy_j"
        if d.idle_since is not None and d.idle_since > report.end + slack:
            return "idle_since after the window's end", f"{dw}.idle_since"
        if d.state_since is not None and d.state_since > report.end + slack:
            return "state_since after the window's end", f"{dw}.state_since"
        for k, h in enumerate(d.holders or ()):
            if h.held_s > window + slack:
                return f"held_s exceeds the {window}s window", f"{dw}.holders[{k}].held_s"
            if h.source == "process" and h.pid is None:
                return "a process holder needs its pid", f"{dw}.holders[{k}].pid"
    return None


def split_error(exc: msgspec.MsgspecError) -> tuple[str, str | None]:
    """msgspec says "Expected `int`, got `str` - at `$.reports[0].seq`": return (reason, "$.reports[0].seq")."""
    text = str(exc)
    reason, sep, where = text.rpartition(" - at `")
    if not sep:
        return text, None
    # A bad dict key reads "… - at `key` in `$.agent.labels`": the path is the part after " in `".
    _, in_sep, path = where.partition("` in `")
    if in_sep:
        return f"{reason} (a key)", path.rstrip("`")
    return reason, where.rstrip("`")
