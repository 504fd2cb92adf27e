"""The live fleet view: the latest window of every device this collector has heard from, in memory.

Per agent it keeps the last `seq` of the current spool `instance` (a report at or below it is a replay
and leaves the view alone; a new instance starts over), the latest window's devices, and the seconds
its devices spent in each state since the collector started (per model; windows that ended before
it started are left out). An agent silent for more
than `stale_windows` of its own windows shows all its devices `unavailable`; one silent for more than
`forget_after_s` leaves the view (filtered at read time, removed by a sweep that `apply` runs at most
once a minute), so decommissioned hosts go away and the view's memory stays bounded.

Memory matters at 100,000 devices: per-device state is a `__slots__` object whose repeated strings
(vendor, model, host, labels) are interned, so thousands of devices share one copy.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from capmon.agent.wire import IDLE_STATES, STATES, Batch

from .config import PricingConfig

_STATE_INDEX = {s: i for i, s in enumerate(STATES)}
_UNAVAILABLE = _STATE_INDEX["unavailable"]
_IDLE_INDEXES = frozenset(_STATE_INDEX[s] for s in IDLE_STATES)
UNKNOWN_MODEL = "unknown"
NO_LABEL = "(none)"
# Seconds between sweeps of forgotten agents (fewer when forget_after_s is shorter).
SWEEP_INTERVAL_S = 60.0

log = logging.getLogger("capmon.collector.fleet")


def _intern(value: str | None) -> str | None:
    return None if value is None else sys.intern(value)


class Pricing:
    """Value of one device-hour by model: exact key, else the longest key contained in the model name."""

    def __init__(self, cfg: PricingConfig) -> None:
        self.currency = cfg.currency
        self.default = cfg.default
        self._models = dict(cfg.models)
        self._lower = sorted(((k.lower(), v) for k, v in self._models.items()), key=lambda kv: -len(kv[0]))
        self._cache: dict[str | None, float] = {}

    def price(self, model: str | None) -> float:
        cached = self._cache.get(model)
        if cached is not None:
            return cached
        value = self.default
        if model is not None:
            if model in self._models:
                value = self._models[model]
            else:
                low = model.lower()
                for key, price in self._lower:
                    if key in low:
                        value = price
                        break
        if len(self._cache) < 100_000:
            self._cache[model] = value
        return value


class DeviceState:
    __slots__ = (
        "device_id",
        "end",
        "idle_since",
        "memory_total_bytes",
        "memory_used_bytes",
        "model",
        "parent_id",
        "power_mean_w",
        "state",
        "temp_max_c",
        "util_max_pct",
        "util_mean_pct",
        "vendor",
    )

    def __init__(self, d: Any, end: int) -> None:
        self.device_id: str = d.device_id
        self.update(d, end)

    def update(self, d: Any, end: int) -> None:
        self.vendor: str = sys.intern(d.vendor)
        self.model: str | None = _intern(d.model)
        self.parent_id: str | None = d.parent_id
        self.state: int = _STATE_INDEX[d.state]
        self.idle_since: int | None = d.idle_since
        self.util_mean_pct: float | None = d.util_mean_pct
        self.util_max_pct: float | None = d.util_max_pct
        self.memory_used_bytes: int | None = d.memory_used_bytes
        self.memory_total_bytes: int | None = d.memory_total_bytes
        self.power_mean_w: float | None = d.power_mean_w
        self.temp_max_c: float | None = d.temp_max_c
        self.end: int = end


class AgentState:
    __slots__ = (
        "devices",
        "host",
        "id",
        "instance",
        "labels",
        "last_end",
        "last_seen",
        "last_seq",
        "seconds",
        "window_s",
    )

    def __init__(self, agent_id: str) -> None:
        self.id = sys.intern(agent_id)
        self.host = ""
        self.instance: str | None = None
        self.labels: tuple[str | None, ...] = ()
        self.last_seq = 0
        self.last_end = 0
        self.last_seen = 0.0
        self.window_s = 60.0
        self.devices: dict[str, DeviceState] = {}
        # model → seconds in each state (STATES order) since the collector started.
        self.seconds: dict[str, list[float]] = {}


class _Tally:
    __slots__ = ("devices", "idle_value_per_hour", "seconds", "states")

    def __init__(self) -> None:
        self.devices = 0
        self.states = [0, 0, 0, 0]
        self.idle_value_per_hour = 0.0
        self.seconds = [0.0, 0.0, 0.0, 0.0]

    def as_dict(self) -> dict[str, Any]:
        idle_s = sum(self.seconds[i] for i in _IDLE_INDEXES)
        return {
            "devices": self.devices,
            "states": dict(zip(STATES, self.states, strict=True)),
            "idle": sum(self.states[i] for i in _IDLE_INDEXES),
            "idle_value_per_hour": round(self.idle_value_per_hour, 6),
            "idle_device_hours": round(idle_s / 3600, 6),
            "device_hours": {s: round(v / 3600, 6) for s, v in zip(STATES, self.seconds, strict=True)},
        }


class FleetView:
    def __init__(
        self,
        label_keys: tuple[str, ...],
        pricing: Pricing,
        stale_windows: float = 3.0,
        clock: Callable[[], float] = time.time,
        forget_after_s: float = 86400.0,
        on_forget: Callable[[int], object] | None = None,
    ) -> None:
        self.label_keys = label_keys
        self.pricing = pricing
        self.stale_windows = stale_windows
        self.clock = clock
        self.started_at = clock()
        self.agents: dict[str, AgentState] = {}
        self.forget_after_s = forget_after_s
        self.on_forget = on_forget
        self._sweep_interval = min(SWEEP_INTERVAL_S, forget_after_s)
        self._next_sweep = self.started_at + self._sweep_interval
        self.sweeps = 0

    def apply(self, batch: Batch) -> tuple[int, int]:
        """Fold a validated batch into the view; returns (reports applied, reports already seen)."""
        ident = batch.agent
        agent = self.agents.get(ident.id)
        if agent is None:
            agent = self.agents[ident.id] = AgentState(ident.id)
        if ident.instance != agent.instance:
            agent.instance = _intern(ident.instance)
            agent.last_seq = 0
        if agent.host != ident.host:
            agent.host = sys.intern(ident.host)
        labels = tuple(_intern(ident.labels.get(k) or None) for k in self.label_keys)
        if labels != agent.labels:
            agent.labels = labels
        now = agent.last_seen = self.clock()
        applied = seen = 0
        for report in sorted(batch.reports, key=lambda r: r.seq):
            if report.seq <= agent.last_seq:
                seen += 1
                continue
            applied += 1
            agent.last_seq = report.seq
            seconds = agent.seconds
            # Since-start totals: a window that ended before this collector started (catch-up from
            # an agent's spool) is not "since this collector started"; it is in storage.
            for d in report.devices if report.end >= self.started_at else ():
                acc = seconds.get(d.model or UNKNOWN_MODEL)
                if acc is None:
                    acc = seconds[sys.intern(d.model or UNKNOWN_MODEL)] = [0.0, 0.0, 0.0, 0.0]
                acc[0] += d.busy_s
                acc[1] += d.allocated_idle_s
                acc[2] += d.free_s
                acc[3] += d.unavailable_s
            if report.end >= agent.last_end:
                agent.last_end = report.end
                agent.window_s = float(max(1, report.end - report.start))
                old = agent.devices
                agent.devices = {}
                for d in report.devices:
                    dev = old.get(d.device_id)
                    if dev is None:
                        dev = DeviceState(d, report.end)
                    else:
                        dev.update(d, report.end)
                    agent.devices[dev.device_id] = dev
        if now >= self._next_sweep:  # after last_seen moved: the sender itself is never swept
            self._sweep(now)
        return applied, seen

    def _sweep(self, now: float) -> None:
        """Drop agents silent for more than `forget_after_s` (the read paths already hide them)."""
        self._next_sweep = now + self._sweep_interval
        self.sweeps += 1
        gone = [a.id for a in self.agents.values() if self.is_forgotten(a, now)]
        for agent_id in gone:
            del self.agents[agent_id]
        if gone:
            log.info(
                "forgot %d agent(s) silent for more than %gs: %s%s",
                len(gone),
                self.forget_after_s,
                ", ".join(gone[:10]),
                ", …" if len(gone) > 10 else "",
            )
            if self.on_forget is not None:
                self.on_forget(len(gone))

    def is_stale(self, agent: AgentState, now: float) -> bool:
        return now - agent.last_seen > self.stale_windows * agent.window_s

    def is_forgotten(self, agent: AgentState, now: float) -> bool:
        return now - agent.last_seen > self.forget_after_s

    def live_agents(self, now: float | None = None) -> list[AgentState]:
        """Agents in the view: those not yet forgotten (a sweep may not have run yet)."""
        now = self.clock() if now is None else now
        return [a for a in self.agents.values() if not self.is_forgotten(a, now)]

    @property
    def agent_count(self) -> int:
        return len(self.live_agents())

    @property
    def device_count(self) -> int:
        return sum(len(a.devices) for a in self.live_agents())

    def stale_agents(self) -> int:
        now = self.clock()
        return sum(1 for a in self.live_agents(now) if self.is_stale(a, now))

    def summary(self) -> dict[str, Any]:
        """`GET /api/v1/fleet`: device counts by state, idle value per hour, idle device-hours; by model and label."""
        now = self.clock()
        total = _Tally()
        by_model: dict[str, _Tally] = {}
        by_label: list[dict[str, _Tally]] = [{} for _ in self.label_keys]
        stale = 0
        agents = self.live_agents(now)
        for agent in agents:
            is_stale = self.is_stale(agent, now)
            stale += is_stale
            label_tallies = [
                per_key.setdefault(value or NO_LABEL, _Tally())
                for per_key, value in zip(
                    by_label, agent.labels or (None,) * len(self.label_keys), strict=True
                )
            ]
            for dev in agent.devices.values():
                state = _UNAVAILABLE if is_stale else dev.state
                model = dev.model or UNKNOWN_MODEL
                value = self.pricing.price(dev.model) if state in _IDLE_INDEXES else 0.0
                model_tally = by_model.get(model)
                if model_tally is None:
                    model_tally = by_model[model] = _Tally()
                for t in (total, model_tally, *label_tallies):
                    t.devices += 1
                    t.states[state] += 1
                    t.idle_value_per_hour += value
            for model, secs in agent.seconds.items():
                model_tally = by_model.get(model)
                if model_tally is None:
                    model_tally = by_model[model] = _Tally()
                for t in (total, model_tally, *label_tallies):
                    for i in range(4):
                        t.seconds[i] += secs[i]
        return {
            "generated_at": now,
            "since": self.started_at,
            "currency": self.pricing.currency,
            "agents": {"total": len(agents), "stale": stale},
            "totals": total.as_dict(),
            "by_model": {m: t.as_dict() for m, t in sorted(by_model.items())},
            "by_label": {
                key: {v: t.as_dict() for v, t in sorted(per_key.items())}
                for key, per_key in zip(self.label_keys, by_label, strict=True)
            },
        }

    def devices(
        self,
        states: frozenset[str] | None = frozenset({"free"}),
        min_idle_s: float = 0.0,
        filters: Mapping[str, str] | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """`GET /api/v1/devices`: matching devices, longest idle first."""
        now = self.clock()
        filters = dict(filters or {})
        want_model = filters.pop("model", None)
        want_vendor = filters.pop("vendor", None)
        want_host = filters.pop("host", None)
        want_agent = filters.pop("agent", None)
        label_filters = [(self.label_keys.index(k), v) for k, v in filters.items()]
        state_idx = None if states is None else frozenset(_STATE_INDEX[s] for s in states)
        found: list[tuple[float, AgentState, DeviceState, int]] = []
        for agent in self._agents(want_agent, now):
            if want_host is not None and agent.host != want_host:
                continue
            if any((agent.labels[i] if agent.labels else None) != v for i, v in label_filters):
                continue
            is_stale = self.is_stale(agent, now)
            for dev in agent.devices.values():
                state = _UNAVAILABLE if is_stale else dev.state
                if state_idx is not None and state not in state_idx:
                    continue
                if want_model is not None and dev.model != want_model:
                    continue
                if want_vendor is not None and dev.vendor != want_vendor:
                    continue
                idle_for = (
                    max(0.0, now - dev.idle_since)
                    if state in _IDLE_INDEXES and dev.idle_since is not None
                    else -1.0
                )
                if min_idle_s > 0 and idle_for < min_idle_s:
                    continue
                found.append((idle_for, agent, dev, state))
        found.sort(key=lambda f: (-f[0], f[1].id, f[2].device_id))
        return [
            self._device_dict(agent, dev, state, idle_for) for idle_for, agent, dev, state in found[:limit]
        ]

    def _agents(self, agent_id: str | None, now: float) -> Iterable[AgentState]:
        if agent_id is None:
            return self.live_agents(now)
        agent = self.agents.get(agent_id)
        return [agent] if agent is not None and not self.is_forgotten(agent, now) else []

    def _device_dict(
        self, agent: AgentState, dev: DeviceState, state: int, idle_for: float
    ) -> dict[str, Any]:
        return {
            "host": agent.host,
            "agent": agent.id,
            "device_id": dev.device_id,
            "vendor": dev.vendor,
            "model": dev.model,
            "parent_id": dev.parent_id,
            "state": STATES[state],
            "reported_state": STATES[dev.state],
            "idle_since": dev.idle_since if state in _IDLE_INDEXES else None,
            "idle_for_s": round(idle_for, 3) if idle_for >= 0 else None,
            "labels": {k: v for k, v in zip(self.label_keys, agent.labels, strict=False) if v is not None},
            "util_mean_pct": dev.util_mean_pct,
            "util_max_pct": dev.util_max_pct,
            "memory_used_bytes": dev.memory_used_bytes,
            "memory_total_bytes": dev.memory_total_bytes,
            "power_mean_w": dev.power_mean_w,
            "temp_max_c": dev.temp_max_c,
            "value_per_hour": self.pricing.price(dev.model),
            "window_end": dev.end,
            "stale": self.is_stale(agent, now=self.clock()),
        }
