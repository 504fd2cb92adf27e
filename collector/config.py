"""Collector configuration: one TOML file mapped onto frozen dataclasses.

Decoded by the loader both roles share (`capmon.agent.configfile`), so problems read as the agent's
do: `<file>: [section] key: reason`. Every option has a default that suits most deployments; the
sample (`collector/sample.toml`, printed by `capmon collector config`) documents each one. Limits the
wire protocol also sets (`capmon.agent.wire`) default to the wire's and may be tighter, never looser.
Secrets may stay out of the file: see `StorageConfig` and `TokenConfig` for the environment variables
they fall back to.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from capmon.agent import wire
from capmon.agent.configfile import ConfigError, Where, bounds, check_sections, decode, parse_toml, read_toml

__all__ = [
    "API_PARAMETERS",
    "RESERVED_FIELDS",
    "RESERVED_TAGS",
    "AuthConfig",
    "CollectorConfig",
    "Config",
    "ConfigError",
    "PricingConfig",
    "StorageConfig",
    "TokenConfig",
    "hash_token",
    "install_hint",
    "load",
    "parse",
    "validate",
]

MiB = 1024 * 1024


def install_hint(extra: str) -> str:
    """How to install an optional extra: capmon is installed from a checkout, not from PyPI."""
    return f"pip install '.[{extra}]' in a capmon checkout (README: Install)"


_ANY_KEY = "zzanykey"  # an extra/info key: its field shows where the writer puts agents' own keys


def _every_field(cls: type, **given: Any) -> Any:
    """`cls` with every optional wire field set, so the writer writes every field it can."""
    values = dict(given)
    for f in msgspec.structs.fields(cls):
        if f.name in values or f.default is not None:
            continue
        for candidate in ("x", 1, 1_700_000_000):
            try:
                msgspec.convert({**values, f.name: candidate}, cls)
            except msgspec.ValidationError:
                continue
            values[f.name] = candidate
            break
    return msgspec.convert(values, cls)


@functools.cache
def _written_keys() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(tag key, field key) -> measurements, read off `lineproto`'s own output for a report in
    which every optional field is set, so this list can never drift from what is written."""
    from capmon.collector import lineproto

    holder = _every_field(wire.HolderWindow)
    device = _every_field(
        wire.DeviceWindow,
        device_id="d",
        vendor="v",
        state="allocated_idle",
        allocated_idle_s=1.0,
        extra={_ANY_KEY: 1.0},
        info={_ANY_KEY: "x"},
        holders=[msgspec.to_builtins(holder)],
    )
    probe = _every_field(wire.ProbeStats, name="p", status="active")
    report = wire.Report(
        seq=1,
        start=1_700_000_000,
        end=1_700_000_060,
        devices=[device],
        host=_every_field(wire.HostWindow),
        agent=_every_field(wire.AgentStats, probes=[msgspec.to_builtins(probe)]),
    )
    batch = wire.Batch(agent=wire.AgentIdentity(id="a", host="h", version="1"), reports=[report])
    tags: dict[str, set[str]] = {}
    fields: dict[str, set[str]] = {}
    for line in lineproto.batch_lines(batch, (), price=lambda d: 1.0, energy_cost=lambda j: 1.0):
        head, field_text, _ = line.split(" ")  # no value above holds a space
        measurement, *tag_pairs = head.split(",")
        for pair in tag_pairs:
            tags.setdefault(pair.partition("=")[0], set()).add(measurement)
        for pair in re.findall(r'([a-z0-9_]+)=(?:"[^"]*"|[^,]*)', field_text):
            fields.setdefault(pair, set()).add(measurement)
    return tags, fields


# Tags the collector writes itself: a label may not take one of these names (a point would carry
# the key twice, and InfluxDB refuses it; remote write would send duplicate labels).
RESERVED_TAGS = frozenset(_written_keys()[0])
# Field names the collector writes: a tag of the same name makes InfluxQL answer `state` and `state_1`.
RESERVED_FIELDS = frozenset(k for k in _written_keys()[1] if not k.endswith(_ANY_KEY))
# Prefixes of the fields that carry an agent's own `extra` and `info` keys (`extra_<key>`).
_RESERVED_PREFIXES = tuple(
    sorted(k.removesuffix(_ANY_KEY) for k in _written_keys()[1] if k.endswith(_ANY_KEY))
)
# Parameters of the read APIs (/api/v1/devices, /holders, /fleet) that are not label filters: a label
# key of one of these names could never be filtered by.
API_PARAMETERS = frozenset({"by", "limit", "min_idle", "since", "state"})
_LABEL_KEY = re.compile(wire.KEY_PATTERN)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_WIRE = "the wire protocol's limit: tighter is fine, looser cannot be honoured"


@dataclass(frozen=True)
class CollectorConfig:
    """`[collector]`: where to listen and what a request may carry."""

    host: str = "127.0.0.1"
    port: int = field(default=8900, metadata=bounds(ge=0, le=65535))
    # Compressed body on the wire, and the body after gzip decoding (zip bombs stop here).
    max_body_bytes: int = field(default=8 * MiB, metadata=bounds(gt=0))
    max_decoded_bytes: int = field(default=64 * MiB, metadata=bounds(gt=0))
    # Decoded request bytes in flight across all requests; a request beyond it is answered 503 with
    # Retry-After, so concurrent large bodies cannot exhaust the collector's memory.
    max_inflight_decoded_bytes: int = field(default=256 * MiB, metadata=bounds(gt=0))
    # A request body must arrive within this many seconds (a client trickling it is cut off).
    body_read_timeout_s: float = field(default=30.0, metadata=bounds(gt=0))
    # Device windows (devices summed over reports) one request may carry; 413 beyond, and agents
    # split. An agent sends at most 100 reports of a few devices each; this keeps one request from
    # holding the event loop for seconds.
    max_device_windows: int = field(default=20_000, metadata=bounds(gt=0))
    # Distinct device ids one agent may report, and distinct model and label values it may introduce:
    # one agent token cannot exhaust the store's series (or the live view) for everyone. 400 beyond.
    max_devices_per_agent: int = field(default=10_000, metadata=bounds(gt=0))
    max_values_per_agent: int = field(default=1_000, metadata=bounds(gt=0))
    # How far a window's end may lie ahead of / behind the collector's clock.
    max_future_s: float = field(default=300.0, metadata=bounds(gt=0))
    max_past_s: float = field(default=7 * 86400.0, metadata=bounds(gt=0))
    # Longest window accepted (end - start).
    max_window_s: float = field(
        default=float(wire.MAX_WINDOW_S), metadata=bounds(gt=0, le=wire.MAX_WINDOW_S, why=_WIRE)
    )
    # Label keys that become tags and live-view breakdowns; other labels are dropped (and counted).
    label_keys: tuple[str, ...] = ("site", "cluster", "pool")
    # Labels per agent and characters per label value: the wire's limits unless set tighter.
    max_labels: int = field(default=wire.MAX_LABELS, metadata=bounds(ge=1, le=wire.MAX_LABELS, why=_WIRE))
    max_label_value_len: int = field(
        default=wire.MAX_LABEL_VALUE_LEN, metadata=bounds(ge=1, le=wire.MAX_LABEL_VALUE_LEN, why=_WIRE)
    )
    # An agent silent for more than this many of its windows shows its devices `unavailable`.
    stale_windows: float = field(default=3.0, metadata=bounds(gt=0))
    # An agent silent (by the collector's clock) for longer than this leaves the live view.
    forget_after_s: float = field(default=86400.0, metadata=bounds(gt=0))
    # Seconds SIGTERM waits for in-flight requests and writes before exiting.
    drain_timeout_s: float = field(default=30.0, metadata=bounds(ge=0))
    # Refused requests (401s, refusals) are logged at most once per this many seconds per cause.
    refusal_log_interval_s: float = field(default=60.0, metadata=bounds(gt=0))
    # Refusals of one agent for one reason are written to the store (where operators look) at most
    # once per this many seconds, with their count.
    refusal_write_interval_s: float = field(default=5.0, metadata=bounds(gt=0))
    # Let several collector processes share host:port (SO_REUSEPORT; Linux spreads connections
    # across them). They keep no state that matters, so this is how one host uses more cores.
    reuse_port: bool = False
    # Where /api/v1/fleet, /devices, /holders and /agents (and the fleet gauges of /metrics) answer
    # from: "memory", what this process received (right for one collector process), or "storage",
    # the store's latest window per device (InfluxQL; storage.kind influxdb_v1 or influxdb_v2), so
    # every collector process gives the same, whole-fleet answer. Required with reuse_port or
    # `--workers` above 1.
    live_view: Literal["memory", "storage"] = "memory"
    # live_view = "storage": how long an answer is reused (concurrent requests share one query), and
    # how long one set of queries may take before the answer is 503.
    live_view_cache_s: float = field(default=2.0, metadata=bounds(ge=0))
    live_view_query_timeout_s: float = field(default=10.0, metadata=bounds(gt=0))
    # live_view = "storage": how often (at most) this process publishes the view of the reports it
    # received (`capmon_live`) and the sums of their windows (`capmon_totals`), from which every
    # process answers /api/v1/fleet and /api/v1/agents. The fleet answer lags reports by up to this.
    live_publish_interval_s: float = field(default=2.0, metadata=bounds(gt=0))
    # The memory live view's fleet-wide bound: a report that would take it past any of these is still
    # stored and answered, but kept out of the live view (listed in /api/v1/agents, counted in
    # /metrics), so no token can exhaust the collector's memory.
    live_view_max_agents: int = field(default=50_000, metadata=bounds(ge=1))
    live_view_max_devices: int = field(default=100_000, metadata=bounds(ge=1))
    live_view_max_holders: int = field(default=500_000, metadata=bounds(ge=1))


@dataclass(frozen=True)
class TokenConfig:
    """One bearer token: its sha256 (hex) in the file, or the plain token in an environment variable."""

    sha256: str = ""
    env: str = ""
    # Agent tokens: the agent ids (fnmatch patterns, e.g. "rack7-*") this token may write as.
    agents: tuple[str, ...] = ()
    # A free-form name for logs and metrics (never the token).
    name: str = ""


@dataclass(frozen=True)
class AuthConfig:
    """`[auth]`: agent tokens write reports as their bound agent ids; read tokens query the APIs."""

    agent_tokens: tuple[TokenConfig, ...] = ()
    read_tokens: tuple[TokenConfig, ...] = ()


@dataclass(frozen=True)
class StorageConfig:
    """`[storage]`: where accepted reports go. kind "none" keeps only the live view."""

    kind: Literal["none", "influxdb_v2", "influxdb_v1", "prometheus_remote_write"] = "none"
    # prometheus_remote_write: the receiver's full URL, e.g. http://prometheus:9090/api/v1/write
    # (Prometheus, VictoriaMetrics), .../api/v1/push (Mimir), .../api/v1/receive (Thanos).
    url: str = "http://127.0.0.1:8086"
    # influxdb_v2: needs a token; `token` falls back to $CAPMON_INFLUX_TOKEN.
    token: str = field(default="", repr=False)
    org: str = ""
    bucket: str = "capmon"
    # influxdb_v1; `password` falls back to $CAPMON_INFLUX_PASSWORD.
    db: str = "capmon"
    rp: str = ""
    user: str = ""
    password: str = field(default="", repr=False)
    create_database: bool = False
    # prometheus_remote_write: basic auth with `user`/`password` (falls back to
    # $CAPMON_REMOTE_WRITE_PASSWORD), or a bearer `token` (falls back to $CAPMON_REMOTE_WRITE_TOKEN);
    # `ca_file` a PEM bundle to verify the receiver's certificate ("" = the system's); `headers`
    # sent with every write (a tenant: X-Scope-OrgID for Mimir, THANOS-TENANT for Thanos).
    ca_file: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    # Group commit: lines per storage write, and how long a write waits for more requests to join.
    batch_size: int = field(default=5000, metadata=bounds(ge=1, le=100_000))
    flush_interval_s: float = field(default=0.05, metadata=bounds(ge=0))
    write_concurrency: int = field(default=2, metadata=bounds(ge=1))
    timeout_s: float = field(default=10.0, metadata=bounds(gt=0))
    # Lines waiting for storage beyond which ingest answers 429; one request with more lines than
    # this is answered 413 (the agent splits it).
    max_pending_lines: int = field(default=200_000, metadata=bounds(gt=0))
    # Retry-After (seconds) told to agents when storage is down and did not say.
    retry_after_s: int = field(default=10, metadata=bounds(gt=0))
    gzip: bool = True


@dataclass(frozen=True)
class PricingConfig:
    """`[pricing]`: value of one device-hour by model; a key matches exactly, else as a substring."""

    currency: str = "USD"
    default: float = field(default=0.0, metadata=bounds(ge=0))
    models: Mapping[str, float] = field(default_factory=dict, metadata=bounds(ge=0))
    # Electricity, in `currency` per kWh: what idle devices' energy costs (`idle_energy_cost`).
    # 0: energy is measured but not priced.
    energy_price_per_kwh: float = field(default=0.0, metadata=bounds(ge=0))
    # The site's power usage effectiveness: facility energy over the devices' own (cooling, power
    # conversion), so an idle device's kWh cost kWh x pue x energy_price_per_kwh. 1.0: the devices only.
    pue: float = field(
        default=1.0, metadata=bounds(ge=1.0, le=10.0, why="a PUE is 1 or more; above 10 is a typo")
    )


@dataclass(frozen=True)
class Config:
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    source: str = "<defaults>"


_SECTIONS = {
    "collector": CollectorConfig,
    "auth": AuthConfig,
    "storage": StorageConfig,
    "pricing": PricingConfig,
}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# The sample's example tokens (commented out there): public, so never accepted.
_EXAMPLE_TOKENS = {
    hashlib.sha256(t.encode()).hexdigest(): t for t in ("example-agent-token", "example-read-token")
}


def _check_collector(c: CollectorConfig, where: Where) -> None:
    for i, key in enumerate(c.label_keys):
        spot = where.child("label_keys").item(i)
        if not _LABEL_KEY.match(key) or len(key) > wire.MAX_KEY_LEN:
            raise spot.error(
                f"{key!r} is not a label key (lower-case letters, digits and _ starting with a letter, "
                f"at most {wire.MAX_KEY_LEN} characters)"
            )
        tags, fields = _written_keys()
        if key in RESERVED_TAGS:
            raise spot.error(f"{key!r} is a tag the collector writes itself (on {_on(tags[key])})")
        if key in RESERVED_FIELDS:
            raise spot.error(
                f"{key!r} is a field the collector writes (on {_on(fields[key])}): a tag of the same "
                "name would make queries answer two columns, "
                f"{key} and {key}_1"
            )
        if key in API_PARAMETERS:
            raise spot.error(
                f"{key!r} is a parameter of /api/v1/devices and /api/v1/holders, so no one could filter by "
                "a label of that name"
            )
        if key == "time":
            raise spot.error("'time' is InfluxDB's timestamp column, never a tag key it accepts")
        if key.startswith(_RESERVED_PREFIXES):
            raise spot.error(
                f"{key!r} starts like the fields of agents' own extra and info keys "
                f"({', '.join(p + '<key>' for p in _RESERVED_PREFIXES)}), which it could collide with"
            )
    if c.max_inflight_decoded_bytes < c.max_decoded_bytes:
        raise where.child("max_inflight_decoded_bytes").error(
            f"must be at least max_decoded_bytes ({c.max_decoded_bytes}), or the largest request "
            "allowed could never be taken"
        )


def _on(measurements: set[str]) -> str:
    return ", ".join(sorted(measurements))


def _check_token(tok: TokenConfig, where: Where, env: Mapping[str, str]) -> None:
    if bool(tok.sha256) == bool(tok.env):
        raise where.error("needs exactly one of sha256 or env")
    if tok.sha256 and not _SHA256_HEX.fullmatch(tok.sha256):
        raise where.child("sha256").error("must be 64 lowercase hex digits")
    if tok.env and not env.get(tok.env):
        raise where.child("env").error(f"names ${tok.env}, which is not set")
    digest = tok.sha256 or hash_token(env[tok.env])
    if digest in _EXAMPLE_TOKENS:
        spot = where.child("sha256") if tok.sha256 else where.child("env")
        raise spot.error(
            f"{'' if tok.sha256 else f'(${tok.env}) '}is the sample's example token "
            f"{_EXAMPLE_TOKENS[digest]!r}, which anyone can read: make a real one with "
            "`capmon collector hash-token --generate` (it prints the token for the client and the "
            "sha256 for this file)"
        )


def _check_auth(auth: AuthConfig, where: Where, env: Mapping[str, str]) -> None:
    for i, tok in enumerate(auth.agent_tokens):
        spot = where.child("agent_tokens").item(i)
        _check_token(tok, spot, env)
        if not tok.agents:
            raise spot.child("agents").error("must name the agent ids it may write as")
    for i, tok in enumerate(auth.read_tokens):
        spot = where.child("read_tokens").item(i)
        _check_token(tok, spot, env)
        if tok.agents:
            raise spot.child("agents").error("read tokens write as no agent")


def _require_influxdb_client(where: Where) -> None:
    """influxdb_v2 writes through influxdb-client's async API, an optional dependency."""
    try:
        importlib.import_module("influxdb_client.client.influxdb_client_async")
    except ImportError as exc:
        raise where.error(
            f"storage.kind influxdb_v2 needs the influxdb-client package ({exc}): "
            + install_hint("collector")
        ) from None


_OWN_HEADERS = frozenset(
    {
        "authorization",
        "content-encoding",
        "content-type",
        "content-length",
        "x-prometheus-remote-write-version",
    }
)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _check_remote_write(s: StorageConfig, where: Where, env: Mapping[str, str]) -> StorageConfig:
    s = dataclasses.replace(
        s,
        token=s.token or env.get("CAPMON_REMOTE_WRITE_TOKEN", ""),
        password=s.password or env.get("CAPMON_REMOTE_WRITE_PASSWORD", ""),
    )
    url = where.child("url")
    if s.url == StorageConfig.url:
        raise url.error(
            "storage.kind prometheus_remote_write needs the receiver's URL, e.g. "
            "http://127.0.0.1:9090/api/v1/write (Prometheus, VictoriaMetrics), .../api/v1/push (Mimir)"
        )
    if not re.match(r"https?://[^/\s]+", s.url):
        raise url.error(f"must be an http:// or https:// URL, got {s.url!r}")
    if s.user and s.token:
        raise where.child("token").error("give either user/password (basic auth) or a bearer token, not both")
    if s.ca_file:
        try:
            Path(s.ca_file).read_bytes()
        except OSError as exc:
            raise where.child("ca_file").error(f"cannot read {s.ca_file}: {exc.strerror}") from None
    for name, value in s.headers.items():
        spot = where.child("headers").child(name)
        if not _HEADER_NAME.fullmatch(name) or name.lower() in _OWN_HEADERS:
            raise spot.error("not a header the collector lets you set (it sets auth and encoding itself)")
        if any(c in value for c in "\r\n\0"):
            raise spot.error("a header value cannot hold a line break")
    for module, package in (("cramjam", "cramjam"), ("google.protobuf", "protobuf")):
        try:
            importlib.import_module(module)
        except ImportError:
            raise where.error(
                f"storage.kind prometheus_remote_write needs the {package} package: "
                + install_hint("collector")
            ) from None
    return s


def _check_storage(s: StorageConfig, where: Where, env: Mapping[str, str]) -> StorageConfig:
    """Name exactly what the chosen kind misses; fill secrets from the environment."""
    if s.kind == "prometheus_remote_write":
        return _check_remote_write(s, where, env)
    if s.kind == "influxdb_v2":
        s = dataclasses.replace(s, token=s.token or env.get("CAPMON_INFLUX_TOKEN", ""))
        missing = [f"storage.{name}" for name in ("org", "bucket") if not getattr(s, name)]
        if not s.token:
            # VictoriaMetrics takes any token; InfluxDB 2 refuses every write without one.
            missing.append("a token (storage.token or $CAPMON_INFLUX_TOKEN)")
        if missing:
            raise where.error(f"storage.kind influxdb_v2 needs {' and '.join(missing)}")
        _require_influxdb_client(where)
    elif s.kind == "influxdb_v1":
        if not s.db:
            raise where.error("storage.kind influxdb_v1 needs storage.db")
        s = dataclasses.replace(s, password=s.password or env.get("CAPMON_INFLUX_PASSWORD", ""))
    return s


# The one wording of "several processes need the storage view", for reuse_port and `--workers`.
SEVERAL_PROCESSES_NEED_STORAGE = (
    'needs live_view = "storage": with the memory view each process answers from only the agents '
    "that happen to connect to it, so every fleet answer would be a random part of the fleet"
)
LIVE_VIEW_STORES = ("influxdb_v1", "influxdb_v2")


def _check_live_view(c: CollectorConfig, storage: StorageConfig, where: Where) -> None:
    if c.reuse_port and c.live_view != "storage":
        raise where.child("reuse_port").error(SEVERAL_PROCESSES_NEED_STORAGE)
    if c.live_view == "storage" and storage.kind not in LIVE_VIEW_STORES:
        raise where.child("live_view").error(
            f'"storage" answers from InfluxQL, which storage.kind {storage.kind!r} cannot serve: '
            f"use {' or '.join(LIVE_VIEW_STORES)} (InfluxDB 1.x, 2.x with a DBRP mapping, 3.x), or "
            '"memory" with one collector process'
        )


def validate(config: Config, env: Mapping[str, str] | None = None) -> Config:
    """Check what one value alone cannot; fill secrets from the environment. Returns the final config."""
    env = os.environ if env is None else env
    src = config.source
    _check_collector(config.collector, Where(src, "collector"))
    _check_auth(config.auth, Where(src, "auth"), env)
    storage = _check_storage(config.storage, Where(src, "storage"), env)
    _check_live_view(config.collector, storage, Where(src, "collector"))
    return dataclasses.replace(config, storage=storage)


def _from_tables(data: Mapping[str, Any], source: str, env: Mapping[str, str] | None) -> Config:
    check_sections(data, _SECTIONS, source)
    sections = {name: decode(cls, data.get(name, {}), Where(source, name)) for name, cls in _SECTIONS.items()}
    return validate(Config(**sections, source=source), env)


def parse(text: str, source: str = "<string>", env: Mapping[str, str] | None = None) -> Config:
    return _from_tables(parse_toml(text, source), source, env)


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    return _from_tables(read_toml(path), str(path), env)
