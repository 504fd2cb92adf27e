"""Each collector process publishes what it received; any process answers the fleet from all of them.

With `live_view = "storage"` the fleet answer (`GET /api/v1/fleet`, `GET /api/v1/agents`, the fleet
gauges of `/metrics`) must be the whole fleet whichever process answers, and cost the store little at
100,000 devices. influxd 1.x charges per series touched (~0.2 ms each: 20 s for the latest window of
100k devices), so the answer is not read from `capmon_device`. Instead:

- Every process keeps the `FleetView` of the reports it received and, every
  `live_publish_interval_s` when something changed, writes it to the store as one `capmon_live`
  point (tag `collector`: this process): per agent its identity, last window end, arrival time,
  refusals and its devices' counts per model (the `summary()` tallies, not the devices), as
  zlib-compressed JSON in base64 string fields of at most `CHUNK` characters (`chunks` says how
  many). The point's timestamp is the hour it is written in, so the store keeps one point per
  process per hour, each publish overwriting the last.
- The windows it applies are summed per block of window end (1 minute and 1 hour), per model and per
  label value, into `capmon_totals` points (tags `collector`, `res`, `dim`, `key`, `value`): a block
  still filling is rewritten with its running sums. The range totals (`?since=`) are then a `sum()`
  over a few hundred series: whole hours from the hour blocks, the partial hours at either end from
  the minute blocks, so the range starts at `since` rounded up to the minute.

The reader takes each process's latest `capmon_live` point within `forget_after_s` and, per agent,
the record with the latest window (an agent that moved to another process, or whose process died,
is in several; the newest wins), sums refusals over them, and judges staleness and forgetting by the
same rules as the memory view, at read time. The answer is `fleet.compose_summary`'s, as the memory
view's: the same JSON and, for the same reports, the same numbers.

What this costs and what it does not do: a publish is ~55 B per agent compressed (13 kB per 1,000
devices at 8 per agent); the answer lags the reports by up to `live_publish_interval_s`; a window an
agent resends to a second process after the first stored it (its answer lost) is counted by both in
the range totals (device states are not affected); a window more than `FINE_KEEP_S` old when it
arrives is left out of the minute blocks and one more than `COARSE_KEEP_S` old out of the totals
(`capmon_collector_totals_late_windows_total` counts them). `GET /api/v1/devices` and `/holders`
list devices and still read `capmon_device` (see `liveview.StorageLiveView`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import msgspec

from capmon.agent.wire import Report

from .fleet import (
    NO_LABEL,
    OTHER,
    UNKNOWN_MODEL,
    AgentState,
    FleetView,
    Pricing,
    _KeptOut,
    _Tally,
    agent_rows,
    compose_summary,
)
from .lineproto import escape_tag, string_field
from .storage import StorageError, describe

__all__ = [
    "CHUNK",
    "PublishedFleet",
    "Publisher",
    "Totals",
    "collector_id",
    "totals_statements",
]

log = logging.getLogger("capmon.collector.published")

FORMAT = 1
# influxd 1.x keeps string fields of up to 64 KiB.
CHUNK = 60_000
# The live point's timestamp is the start of the hour it is written in.
LIVE_POINT_S = 3600
# Blocks of window end the totals are summed in, and how long a block is kept in memory to be added to.
FINE_S = 60
COARSE_S = 3600
FINE_KEEP_S = 3 * 3600
COARSE_KEEP_S = 26 * 3600
RESOLUTIONS = ((FINE_S, "1m", FINE_KEEP_S), (COARSE_S, "1h", COARSE_KEEP_S))
# Per block: models and values of each label key kept apart; the rest is summed as "(other)".
MAX_TOTALS_MODELS = 256
MAX_TOTALS_VALUES = 256
# The sums of a block, in field order: seconds per state, the same in GPU-equivalents, idle energy.
TOTALS_FIELDS = (
    "busy_s",
    "allocated_idle_s",
    "free_s",
    "unavailable_s",
    "busy_gpu_s",
    "allocated_idle_gpu_s",
    "free_gpu_s",
    "unavailable_gpu_s",
)
ENERGY_FIELD = "idle_energy_j"


def collector_id(worker: str = "") -> str:
    """This process, as its `capmon_live` and `capmon_totals` points name it: host, pid, start."""
    host = socket.gethostname()[:64] or "collector"
    who = f"w{worker}" if worker else "p"
    return f"{host}:{who}{os.getpid()}:{int(time.time()):x}"


# -- the range totals ----------------------------------------------------------------------------


class Totals:
    """The seconds of the windows this process applied, per block of window end, model and label."""

    def __init__(self, label_keys: tuple[str, ...], clock: Callable[[], float]) -> None:
        self.label_keys = label_keys
        self.clock = clock
        # (block seconds, block start) → (dim, key, value) → 8 sums, idle energy (None: none reported)
        self.blocks: dict[tuple[int, int], dict[tuple[str, str, str], list[Any]]] = {}
        self.dirty: set[tuple[int, int]] = set()
        self.late_windows = 0

    def add(self, agent: AgentState, report: Report) -> None:
        per_model: dict[str, list[Any]] = {}
        for d in report.devices:
            model = d.model or UNKNOWN_MODEL
            acc = per_model.get(model)
            if acc is None:
                acc = per_model[model] = [0.0] * 8 + [None]
            share = d.fraction or 1.0
            for i, s in enumerate((d.busy_s, d.allocated_idle_s, d.free_s, d.unavailable_s)):
                acc[i] += s
                acc[4 + i] += s * share
            if d.idle_energy_j is not None:
                acc[8] = (acc[8] or 0.0) + d.idle_energy_j
        if not per_model:
            return
        labels = agent.labels or (None,) * len(self.label_keys)
        now = self.clock()
        late = False
        for size, _name, keep in RESOLUTIONS:
            start = report.end // size * size
            if start + size < now - keep:
                late = True
                continue
            block = self.blocks.get((size, start))
            if block is None:
                block = self.blocks[(size, start)] = {}
            self.dirty.add((size, start))
            models = sum(1 for dim in block if dim[0] == "model")
            for model, acc in per_model.items():
                dim = ("model", "", model)
                if dim not in block and models >= MAX_TOTALS_MODELS - 1:
                    dim = ("model", "", OTHER)
                models += dim not in block
                _add(block, dim, acc)
            whole = _sum(per_model.values())
            for key, value in zip(self.label_keys, labels, strict=True):
                dim = ("label", key, value or NO_LABEL)
                if dim not in block:
                    n = sum(1 for d in block if d[0] == "label" and d[1] == key)
                    if n >= MAX_TOTALS_VALUES - 1:
                        dim = ("label", key, OTHER)
                _add(block, dim, whole)
        self.late_windows += late

    def lines(self, collector: str) -> list[str]:
        """The points of every block changed since the last call (its running sums), then forget the
        blocks too old to be added to."""
        out = []
        tag = escape_tag(collector)
        names = {size: name for size, name, _ in RESOLUTIONS}
        for size, start in sorted(self.dirty):
            for (dim, key, value), acc in self.blocks.get((size, start), {}).items():
                key_tag = f",key={escape_tag(key)}" if key else ""
                fields = ",".join(f"{f}={float(v)!r}" for f, v in zip(TOTALS_FIELDS, acc, strict=False))
                if acc[8] is not None:
                    fields += f",{ENERGY_FIELD}={float(acc[8])!r}"
                out.append(
                    f"capmon_totals,collector={tag},dim={dim}{key_tag},res={names[size]},"
                    f"value={escape_tag(value)} {fields} {start}"
                )
        self.dirty.clear()
        now = self.clock()
        keep = {size: k for size, _, k in RESOLUTIONS}
        for size, start in [b for b in self.blocks if b[1] + b[0] < now - keep[b[0]]]:
            del self.blocks[(size, start)]
        return out

    def mark_dirty(self, blocks: Iterable[tuple[int, int]]) -> None:
        """Blocks whose write failed: written again with the next lines."""
        self.dirty.update(b for b in blocks if b in self.blocks)


def _add(block: dict[tuple[str, str, str], list[Any]], dim: tuple[str, str, str], acc: Sequence[Any]) -> None:
    have = block.get(dim)
    if have is None:
        have = block[dim] = [0.0] * 8 + [None]
    for i in range(8):
        have[i] += acc[i]
    if acc[8] is not None:
        have[8] = (have[8] or 0.0) + acc[8]


def _sum(accs: Iterable[Sequence[Any]]) -> list[Any]:
    out: list[Any] = [0.0] * 8 + [None]
    for acc in accs:
        for i in range(8):
            out[i] += acc[i]
        if acc[8] is not None:
            out[8] = (out[8] or 0.0) + acc[8]
    return out


def range_start(since: float) -> int:
    """Where a range starting at `since` starts in the totals: the next minute block."""
    return -(-int(since) // FINE_S) * FINE_S


def totals_statements(since: float, now: float) -> list[str]:
    """InfluxQL summing `capmon_totals` over [range_start(since), now], per dim, key and value:
    whole hours from the hour blocks, the partial hours at either end from the minute blocks."""
    start, end = range_start(since), int(now)
    sums = ", ".join(f'sum("{f}")' for f in (*TOTALS_FIELDS, ENERGY_FIELD))
    head = f"SELECT {sums} FROM capmon_totals WHERE"
    tail = 'GROUP BY "dim", "key", "value"'
    first_hour = -(-start // COARSE_S) * COARSE_S
    last_hour = end // COARSE_S * COARSE_S
    if first_hour >= last_hour:
        return [f"{head} res = '1m' AND time >= {start}s AND time <= {end}s {tail}"]
    out = [f"{head} res = '1h' AND time >= {first_hour}s AND time < {last_hour}s {tail}"]
    if start < first_hour:
        out.append(f"{head} res = '1m' AND time >= {start}s AND time < {first_hour}s {tail}")
    out.append(f"{head} res = '1m' AND time >= {last_hour}s AND time <= {end}s {tail}")
    return out


# -- publishing ----------------------------------------------------------------------------------


class Publisher:
    """Writes this process's view (`capmon_live`) and the sums of its windows (`capmon_totals`)."""

    def __init__(
        self,
        fleet: FleetView,
        submit: Callable[[list[str]], Awaitable[None]],
        interval_s: float,
        collector: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fleet = fleet
        self.submit = submit
        self.interval_s = interval_s
        self.collector = collector
        self.clock = clock
        self.totals = Totals(fleet.label_keys, clock)
        fleet.on_window = self.totals.add
        self._published_changes = -1
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.publishes = 0
        self.failures = 0
        self.last_bytes = 0

    def payload(self, now: float) -> dict[str, Any]:
        fleet = self.fleet
        keys = fleet.label_keys
        agents = []
        for a in fleet.live_agents(now):
            agents.append(
                [
                    a.id,
                    a.host,
                    a.instance,
                    a.version,
                    {k: v for k, v in zip(keys, a.labels, strict=False) if v is not None},
                    a.window_s,
                    a.last_end,
                    a.last_seen,
                    a.last_refused_at,
                    a.folded_models,
                    len(a.devices),
                    a.refusals or None,
                    {m: t.packed() for m, t in fleet.device_tallies(a).items()},
                ]
            )
        refused = [
            [a.id, a.host, a.last_refused_at, a.refusals]
            for a in fleet.refused_only.values()
            if not fleet.is_forgotten(a, now)
        ]
        kept_out = [
            [k, r.host, r.last_seen, r.reports, r.devices, r.bound]
            for k, r in fleet.kept_out.items()
            if now - r.last_seen <= fleet.forget_after_s
        ]
        return {"v": FORMAT, "at": now, "agents": agents, "refused": refused, "kept_out": kept_out}

    def live_line(self, now: float) -> str:
        packed = base64.b64encode(zlib.compress(msgspec.json.encode(self.payload(now)), 1)).decode()
        chunks = [packed[i : i + CHUNK] for i in range(0, len(packed), CHUNK)] or [""]
        self.last_bytes = len(packed)
        fields = ",".join(f"p{i}={string_field(c)}" for i, c in enumerate(chunks))
        ts = int(now) // LIVE_POINT_S * LIVE_POINT_S
        return (
            f"capmon_live,collector={escape_tag(self.collector)} v={float(FORMAT)!r},at={float(now)!r},"
            f"chunks={float(len(chunks))!r},{fields} {ts}"
        )

    def changed(self) -> bool:
        return self.fleet.changes != self._published_changes or bool(self.totals.dirty)

    async def publish(self) -> bool:
        """Write what changed; False (logged once per outage) when the store did not take it."""
        now = self.clock()
        changes = self.fleet.changes
        blocks = set(self.totals.dirty)
        lines = [*self.totals.lines(self.collector), self.live_line(now)]
        try:
            await self.submit(lines)
        except StorageError as exc:
            self.totals.mark_dirty(blocks)
            self.failures += 1
            if not self._failing:
                log.warning("could not publish this collector's live view (retrying): %s", exc.detail)
            self._failing = True
            return False
        except Exception as exc:  # never take the collector down; tried again next interval
            self.totals.mark_dirty(blocks)
            self.failures += 1
            log.warning("could not publish this collector's live view: %s", describe(exc))
            return False
        if self._failing:
            log.info("published this collector's live view again")
        self._failing = False
        self._published_changes = changes
        self.publishes += 1
        return True

    async def flush(self) -> None:
        """Publish now if anything changed (tests, and shutdown)."""
        if self.changed():
            await self.publish()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self.changed():
                await self.publish()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="capmon-publish")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await asyncio.wait_for(self.flush(), 5.0)
        except TimeoutError:
            log.info("could not publish this collector's live view at shutdown: the store did not answer")


# -- reading ---------------------------------------------------------------------------------------


def live_statement(now: float, forget_after_s: float) -> str:
    since = int(now - forget_after_s) // LIVE_POINT_S * LIVE_POINT_S
    return f"SELECT * FROM capmon_live WHERE time >= {since}s GROUP BY collector ORDER BY time DESC LIMIT 1"


def decode_live(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """A `capmon_live` row's payload; None (logged) when it is not one this version reads."""
    try:
        if int(row.get("v") or 0) != FORMAT:
            return None
        n = int(row.get("chunks") or 0)
        packed = "".join(row.get(f"p{i}") or "" for i in range(n))
        return msgspec.json.decode(zlib.decompress(base64.b64decode(packed)))
    except (ValueError, TypeError, zlib.error, msgspec.DecodeError) as exc:
        log.warning("a published live view could not be read (%s): left out", type(exc).__name__)
        return None


class PublishedFleet:
    """The fleet merged from every process's latest published view, and the range totals."""

    def __init__(
        self,
        label_keys: tuple[str, ...],
        pricing: Pricing,
        stale_windows: float,
        forget_after_s: float,
        now: float,
        since: float,
    ) -> None:
        self.label_keys = label_keys
        self.pricing = pricing
        self.stale_windows = stale_windows
        self.forget_after_s = forget_after_s
        self.now = now
        self.since = float(range_start(since))
        self.agents: dict[str, tuple[AgentState, dict[str, _Tally], int]] = {}
        self.refused: dict[str, AgentState] = {}
        self.kept_out: dict[str, _KeptOut] = {}
        self.by_model: dict[str, _Tally] = {}
        self.by_label: list[dict[str, _Tally]] = [{} for _ in label_keys]
        self.publishers = 0
        # Refusals per agent, summed over the processes that refused it: reason → [count, detail, at].
        self._refusals: dict[str, dict[str, list[Any]]] = {}

    def add_payload(self, payload: Mapping[str, Any]) -> None:
        if self.now - float(payload.get("at") or 0) > self.forget_after_s:
            return
        self.publishers += 1
        keys = self.label_keys
        for rec in payload.get("agents") or ():
            agent_id, host, instance, version, labels, window_s, last_end, last_seen = rec[:8]
            last_refused_at, folded, devices, refusals, tallies = rec[8:13]
            self._add_refusals(agent_id, refusals)
            have = self.agents.get(agent_id)
            if have is not None and (have[0].last_end, have[0].last_seen) >= (last_end, last_seen):
                have[0].last_refused_at = max(have[0].last_refused_at, last_refused_at)
                continue
            a = AgentState(agent_id)
            a.host, a.instance, a.version = host, instance, version
            a.labels = tuple(labels.get(k) for k in keys)
            a.window_s, a.last_end, a.last_seen = float(window_s), int(last_end), float(last_seen)
            a.last_refused_at = max(last_refused_at, have[0].last_refused_at if have else 0.0)
            a.folded_models = folded
            self.agents[agent_id] = (a, {m: _Tally.unpacked(v) for m, v in tallies.items()}, int(devices))
        for agent_id, host, last_refused_at, refusals in payload.get("refused") or ():
            self._add_refusals(agent_id, refusals)
            have_r = self.refused.get(agent_id)
            if have_r is None or last_refused_at > have_r.last_refused_at:
                a = AgentState(agent_id)
                a.host, a.last_refused_at = host, last_refused_at
                self.refused[agent_id] = a
        for agent_id, host, last_seen, reports, devices, bound in payload.get("kept_out") or ():
            have_k = self.kept_out.get(agent_id)
            if have_k is None or last_seen > have_k.last_seen:
                k = _KeptOut()
                k.host, k.last_seen, k.reports, k.devices, k.bound = host, last_seen, reports, devices, bound
                self.kept_out[agent_id] = k

    def _add_refusals(self, agent_id: str, refusals: Mapping[str, list[Any]] | None) -> None:
        if not refusals:
            return
        mine = self._refusals.setdefault(agent_id, {})
        for reason, (count, detail, at) in refusals.items():
            have = mine.get(reason)
            if have is None:
                mine[reason] = [count, detail, at]
            else:
                have[0] += count
                if at > have[2]:
                    have[1], have[2] = detail, at

    def add_totals(self, rows: Iterable[tuple[Mapping[str, str], Mapping[str, Any]]]) -> None:
        for tags, row in rows:
            t = _Tally()
            sums = [row.get("sum" if i == 0 else f"sum_{i}") for i in range(len(TOTALS_FIELDS) + 1)]
            for i in range(4):
                t.seconds[i] = float(sums[i] or 0.0)
                t.gpu_seconds[i] = float(sums[4 + i] or 0.0)
            t.add_energy(sums[8])
            value = tags.get("value") or ""
            if tags.get("dim") == "model":
                target = self.by_model
            elif tags.get("dim") == "label" and tags.get("key") in self.label_keys:
                target = self.by_label[self.label_keys.index(tags["key"])]
            else:
                continue
            have = target.get(value)
            if have is None:
                target[value] = t
            else:
                have.add(t)

    def finish(self) -> None:
        """Settle who is in the view: refusals merged, kept-out and forgotten agents out."""
        now = self.now
        for agent_id, k in list(self.kept_out.items()):
            live = self.agents.get(agent_id)
            if live is not None and live[0].last_seen >= k.last_seen:
                del self.kept_out[agent_id]
            elif live is not None:
                del self.agents[agent_id]  # kept out after its latest record: as the memory view
            if now - k.last_seen > self.forget_after_s:
                self.kept_out.pop(agent_id, None)
        for agent_id in list(self.refused):
            if agent_id in self.agents:
                del self.refused[agent_id]
        for agent_id, refusals in self._refusals.items():
            owner = self.agents.get(agent_id)
            target = owner[0] if owner is not None else self.refused.get(agent_id)
            if target is not None:
                target.refusals = refusals
        for agent_id, (a, _, _) in list(self.agents.items()):
            if now - max(a.last_seen, a.last_refused_at) > self.forget_after_s:
                del self.agents[agent_id]
        for agent_id, a in list(self.refused.items()):
            if now - a.last_refused_at > self.forget_after_s:
                del self.refused[agent_id]

    def is_stale(self, agent: AgentState) -> bool:
        return self.now - agent.last_seen > self.stale_windows * agent.window_s

    def summary(self) -> dict[str, Any]:
        parts = []
        stale = 0
        for a, tallies, _ in self.agents.values():
            is_stale = self.is_stale(a)
            stale += is_stale
            parts.append(
                (a.labels, {m: t.as_unavailable() for m, t in tallies.items()} if is_stale else tallies)
            )
        return compose_summary(
            now=self.now,
            since=self.since,
            label_keys=self.label_keys,
            pricing=self.pricing,
            agents=len(self.agents),
            stale=stale,
            parts=parts,
            by_model_extra=self.by_model,
            by_label_extra=self.by_label,
        )

    def agent_rows(self) -> list[dict[str, Any]]:
        return agent_rows(
            [(a, self.is_stale(a), devices) for a, _, devices in self.agents.values()],
            self.refused.values(),
            self.kept_out.items(),
        )

    @property
    def agent_count(self) -> int:
        return len(self.agents)

    @property
    def device_count(self) -> int:
        return sum(devices for _, _, devices in self.agents.values())

    def stale_agents(self) -> int:
        return sum(1 for a, _, _ in self.agents.values() if self.is_stale(a))
