"""The agent's configuration: one TOML file mapped onto frozen dataclasses, plus environment overrides.

An unknown key is a startup error that names the key and the file. Secrets (the collector token)
may come from the environment instead of the file.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capmon.agent.classifier import ClassifierConfig
from capmon.agent.probe import config_from_mapping
from capmon.agent.spool import SpoolConfig
from capmon.agent.transport import TransportConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the file."""


@dataclass(frozen=True, slots=True)
class AgentSection:
    """`[agent]`: who this agent is and how often it reports."""

    # Agent id, unique in the fleet; the collector binds tokens to it. Default: the host name.
    id: str = ""
    # Host name reported with every record. Default: this machine's host name.
    host: str = ""
    # Seconds per report window; windows end on multiples of it (wall clock), so timestamps align.
    window_s: int = 60
    # Labels attached to every record (bounded-cardinality identities: site, cluster, pool, ...).
    labels: Mapping[str, str] = field(default_factory=dict)
    # Where finished windows go when no collector is configured ([transport] url): "-" is stdout,
    # anything else a file path, one JSON batch per line.
    output: str = "-"
    # Seconds the agent may spend delivering what it holds after SIGTERM before it exits.
    shutdown_timeout_s: float = 20.0
    # debug, info, warning or error.
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class ProbesSection:
    """`[probes]`: which probes run. Each probe's own options live in `[probes.<name>]`."""

    # Probes that run only when asked for (the mock) are named here. Env: CAPMON_PROBES_ENABLE=a,b
    enable: tuple[str, ...] = ()
    # Probes never to run, even where their hardware is present. Env: CAPMON_PROBES_DISABLE=a,b
    disable: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    agent: AgentSection = field(default_factory=AgentSection)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    probes: ProbesSection = field(default_factory=ProbesSection)
    # `[spool]` and `[transport]`: their dataclasses live in the modules that use them.
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    source: str = "<defaults>"

    @property
    def agent_id(self) -> str:
        return self.agent.id or self.host

    @property
    def host(self) -> str:
        return self.agent.host or socket.gethostname()


def section(cls: type, table: Any, where: str) -> Any:
    """Build one frozen dataclass from a TOML table; unknown keys and wrong types are named."""
    try:
        return config_from_mapping(cls, table, where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _check_identity(agent: AgentSection, source: str) -> None:
    """What the collector would refuse for every window (wire.AgentIdentity's limits) is refused here,
    at startup, naming the key: a bad label must not cost the fleet its data."""
    where = f"{source}: [agent]"
    if not isinstance(agent.labels, Mapping):
        raise ConfigError(f'{where} labels must be a table such as {{ site = "ams1" }}, got {agent.labels!r}')
    if len(agent.labels) > 16:
        raise ConfigError(f"{where} labels: at most 16, got {len(agent.labels)}")
    for key, value in agent.labels.items():
        if not _LABEL_KEY.match(key):
            raise ConfigError(
                f"{where} labels.{key}: a label key is lower-case letters, digits and _ starting with a letter"
            )
        if not isinstance(value, str) or len(value) > 256:
            raise ConfigError(
                f"{where} labels.{key} must be a string of at most 256 characters, got {value!r}"
            )
    if len(agent.id) > 128:
        raise ConfigError(f"{where} id: at most 128 characters")
    if len(agent.host) > 256:
        raise ConfigError(f"{where} host: at most 256 characters")


def _names(value: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in value.split(",") if n.strip())


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read the agent's TOML file (or defaults when `path` is None) and apply environment overrides."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    known = {"agent", "classifier", "probes", "spool", "transport"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown section [{unknown[0]}] (known: {', '.join(sorted(known))})")
    agent = section(AgentSection, data.get("agent", {}), f"{source}: [agent]")
    if agent.window_s < 1:
        raise ConfigError(f"{source}: [agent] window_s must be ≥ 1, got {agent.window_s}")
    _check_identity(agent, source)
    classifier = section(ClassifierConfig, data.get("classifier", {}), f"{source}: [classifier]")
    for name in ("memory_baseline_mib", "memory_baseline_pct"):
        table = getattr(classifier, name)
        if not isinstance(table, Mapping) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in table.values()
        ):
            raise ConfigError(
                f"{source}: [classifier] {name} must map models or vendors to numbers ≥ 0, got {table!r}"
            )
    probes_table = dict(data.get("probes", {}))
    options = {k: v for k, v in probes_table.items() if isinstance(v, Mapping)}
    for k in options:
        del probes_table[k]
    probes = section(ProbesSection, probes_table, f"{source}: [probes]")
    enable = probes.enable + _names(env.get("CAPMON_PROBES_ENABLE", ""))
    disable = probes.disable + _names(env.get("CAPMON_PROBES_DISABLE", ""))
    probes = ProbesSection(enable=enable, disable=disable, options=options)
    transport = dict(data.get("transport", {}))
    if env.get("CAPMON_AGENT_TOKEN"):
        transport["token"] = env["CAPMON_AGENT_TOKEN"]
    spool = dict(data.get("spool", {}))
    # Decoded once, here: a misspelt `url` must not quietly turn delivery off.
    return AgentConfig(
        agent=agent,
        classifier=classifier,
        probes=probes,
        spool=section(SpoolConfig, spool, f"{source}: [spool]"),
        transport=section(TransportConfig, transport, f"{source}: [transport]"),
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
        for name in ("host", "nvml", "ascend", "mock"):
            sample = plugins / name / "sample.toml"
            if sample.exists():
                parts.append(sample.read_text())
    return "\n".join(p.rstrip() + "\n" for p in parts)
