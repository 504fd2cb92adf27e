"""The live fleet view: the latest window of every device this collector has heard from, in memory.

Per agent it keeps the end of the latest window applied: a report whose window ends at or before it is
a replay (or late) and leaves the view and the totals alone, whatever its `seq` or spool `instance`, so
each (agent, device, window end) counts once and a device's view only moves forward in time. It keeps
the latest window's devices, and the seconds its devices spent in each state since the collector
started (per model, at most `MAX_MODELS_PER_AGENT` models, the rest folded into "(other)"; windows that
ended before it started are left out). An agent silent for more than `stale_windows` of its configured
windows (`AgentIdentity.window_s`; from older agents the longest window seen) shows all its devices
`unavailable`; one silent for more than `forget_after_s` leaves the view (filtered at read time, removed
by a sweep that runs at most once a minute), so decommissioned hosts go away and memory stays bounded.

A device its agent stops listing is `unavailable` ("no longer reported") until it is known to be gone:
its parent GPU is listed with a different MIG layout (other instances, or the parent as a whole device),
a whole GPU is now split into instances, or it has been missing longer than `forget_after_s`.

MIG instances count as their fraction of the GPU (`DeviceWindow.fraction`): `gpu_equivalents`,
`gpu_hours` and the idle value are GPU-equivalents; `states`, `devices` and `device_hours` count every
device as one.

Idle energy (issue 16): `idle_power_w` is the power now (each device's latest window's mean) of the
devices shown idle now; `idle_energy_kwh` the energy the windows counted since the collector started
spent idle (`DeviceWindow.idle_energy_j`), and `idle_energy_cost` that priced at
`[pricing] energy_price_per_kwh` times `pue`. None where nothing reported power or energy, and the cost
None where energy is not priced: unknown is never shown as 0.

Refusals (reports the collector answered 4xx/5xx) are recorded per agent, even for an agent that never
delivered a valid report, so an agent whose clock is off is visible in `GET /api/v1/agents`.

Who holds each device (`DeviceWindow.holders`, the latest window's) is kept with it, and `holders()`
groups the devices held now by user, namespace, pod, Slurm job or container: the reclaim candidates,
most wasteful first. A device's value and its allocated-idle seconds are split evenly over the parties
holding it (`holder_shares`: a pod's allocation and the processes in that pod are one, as are a Slurm
job's records), so the holders' shares sum to the fleet's; a record without the grouping's key (a
pod's allocation has no user) takes the key of its party's other records. Since-start allocated-idle
seconds are kept per agent per holder key, at most `MAX_HOLDER_KEYS_PER_AGENT` per grouping, the least
recently active folded into "(other)" and counted.

Memory matters at 100,000 devices: per-device state is a `__slots__` object whose repeated strings
(vendor, model, host, labels) are interned, so thousands of devices share one copy. Memory is bounded
fleet-wide, not only per agent (agent ids are bounded only by a token's pattern): at most
`MAX_VIEW_AGENTS` agents, `MAX_VIEW_DEVICES` devices and `MAX_VIEW_HOLDERS` holder records. A report
that would pass one is stored all the same but kept out of the view: its agent (if it was in the view)
leaves it, and `GET /api/v1/agents` lists it with `live_view` saying why, until a later report fits
again. A device no longer reported keeps no holders.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from capmon.agent.wire import (
    IDLE_STATES,
    MAX_DEVICES_PER_REPORT,
    MAX_ID_LEN,
    MAX_KEY_LEN,
    MAX_NAME_LEN,
    MAX_TEXT_LEN,
    STATES,
    Batch,
    DeviceWindow,
    HolderWindow,
    Report,
)

from .config import PricingConfig
from .shares import holder_shares
from .shares import party as _party

_STATE_INDEX = {s: i for i, s in enumerate(STATES)}
_UNAVAILABLE = _STATE_INDEX["unavailable"]
_IDLE_INDEXES = frozenset(_STATE_INDEX[s] for s in IDLE_STATES)
_ALLOCATED_IDLE = _STATE_INDEX["allocated_idle"]
_HELD_STATES = frozenset({_ALLOCATED_IDLE, _STATE_INDEX["busy"]})
UNKNOWN_MODEL = "unknown"
NO_LABEL = "(none)"
# Where what is beyond a bound goes: breakdown keys, per-agent models, refusal reasons.
OTHER = "(other)"
NO_LONGER_REPORTED = "no longer reported"
AGENT_SILENT = "agent silent"
# Seconds between sweeps of forgotten agents (fewer when forget_after_s is shorter).
SWEEP_INTERVAL_S = 60.0
# The agent's default window: the length assumed for an older agent (no `window_s` in its identity)
# until it has sent a second window, since its first may be a short partial one.
DEFAULT_WINDOW_S = 60.0
# Bounds on what agents' strings can grow (issue 11 item 12): since-start totals by model per agent,
# keys of each breakdown in `summary()`, refusal reasons per agent, agents known only by refusals,
# devices an agent stopped listing.
MAX_MODELS_PER_AGENT = 64
MAX_BREAKDOWN_KEYS = 100
MAX_REFUSAL_REASONS = 16
MAX_REFUSED_ONLY_AGENTS = 1000
MAX_MISSING_DEVICES = MAX_DEVICES_PER_REPORT
MAX_PRICE_CACHE = 4096
# Since-start allocated-idle seconds per holder key, per agent and grouping (pods come and go: the
# least recently active keys fold into "(other)"); devices listed per holder in `holders()`.
MAX_HOLDER_KEYS_PER_AGENT = 256
MAX_HELD_LISTED = 50
# Fleet-wide bounds on what the view keeps (agent ids are bounded only by a token's pattern, so one
# token could otherwise fill the collector's memory): agents, devices (listed and "no longer
# reported"), and holder records of the latest windows. A report that would take the view beyond one
# is stored but kept out of the live view (`KEPT_OUT`), its agent listed as such; at most
# MAX_KEPT_OUT_AGENTS of those are remembered, the least recently seen dropped first.
MAX_VIEW_AGENTS = 50_000
MAX_VIEW_DEVICES = 100_000
MAX_VIEW_HOLDERS = 500_000
MAX_KEPT_OUT_AGENTS = 1000
KEPT_OUT = "not in the live view: fleet bound"

log = logging.getLogger("capmon.collector.fleet")
# A model's seconds where a view keeps none (`count_totals=False`): shared, never added to.
_NO_SECONDS = (0.0,) * 8


def _intern(value: str | None) -> str | None:
    return None if value is None else sys.intern(value)


class Pricing:
    """Value of one device-hour by model: exact key, else the longest key contained in the model name.

    A MIG instance is worth its fraction of its model's price, unless a price is set for its profile
    (`"1g.10gb"`, or `"H100 1g.10gb"` for one model only).
    """

    def __init__(self, cfg: PricingConfig) -> None:
        self.currency = cfg.currency
        self.default = cfg.default
        # What one joule a device spent costs the site (kWh price x PUE), None: energy not priced.
        self.cost_per_joule: float | None = (
            cfg.energy_price_per_kwh * cfg.pue / 3.6e6 if cfg.energy_price_per_kwh > 0 else None
        )
        self._models = dict(cfg.models)
        self._lower = sorted(((k.lower(), v) for k, v in self._models.items()), key=lambda kv: -len(kv[0]))
        self._cache: dict[str | None, float] = {}
        self._profile_cache: dict[tuple[str | None, str], float | None] = {}

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
        # Bounded: a hostile agent's unique model names are priced, not remembered.
        if len(self._cache) < MAX_PRICE_CACHE:
            self._cache[model] = value
        return value

    def profile_price(self, model: str | None, profile: str) -> float | None:
        """The price set for a MIG profile: `"<profile>"`, or `"<model part> <profile>"` matching the model."""
        key = (model, profile)
        if key in self._profile_cache:
            return self._profile_cache[key]
        found: float | None = None
        want = profile.lower()
        low_model = (model or "").lower()
        for k, price in self._lower:  # longest first
            if not k.endswith(want):
                continue
            prefix = k[: -len(want)]
            if prefix == "" or (prefix.endswith(" ") and prefix.strip() and prefix.strip() in low_model):
                found = price
                break
        if len(self._profile_cache) < MAX_PRICE_CACHE:
            self._profile_cache[key] = found
        return found

    def for_device(self, d: DeviceWindow) -> float:
        """Value of one device-hour of this device: its MIG profile's price, else model price × fraction."""
        profile = d.info.get("mig_profile") if d.info else None
        if profile:
            price = self.profile_price(d.model, profile)
            if price is not None:
                return price
        return self.price(d.model) * (d.fraction or 1.0)

    def energy_cost(self, joules: float | None) -> float | None:
        """What `joules` of device energy cost with the site's PUE on top; None when not priced or unknown."""
        if joules is None or self.cost_per_joule is None:
            return None
        return joules * self.cost_per_joule


class DeviceState:
    __slots__ = (
        "device_id",
        "end",
        "error",
        "fraction",
        "holders",
        "holders_omitted",
        "idle_energy_j",
        "idle_since",
        "memory_total_bytes",
        "memory_used_bytes",
        "missing",
        "model",
        "parent_id",
        "power_mean_w",
        "reason",
        "state",
        "state_since",
        "temp_max_c",
        "util_max_pct",
        "util_mean_pct",
        "value_per_hour",
        "vendor",
    )

    def __init__(self, d: DeviceWindow, end: int, value_per_hour: float = 0.0) -> None:
        self.device_id: str = d.device_id
        # Idle energy of the windows counted since the collector started; None: none reported any.
        self.idle_energy_j: float | None = None
        self.update(d, end, value_per_hour)

    def update(self, d: DeviceWindow, end: int, value_per_hour: float = 0.0) -> None:
        self.vendor: str = sys.intern(d.vendor)
        self.model: str | None = _intern(d.model)
        self.parent_id: str | None = d.parent_id
        self.state: int = _STATE_INDEX[d.state]
        self.idle_since: int | None = d.idle_since
        self.state_since: int | None = d.state_since
        self.util_mean_pct: float | None = d.util_mean_pct
        self.util_max_pct: float | None = d.util_max_pct
        self.memory_used_bytes: int | None = d.memory_used_bytes
        self.memory_total_bytes: int | None = d.memory_total_bytes
        self.power_mean_w: float | None = d.power_mean_w
        self.temp_max_c: float | None = d.temp_max_c
        self.fraction: float | None = d.fraction
        self.value_per_hour: float = value_per_hour
        # Repeated across a fleet ("simulated XID 79: fallen off the bus"): one copy.
        self.error: str | None = _intern(d.error)
        self.reason: str | None = _intern(d.reason)
        # The latest window's holders; None: the probe cannot tell who holds it. Their names repeat
        # across devices and windows (a user on eight GPUs, `python3`): one copy each.
        for h in d.holders or ():
            h.user = _intern(h.user)
            h.command = _intern(h.command)
            h.namespace = _intern(h.namespace)
            h.runtime = _intern(h.runtime)
        self.holders: Sequence[HolderWindow] | None = d.holders
        self.holders_omitted: int = d.holders_omitted
        self.missing: bool = False
        self.end: int = end

    @property
    def share(self) -> float:
        return self.fraction or 1.0


class AgentState:
    __slots__ = (
        "devices",
        "folded_models",
        "held",
        "held_folded",
        "holder_count",
        "host",
        "id",
        "idle_energy",
        "instance",
        "labels",
        "last_end",
        "last_refused_at",
        "last_seen",
        "longest_window",
        "refusals",
        "reports",
        "seconds",
        "version",
        "window_s",
    )

    def __init__(self, agent_id: str) -> None:
        self.id = sys.intern(agent_id)
        self.host = ""
        self.instance: str | None = None
        self.version = ""
        self.labels: tuple[str | None, ...] = ()
        self.last_end = 0
        self.last_seen = 0.0
        self.last_refused_at = 0.0
        self.reports = 0
        self.longest_window = 0
        self.window_s = DEFAULT_WINDOW_S
        self.devices: dict[str, DeviceState] = {}
        # Holder records its devices keep (the fleet-wide bound counts them).
        self.holder_count = 0
        # model → seconds in each state (STATES order), then the same in GPU-equivalents, since the
        # collector started.
        self.seconds: dict[str, Sequence[float]] = {}
        # model → idle energy (J) since the collector started, of the windows that reported one.
        self.idle_energy: dict[str, float] = {}
        self.folded_models = 0
        # grouping (`HOLDER_KEYS`) → holder key (None: not known) → model → [allocated-idle seconds,
        # the same in GPU-equivalents] since the collector started; least recently active first.
        self.held: dict[str, OrderedDict[str | None, dict[str, list[float]]]] | None = None
        self.held_folded: dict[str, int] | None = None
        self.refusals: dict[str, list[Any]] | None = None


def _record_refusal(refusals: dict[str, list[Any]], reason: str, detail: str, now: float) -> None:
    reason = reason[:MAX_KEY_LEN]
    rec = refusals.get(reason)
    if rec is None:
        if len(refusals) >= MAX_REFUSAL_REASONS - 1 and reason != OTHER:
            reason = OTHER
            rec = refusals.get(reason)
        if rec is None:
            rec = refusals[sys.intern(reason)] = [0, "", 0.0]
    rec[0] += 1
    rec[1] = detail[:MAX_TEXT_LEN]
    rec[2] = now


def _refusals_dict(refusals: dict[str, list[Any]] | None) -> dict[str, dict[str, Any]]:
    if not refusals:
        return {}
    return {
        reason: {"count": count, "last_detail": detail, "last_at": at}
        for reason, (count, detail, at) in sorted(refusals.items())
    }


def _pod(h: HolderWindow) -> str | None:
    if h.pod:
        return f"{h.namespace}/{h.pod}" if h.namespace else h.pod
    return h.pod_uid


def _container(h: HolderWindow) -> str | None:
    if h.container and (h.pod or h.pod_uid):
        return f"{_pod(h)}/{h.container}"
    return h.container_id or h.container


# `GET /api/v1/holders?by=…`: what a holder is, per grouping. Pods by namespace/name (else their
# UID), containers by pod/name (else their runtime id).
HOLDER_KEYS: dict[str, Callable[[HolderWindow], str | None]] = {
    "user": lambda h: h.user,
    "namespace": lambda h: h.namespace,
    "pod": _pod,
    "job": lambda h: h.slurm_job_id,
    "container": _container,
}


def _shares(holders: Sequence[HolderWindow] | None, key_of: Callable[[HolderWindow], str | None]):
    """Holder key → (share of the device, its holders), by `holder_shares`; a device held by nobody
    known is all None's. A record without the key (a pod's allocation has no user) takes its party's
    key when the party's other records agree on one."""
    if not holders:
        return {None: (1.0, [])}
    known: dict[tuple[str, str | int | None], set[str]] = {}
    for h in holders:
        key = key_of(h)
        if key is not None:
            known.setdefault(_party(h), set()).add(key)
    out: dict[str | None, tuple[float, list[HolderWindow]]] = {}
    for h, share in zip(holders, holder_shares(holders), strict=True):
        key = key_of(h)
        if key is None:
            party_keys = known.get(_party(h))
            if party_keys is not None and len(party_keys) == 1:
                (key,) = party_keys
        total, hs = out.get(key, (0.0, []))
        hs.append(h)
        out[key] = (total + share, hs)
    return out


def _count_held(agent: AgentState, d: DeviceWindow, model: str, fraction: float) -> None:
    if agent.held is None:
        agent.held = {by: OrderedDict() for by in HOLDER_KEYS}
        agent.held_folded = dict.fromkeys(HOLDER_KEYS, 0)
    seconds = d.allocated_idle_s
    for by, key_of in HOLDER_KEYS.items():
        keys = agent.held[by]
        for key, (share, _) in _shares(d.holders, key_of).items():
            per_model = keys.get(key)
            if per_model is None:
                if len(keys) >= MAX_HOLDER_KEYS_PER_AGENT:
                    _fold_oldest(agent, by, keys)
                per_model = keys[key] = {}
            else:
                keys.move_to_end(key)
            acc = per_model.get(model)
            if acc is None:
                acc = per_model[model] = [0.0, 0.0]
            acc[0] += seconds * share
            acc[1] += seconds * share * fraction


def _fold_oldest(agent: AgentState, by: str, keys: OrderedDict[str | None, dict[str, list[float]]]) -> None:
    """Make room for a new key (and "(other)"): the least recently active keys' seconds go to
    "(other)", so nothing is lost, only who it was."""
    other = keys.pop(OTHER, None) or {}
    while len(keys) >= MAX_HOLDER_KEYS_PER_AGENT - 1:
        _, per_model = keys.popitem(last=False)
        for model, (s, gs) in per_model.items():
            acc = other.setdefault(model, [0.0, 0.0])
            acc[0] += s
            acc[1] += gs
        if agent.held_folded is not None:
            agent.held_folded[by] += 1
    keys[OTHER] = other
    keys.move_to_end(OTHER, last=False)  # "(other)" is never the one folded


def holder_dict(h: HolderWindow) -> dict[str, Any]:
    """A holder as the API shows it: every field, None where not known."""
    return {
        "source": h.source,
        "pid": h.pid,
        "user": h.user,
        "uid": h.uid,
        "command": h.command,
        "runtime": h.runtime,
        "container_id": h.container_id,
        "pod_uid": h.pod_uid,
        "namespace": h.namespace,
        "pod": h.pod,
        "container": h.container,
        "slurm_job_id": h.slurm_job_id,
        "partition": h.partition,
        "memory_bytes": h.memory_bytes,
        "held_s": h.held_s,
        "since": h.since,
    }


class _KeptOut:
    """An agent the fleet-wide bound keeps out of the view: what `GET /api/v1/agents` says of it."""

    __slots__ = ("bound", "devices", "host", "last_seen", "reports")

    def __init__(self) -> None:
        self.host = ""
        self.last_seen = 0.0
        self.reports = 0
        self.devices = 0
        self.bound = ""


class _HolderTally:
    __slots__ = (
        "alloc_idle_value",
        "devices",
        "gpu",
        "gpu_seconds",
        "held",
        "longest",
        "seconds",
        "states",
        "value",
    )

    def __init__(self) -> None:
        self.devices = 0
        self.gpu = 0.0
        self.states = [0, 0, 0, 0]
        self.value = 0.0
        self.alloc_idle_value = 0.0
        self.longest = -1.0
        self.seconds = 0.0
        self.gpu_seconds = 0.0
        self.held: list[tuple[Any, ...]] = []


class _Tally:
    __slots__ = (
        "devices",
        "gpu",
        "gpu_seconds",
        "idle_energy_j",
        "idle_power_w",
        "idle_value_per_hour",
        "seconds",
        "states",
    )

    def __init__(self) -> None:
        self.devices = 0
        self.states = [0, 0, 0, 0]
        self.gpu = [0.0, 0.0, 0.0, 0.0]
        self.idle_value_per_hour = 0.0
        self.seconds = [0.0, 0.0, 0.0, 0.0]
        self.gpu_seconds = [0.0, 0.0, 0.0, 0.0]
        # None until a device reports power (now) or idle energy (since start).
        self.idle_power_w: float | None = None
        self.idle_energy_j: float | None = None

    def add_power(self, watts: float | None, idle: bool) -> None:
        if watts is not None:
            self.idle_power_w = (self.idle_power_w or 0.0) + (watts if idle else 0.0)

    def add_energy(self, joules: float | None) -> None:
        if joules is not None:
            self.idle_energy_j = (self.idle_energy_j or 0.0) + joules

    def add(self, other: _Tally) -> None:
        self.devices += other.devices
        self.idle_value_per_hour += other.idle_value_per_hour
        if other.idle_power_w is not None:
            self.idle_power_w = (self.idle_power_w or 0.0) + other.idle_power_w
        self.add_energy(other.idle_energy_j)
        for i in range(4):
            self.states[i] += other.states[i]
            self.gpu[i] += other.gpu[i]
            self.seconds[i] += other.seconds[i]
            self.gpu_seconds[i] += other.gpu_seconds[i]

    def weight(self) -> tuple[int, float]:
        return self.devices, sum(self.seconds)

    def packed(self) -> list[Any]:
        """The device counts of a tally (what `device_tallies` fills) as a list, for the published view."""
        return [self.devices, *self.states, *self.gpu, self.idle_value_per_hour, self.idle_power_w]

    @classmethod
    def unpacked(cls, values: Sequence[Any]) -> _Tally:
        t = cls()
        t.devices = int(values[0])
        t.states = [int(v) for v in values[1:5]]
        t.gpu = [float(v) for v in values[5:9]]
        t.idle_value_per_hour = float(values[9])
        t.idle_power_w = None if values[10] is None else float(values[10])
        return t

    def as_unavailable(self) -> _Tally:
        """The same devices as an agent gone silent shows them: all unavailable, nothing idle."""
        t = _Tally()
        t.devices = self.devices
        t.states[_UNAVAILABLE] = self.devices
        t.gpu[_UNAVAILABLE] = sum(self.gpu)
        t.idle_power_w = None if self.idle_power_w is None else 0.0
        return t

    def as_dict(self, pricing: Pricing | None = None) -> dict[str, Any]:
        idle_s = sum(self.seconds[i] for i in _IDLE_INDEXES)
        energy = self.idle_energy_j
        cost = pricing.energy_cost(energy) if pricing is not None else None
        idle_gpu_s = sum(self.gpu_seconds[i] for i in _IDLE_INDEXES)
        return {
            "devices": self.devices,
            "states": dict(zip(STATES, self.states, strict=True)),
            "idle": sum(self.states[i] for i in _IDLE_INDEXES),
            "gpu_equivalents": {s: round(v, 6) for s, v in zip(STATES, self.gpu, strict=True)},
            "idle_gpu_equivalents": round(sum(self.gpu[i] for i in _IDLE_INDEXES), 6),
            "idle_value_per_hour": round(self.idle_value_per_hour, 6),
            "idle_device_hours": round(idle_s / 3600, 6),
            "device_hours": {s: round(v / 3600, 6) for s, v in zip(STATES, self.seconds, strict=True)},
            "idle_gpu_hours": round(idle_gpu_s / 3600, 6),
            "gpu_hours": {s: round(v / 3600, 6) for s, v in zip(STATES, self.gpu_seconds, strict=True)},
            "idle_power_w": None if self.idle_power_w is None else round(self.idle_power_w, 3),
            "idle_energy_kwh": None if energy is None else round(energy / 3.6e6, 6),
            "idle_energy_cost": None if cost is None else round(cost, 6),
        }


def _capped(
    tallies: dict[str, _Tally], pricing: Pricing | None = None
) -> tuple[dict[str, dict[str, Any]], int]:
    """At most MAX_BREAKDOWN_KEYS keys, the largest; the rest folded into "(other)". Returns (dict, folded)."""
    if len(tallies) <= MAX_BREAKDOWN_KEYS:
        return {k: t.as_dict(pricing) for k, t in sorted(tallies.items())}, 0
    ranked = sorted(tallies.items(), key=lambda kv: (-kv[1].devices, -sum(kv[1].seconds), kv[0]))
    kept = dict(ranked[: MAX_BREAKDOWN_KEYS - 1])
    other = kept.pop(OTHER, None) or _Tally()
    folded = 0
    for key, t in ranked[MAX_BREAKDOWN_KEYS - 1 :]:
        other.add(t)
        folded += key != OTHER
    kept[OTHER] = other
    return {k: t.as_dict(pricing) for k, t in sorted(kept.items())}, folded


def agent_rows(
    live: Iterable[tuple[AgentState, bool, int]],
    refused_only: Iterable[AgentState],
    kept_out: Iterable[tuple[str, _KeptOut]],
) -> list[dict[str, Any]]:
    """`GET /api/v1/agents` rows: (agent, stale, devices) of the agents in the view, the agents known
    only by their refusals, and those the fleet-wide bound keeps out; by id."""
    out = []
    rows: dict[str, dict[str, Any]] = {}
    for agent, stale, devices in live:
        out.append(
            {
                "id": agent.id,
                "host": agent.host,
                "instance": agent.instance,
                "version": agent.version,
                "window_s": agent.window_s,
                "last_report_end": agent.last_end or None,
                "last_seen": agent.last_seen,
                "stale": stale,
                "devices": devices,
                "models_folded": agent.folded_models,
                "refusals": _refusals_dict(agent.refusals),
                "live_view": None,
            }
        )
    for agent in refused_only:
        rows[agent.id] = {
            "id": agent.id,
            "host": agent.host or None,
            "instance": None,
            "version": None,
            "window_s": None,
            "last_report_end": None,
            "last_seen": None,
            "stale": True,
            "devices": 0,
            "models_folded": 0,
            "refusals": _refusals_dict(agent.refusals),
            "live_view": None,
        }
    for agent_id, rec in kept_out:
        row = rows.setdefault(
            agent_id,
            {
                "id": agent_id,
                "instance": None,
                "version": None,
                "window_s": None,
                "last_report_end": None,
                "stale": True,
                "models_folded": 0,
                "refusals": {},
            },
        )
        row.update(
            host=rec.host,
            last_seen=rec.last_seen,
            # What its latest report listed; the view keeps none of them.
            devices=rec.devices,
            kept_out_reports=rec.reports,
            live_view=f"{KEPT_OUT} ({rec.bound})",
        )
    out.extend(rows.values())
    out.sort(key=lambda a: a["id"])
    return out


def compose_summary(
    *,
    now: float,
    since: float,
    label_keys: tuple[str, ...],
    pricing: Pricing,
    agents: int,
    stale: int,
    parts: Iterable[tuple[Sequence[str | None], Mapping[str, _Tally]]],
    by_model_extra: Mapping[str, _Tally] | None = None,
    by_label_extra: Sequence[Mapping[str, _Tally]] | None = None,
) -> dict[str, Any]:
    """The `GET /api/v1/fleet` answer from per-agent tallies: `parts` is (agent labels, model →
    tally) per agent, added to the totals, its model's and its labels' breakdowns; `by_model_extra`
    (model → tally) is added to the totals and by model only, `by_label_extra` (per label key, value →
    tally) to by label only (the store's range totals, which are kept per model and per label)."""
    total = _Tally()
    by_model: dict[str, _Tally] = {}
    by_label: list[dict[str, _Tally]] = [{} for _ in label_keys]
    for labels, tallies in parts:
        label_tallies = [
            per_key.setdefault(value or NO_LABEL, _Tally())
            for per_key, value in zip(by_label, labels or (None,) * len(label_keys), strict=True)
        ]
        for model, t in tallies.items():
            model_tally = by_model.get(model)
            if model_tally is None:
                model_tally = by_model[model] = _Tally()
            for acc in (total, model_tally, *label_tallies):
                acc.add(t)
    for model, t in (by_model_extra or {}).items():
        model_tally = by_model.get(model)
        if model_tally is None:
            model_tally = by_model[model] = _Tally()
        total.add(t)
        model_tally.add(t)
    for per_key, extra in zip(by_label, by_label_extra or (), strict=False):
        for value, t in extra.items():
            per_key.setdefault(value, _Tally()).add(t)
    models, folded_models = _capped(by_model, pricing)
    labels_out = {}
    folded_labels = {}
    for key, per_key in zip(label_keys, by_label, strict=True):
        labels_out[key], folded_labels[key] = _capped(per_key, pricing)
    return {
        "generated_at": now,
        "since": since,
        "currency": pricing.currency,
        "units": UNITS,
        "agents": {"total": agents, "stale": stale},
        "totals": total.as_dict(pricing),
        "by_model": models,
        "by_label": labels_out,
        # Keys beyond MAX_BREAKDOWN_KEYS per breakdown, folded into "(other)".
        "folded": {"by_model": folded_models, "by_label": folded_labels},
    }


UNITS = (
    "devices, states, idle and device_hours count every device as one; gpu_equivalents, gpu_hours and "
    "idle_value_per_hour count a MIG instance as its fraction of its GPU; idle_power_w is the power now "
    "of the devices idle now, idle_energy_kwh their energy since `since` (idle_energy_cost: with the PUE)"
)


class FleetView:
    def __init__(
        self,
        label_keys: tuple[str, ...],
        pricing: Pricing,
        stale_windows: float = 3.0,
        clock: Callable[[], float] = time.time,
        forget_after_s: float = 86400.0,
        on_forget: Callable[[int], object] | None = None,
        max_agents: int | None = None,
        max_devices: int | None = None,
        max_holders: int | None = None,
        on_window: Callable[[AgentState, Report], object] | None = None,
        count_totals: bool = True,
    ) -> None:
        self.label_keys = label_keys
        # Called with each window applied (counted once per agent and window end, catch-up included).
        self.on_window = on_window
        # False: the since-start totals are not kept (a process that publishes its view: the range
        # totals are its `published.Totals`, and nothing answers from these).
        self.count_totals = count_totals
        # Moves on with every report or refusal taken, and every agent forgotten (what to publish).
        self.changes = 0
        self.pricing = pricing
        self.stale_windows = stale_windows
        self.clock = clock
        self.started_at = clock()
        self.by_id: dict[str, AgentState] = {}
        # Agents known only by their refusals (never a valid report yet), least recently refused first.
        self.refused_only: OrderedDict[str, AgentState] = OrderedDict()
        self.refused_only_evicted = 0
        self.missing_dropped = 0
        self.max_agents = MAX_VIEW_AGENTS if max_agents is None else max_agents
        self.max_devices = MAX_VIEW_DEVICES if max_devices is None else max_devices
        self.max_holders = MAX_VIEW_HOLDERS if max_holders is None else max_holders
        # What the agents in `by_id` keep: devices (listed and missing) and holder records.
        self.device_total = 0
        self.holder_total = 0
        # Agents whose latest report the fleet-wide bound kept out, least recently seen first.
        self.kept_out: OrderedDict[str, _KeptOut] = OrderedDict()
        self.kept_out_reports = 0
        self.kept_out_evicted = 0
        self.forget_after_s = forget_after_s
        self.on_forget = on_forget
        self._sweep_interval = min(SWEEP_INTERVAL_S, forget_after_s)
        self._next_sweep = self.started_at + self._sweep_interval
        self.sweeps = 0

    def apply(self, batch: Batch) -> tuple[int, int]:
        """Fold a validated batch into the view; returns (reports applied, reports already seen)."""
        ident = batch.agent
        self.changes += 1
        agent = self.by_id.get(ident.id)
        latest = max(batch.reports, key=lambda r: r.end, default=None)
        if agent is None or (latest is not None and latest.end > agent.last_end):
            over = self._beyond_bound(agent, latest)
            if over is not None:
                self._keep_out(ident.id, ident.host, latest, over)
                return 0, 0
            agent = self.by_id.get(ident.id)
        self.kept_out.pop(ident.id, None)
        if agent is None:
            agent = self.refused_only.pop(ident.id, None) or AgentState(ident.id)
            self.by_id[agent.id] = agent
        if ident.instance != agent.instance:
            agent.instance = _intern(ident.instance)
        if agent.host != ident.host:
            agent.host = sys.intern(ident.host)
        if agent.version != ident.version:
            agent.version = sys.intern(ident.version)
        labels = tuple(_intern(ident.labels.get(k) or None) for k in self.label_keys)
        if labels != agent.labels:
            agent.labels = labels
        now = agent.last_seen = self.clock()
        applied = seen = 0
        # By window end, not seq: a replay under another seq or instance, or a seq of 2^53, must
        # neither count twice nor turn later genuine windows into "replays" (issue 11 item 16).
        for report in sorted(batch.reports, key=lambda r: r.end):
            if report.end <= agent.last_end:
                seen += 1
                continue
            applied += 1
            if self.on_window is not None:
                self.on_window(agent, report)
            # Since-start totals: a window that ended before this collector started (catch-up from
            # an agent's spool) is not "since this collector started"; it is in storage.
            counted = self.count_totals and report.end >= self.started_at
            if counted:
                self._count(agent, report)
            elif not self.count_totals and report.end >= self.started_at:
                self._count_models(agent, report)
            self._replace_devices(agent, report, counted)
            agent.last_end = report.end
            agent.reports += 1
            agent.longest_window = max(agent.longest_window, report.end - report.start)
        if ident.window_s is not None:
            agent.window_s = float(ident.window_s)
        elif agent.reports:
            # An older agent: the longest window seen, and while only one has been seen (it may be a
            # short partial first window) at least the agent's default window.
            longest = float(max(1, agent.longest_window))
            agent.window_s = longest if agent.reports > 1 else max(longest, DEFAULT_WINDOW_S)
        if now >= self._next_sweep:  # after last_seen moved: the sender itself is never swept
            self._sweep(now)
        return applied, seen

    def _beyond_bound(self, agent: AgentState | None, latest: Report | None) -> str | None:
        """Which fleet-wide bound the view would pass if this agent's devices were `latest`'s
        (and its other devices kept as missing: an upper bound); None when it fits."""
        listed = {d.device_id for d in latest.devices} if latest is not None else set()
        devices = len(listed)
        if agent is not None:
            devices += min(MAX_MISSING_DEVICES, sum(1 for k in agent.devices if k not in listed))
        holders = sum(len(d.holders) for d in latest.devices if d.holders) if latest is not None else 0
        for attempt in range(2):
            if agent is not None and self.by_id.get(agent.id) is not agent:
                agent = None  # the sweep below forgot it: it comes back as a new agent
            now_devices = self.device_total - (len(agent.devices) if agent is not None else 0)
            now_holders = self.holder_total - (agent.holder_count if agent is not None else 0)
            if agent is None and len(self.by_id) >= self.max_agents:
                over = f"{self.max_agents} agents"
            elif now_devices + devices > self.max_devices:
                over = f"{self.max_devices} devices"
            elif now_holders + holders > self.max_holders:
                over = f"{self.max_holders} holder records"
            else:
                return None
            if attempt == 0:
                self._sweep(self.clock())  # forgotten agents not swept yet may be what fills it
        return over

    def _keep_out(self, agent_id: str, host: str, latest: Report | None, over: str) -> None:
        """Keep an agent out of the view (its reports are stored all the same): what it held leaves."""
        agent = self.by_id.pop(agent_id, None)
        if agent is not None:
            self.device_total -= len(agent.devices)
            self.holder_total -= agent.holder_count
        rec = self.kept_out.pop(agent_id, None)
        if rec is None:
            if len(self.kept_out) >= MAX_KEPT_OUT_AGENTS:
                self.kept_out.popitem(last=False)
                self.kept_out_evicted += 1
            rec = _KeptOut()
            log.warning(
                "agent %r kept out of the live view: it would pass the fleet-wide bound of %s "
                "(its reports are still stored)",
                agent_id[:128],
                over,
            )
        self.kept_out[sys.intern(agent_id)] = rec
        rec.host = sys.intern(host)
        rec.last_seen = self.clock()
        rec.reports += 1
        rec.devices = len(latest.devices) if latest is not None else 0
        rec.bound = over
        self.kept_out_reports += 1

    def _count(self, agent: AgentState, report: Report) -> None:
        seconds = agent.seconds
        for d in report.devices:
            model = d.model or UNKNOWN_MODEL
            acc = seconds.get(model)
            if acc is None:
                if len(seconds) >= MAX_MODELS_PER_AGENT - 1 and model != OTHER:
                    agent.folded_models += 1
                    model = OTHER
                    acc = seconds.get(model)
                if acc is None:
                    acc = seconds[sys.intern(model)] = [0.0] * 8
            share = d.fraction or 1.0
            for i, s in enumerate((d.busy_s, d.allocated_idle_s, d.free_s, d.unavailable_s)):
                acc[i] += s
                acc[4 + i] += s * share
            if d.allocated_idle_s > 0:
                _count_held(agent, d, model, share)
            if d.idle_energy_j is not None:
                agent.idle_energy[model] = agent.idle_energy.get(model, 0.0) + d.idle_energy_j

    def _count_models(self, agent: AgentState, report: Report) -> None:
        """Without totals: only which models an agent's windows had, as `_count` keeps them, so
        `models_folded` says the same."""
        seconds = agent.seconds
        for d in report.devices:
            model = d.model or UNKNOWN_MODEL
            if model in seconds:
                continue
            if len(seconds) >= MAX_MODELS_PER_AGENT - 1 and model != OTHER:
                agent.folded_models += 1
                seconds.setdefault(OTHER, _NO_SECONDS)
            else:
                seconds[sys.intern(model)] = _NO_SECONDS

    def _replace_devices(self, agent: AgentState, report: Report, counted: bool = True) -> None:
        old = agent.devices
        self.device_total -= len(old)
        self.holder_total -= agent.holder_count
        holders = 0
        new: dict[str, DeviceState] = {}
        # Whose layout this report states: a MIG parent's instances, or a whole device itself.
        stated: set[str] = set()
        for d in report.devices:
            stated.add(d.parent_id if d.parent_id is not None else d.device_id)
            value = self.pricing.for_device(d)
            dev = old.pop(d.device_id, None)
            if dev is None:
                dev = DeviceState(d, report.end, value)
            else:
                dev.update(d, report.end, value)
            if counted and d.idle_energy_j is not None:
                dev.idle_energy_j = (dev.idle_energy_j or 0.0) + d.idle_energy_j
            if d.holders:
                holders += len(d.holders)
            new[dev.device_id] = dev
        missing = []
        for dev in old.values():
            if dev.parent_id is not None and dev.parent_id in stated:
                continue  # its GPU now has another MIG layout (or none): the instance is gone
            if dev.device_id in stated:
                continue  # a whole GPU now split into instances
            if report.end - dev.end > self.forget_after_s:
                continue
            dev.missing = True
            # Who held it is no longer known (nor shown): its last holders are not kept.
            dev.holders = None
            dev.holders_omitted = 0
            missing.append(dev)
        if len(missing) > MAX_MISSING_DEVICES:
            missing.sort(key=lambda m: -m.end)
            self.missing_dropped += len(missing) - MAX_MISSING_DEVICES
            del missing[MAX_MISSING_DEVICES:]
        for dev in missing:
            new[dev.device_id] = dev
        agent.devices = new
        agent.holder_count = holders
        self.device_total += len(new)
        self.holder_total += holders

    def record_refusal(
        self, agent_id: str, reason: str, detail: str, now: float, host: str | None = None
    ) -> None:
        """Count a refused report for this agent: reason → count, last detail, last time.

        `host` names an agent known only by its refusals; a delivered report's host wins.
        """
        agent_id = agent_id[:MAX_ID_LEN]
        self.changes += 1
        agent = self.by_id.get(agent_id)
        if agent is None:
            agent = self.refused_only.get(agent_id)
            if agent is None:
                if len(self.refused_only) >= MAX_REFUSED_ONLY_AGENTS:
                    self.refused_only.popitem(last=False)
                    self.refused_only_evicted += 1
                agent = self.refused_only[agent_id] = AgentState(agent_id)
            else:
                self.refused_only.move_to_end(agent_id)
            if host:
                agent.host = sys.intern(host[:MAX_NAME_LEN])
        if agent.refusals is None:
            agent.refusals = {}
        _record_refusal(agent.refusals, reason, detail, now)
        agent.last_refused_at = now
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Drop agents silent for more than `forget_after_s` (the read paths already hide them)."""
        self._next_sweep = now + self._sweep_interval
        self.sweeps += 1
        gone = [a.id for a in self.by_id.values() if self.is_forgotten(a, now)]
        for agent_id in gone:
            agent = self.by_id.pop(agent_id)
            self.device_total -= len(agent.devices)
            self.holder_total -= agent.holder_count
        for agent_id in [a.id for a in self.refused_only.values() if self.is_forgotten(a, now)]:
            del self.refused_only[agent_id]
        for agent_id in [k for k, r in self.kept_out.items() if now - r.last_seen > self.forget_after_s]:
            del self.kept_out[agent_id]
        if gone:
            self.changes += 1
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
        # An agent still sending, even if every report is refused, stays listed.
        return now - max(agent.last_seen, agent.last_refused_at) > self.forget_after_s

    def live_agents(self, now: float | None = None) -> list[AgentState]:
        """Agents in the view: those not yet forgotten (a sweep may not have run yet)."""
        now = self.clock() if now is None else now
        return [a for a in self.by_id.values() if not self.is_forgotten(a, now)]

    @property
    def agent_count(self) -> int:
        return len(self.live_agents())

    @property
    def device_count(self) -> int:
        return sum(len(a.devices) for a in self.live_agents())

    def stale_agents(self) -> int:
        now = self.clock()
        return sum(1 for a in self.live_agents(now) if self.is_stale(a, now))

    def agents(self, now: float | None = None) -> list[dict[str, Any]]:
        """`GET /api/v1/agents`: every agent with its last report and its refusals, by id.

        Includes agents that never delivered a valid report (every window refused: a clock far off),
        and agents whose reports are stored but kept out of the live view by its fleet-wide bound
        (`live_view` says so; None: the agent is in the view, or known only by refusals).
        """
        now = self.clock() if now is None else now
        return agent_rows(
            [(a, self.is_stale(a, now), len(a.devices)) for a in self.live_agents(now)],
            [a for a in self.refused_only.values() if not self.is_forgotten(a, now)],
            [(k, r) for k, r in self.kept_out.items() if now - r.last_seen <= self.forget_after_s],
        )

    def device_tallies(self, agent: AgentState, stale: bool = False) -> dict[str, _Tally]:
        """An agent's devices now, per model, as `summary()` counts them (all unavailable if `stale`)."""
        out: dict[str, _Tally] = {}
        for dev in agent.devices.values():
            state = _UNAVAILABLE if stale or dev.missing else dev.state
            model = dev.model or UNKNOWN_MODEL
            t = out.get(model)
            if t is None:
                t = out[model] = _Tally()
            idle = state in _IDLE_INDEXES
            t.devices += 1
            t.states[state] += 1
            t.gpu[state] += dev.share
            if idle:
                t.idle_value_per_hour += dev.value_per_hour
            t.add_power(dev.power_mean_w, idle)
        return out

    def summary(self) -> dict[str, Any]:
        """`GET /api/v1/fleet`: device counts by state, idle value per hour, idle device-hours; by model and label."""
        now = self.clock()
        agents = self.live_agents(now)
        parts = []
        stale = 0
        for agent in agents:
            is_stale = self.is_stale(agent, now)
            stale += is_stale
            tallies = self.device_tallies(agent, is_stale)
            for model, secs in agent.seconds.items():
                t = tallies.get(model)
                if t is None:
                    t = tallies[model] = _Tally()
                for i in range(4):
                    t.seconds[i] += secs[i]
                    t.gpu_seconds[i] += secs[4 + i]
            for model, joules in agent.idle_energy.items():
                t = tallies.get(model)
                if t is None:
                    t = tallies[model] = _Tally()
                t.add_energy(joules)
            parts.append((agent.labels, tallies))
        return compose_summary(
            now=now,
            since=self.started_at,
            label_keys=self.label_keys,
            pricing=self.pricing,
            agents=len(agents),
            stale=stale,
            parts=parts,
        )

    def devices(
        self,
        states: frozenset[str] | None = frozenset({"free"}),
        min_idle_s: float = 0.0,
        filters: Mapping[str, str] | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """`GET /api/v1/devices`: matching devices, longest idle first.

        For a single state (`free`, `allocated_idle` — the reclaim list — …) `min_idle` and the order
        go by the time in that state (`state_since`, from older agents `idle_since`); for several
        states (`idle`, `all`) by the idle streak (`idle_since`).
        """
        now = self.clock()
        filters = dict(filters or {})
        want_model = filters.pop("model", None)
        want_vendor = filters.pop("vendor", None)
        want_host = filters.pop("host", None)
        want_agent = filters.pop("agent", None)
        label_filters = [(self.label_keys.index(k), v) for k, v in filters.items()]
        state_idx = None if states is None else frozenset(_STATE_INDEX[s] for s in states)
        by_state = state_idx is not None and len(state_idx) == 1
        found: list[tuple[float, AgentState, DeviceState, int, float, float, bool]] = []
        for agent in self._select_agents(want_agent, now):
            if want_host is not None and agent.host != want_host:
                continue
            if any((agent.labels[i] if agent.labels else None) != v for i, v in label_filters):
                continue
            is_stale = self.is_stale(agent, now)
            for dev in agent.devices.values():
                state = _UNAVAILABLE if is_stale or dev.missing else dev.state
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
                since = _state_since(dev, state)
                in_state_for = max(0.0, now - since) if since is not None else -1.0
                rank = in_state_for if by_state else idle_for
                if min_idle_s > 0 and rank < min_idle_s:
                    continue
                found.append((rank, agent, dev, state, idle_for, in_state_for, is_stale))
        found.sort(key=lambda f: (-f[0], f[1].id, f[2].device_id))
        return [self._device_dict(*f[1:]) for f in found[:limit]]

    def holders(
        self,
        by: str = "user",
        states: frozenset[str] | None = frozenset({"allocated_idle"}),
        min_idle_s: float = 0.0,
        filters: Mapping[str, str] | None = None,
        limit: int = 100,
    ) -> dict[str, Any]:
        """`GET /api/v1/holders`: per holder (`by`: user, namespace, pod, job, container), the devices
        it holds now, their state, how long, their value per hour and its allocated-idle hours since
        the collector started; most wasteful first (allocated-idle value per hour, then time).

        Devices, states and `gpu_equivalents` count each device a holder holds; values and hours are
        its share of the device (split evenly over the device's listed holders). "How long" and
        `min_idle` go by the time in the state for a single state, by the idle streak for `all`.
        """
        key_of = HOLDER_KEYS[by]
        now = self.clock()
        filters = dict(filters or {})
        want_model = filters.pop("model", None)
        want_host = filters.pop("host", None)
        want_agent = filters.pop("agent", None)
        label_filters = [(self.label_keys.index(k), v) for k, v in filters.items()]
        state_idx = None if states is None else frozenset(_STATE_INDEX[s] for s in states)
        by_state = state_idx is not None and len(state_idx) == 1
        tallies: dict[str | None, _HolderTally] = {}
        agents = []
        for agent in self._select_agents(want_agent, now):
            if want_host is not None and agent.host != want_host:
                continue
            if any((agent.labels[i] if agent.labels else None) != v for i, v in label_filters):
                continue
            agents.append(agent)
            is_stale = self.is_stale(agent, now)
            for dev in agent.devices.values():
                state = _UNAVAILABLE if is_stale or dev.missing else dev.state
                if state_idx is not None and state not in state_idx:
                    continue
                if want_model is not None and dev.model != want_model:
                    continue
                if dev.missing:
                    continue  # no longer reported: who holds it now is not known
                if not dev.holders and dev.state not in _HELD_STATES:
                    continue  # nobody held it in its latest window
                idle_for = (
                    max(0.0, now - dev.idle_since)
                    if state in _IDLE_INDEXES and dev.idle_since is not None
                    else -1.0
                )
                since = _state_since(dev, state)
                in_state_for = max(0.0, now - since) if since is not None else -1.0
                rank = in_state_for if by_state else idle_for
                if min_idle_s > 0 and rank < min_idle_s:
                    continue
                for key, (share, hs) in _shares(dev.holders, key_of).items():
                    t = tallies.get(key)
                    if t is None:
                        t = tallies[key] = _HolderTally()
                    value = dev.value_per_hour * share
                    t.devices += 1
                    t.gpu += dev.share
                    t.states[state] += 1
                    t.value += value
                    if state == _ALLOCATED_IDLE:
                        t.alloc_idle_value += value
                    t.longest = max(t.longest, rank)
                    t.held.append(
                        (value, rank, agent, dev, state, idle_for, in_state_for, is_stale, share, hs)
                    )
        folded = 0
        other_s = other_gpu_s = 0.0
        for agent in agents:
            if agent.held is None or agent.held_folded is None:
                continue
            folded += agent.held_folded[by]
            for key, per_model in agent.held[by].items():
                t = tallies.get(key)
                if t is None and key != OTHER:
                    continue
                for model, (s, gs) in per_model.items():
                    if want_model is not None and model != want_model:
                        continue
                    if t is not None:
                        t.seconds += s
                        t.gpu_seconds += gs
                    else:
                        other_s += s
                        other_gpu_s += gs
        ranked = sorted(
            tallies.items(),
            key=lambda kv: (-kv[1].alloc_idle_value, -kv[1].longest, kv[0] is None, kv[0] or ""),
        )
        return {
            "generated_at": now,
            "since": self.started_at,
            "by": by,
            "currency": self.pricing.currency,
            "holders": [self._holder_dict(key, t) for key, t in ranked[:limit]],
            "count": len(ranked),
            # Keys folded into "(other)" in the since-start hours (the least recently active first).
            "folded": {
                "holders": folded,
                "allocated_idle_device_hours": round(other_s / 3600, 6),
                "allocated_idle_gpu_hours": round(other_gpu_s / 3600, 6),
            },
        }

    def _holder_dict(self, key: str | None, t: _HolderTally) -> dict[str, Any]:
        t.held.sort(key=lambda f: (-f[0], -f[1], f[2].id, f[3].device_id))
        held = []
        for value, _rank, agent, dev, state, idle_for, in_state_for, is_stale, share, hs in t.held[
            :MAX_HELD_LISTED
        ]:
            held.append(
                {
                    "host": agent.host,
                    "agent": agent.id,
                    "device_id": dev.device_id,
                    "model": dev.model,
                    "fraction": dev.share,
                    "state": STATES[state],
                    "idle_for_s": round(idle_for, 3) if idle_for >= 0 else None,
                    "in_state_for_s": round(in_state_for, 3) if in_state_for >= 0 else None,
                    "share": round(share, 6),
                    "value_per_hour": round(value, 6),
                    "stale": is_stale,
                    "holders": [holder_dict(h) for h in hs],
                }
            )
        return {
            "holder": key,
            "devices": t.devices,
            "gpu_equivalents": round(t.gpu, 6),
            "states": dict(zip(STATES, t.states, strict=True)),
            "longest_for_s": round(t.longest, 3) if t.longest >= 0 else None,
            "value_per_hour": round(t.value, 6),
            "allocated_idle_value_per_hour": round(t.alloc_idle_value, 6),
            "allocated_idle_device_hours": round(t.seconds / 3600, 6),
            "allocated_idle_gpu_hours": round(t.gpu_seconds / 3600, 6),
            "held": held,
            "held_omitted": max(0, len(t.held) - MAX_HELD_LISTED),
        }

    def _select_agents(self, agent_id: str | None, now: float) -> Iterable[AgentState]:
        if agent_id is None:
            return self.live_agents(now)
        agent = self.by_id.get(agent_id)
        return [agent] if agent is not None and not self.is_forgotten(agent, now) else []

    def _device_dict(
        self,
        agent: AgentState,
        dev: DeviceState,
        state: int,
        idle_for: float,
        in_state_for: float,
        is_stale: bool,
    ) -> dict[str, Any]:
        if dev.missing:
            reason: str | None = NO_LONGER_REPORTED
        elif is_stale:
            reason = AGENT_SILENT
        else:
            reason = dev.reason
        idle_now = state in _IDLE_INDEXES
        idle_j = dev.idle_energy_j
        idle_cost = self.pricing.energy_cost(idle_j)
        return {
            "host": agent.host,
            "agent": agent.id,
            "device_id": dev.device_id,
            "vendor": dev.vendor,
            "model": dev.model,
            "parent_id": dev.parent_id,
            "fraction": dev.share,
            "state": STATES[state],
            "reported_state": STATES[dev.state],
            "reason": reason,
            "error": dev.error,
            "idle_since": dev.idle_since if state in _IDLE_INDEXES else None,
            "idle_for_s": round(idle_for, 3) if idle_for >= 0 else None,
            "state_since": _state_since(dev, state),
            "in_state_for_s": round(in_state_for, 3) if in_state_for >= 0 else None,
            "labels": {k: v for k, v in zip(self.label_keys, agent.labels, strict=False) if v is not None},
            "util_mean_pct": dev.util_mean_pct,
            "util_max_pct": dev.util_max_pct,
            "memory_used_bytes": dev.memory_used_bytes,
            "memory_total_bytes": dev.memory_total_bytes,
            "power_mean_w": dev.power_mean_w,
            # The power now if the device is idle now (0 if not; None: power unknown), and its idle
            # energy since the collector started, priced with the PUE where energy is priced.
            "idle_power_w": None if dev.power_mean_w is None else (dev.power_mean_w if idle_now else 0.0),
            "idle_energy_kwh": None if idle_j is None else round(idle_j / 3.6e6, 6),
            "idle_energy_cost": None if idle_cost is None else round(idle_cost, 6),
            "temp_max_c": dev.temp_max_c,
            "value_per_hour": round(dev.value_per_hour, 6),
            "window_end": dev.end,
            "stale": is_stale,
            "holders": None if dev.holders is None else [holder_dict(h) for h in dev.holders],
            "holders_omitted": dev.holders_omitted,
        }


def _state_since(dev: DeviceState, state: int) -> int | None:
    """Since when the device has been in `state` as the view shows it."""
    if state == dev.state:
        if dev.state_since is not None:
            return dev.state_since
        return dev.idle_since if state in _IDLE_INDEXES else None
    # Shown unavailable because its agent went silent or stopped listing it: since its last window.
    return dev.end
