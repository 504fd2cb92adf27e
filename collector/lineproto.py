"""InfluxDB line protocol straight from the wire structs: no per-point objects, one f-string per line.

The schema is documented in `collector/README.md` (measurements `capmon_device`, `capmon_holder`,
`capmon_host`, `capmon_agent`). Every numeric field is a float, so a field never changes type; the timestamp is the
report's `end` in seconds, so a resent report rewrites identical points.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from capmon.agent.wire import STATES, AgentIdentity, Batch, DeviceWindow, HolderWindow, Report

from .shares import holder_shares

STATE_CODE: dict[str, float] = {state: float(i) for i, state in enumerate(STATES)}

_CONTROL = [*range(32), 0x7F]
# Tags: `,` `=` and space are escaped. A backslash is written as `/`, because InfluxDB 1.x keeps `\\`
# as two characters while 2.x and VictoriaMetrics read it as one, and a trailing `\` is a parse error
# in 1.x. Control characters (newlines included) become an escaped space: a tag can never end a line.
_TAG_ESCAPES = str.maketrans(
    {**{chr(c): "\\ " for c in _CONTROL}, "\\": "/", ",": "\\,", "=": "\\=", " ": "\\ "}
)
# String fields: quoted; `"` and `\` escaped, control characters (newlines included) become spaces.
_STR_ESCAPES = str.maketrans({**{chr(c): " " for c in _CONTROL}, "\\": "\\\\", '"': '\\"'})

_tag_cache: dict[str, str] = {}


def escape_tag(value: str) -> str:
    return value.translate(_TAG_ESCAPES)


def _tag(value: str) -> str:
    """`escape_tag` for the few values that repeat across thousands of devices (vendor, model)."""
    escaped = _tag_cache.get(value)
    if escaped is None:
        if len(_tag_cache) > 10_000:
            _tag_cache.clear()
        escaped = _tag_cache[value] = value.translate(_TAG_ESCAPES)
    return escaped


_SAFE_KEY = re.compile(r"[a-z][a-z0-9_]*")
_UNSAFE_KEY_CHARS = re.compile(r"[^a-z0-9_]")
_key_cache: dict[str, str] = {}


def field_key(key: str) -> str:
    """A key safe as a line-protocol field or tag key whatever it contains: the wire's key pattern
    as is, anything else with every other character replaced by `_` (a newline, space, comma, `=`
    or quote in a key would split or corrupt the line; the validator is not trusted for that)."""
    safe = _key_cache.get(key)
    if safe is None:
        if _SAFE_KEY.fullmatch(key):
            safe = key
        else:
            safe = _UNSAFE_KEY_CHARS.sub("_", key.lower()) or "_"
        if len(_key_cache) > 10_000:
            _key_cache.clear()
        _key_cache[key] = safe
    return safe


def string_field(value: str) -> str:
    return '"' + value.translate(_STR_ESCAPES) + '"'


def identity_tags(agent: AgentIdentity, label_keys: tuple[str, ...]) -> str:
    """`,agent=…,host=…,site=…`: the tags every point of one batch carries (configured labels only)."""
    parts = [",agent=", escape_tag(agent.id), ",host=", escape_tag(agent.host)]
    labels = agent.labels
    for key in label_keys:
        value = labels.get(key)
        if value:
            parts += (",", field_key(key), "=", escape_tag(value))
    return "".join(parts)


def report_lines(
    report: Report,
    tags: str,
    out: list[str],
    price: Callable[[DeviceWindow], float] | None = None,
    agent_fields: str = "",
    energy_cost: Callable[[float], float | None] | None = None,
) -> None:
    """Append the lines of one report to `out`.

    `price`: value of one device-hour of a device (the collector's `Pricing.for_device`: by model,
    a MIG instance its fraction); a device it prices above 0 gets `idle_value`. `agent_fields`: `version="…"` or empty, added to the
    report's `capmon_agent` point. `energy_cost`: what joules of device energy cost with the site's
    PUE (`Pricing.energy_cost`; None: not priced); a device with `idle_energy_j` gets `idle_energy_cost`.
    """
    ts = report.end
    window = float(report.end - report.start)
    for d in report.devices:
        line = [
            "capmon_device",
            tags,
            ",vendor=",
            _tag(d.vendor),
            ",device=",
            escape_tag(d.device_id),
        ]
        if d.model:
            line += (",model=", _tag(d.model))
        if d.parent_id:
            line += (",parent=", escape_tag(d.parent_id))
        idle_s = d.allocated_idle_s + d.free_s
        # GPU-equivalents: a MIG instance counts as its share of the GPU, so sums over devices
        # never count one GPU several times.
        fraction = float(d.fraction) if d.fraction is not None else 1.0
        line.append(
            f' state="{d.state}",state_code={STATE_CODE[d.state]!r},window_s={window!r}'
            f",busy_s={float(d.busy_s)!r},allocated_idle_s={float(d.allocated_idle_s)!r}"
            f",free_s={float(d.free_s)!r},unavailable_s={float(d.unavailable_s)!r}"
            f",idle_s={float(idle_s)!r},ghost_s={float(d.ghost_s)!r},spin_s={float(d.spin_s)!r}"
            f",gpu_fraction={fraction!r},idle_gpu_s={idle_s * fraction!r}"
            f",allocated_idle_gpu_s={d.allocated_idle_s * fraction!r}"
            f",window_gpu_s={(d.busy_s + idle_s + d.unavailable_s) * fraction!r}"
        )
        value_per_hour = 0.0
        if price is not None:
            value_per_hour = price(d)
            if value_per_hour > 0:
                line.append(f",idle_value={idle_s / 3600 * value_per_hour!r}")
        if d.util_mean_pct is not None:
            line.append(f",util_mean_pct={float(d.util_mean_pct)!r}")
        if d.util_max_pct is not None:
            line.append(f",util_max_pct={float(d.util_max_pct)!r}")
        if d.memory_used_bytes is not None:
            line.append(f",memory_used_bytes={float(d.memory_used_bytes)!r}")
        if d.memory_total_bytes is not None:
            line.append(f",memory_total_bytes={float(d.memory_total_bytes)!r}")
        if d.power_mean_w is not None:
            line.append(f",power_mean_w={float(d.power_mean_w)!r}")
        if d.energy_j is not None:
            line.append(f",energy_j={float(d.energy_j)!r}")
        if d.idle_energy_j is not None:
            line.append(f",idle_energy_j={float(d.idle_energy_j)!r}")
            cost = energy_cost(d.idle_energy_j) if energy_cost is not None else None
            if cost is not None:
                line.append(f",idle_energy_cost={float(cost)!r}")
        if d.temp_max_c is not None:
            line.append(f",temp_max_c={float(d.temp_max_c)!r}")
        if d.processes is not None:
            line.append(f",processes={float(d.processes)!r}")
        if d.index is not None:
            line.append(f",index={float(d.index)!r}")
        if d.idle_since is not None:
            line.append(
                f",idle_since={float(d.idle_since)!r},idle_for_s={float(max(0, ts - d.idle_since))!r}"
            )
        if d.state_since is not None:
            line.append(
                f",state_since={float(d.state_since)!r},in_state_s={float(max(0, ts - d.state_since))!r}"
            )
        if d.error:
            line += (",error=", string_field(d.error))
        if d.reason:
            line += (",reason=", string_field(d.reason))
        if d.extra:
            for key, value in d.extra.items():
                line.append(f",extra_{field_key(key)}={float(value)!r}")
        if d.info:
            for key, text in d.info.items():
                line += (",info_", field_key(key), "=", string_field(text))
        line.append(f" {ts}")
        out.append("".join(line))
        if d.holders:
            _holder_lines(d, tags, ts, value_per_hour, out)

    h = report.host
    if h is not None:
        fields = [f"devices={float(len(report.devices))!r},window_s={window!r}"]
        for name in (
            "cpu_mean_pct",
            "cpu_max_pct",
            "memory_used_bytes",
            "memory_total_bytes",
            "load1",
            "load5",
            "load15",
            "cpu_count",
        ):
            value = getattr(h, name)
            if value is not None:
                fields.append(f"{name}={float(value)!r}")
        out.append(f"capmon_host{tags} {','.join(fields)} {ts}")

    a = report.agent
    fields = [f"seq={float(report.seq)!r},window_s={window!r},devices={float(len(report.devices))!r}"]
    if a is not None:
        fields.append(
            f"uptime_s={float(a.uptime_s)!r},spool_reports={float(a.spool_reports)!r}"
            f",spool_bytes={float(a.spool_bytes)!r},dropped_reports={float(a.dropped_reports)!r}"
            f",dead_letter_reports={float(a.dead_letter_reports)!r},lost_windows={float(a.lost_windows)!r}"
        )
    if agent_fields:
        fields.append(agent_fields)
    out.append(f"capmon_agent{tags} {','.join(fields)} {ts}")
    if a is not None:
        for p in a.probes:
            pf = [
                f"status={string_field(p.status)},samples={float(p.samples)!r}"
                f",errors={float(p.errors)!r},timeouts={float(p.timeouts)!r}"
            ]
            if p.last_duration_s is not None:
                pf.append(f"last_duration_s={float(p.last_duration_s)!r}")
            if p.reason:
                pf.append(f"reason={string_field(p.reason)}")
            out.append(f"capmon_agent{tags},probe={escape_tag(p.name)} {','.join(pf)} {ts}")


_HOLDER_STRINGS = (
    "source",
    "command",
    "container_id",
    "pod_uid",
    "pod",
    "container",
    "slurm_job_id",
    "partition",
)


def _holder_lines(d: DeviceWindow, tags: str, ts: int, value_per_hour: float, out: list[str]) -> None:
    """`capmon_holder`: one point per holder of the device. Tags are bounded identities only (user,
    namespace, runtime); pid, command, pod, job are fields. The device's state and idle time ride
    along, and its allocated-idle seconds and value are split over its holders as the live view
    splits them (`shares.holder_shares`: per pod / job / container, then per record), so a SUM by
    user is what that user holds idle and the sum over holders is the device's."""
    holders = d.holders or ()
    fraction = float(d.fraction) if d.fraction is not None else 1.0
    device_tags = ["capmon_holder", tags, ",vendor=", _tag(d.vendor), ",device=", escape_tag(d.device_id)]
    if d.model:
        device_tags += (",model=", _tag(d.model))
    head = "".join(device_tags)
    common = [
        f" state={string_field(d.state)},state_code={STATE_CODE[d.state]!r}",
        f",gpu_fraction={fraction!r}",
    ]
    if d.idle_since is not None:
        common.append(f",idle_for_s={float(max(0, ts - d.idle_since))!r}")
    if d.state_since is not None:
        common.append(f",in_state_s={float(max(0, ts - d.state_since))!r}")
    device_fields = "".join(common)
    # Two holders with the same tags (two processes of one user) would be one series at one
    # timestamp, and the second point would overwrite the first: `slot` numbers them (< MAX_HOLDERS).
    slots: dict[str, int] = {}
    for h, share in zip(holders, holder_shares(holders), strict=True):
        line = [head]
        if h.user:
            line += (",user=", escape_tag(h.user))
        if h.namespace:
            line += (",namespace=", escape_tag(h.namespace))
        if h.runtime:
            line += (",runtime=", escape_tag(h.runtime))
        identity = "".join(line)
        slot = slots.get(identity, 0)
        slots[identity] = slot + 1
        line.append(
            f",slot={slot}{device_fields}"
            f",allocated_idle_s={d.allocated_idle_s * share!r}"
            f",allocated_idle_gpu_s={d.allocated_idle_s * share * fraction!r}"
        )
        if value_per_hour > 0:
            line.append(f",idle_value={d.allocated_idle_s / 3600 * value_per_hour * share!r}")
        _holder_fields(h, line)
        line.append(f" {ts}")
        out.append("".join(line))


def _holder_fields(h: HolderWindow, line: list[str]) -> None:
    for name in _HOLDER_STRINGS:
        text = getattr(h, name)
        if text:
            line += (",", name, "=", string_field(text))
    if h.pid is not None:
        # A pid is an identity, not a quantity: a string, so no dashboard sums or averages it.
        line.append(f',pid="{int(h.pid)}"')
    line.append(f",held_s={float(h.held_s)!r}")
    if h.memory_bytes is not None:
        line.append(f",memory_bytes={float(h.memory_bytes)!r}")
    if h.since is not None:
        line.append(f",since={float(h.since)!r}")
    if h.uid is not None:
        line.append(f",uid={float(h.uid)!r}")


def batch_lines(
    batch: Batch,
    label_keys: tuple[str, ...],
    price: Callable[[DeviceWindow], float] | None = None,
    energy_cost: Callable[[float], float | None] | None = None,
) -> list[str]:
    """All lines of a batch, in report order. `price` (e.g. `Pricing.for_device`) adds `idle_value`,
    `energy_cost` (`Pricing.energy_cost`) `idle_energy_cost`."""
    tags = identity_tags(batch.agent, label_keys)
    version = batch.agent.version
    agent_fields = "version=" + string_field(version) if version else ""
    out: list[str] = []
    for report in batch.reports:
        report_lines(report, tags, out, price, agent_fields, energy_cost)
    return out
