"""Prometheus remote write 1.0 storage: Prometheus, VictoriaMetrics, Mimir, Thanos Receive.

The writer takes the same line-protocol lines as the InfluxDB writers (the group commit and the
ingest rules stay one), turns each point into one sample per series at the point's timestamp (the
window's end, in ms), and POSTs a snappy-compressed protobuf `prometheus.WriteRequest`. Names and
units are the agent exporter's (`capmon.agent.exporter`):

- `capmon_device_state{state}`: 1 for the state at the window's end, 0 for the others (one-hot);
- `capmon_device_window_state_seconds{state}`: the seconds of *this window* in each state, a gauge
  per window (not a counter: a collector sees windows, not the agent's lifetime). Over a range:
  `sum_over_time(capmon_device_window_state_seconds{state="free"}[1h])`; the exporter's counter
  `capmon_device_state_seconds_total` answers the same with `increase()`;
- `capmon_device_window_idle_gpu_seconds`, `…_allocated_idle_gpu_seconds`, `…_gpu_seconds`
  (GPU-equivalents: a MIG instance counted as its share), `capmon_device_window_idle_value`;
- readings as window statistics: `capmon_device_utilization_ratio` (mean, 0-1),
  `capmon_device_utilization_max_ratio`, `capmon_device_power_watts` (mean),
  `capmon_device_temperature_max_celsius`, `capmon_device_memory_used_bytes`, …;
- `capmon_agent_*` and `capmon_host_*` from the agent and host points, other measurements as
  `<measurement>_<field>`. Text fields (error, reason, info) have no place in Prometheus and are
  left out, but for who holds a device:
- `capmon_holder_info` (value 1), one per `capmon_holder` point (per holder per device per window,
  at most `wire.MAX_HOLDERS` per device), labelled with the point's identities (agent tags, vendor,
  model, device, user, namespace, runtime, slot) and the holder's names `source`, `pod`,
  `container`, `slurm_job_id` and `command` (each bounded by the wire's limits). A panel joins it
  to the numbers of the same holder: `capmon_holder_allocated_idle_gpu_seconds * on(host, device,
  user, namespace, runtime, slot) group_left(slurm_job_id) capmon_holder_info`. A pod or job name
  makes a series per pod or job, which lives while the pod or job holds the device (as
  kube-state-metrics' `kube_pod_info`); the pid is never a label: a series per process, many per
  job, is what Prometheus's cardinality advice warns against.

Acknowledgement: as with InfluxDB, a write succeeds only once the store answered 2xx. Prometheus
refuses a whole request (it rolls back) when one sample is out of order or a duplicate with another
value: that is how a resent window looks, so a refused request is split until the refused points
stand alone, and a point refused alone for that reason counts as stored (it was, or the series has
newer samples and it never can be); it is not dead-lettered. Other 4xx are `StorageRejected`;
429 and 5xx `StorageUnavailable` (retried).

The protobuf schema, from prometheus/prompb (remote.proto, types.proto), built at import with
protobuf's runtime (no generated code, no protoc):

    syntax = "proto3";
    package prometheus;
    message WriteRequest { repeated TimeSeries timeseries = 1; }
    message TimeSeries { repeated Label labels = 1; repeated Sample samples = 2; }
    message Label { string name = 1; string value = 2; }
    message Sample { double value = 1; int64 timestamp = 2; }
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections.abc import Sequence

import aiohttp
import cramjam
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from capmon.agent.wire import STATES

from .config import StorageConfig
from .storage import StorageRejected, StorageUnavailable, classify, describe

__all__ = ["RemoteWriteWriter", "encode_write_request", "series_of_lines"]


def _schema() -> type:
    f = descriptor_pb2.FileDescriptorProto(name="capmon_prometheus_remote.proto", package="prometheus")
    f.syntax = "proto3"
    T = descriptor_pb2.FieldDescriptorProto
    for name, fields in (
        ("Label", (("name", 1, T.TYPE_STRING, None), ("value", 2, T.TYPE_STRING, None))),
        ("Sample", (("value", 1, T.TYPE_DOUBLE, None), ("timestamp", 2, T.TYPE_INT64, None))),
        (
            "TimeSeries",
            (
                ("labels", 1, T.TYPE_MESSAGE, ".prometheus.Label"),
                ("samples", 2, T.TYPE_MESSAGE, ".prometheus.Sample"),
            ),
        ),
        ("WriteRequest", (("timeseries", 1, T.TYPE_MESSAGE, ".prometheus.TimeSeries"),)),
    ):
        m = f.message_type.add(name=name)
        for fname, number, ftype, type_name in fields:
            fd = m.field.add(name=fname, number=number, type=ftype)
            if type_name:
                fd.type_name = type_name
                fd.label = T.LABEL_REPEATED
            else:
                fd.label = T.LABEL_OPTIONAL
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("prometheus.WriteRequest"))


WriteRequest = _schema()

# capmon_device fields with a name of their own; `None`: not a number Prometheus can hold.
_STATE_FIELDS = {f"{s}_s": s for s in STATES}
_DEVICE = {
    "window_s": ("capmon_device_window_seconds", 1.0),
    "idle_s": ("capmon_device_window_idle_seconds", 1.0),
    "ghost_s": ("capmon_device_window_ghost_seconds", 1.0),
    "spin_s": ("capmon_device_window_spin_seconds", 1.0),
    "gpu_fraction": ("capmon_device_gpu_fraction", 1.0),
    "idle_gpu_s": ("capmon_device_window_idle_gpu_seconds", 1.0),
    "allocated_idle_gpu_s": ("capmon_device_window_allocated_idle_gpu_seconds", 1.0),
    "window_gpu_s": ("capmon_device_window_gpu_seconds", 1.0),
    "idle_value": ("capmon_device_window_idle_value", 1.0),
    # The window's energy, as the other per-window sums: base units (the agent's exporter has the
    # running counter, `capmon_device_energy_joules`).
    "energy_j": ("capmon_device_window_energy_joules", 1.0),
    "idle_energy_j": ("capmon_device_window_idle_energy_joules", 1.0),
    "idle_energy_cost": ("capmon_device_window_idle_energy_cost", 1.0),
    "util_mean_pct": ("capmon_device_utilization_ratio", 0.01),
    "util_max_pct": ("capmon_device_utilization_max_ratio", 0.01),
    "memory_used_bytes": ("capmon_device_memory_used_bytes", 1.0),
    "memory_total_bytes": ("capmon_device_memory_total_bytes", 1.0),
    "power_mean_w": ("capmon_device_power_watts", 1.0),
    "temp_max_c": ("capmon_device_temperature_max_celsius", 1.0),
    "processes": ("capmon_device_processes", 1.0),
    "idle_since": ("capmon_device_idle_since_seconds", 1.0),
    "idle_for_s": ("capmon_device_idle_for_seconds", 1.0),
    "state_since": ("capmon_device_state_since_seconds", 1.0),
    "in_state_s": ("capmon_device_in_state_seconds", 1.0),
    "state_code": None,
    "index": None,
}
# Cumulative on the agent: counters, named as the exporter names them.
_AGENT = {
    "uptime_s": "capmon_agent_uptime_seconds",
    "dropped_reports": "capmon_agent_dropped_reports_total",
    "lost_windows": "capmon_agent_lost_windows_total",
    "dead_letter_reports": "capmon_agent_dead_letter_reports_total",
    "samples": "capmon_agent_probe_samples_total",
    "errors": "capmon_agent_probe_errors_total",
    "timeouts": "capmon_agent_probe_timeouts_total",
    "last_duration_s": "capmon_agent_probe_last_duration_seconds",
    "window_s": "capmon_agent_window_seconds",
}
_UNITS = (("_pct", "_ratio", 0.01), ("_s", "_seconds", 1.0), ("_w", "_watts", 1.0), ("_c", "_celsius", 1.0))

_TAGS_END = re.compile(r"((?:[^ \\]|\\.)*) ", re.DOTALL)
_TAG = re.compile(r"((?:[^,\\]|\\.)+)")
_FIELD = re.compile(r'([A-Za-z0-9_]+)=("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)', re.DOTALL)
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)

# Prometheus (Mimir, Thanos) refusing a sample it already has, or one behind newer samples.
_ALREADY_STORED = re.compile(
    r"out of order|out-of-order|duplicate sample|repeated timestamp|sample-timestamp-too-old"
    r"|new value for this timestamp",
    re.IGNORECASE,
)

_WRONG_PATH = re.compile(r"unsupported path", re.IGNORECASE)

# capmon_holder's text fields that become labels of `capmon_holder_info` (the pid never does).
HOLDER_INFO_LABELS = ("source", "pod", "container", "slurm_job_id", "command")


def _name(measurement: str, key: str) -> tuple[str, float] | None:
    if measurement == "capmon_device" and key in _DEVICE:
        return _DEVICE[key]
    if measurement == "capmon_device" and key.startswith("extra_"):
        return "capmon_device_" + key, 1.0
    if measurement == "capmon_agent" and key in _AGENT:
        return _AGENT[key], 1.0
    for suffix, unit, scale in _UNITS:
        if key.endswith(suffix):
            return f"{measurement}_{key[: -len(suffix)]}{unit}", scale
    return f"{measurement}_{key}", 1.0


Series = tuple[tuple[tuple[str, str], ...], float, int]


def series_of_lines(lines: Sequence[str]) -> list[Series]:
    """One (sorted labels with `__name__`, value, timestamp in ms) per number of each point."""
    out: list[Series] = []
    for line in lines:
        head, _, ts = line.rpartition(" ")
        m = _TAGS_END.match(head)
        if m is None or not ts.isdigit():
            raise StorageRejected(f"not a line-protocol point: {line[:200]!r}")
        tags = _TAG.findall(m.group(1))
        measurement = tags[0]
        labels: list[tuple[str, str]] = []
        for tag in tags[1:]:
            key, _, value = tag.partition("=")
            labels.append((key, _UNESCAPE.sub(r"\1", value)))
        ms = int(ts) * 1000
        fields = head[m.end() :]
        names: list[tuple[str, str]] = []
        for fm in _FIELD.finditer(fields):
            key, raw = fm.group(1), fm.group(2)
            if raw.startswith('"'):
                if measurement == "capmon_device" and key == "state":
                    state = raw[1:-1]
                    for s in STATES:
                        out.append(_series(labels, "capmon_device_state", 1.0 if s == state else 0.0, ms, s))
                elif measurement == "capmon_holder" and key in HOLDER_INFO_LABELS and len(raw) > 2:
                    names.append((key, _UNESCAPE.sub(r"\1", raw[1:-1])))
                continue
            if measurement == "capmon_device" and key in _STATE_FIELDS:
                out.append(
                    _series(labels, "capmon_device_window_state_seconds", float(raw), ms, _STATE_FIELDS[key])
                )
                continue
            named = _name(measurement, key)
            if named is None:
                continue
            name, scale = named
            out.append(_series(labels, name, float(raw.rstrip("i")) * scale, ms))
        if measurement == "capmon_holder":
            # A label key of the collector's named like a holder field keeps its tag (a duplicate
            # label name would make the store refuse the whole request).
            taken = {k for k, _ in labels}
            info = labels + [(k, v) for k, v in names if k not in taken]
            out.append(_series(info, "capmon_holder_info", 1.0, ms))
    return out


def _series(
    labels: list[tuple[str, str]], name: str, value: float, ms: int, state: str | None = None
) -> Series:
    extra = [("__name__", name)]
    if state is not None:
        extra.append(("state", state))
    return tuple(sorted(labels + extra)), value, ms


def encode_write_request(series: Sequence[Series]) -> bytes:
    """The snappy-compressed (block format) protobuf body of one remote-write request."""
    req = WriteRequest()
    for labels, value, ms in series:
        ts = req.timeseries.add()
        for name, label_value in labels:
            ts.labels.add(name=name, value=label_value)
        ts.samples.add(value=value, timestamp=ms)
    return bytes(cramjam.snappy.compress_raw(req.SerializeToString()))


class RemoteWriteWriter:
    """kind = "prometheus_remote_write": POST /api/v1/write (Prometheus, VictoriaMetrics),
    /api/v1/push (Mimir), /api/v1/receive (Thanos); basic auth or a bearer token, TLS."""

    name = "prometheus_remote_write"

    def __init__(self, cfg: StorageConfig) -> None:
        self.cfg = cfg
        self.session: aiohttp.ClientSession | None = None
        # Points a store refused as duplicates or out of order, taken as stored (for tests, /metrics).
        self.already_stored = 0

    async def start(self) -> None:
        headers = {
            "Content-Encoding": "snappy",
            "Content-Type": "application/x-protobuf",
            "X-Prometheus-Remote-Write-Version": "0.1.0",
            "User-Agent": "capmon-collector",
            **dict(self.cfg.headers),
        }
        if self.cfg.token:
            headers["Authorization"] = f"Bearer {self.cfg.token}"
        elif self.cfg.user:
            # By hand: aiohttp 3.14 deprecates BasicAuth, and its replacement is not in 3.9.
            pair = f"{self.cfg.user}:{self.cfg.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        connector = None
        if self.cfg.ca_file:
            connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=self.cfg.ca_file))
        self.session = aiohttp.ClientSession(
            headers=headers,
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
        )

    async def ready(self) -> None:
        """An empty write: the endpoint, the auth and the receiver (Prometheus needs
        --web.enable-remote-write-receiver) all answer it as they would a real one."""
        try:
            await self._post(encode_write_request(()))
        except StorageRejected as exc:
            raise StorageUnavailable(exc.detail) from None

    async def write(self, lines: Sequence[str]) -> None:
        await self._write(list(lines))

    async def _write(self, lines: list[str]) -> None:
        if len(lines) > 200:
            body = await asyncio.to_thread(lambda: encode_write_request(series_of_lines(lines)))
        else:
            body = encode_write_request(series_of_lines(lines))
        try:
            await self._post(body)
        except _AlreadyStored:
            if len(lines) == 1:
                self.already_stored += 1
                return
            # The store refused the whole request for some point(s) it already has: find them.
            half = len(lines) // 2
            await self._write(lines[:half])
            await self._write(lines[half:])

    async def _post(self, body: bytes) -> None:
        assert self.session is not None
        try:
            async with self.session.post(self.cfg.url, data=body) as resp:
                if resp.status < 300:
                    return
                text = (await resp.text(errors="replace")).strip()[:1000]
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise StorageUnavailable(
                f"{self.name} {self.cfg.url} unreachable: {describe(exc)}", self.cfg.retry_after_s
            ) from None
        if status in (400, 409, 422) and _ALREADY_STORED.search(text):
            raise _AlreadyStored(text)
        if _WRONG_PATH.search(text):
            # VictoriaMetrics answers 400 for a wrong path: that is the URL, not the data.
            raise StorageUnavailable(f"{self.name} answered {status}: {text}", self.cfg.retry_after_s)
        if 400 <= status < 500 and status not in (401, 403, 404, 408, 413, 429):
            raise StorageRejected(f"{self.name} answered {status}: {text}")
        raise classify(status, text, retry_after, self.cfg.retry_after_s)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class _AlreadyStored(Exception):
    """The store refused the request because of samples it has (or newer ones of their series)."""
