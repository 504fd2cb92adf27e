"""Finding plugins: the plugin manager, and which probes and allocation sources run here and why.

Built-in probes and third-party ones arrive the same way: modules named in the `capmon.probes`
entry-point group whose `capmon_probe_types()` hook returns probe classes. Allocation sources
(`kubernetes`, `slurm`, third-party schedulers) likewise: modules in the `capmon.allocations` group
whose `capmon_allocation_sources()` returns source classes. Each entry point loads, and each hook
implementation is called, in its own `try`; a broken plugin is reported by `capmon agent probes`,
never fatal.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from capmon.agent import hookspecs
from capmon.agent.allocation import AllocationSource
from capmon.agent.configfile import ConfigError
from capmon.agent.probe import Probe, ProbeUnavailable, config_from_mapping

log = logging.getLogger("capmon.agent.registry")

ENTRY_POINT_GROUP = "capmon.probes"
ALLOCATIONS_GROUP = "capmon.allocations"


@dataclass(slots=True)
class ProbeStatus:
    """One line of `capmon agent probes`."""

    name: str
    status: str  # active | skipped | failed | disabled
    reason: str = ""
    source: str = ""
    probe: Probe | None = None


@dataclass(slots=True)
class SourceStatus:
    """One allocation source's line of `capmon agent probes`."""

    name: str
    status: str  # active | skipped | failed | disabled
    reason: str = ""
    plugin: str = ""
    source: AllocationSource | None = None


class ProbeRegistry:
    """A pluggy manager holding the probe and allocation-source plugins of one agent (tests build
    their own: a registry given `entry_points` loads no allocation entry points it was not given)."""

    def __init__(
        self,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
        plugins: Iterable[tuple[str, object]] = (),
        allocation_entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
    ) -> None:
        self.pm = pluggy.PluginManager("capmon")
        self.pm.add_hookspecs(hookspecs)
        self.load_errors: dict[str, str] = {}
        self.source_load_errors: dict[str, str] = {}
        if allocation_entry_points is None:
            allocation_entry_points = (
                importlib.metadata.entry_points(group=ALLOCATIONS_GROUP) if entry_points is None else ()
            )
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in entry_points:
            try:
                module = ep.load()
            except Exception as exc:
                self.load_errors[ep.name] = f"plugin {ep.value!r} failed to load: {type(exc).__name__}: {exc}"
                log.warning("%s", self.load_errors[ep.name])
                continue
            self._register(module, ep.name, ep.value, self.load_errors)
        for ep in allocation_entry_points:
            try:
                module = ep.load()
            except Exception as exc:
                self.source_load_errors[ep.name] = (
                    f"plugin {ep.value!r} failed to load: {type(exc).__name__}: {exc}"
                )
                log.warning("%s", self.source_load_errors[ep.name])
                continue
            if self.pm.is_registered(module):
                continue  # one module in both groups is one plugin
            name = ep.name if self.pm.get_plugin(ep.name) is None else f"{ep.name} ({ALLOCATIONS_GROUP})"
            self._register(module, name, ep.value, self.source_load_errors)
        for name, plugin in plugins:
            self._register(plugin, name, repr(plugin), self.load_errors)
        self.pm.check_pending()
        self.types, self.sources = self._collect("capmon_probe_types", Probe, "probe", self.load_errors)
        self.source_types, self.source_plugins = self._collect(
            "capmon_allocation_sources", AllocationSource, "allocation source", self.source_load_errors
        )

    def _register(self, plugin: object, name: str, source: str, errors: dict[str, str]) -> None:
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            errors[name] = f"plugin {source!r} could not register: {type(exc).__name__}: {exc}"
            log.warning("%s", errors[name])

    def activate_sources(
        self,
        enable: Iterable[str] = (),
        disable: Iterable[str] = (),
        options: Mapping[str, Mapping[str, Any]] | None = None,
        boundaries: Mapping[str, Mapping[str, Any]] | None = None,
        where: str = "configuration",
    ) -> list[SourceStatus]:
        """Construct and set up each allocation source that should run here, as `activate` does for
        probes: not disabled, and auto-detecting or named in `enable`; `options[name]` is its
        `[allocations.<name>]` table, `boundaries[name]` its boundary (tests pass fakes). A source is
        closed after a failed setup too (its contract says so)."""
        fates = self._activate(
            self.source_types,
            self.source_plugins,
            self.source_load_errors,
            ("allocation source", "allocations"),
            enable,
            disable,
            options,
            boundaries,
            where,
            close_failed=True,
        )
        return [SourceStatus(*fate) for fate in fates]

    def _collect(
        self, hook: str, base: type, kind: str, errors: dict[str, str]
    ) -> tuple[dict, dict[str, str]]:
        """The classes every plugin's `hook` returns, by name, and which plugin gave each. Each
        implementation is called on its own: in pluggy one raising hookimpl aborts the whole call."""
        types: dict[str, type] = {}
        plugins: dict[str, str] = {}
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            plugin = impl.plugin_name
            try:
                returned = impl.function() or []
            except Exception as exc:
                errors[plugin] = f"{hook}() raised {type(exc).__name__}: {exc}"
                continue
            for cls in returned:
                if not (isinstance(cls, type) and issubclass(cls, base) and cls.name):
                    errors[plugin] = f"{hook}() returned {cls!r}, not a named {base.__name__} subclass"
                    continue
                if cls.name in types:
                    errors[f"{plugin}:{cls.name}"] = (
                        f"{kind} name {cls.name!r} from {plugin} is already taken by {plugins[cls.name]}; ignored"
                    )
                    continue
                types[cls.name] = cls
                plugins[cls.name] = plugin
        return dict(sorted(types.items())), plugins

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
        fates = self._activate(
            self.types,
            self.sources,
            self.load_errors,
            ("probe", "probes"),
            enable,
            disable,
            options,
            boundaries,
            where,
        )
        return [ProbeStatus(*fate) for fate in fates]

    def _activate(
        self,
        types: Mapping[str, type],
        plugins: Mapping[str, str],
        load_errors: Mapping[str, str],
        kind: tuple[str, str],
        enable: Iterable[str],
        disable: Iterable[str],
        options: Mapping[str, Mapping[str, Any]] | None,
        boundaries: Mapping[str, Mapping[str, Any]] | None,
        where: str,
        close_failed: bool = False,
    ) -> list[tuple[str, str, str, str, Any]]:
        """(name, status, reason, plugin, object) for every class of one plugin kind."""
        noun, section = kind
        enable, disable = set(enable), set(disable)
        options = options or {}
        boundaries = boundaries or {}
        unknown = sorted((enable | disable | set(options)) - (set(types) | set(load_errors)))
        if unknown:
            raise unknown_plugin(where, noun, unknown[0], types)
        # Every one's options are checked, whether or not it runs here: a typo is an error today,
        # not on the day the hardware arrives.
        configs = {
            name: config_from_mapping(cls.Config, options.get(name, {}), f"{where}: [{section}.{name}]")
            for name, cls in types.items()
        }
        fates: list[tuple[str, str, str, str, Any]] = []
        for name, cls in types.items():
            plugin = plugins[name]
            if name in disable:
                fates.append((name, "disabled", "disabled by configuration", plugin, None))
                continue
            # Only `enable` starts one that does not detect its hardware (the mock): its options
            # table alone, as in `capmon agent config`'s output, must never put fake devices in a fleet.
            if not cls.auto and name not in enable:
                fates.append((name, "disabled", f"runs only when named in {section}.enable", plugin, None))
                continue
            made = None
            try:
                made = cls(configs[name], **boundaries.get(name, {}))
                made.setup()
            except ProbeUnavailable as exc:
                fates.append((name, "skipped", str(exc) or "unavailable", plugin, None))
                if close_failed:
                    _close(made)
                continue
            except Exception as exc:
                fates.append((name, "failed", f"{type(exc).__name__}: {exc}", plugin, None))
                if close_failed:
                    _close(made)
                continue
            fates.append((name, "active", "", plugin, made))
        for name, error in load_errors.items():
            fates.append((name, "failed", error, name, None))
        return fates


def _close(source: AllocationSource | None) -> None:
    """A source is closed after a failed setup too (its contract says so); close() must not raise."""
    if source is None:
        return
    try:
        source.close()
    except Exception:
        log.exception("allocation source %s: close() failed", source.name)


def unknown_plugin(where: str, kind: str, name: str, known: Iterable[str]) -> ConfigError:
    """A configuration error like every other (`capmon: configuration error: <file>: …`), with the
    closest known name: `enable = ["mokc"]` is a typo of "mock" far more often than a missing plugin."""
    names = sorted(known)
    close = difflib.get_close_matches(name, names, n=1)
    guess = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown {kind} {name!r}{guess} (known: {', '.join(names) or 'none'})")
