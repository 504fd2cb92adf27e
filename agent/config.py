"""The agent's configuration: one TOML file mapped onto frozen dataclasses, plus environment overrides.

Decoded once, by the loader both roles share (`capmon.agent.configfile`): an unknown key or a wrong
type is a startup error naming the file, the section and the key. What the collector would refuse
for every window (the wire protocol's limits, `capmon.agent.wire`) is refused here, at startup.
Secrets (the collector token) may come from the environment instead of the file.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from capmon.agent import wire
from capmon.agent.classifier import ClassifierConfig
from capmon.agent.configfile import ConfigError, Where, bounds, check_sections, decode, read_toml
from capmon.agent.holders import HoldersConfig
from capmon.agent.spool import SpoolConfig
from capmon.agent.transport import TransportConfig

__all__ = [
    "EXPORTER_PORT",
    "AgentConfig",
    "AgentSection",
    "AllocationsSection",
    "ConfigError",
    "ExporterSection",
    "HoldersConfig",
    "ProbesSection",
    "load_config",
    "sample_config",
]

# The exporter's documented port: clear of dcgm-exporter 9400, nvidia_gpu_exporter 9835, Huawei's
# npu-exporter 8082, node_exporter 9100 and Prometheus itself (9090-9094).
EXPORTER_PORT = 9477


@dataclass(frozen=True, slots=True)
class AgentSection:
    """`[agent]`: who this agent is and how often it reports."""

    # Agent id, unique in the fleet; the collector binds tokens to it. Default: the host name.
    id: str = ""
    # Host name reported with every record. Default: this machine's host name.
    host: str = ""
    # Seconds per report window; windows end on multiples of it (wall clock), so timestamps align.
    window_s: int = field(default=60, metadata=bounds(ge=1, le=wire.MAX_WINDOW_S))
    # Labels attached to every record (bounded-cardinality identities: site, cluster, pool, ...).
    labels: Mapping[str, str] = field(default_factory=dict)
    # Where finished windows go when no collector is configured ([transport] url): "-" is stdout,
    # anything else a file path, one JSON batch per line.
    output: str = "-"
    # Seconds the agent may spend delivering what it holds after SIGTERM before it exits.
    shutdown_timeout_s: float = field(default=20.0, metadata=bounds(ge=0))
    log_level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class ProbesSection:
    """`[probes]`: which probes run. Each probe's own options live in `[probes.<name>]`."""

    # Probes that run only when asked for (the mock) are named here. Env: CAPMON_PROBES_ENABLE=a,b
    enable: tuple[str, ...] = ()
    # Probes never to run, even where their hardware is present. Env: CAPMON_PROBES_DISABLE=a,b
    disable: tuple[str, ...] = ()
    # `[probes.<name>]` tables, decoded by the probe registry onto each probe's own config class.
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AllocationsSection:
    """`[allocations]`: which allocation sources run (`kubernetes`, `slurm`, third-party ones). Each
    source's own options live in `[allocations.<name>]`."""

    # Sources that run only when asked for. Env: CAPMON_ALLOCATIONS_ENABLE=a,b
    enable: tuple[str, ...] = ()
    # Sources never to run, even where their scheduler is present. Env: CAPMON_ALLOCATIONS_DISABLE=a,b
    disable: tuple[str, ...] = ()
    # `[allocations.<name>]` tables, decoded by the registry onto each source's own config class.
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExporterSection:
    """`[exporter]`: the agent's devices for a Prometheus scrape (`capmon.agent.exporter`)."""

    # "host:port" to serve /metrics on, e.g. "127.0.0.1:9477" (9477 is capmon's port) or
    # "0.0.0.0:9477" for every interface. Empty: no exporter. Needs prometheus-client.
    listen: str = ""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    agent: AgentSection = field(default_factory=AgentSection)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    probes: ProbesSection = field(default_factory=ProbesSection)
    # `[spool]` and `[transport]`: their dataclasses live in the modules that use them.
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    exporter: ExporterSection = field(default_factory=ExporterSection)
    # `[holders]`: who holds each device, and what of it leaves the host (`capmon.agent.holders`).
    holders: HoldersConfig = field(default_factory=HoldersConfig)
    allocations: AllocationsSection = field(default_factory=AllocationsSection)
    source: str = "<defaults>"

    @property
    def agent_id(self) -> str:
        return self.agent.id or self.host

    @property
    def host(self) -> str:
        return self.agent.host or socket.gethostname()


_SECTIONS = ("agent", "allocations", "classifier", "exporter", "holders", "probes", "spool", "transport")


_KEY = re.compile(wire.KEY_PATTERN)


def _check_agent(agent: AgentSection, where: Where) -> None:
    """What the collector would refuse for every window (the limits of `wire.AgentIdentity`) is refused
    at startup, naming the key: a bad label must not cost the fleet its data."""
    if len(agent.labels) > wire.MAX_LABELS:
        raise where.child("labels").error(
            f"at most {wire.MAX_LABELS} labels (the collector refuses more), got {len(agent.labels)}"
        )
    for key, value in agent.labels.items():
        spot = where.child("labels").child(key)
        if not _KEY.match(key) or len(key) > wire.MAX_KEY_LEN:
            raise spot.error(
                "a label key is lower-case letters, digits and _ starting with a letter, "
                f"at most {wire.MAX_KEY_LEN} characters"
            )
        if len(value) > wire.MAX_LABEL_VALUE_LEN:
            raise spot.error(f"at most {wire.MAX_LABEL_VALUE_LEN} characters (the collector refuses longer)")
    for key, most in (("id", wire.MAX_ID_LEN), ("host", wire.MAX_NAME_LEN)):
        if len(getattr(agent, key)) > most:
            raise where.child(key).error(f"at most {most} characters (the collector refuses longer)")
    # Whatever else the wire's identity type refuses (a bound added there later) is refused here too.
    identity = {"id": agent.id or "x", "host": agent.host or "x", "labels": dict(agent.labels)}
    try:
        msgspec.convert(identity, wire.AgentIdentity)
    except msgspec.ValidationError as exc:
        reason, path = wire.split_error(exc)
        raise where.child((path or "$").removeprefix("$.")).error(
            f"{reason} (the collector refuses it)"
        ) from None


def _check_classifier(classifier: ClassifierConfig, where: Where) -> None:
    for name in ("memory_baseline_mib", "memory_idle_mib", "memory_baseline_pct"):
        for key, value in getattr(classifier, name).items():
            if value < 0:
                raise where.child(name).child(key).error(f"must be ≥ 0, got {value}")


def listen_address(listen: str, any_port: bool = False) -> tuple[str, int]:
    """`"127.0.0.1:9477"` → ("127.0.0.1", 9477); `"[::1]:9477"` → ("::1", 9477). Raises ValueError.
    Port 0 (any free port: tests) only with `any_port`; a scraper needs to know the port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not (0 if any_port else 1) <= int(port) <= 65535:
        raise ValueError(
            f"must be host:port with a port 1-65535 (e.g. 127.0.0.1:{EXPORTER_PORT}), got {listen!r}"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or (":" in host and not listen.startswith("[")):
        raise ValueError(
            f"needs a host: 127.0.0.1:{EXPORTER_PORT}, 0.0.0.0:{EXPORTER_PORT} or [::1]:{EXPORTER_PORT}"
        )
    return host, int(port)


def _check_exporter(exporter: ExporterSection, where: Where) -> None:
    if not exporter.listen:
        return
    try:
        listen_address(exporter.listen)
    except ValueError as exc:
        raise where.child("listen").error(str(exc)) from None
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise where.child("listen").error(
            "the exporter needs the prometheus-client package: "
            "pip install '.[prometheus]' in a capmon checkout (README: Install)"
        ) from None


def _names(value: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in value.split(",") if n.strip())


def _decode_probes(table: Any, where: Where, env: Mapping[str, str]) -> ProbesSection:
    return _decode_plugins(ProbesSection, "probes", table, where, env)


def _decode_plugins(cls: type, section: str, table: Any, where: Where, env: Mapping[str, str]) -> Any:
    """`[probes]` or `[allocations]`: enable/disable lists plus a `[<section>.<name>]` table each."""
    if not isinstance(table, Mapping):
        return decode(cls, table, where)  # names the wrong type
    options = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    own = {k: v for k, v in table.items() if k not in options}
    for key in own:
        if key not in ("enable", "disable"):
            raise where.error(
                f"unknown key '{section}.{key}' (known: disable, enable, and [{section}.<name>] tables)"
            )
    decoded = decode(cls, own, where)
    prefix = f"CAPMON_{section.upper()}"
    return cls(
        enable=decoded.enable + _names(env.get(f"{prefix}_ENABLE", "")),
        disable=decoded.disable + _names(env.get(f"{prefix}_DISABLE", "")),
        options=options,
    )


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read the agent's TOML file (or defaults when `path` is None) and apply environment overrides."""
    env = os.environ if env is None else env
    source = "<defaults>" if path is None else str(path)
    data: dict[str, Any] = {} if path is None else read_toml(path)
    check_sections(data, _SECTIONS, source)
    agent = decode(AgentSection, data.get("agent", {}), Where(source, "agent"))
    _check_agent(agent, Where(source, "agent"))
    classifier = decode(ClassifierConfig, data.get("classifier", {}), Where(source, "classifier"))
    _check_classifier(classifier, Where(source, "classifier"))
    transport = data.get("transport", {})
    if env.get("CAPMON_AGENT_TOKEN") and isinstance(transport, Mapping):
        transport = {**transport, "token": env["CAPMON_AGENT_TOKEN"]}
    exporter = decode(ExporterSection, data.get("exporter", {}), Where(source, "exporter"))
    _check_exporter(exporter, Where(source, "exporter"))
    # Decoded once, here: a misspelt `url` must not quietly turn delivery off.
    return AgentConfig(
        agent=agent,
        classifier=classifier,
        probes=_decode_probes(data.get("probes", {}), Where(source, "probes"), env),
        spool=decode(SpoolConfig, data.get("spool", {}), Where(source, "spool")),
        transport=decode(TransportConfig, transport, Where(source, "transport")),
        exporter=exporter,
        holders=decode(HoldersConfig, data.get("holders", {}), Where(source, "holders")),
        allocations=_decode_plugins(
            AllocationsSection, "allocations", data.get("allocations", {}), Where(source, "allocations"), env
        ),
        source=source,
    )


def sample_config() -> str:
    """The commented sample configuration: the agent's own sections, then each built-in probe's."""
    here = Path(__file__).parent
    parts = [(here / "sample.toml").read_text()]
    plugins = here.parent / "plugins" if (here.parent / "plugins").is_dir() else None
    try:
        import capmon.plugins as builtins

        plugins = Path(builtins.__file__).parent
    except ImportError:  # pragma: no cover - the distribution always ships them
        pass
    if plugins is not None:
        for name in ("host", "nvml", "ascend", "mock", "kubernetes", "slurm"):
            sample = plugins / name / "sample.toml"
            if sample.exists():
                parts.append(sample.read_text())
    return "\n".join(p.rstrip() + "\n" for p in parts)
