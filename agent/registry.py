"""Finding probes: the plugin manager, and which probes run on this host and why.

Built-in probes and third-party ones arrive the same way: modules named in the `capmon.probes`
entry-point group whose `capmon_probe_types()` hook returns probe classes. Each entry point loads in
its own `try`; a broken plugin is reported by `capmon agent probes`, never fatal.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from capmon.agent import hookspecs
from capmon.agent.probe import Probe, ProbeUnavailable, config_from_mapping

log = logging.getLogger("capmon.agent.registry")

ENTRY_POINT_GROUP = "capmon.probes"


@dataclass(slots=True)
class ProbeStatus:
    """One line of `capmon agent probes`."""

    name: str
    status: str  # active | skipped | failed | disabled
    reason: str = ""
    source: str = ""
    probe: Probe | None = None


class ProbeRegistry:
    """A pluggy manager holding the probe plugins of one agent (tests build their own)."""

    def __init__(
        self,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
        plugins: Iterable[tuple[str, object]] = (),
    ) -> None:
        self.pm = pluggy.PluginManager("capmon")
        self.pm.add_hookspecs(hookspecs)
        self.load_errors: dict[str, str] = {}
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in entry_points:
            try:
                module = ep.load()
            except Exception as exc:
                self.load_errors[ep.name] = f"plugin {ep.value!r} failed to load: {type(exc).__name__}: {exc}"
                log.warning("%s", self.load_errors[ep.name])
                continue
            self._register(module, ep.name, ep.value)
        for name, plugin in plugins:
            self._register(plugin, name, repr(plugin))
        self.pm.check_pending()
        self.types, self.sources = self._collect_types()

    def _register(self, plugin: object, name: str, source: str) -> None:
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self.load_errors[name] = f"plugin {source!r} could not register: {type(exc).__name__}: {exc}"
            log.warning("%s", self.load_errors[name])

    def _collect_types(self) -> tuple[dict[str, type[Probe]], dict[str, str]]:
        # Each implementation is called on its own: in pluggy one raising hookimpl aborts the call.
        types: dict[str, type[Probe]] = {}
        sources: dict[str, str] = {}
        for impl in self.pm.hook.capmon_probe_types.get_hookimpls():
            plugin = impl.plugin_name
            try:
                returned = impl.function() or []
            except Exception as exc:
                self.load_errors[plugin] = f"capmon_probe_types() raised {type(exc).__name__}: {exc}"
                continue
            for cls in returned:
                if not (isinstance(cls, type) and issubclass(cls, Probe) and cls.name):
                    self.load_errors[plugin] = (
                        f"capmon_probe_types() returned {cls!r}, not a named Probe subclass"
                    )
                    continue
                if cls.name in types:
                    self.load_errors[f"{plugin}:{cls.name}"] = (
                        f"probe name {cls.name!r} from {plugin} is already taken by {sources[cls.name]}; ignored"
                    )
                    continue
                types[cls.name] = cls
                sources[cls.name] = plugin
        return dict(sorted(types.items())), sources

    def activate(
        self,
        enable: Iterable[str] = (),
        disable: Iterable[str] = (),
        options: Mapping[str, Mapping[str, Any]] | None = None,
        boundaries: Mapping[str, Mapping[str, Any]] | None = None,
        where: str = "configuration",
    ) -> list[ProbeStatus]:
        """Construct and set up each probe that should run here; report every probe's fate.

        A probe runs when it is not disabled and either auto-detects (`auto = True`) or is named in
        `enable`. `options[name]` is its `[probes.<name>]` table; `boundaries[name]` its hardware
        boundary (tests pass fakes here).
        """
        enable, disable = set(enable), set(disable)
        options = options or {}
        boundaries = boundaries or {}
        known = set(self.types) | set(self.load_errors)
        unknown = sorted((enable | disable | set(options)) - known)
        if unknown:
            raise ValueError(
                f"{where}: unknown probe {unknown[0]!r} (known: {', '.join(self.types) or 'none'})"
            )
        # Every probe's options are checked, whether or not it runs here: a typo is an error today,
        # not on the day the hardware arrives.
        configs = {
            name: config_from_mapping(cls.Config, options.get(name, {}), f"{where}: [probes.{name}]")
            for name, cls in self.types.items()
        }
        statuses: list[ProbeStatus] = []
        for name, cls in self.types.items():
            source = self.sources[name]
            if name in disable:
                statuses.append(ProbeStatus(name, "disabled", "disabled by configuration", source))
                continue
            # Only `enable` starts a probe that does not detect its hardware (the mock): its options
            # table alone, as in `capmon agent config`'s output, must never put fake devices in a fleet.
            if not cls.auto and name not in enable:
                statuses.append(
                    ProbeStatus(name, "disabled", "runs only when named in probes.enable", source)
                )
                continue
            config = configs[name]
            try:
                probe = cls(config, **boundaries.get(name, {}))
                probe.setup()
            except ProbeUnavailable as exc:
                statuses.append(ProbeStatus(name, "skipped", str(exc) or "unavailable", source))
                continue
            except Exception as exc:
                statuses.append(ProbeStatus(name, "failed", f"{type(exc).__name__}: {exc}", source))
                continue
            statuses.append(ProbeStatus(name, "active", "", source, probe))
        for name, error in self.load_errors.items():
            statuses.append(ProbeStatus(name, "failed", error, name))
        return statuses
