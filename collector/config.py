"""Collector configuration: one TOML file mapped onto frozen dataclasses.

Every option has a default that suits most deployments; the sample (`collector/sample.toml`, printed
by `capmon collector config`) documents each one. Unknown keys are a startup error naming the key and
the file. Secrets may stay out of the file: see `StorageConfig` and `TokenConfig` for the environment
variables they fall back to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


# Tags the collector writes itself: a label may not take one of these names.
RESERVED_TAGS = frozenset({"host", "agent", "vendor", "model", "device", "parent", "probe"})
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class CollectorConfig:
    """`[collector]`: where to listen and what a request may carry."""

    host: str = "127.0.0.1"
    port: int = 8900
    # Compressed body on the wire, and the body after gzip decoding (zip bombs stop here).
    max_body_bytes: int = 8 * 1024 * 1024
    max_decoded_bytes: int = 64 * 1024 * 1024
    # Device windows (devices summed over reports) one request may carry; 413 beyond, and agents
    # split. An agent sends at most 100 reports of a few devices each; this keeps one request from
    # holding the event loop for seconds.
    max_device_windows: int = 20_000
    # How far a window's end may lie ahead of / behind the collector's clock.
    max_future_s: float = 300.0
    max_past_s: float = 7 * 86400.0
    # Longest window accepted (end - start).
    max_window_s: float = 86400.0
    # Label keys that become tags and live-view breakdowns; other labels are dropped (and counted).
    label_keys: tuple[str, ...] = ("site", "cluster", "pool")
    max_labels: int = 16
    max_label_value_len: int = 128
    # An agent silent for more than this many of its windows shows its devices `unavailable`.
    stale_windows: float = 3.0
    # An agent silent (by the collector's clock) for longer than this leaves the live view.
    forget_after_s: float = 86400.0
    # Seconds SIGTERM waits for in-flight requests and writes before exiting.
    drain_timeout_s: float = 30.0
    # Let several collector processes share host:port (SO_REUSEPORT; Linux spreads connections
    # across them). They keep no state that matters, so this is how one host uses more cores.
    reuse_port: bool = False


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

    kind: Literal["none", "influxdb_v2", "influxdb_v1"] = "none"
    url: str = "http://127.0.0.1:8086"
    # influxdb_v2; `token` falls back to $CAPMON_INFLUX_TOKEN.
    token: str = field(default="", repr=False)
    org: str = ""
    bucket: str = "capmon"
    # influxdb_v1; `password` falls back to $CAPMON_INFLUX_PASSWORD.
    db: str = "capmon"
    rp: str = ""
    user: str = ""
    password: str = field(default="", repr=False)
    create_database: bool = False
    # Group commit: lines per storage write, and how long a write waits for more requests to join.
    batch_size: int = 5000
    flush_interval_s: float = 0.05
    write_concurrency: int = 2
    timeout_s: float = 10.0
    # Lines waiting for storage beyond which ingest answers 429; one request with more lines than
    # this is answered 413 (the agent splits it).
    max_pending_lines: int = 200_000
    # Retry-After (seconds) told to agents when storage is down and did not say.
    retry_after_s: int = 10
    gzip: bool = True


@dataclass(frozen=True)
class PricingConfig:
    """`[pricing]`: value of one device-hour by model; a key matches exactly, else as a substring."""

    currency: str = "USD"
    default: float = 0.0
    models: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    source: str = "<defaults>"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {where} must be one of {', '.join(map(repr, args))}, not {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _convert(value, arg, where, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {where} has the wrong type ({type(value).__name__})")
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where} must be a list")
        return tuple(_convert(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a table")
        return types.MappingProxyType(
            {str(k): _convert(v, args[1], f"{where}.{k}", source) for k, v in value.items()}
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{where}] must be a table")
        return _build(tp, value, where, source)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {where} must be a number, not {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {where} must be an integer, not {value!r}")
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise ConfigError(f"{source}: {where} must be a {tp.__name__}, not {value!r}")
        return value
    raise ConfigError(f"{source}: {where}: unsupported option type {tp!r}")  # pragma: no cover


def _build(cls: type, data: Mapping[str, Any], where: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"{source}: unknown key {dotted!r}")
        kwargs[key] = _convert(value, hints[key], dotted, source)
    return cls(**kwargs)


# The sample's example tokens (commented out there): public, so never accepted.
_EXAMPLE_TOKENS = {
    hashlib.sha256(t.encode()).hexdigest(): t for t in ("example-agent-token", "example-read-token")
}


def _check_token(tok: TokenConfig, where: str, source: str, env: Mapping[str, str]) -> None:
    if bool(tok.sha256) == bool(tok.env):
        raise ConfigError(f"{source}: {where} needs exactly one of sha256 or env")
    if tok.sha256 and not _SHA256_HEX.match(tok.sha256):
        raise ConfigError(f"{source}: {where}.sha256 must be 64 lowercase hex digits")
    if tok.env and not env.get(tok.env):
        raise ConfigError(f"{source}: {where}.env names ${tok.env}, which is not set")
    digest = tok.sha256 or hash_token(env[tok.env])
    if digest in _EXAMPLE_TOKENS:
        key = f"{where}.sha256" if tok.sha256 else f"{where}.env (${tok.env})"
        raise ConfigError(
            f"{source}: {key} is the sample's example token {_EXAMPLE_TOKENS[digest]!r}, which anyone can "
            "read: make a real one with `capmon collector hash-token --generate` (it prints the token "
            "for the client and the sha256 for this file)"
        )


def _check_number(src: str, key: str, value: float, *, zero_ok: bool = False) -> None:
    """Finite and positive (or at least 0 where 0 means something: no wait, not priced)."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(
            f"{src}: {key} must be a finite number {'>= 0' if zero_ok else '> 0'}, not {value!r}"
        )


def _require_influxdb_client(src: str) -> None:
    """influxdb_v2 writes through influxdb-client's async API, an optional dependency."""
    try:
        importlib.import_module("influxdb_client.client.influxdb_client_async")
    except ImportError as exc:
        raise ConfigError(
            f"{src}: storage.kind influxdb_v2 needs the influxdb-client package ({exc}): "
            "pip install 'capmon[collector]'"
        ) from None


def validate(config: Config, env: Mapping[str, str] | None = None) -> Config:
    """Check what types alone cannot; fill secrets from the environment. Returns the final config."""
    env = os.environ if env is None else env
    src = config.source
    c = config.collector
    if not 0 <= c.port <= 65535:
        raise ConfigError(f"{src}: collector.port must be 0..65535")
    for key in c.label_keys:
        if not _LABEL_KEY.match(key) or len(key) > 64:
            raise ConfigError(f"{src}: collector.label_keys: {key!r} is not a valid label key")
        if key in RESERVED_TAGS:
            raise ConfigError(f"{src}: collector.label_keys: {key!r} is a tag the collector writes itself")
    for name in (
        "max_body_bytes",
        "max_decoded_bytes",
        "max_device_windows",
        "max_labels",
        "max_label_value_len",
    ):
        if getattr(c, name) <= 0:
            raise ConfigError(f"{src}: collector.{name} must be positive")
    _check_number(src, "collector.stale_windows", c.stale_windows)
    _check_number(src, "collector.forget_after_s", c.forget_after_s)
    for i, tok in enumerate(config.auth.agent_tokens):
        _check_token(tok, f"auth.agent_tokens[{i}]", src, env)
        if not tok.agents:
            raise ConfigError(f"{src}: auth.agent_tokens[{i}].agents must name the agent ids it may write as")
    for i, tok in enumerate(config.auth.read_tokens):
        _check_token(tok, f"auth.read_tokens[{i}]", src, env)
        if tok.agents:
            raise ConfigError(f"{src}: auth.read_tokens[{i}].agents: read tokens write as no agent")
    s = config.storage
    if s.kind == "influxdb_v2":
        token = s.token or env.get("CAPMON_INFLUX_TOKEN", "")
        if not s.org or not s.bucket:
            raise ConfigError(f"{src}: storage.kind influxdb_v2 needs storage.org and storage.bucket")
        _require_influxdb_client(src)
        s = dataclasses.replace(s, token=token)
    elif s.kind == "influxdb_v1":
        if not s.db:
            raise ConfigError(f"{src}: storage.kind influxdb_v1 needs storage.db")
        s = dataclasses.replace(s, password=s.password or env.get("CAPMON_INFLUX_PASSWORD", ""))
    if not 1 <= s.batch_size <= 100_000:
        raise ConfigError(f"{src}: storage.batch_size must be 1..100000")
    if s.write_concurrency < 1:
        raise ConfigError(f"{src}: storage.write_concurrency must be at least 1")
    _check_number(src, "storage.flush_interval_s", s.flush_interval_s, zero_ok=True)
    _check_number(src, "storage.timeout_s", s.timeout_s)
    _check_number(src, "storage.retry_after_s", s.retry_after_s)
    _check_number(src, "storage.max_pending_lines", s.max_pending_lines)
    p = config.pricing
    _check_number(src, "pricing.default", p.default, zero_ok=True)
    for model, price in p.models.items():
        _check_number(src, f"pricing.models.{model}", price, zero_ok=True)
    return dataclasses.replace(config, storage=s)


def parse(text: str, source: str = "<string>", env: Mapping[str, str] | None = None) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    config = _build(Config, data, "", source)
    return validate(dataclasses.replace(config, source=source), env)


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    return parse(text, str(path), env)
