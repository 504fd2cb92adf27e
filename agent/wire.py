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

# Unix seconds between 2001 and 2100: anything else is a broken clock, not data.
Timestamp = Annotated[int, Meta(ge=1_000_000_000, le=4_102_444_800)]
Seconds = Annotated[float, Meta(ge=0, le=86_400)]
Percent = Annotated[float, Meta(ge=0, le=100)]
Bytes = Annotated[int, Meta(ge=0, le=2**53)]
Count = Annotated[int, Meta(ge=0, le=1_000_000)]
Finite = Annotated[float, Meta(ge=-1e15, le=1e15)]
Watts = Annotated[float, Meta(ge=0, le=100_000)]
Celsius = Annotated[float, Meta(ge=-100, le=300)]
Identifier = Annotated[str, Meta(min_length=1, max_length=128)]
Name = Annotated[str, Meta(min_length=1, max_length=256)]
FieldName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
LabelKey = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
LabelValue = Annotated[str, Meta(max_length=256)]
Text = Annotated[str, Meta(max_length=1024)]


class _Record(msgspec.Struct, kw_only=True, omit_defaults=True):
    pass


class DeviceWindow(_Record, kw_only=True):
    """One device over one window: seconds in each state, and statistics of what it did."""

    device_id: Identifier
    vendor: Annotated[str, Meta(min_length=1, max_length=64)]
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
    util_mean_pct: Percent | None = None
    util_max_pct: Percent | None = None
    memory_used_bytes: Bytes | None = None
    memory_total_bytes: Bytes | None = None
    power_mean_w: Watts | None = None
    temp_max_c: Celsius | None = None
    processes: Count | None = None
    # Start of the current idle streak (unix seconds), None when the device is not idle.
    idle_since: Timestamp | None = None
    error: Text | None = None
    extra: Annotated[dict[FieldName, Finite], Meta(max_length=32)] = {}
    info: Annotated[dict[FieldName, Text], Meta(max_length=16)] = {}


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

    uptime_s: Annotated[float, Meta(ge=0)] = 0.0
    spool_reports: Count = 0
    spool_bytes: Bytes = 0
    dropped_reports: Count = 0
    dead_letter_reports: Count = 0
    probes: Annotated[list[ProbeStats], Meta(max_length=64)] = []


class Report(_Record, kw_only=True):
    """One finished window. `seq` increases by one per window per agent; `end` is the points' timestamp."""

    seq: Annotated[int, Meta(ge=1, le=2**53)]
    start: Timestamp
    end: Timestamp
    devices: Annotated[list[DeviceWindow], Meta(max_length=4096)] = []
    host: HostWindow | None = None
    agent: AgentStats | None = None


class AgentIdentity(_Record, kw_only=True):
    id: Identifier
    host: Name
    # Random id of the spool that numbers `seq`: a new instance (fresh spool) restarts `seq` at 1.
    instance: Identifier | None = None
    version: Annotated[str, Meta(max_length=64)] = ""
    labels: Annotated[dict[LabelKey, LabelValue], Meta(max_length=16)] = {}


class Batch(_Record, kw_only=True):
    """The body of `POST /api/v1/reports`."""

    protocol: Literal[1] = PROTOCOL_VERSION
    agent: AgentIdentity
    reports: Annotated[list[Report], Meta(min_length=1, max_length=1000)]


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
