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
- The windows it applies are summed per block of window end (1 minute, 10 minutes, 1 hour), per
  model and per label value, into `capmon_totals` points (tags `collector`, `res`, `dim`, `key`, `value`): a block
  still filling is rewritten with its running sums. The range totals (`?since=`) are then the sum
  of a few hundred series' points: whole hours from the hour blocks, then whole ten minutes, then
  minutes at either end, so the range starts at `since` rounded up to the minute.

The reader takes each process's latest `capmon_live` point within `forget_after_s` and, per agent,
the record with the latest window (an agent that moved to another process, or whose process died,
is in several; the newest wins), sums refusals over them, and judges staleness and forgetting by the
same rules as the memory view, at read time. The answer is `fleet.compose_summary`'s, as the memory
view's: the same JSON and, for the same reports, the same numbers.

What this costs and what it does not do: a publish is ~15 B per agent compressed (2 kB per 1,000
devices at 8 per agent); the answer lags the reports by up to `live_publish_interval_s`; a window an
agent resends to a second process after the first stored it (its answer lost) is counted by both in
the range totals (device states are not affected); a window more than `FINE_KEEP_S` old when it
arrives is left out of the minute blocks and one more than `COARSE_KEEP_S` old out of the totals
(`capmon_collector_totals_late_windows` counts them). `GET /api/v1/devices` and `/holders`
list devices and still read `capmon_device` (see `liveview.StorageLiveView`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
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
from .storage import StorageError, StorageRejected, describe

__all__ = [
    "CHUNK",
    "LivePayload",
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
# (block seconds, `res` tag, kept in memory): a range reads whole hours, then whole ten minutes, then
# minutes at either end, so at most ~50 blocks per series however long the range.
RESOLUTIONS = ((FINE_S, "1m", FINE_KEEP_S), (600, "10m", COARSE_KEEP_S), (COARSE_S, "1h", COARSE_KEEP_S))
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
# The model or label value as sent, JSON-encoded (a string field).
NAME_FIELD = "name"
# A refusal's last detail as published (the memory view keeps up to wire.MAX_TEXT_LEN).
MAX_PUBLISHED_DETAIL = 256
# Lines per write when publishing (well under storage.max_pending_lines).
PUBLISH_LINES = 10_000


def collector_id(worker: str = "") -> str:
    """This process, as its `capmon_live` and `capmon_totals` points name it: host, pid, start."""
    host = socket.gethostname()[:64] or "collector"
    who = f"w{worker}" if worker else "p"
    return f"{host}:{who}:{os.getpid()}:{int(time.time()):x}"


# -- the range totals ----------------------------------------------------------------------------


class Totals:
    """The seconds of the windows this process applied, per block of window end, model and label."""

    def __init__(self, label_keys: tuple[str, ...], clock: Callable[[], float]) -> None:
        self.label_keys = label_keys
        self.clock = clock
        # (block seconds, block start) → (dim, key, value) → 8 sums, idle energy (None: none reported)
        self.blocks: dict[tuple[int, int], dict[tuple[str, str, str], list[Any]]] = {}
        self.dirty: set[tuple[int, int]] = set()
        # (minute block, agent labels, model, which resolutions may be added to) → the sums of the
        # windows counted since the blocks were last written.
        self.pending: dict[tuple[int, tuple[str | None, ...], str, tuple[bool, ...]], list[Any]] = {}
        # The blocks the last `lines()` wrote (to be written again if that write fails).
        self.written: set[tuple[int, int]] = set()
        self.late_windows = 0
        # Blocks kept that hold each (dim, key, value), and the values kept per (dim, key).
        self.dims: dict[tuple[str, str, str], int] = {}
        self.kinds: dict[tuple[str, str], int] = {}

    def add(self, agent: AgentState, report: Report) -> None:
        """Count a window applied (called for each, at ingest: cheap — the blocks are made from
        `pending` when written)."""
        now = self.clock()
        # Which resolutions' blocks may still be added to (the others are too old to be kept).
        oks = tuple(report.end // size * size + size >= now - keep for size, _, keep in RESOLUTIONS)
        if not any(oks):
            self.late_windows += 1
            return
        self.late_windows += not all(oks)
        labels = agent.labels or (None,) * len(self.label_keys)
        minute = report.end // FINE_S * FINE_S
        pending = self.pending
        for d in report.devices:
            key = (minute, labels, d.model or UNKNOWN_MODEL, oks)
            acc = pending.get(key)
            if acc is None:
                acc = pending[key] = [0.0] * 8 + [None]
            busy, alloc, free, unav = d.busy_s, d.allocated_idle_s, d.free_s, d.unavailable_s
            acc[0] += busy
            acc[1] += alloc
            acc[2] += free
            acc[3] += unav
            share = d.fraction
            if share is None:
                acc[4] += busy
                acc[5] += alloc
                acc[6] += free
                acc[7] += unav
            else:
                acc[4] += busy * share
                acc[5] += alloc * share
                acc[6] += free * share
                acc[7] += unav * share
            if d.idle_energy_j is not None:
                acc[8] = (acc[8] or 0.0) + d.idle_energy_j

    def _fold(self) -> None:
        """Add what was counted since the last write to its blocks, per model and label value."""
        keys = self.label_keys
        for (minute, labels, model, oks), acc in self.pending.items():
            for (size, _, _), ok in zip(RESOLUTIONS, oks, strict=True):
                if not ok:
                    continue
                start = minute // size * size
                block = self.blocks.get((size, start))
                if block is None:
                    block = self.blocks[(size, start)] = {}
                self.dirty.add((size, start))
                self._add(block, ("model", "", model), acc, MAX_TOTALS_MODELS)
                for key, value in zip(keys, labels, strict=True):
                    self._add(block, ("label", key, value or NO_LABEL), acc, MAX_TOTALS_VALUES)
        self.pending.clear()

    def _add(
        self,
        block: dict[tuple[str, str, str], list[Any]],
        dim: tuple[str, str, str],
        acc: Sequence[Any],
        cap: int,
    ) -> None:
        """Add to a block; a model or label value new to every block kept folds into "(other)" once
        `cap` of its kind are kept (a name per window cannot make a series per window)."""
        if dim not in block:
            if dim not in self.dims and self.kinds.get(dim[:2], 0) >= cap - 1 and dim[2] != OTHER:
                dim = (dim[0], dim[1], OTHER)
            if dim not in block:
                n = self.dims.get(dim, 0)
                if n == 0:
                    self.kinds[dim[:2]] = self.kinds.get(dim[:2], 0) + 1
                self.dims[dim] = n + 1
        _add(block, dim, acc)

    def _forget(self, key: tuple[int, int]) -> None:
        for dim in self.blocks.pop(key):
            n = self.dims[dim] - 1
            if n:
                self.dims[dim] = n
            else:
                del self.dims[dim]
                self.kinds[dim[:2]] -= 1

    def lines(self, collector: str) -> list[str]:
        """The points of every block changed since the last call (its running sums)."""
        self._fold()
        out = []
        tag = escape_tag(collector)
        names = {size: name for size, name, _ in RESOLUTIONS}
        for size, start in sorted(self.dirty):
            for (dim, key, value), acc in self.blocks.get((size, start), {}).items():
                key_tag = f",key={escape_tag(key)}" if key else ""
                fields = ",".join(f"{f}={float(v)!r}" for f, v in zip(TOTALS_FIELDS, acc, strict=False))
                if acc[8] is not None:
                    fields += f",{ENERGY_FIELD}={float(acc[8])!r}"
                # The value as sent (a tag reads back with `\` as `/` and control characters as
                # spaces): JSON, so the answer's keys are the memory view's.
                fields += f",{NAME_FIELD}={string_field(_json_text(value))}"
                out.append(
                    f"capmon_totals,collector={tag},dim={dim}{key_tag},res={names[size]},"
                    f"value={escape_tag(value)} {fields} {start}"
                )
        self.written = set(self.dirty)
        self.dirty.clear()
        return out

    def forget_old(self) -> None:
        """Forget the blocks too old to be added to (once their last sums are written; a block with
        windows still pending is dirty, so kept)."""
        self._fold()
        now = self.clock()
        keep = {size: k for size, _, k in RESOLUTIONS}
        for key in [b for b in self.blocks if b not in self.dirty and b[1] + b[0] < now - keep[b[0]]]:
            self._forget(key)

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


def _json_text(value: str) -> str:
    return msgspec.json.encode(value).decode()


def _name(text: Any) -> str | None:
    """A `name` field back to the value it names; None when absent or not one."""
    if not isinstance(text, str):
        return None
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, str) else None


def range_start(since: float) -> int:
    """Where a range starting at `since` starts in the totals: the next minute block."""
    return math.ceil(since / FINE_S) * FINE_S


def _pieces(start: int, stop: int, sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """[start, stop) as (block seconds, first block, end) of the largest whole blocks, smaller ones
    at either end; start and stop are multiples of the smallest size."""
    if start >= stop:
        return []
    if len(sizes) == 1:
        return [(sizes[0], start, stop)]
    size = sizes[-1]
    first, last = -(-start // size) * size, stop // size * size
    if first >= last:
        return _pieces(start, stop, sizes[:-1])
    return [*_pieces(start, first, sizes[:-1]), (size, first, last), *_pieces(last, stop, sizes[:-1])]


def totals_statements(since: float, now: float) -> list[str]:
    """InfluxQL reading the `capmon_totals` points over [range_start(since), now], per dim, key and
    value (summed by `PublishedFleet.add_totals`): whole hours from the hour blocks, whole ten minutes
    from those blocks, the minutes at either end from the minute blocks; the minute block holding
    `now` is the last one."""
    # The blocks' points, summed here: influxd 1.6 pays ~6 ms per summed column over a day of blocks,
    # while the points themselves (a few hundred series, at most ~50 blocks each) read in a few ms.
    fields = ", ".join(f'"{f}"' for f in (*TOTALS_FIELDS, ENERGY_FIELD, NAME_FIELD))
    names = {size: name for size, name, _ in RESOLUTIONS}
    stop = int(now) // FINE_S * FINE_S + FINE_S
    return [
        f"SELECT {fields} FROM capmon_totals WHERE res = '{names[size]}' AND time >= {lo}s "
        f'AND time < {hi}s GROUP BY "dim", "key", "value"'
        for size, lo, hi in _pieces(range_start(since), stop, [size for size, _, _ in RESOLUTIONS])
    ]


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
        fleet.count_totals = False  # the range totals are `self.totals`; nothing reads the view's own
        self._published_changes = -1
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.publishes = 0
        self.failures = 0
        self.rejections = 0
        self._rejected_logged = -3600.0
        self.last_bytes = 0

    def payload(self, now: float) -> dict[str, Any]:
        """This process's view in columns (one list per attribute: 12,500 agents decode in a few ms,
        where a list per agent costs the reader ten times that): agents and their identity, their
        devices' counts per model as rows of `TALLY_WIDTH` numbers in one flat list, agents known
        only by refusals, agents kept out of the view."""
        fleet = self.fleet
        keys = fleet.label_keys
        live = fleet.live_agents(now)
        t_agent: list[int] = []
        t_model: list[str] = []
        t_values: list[Any] = []
        refusals: dict[str, Any] = {}
        for i, a in enumerate(live):
            for model, t in fleet.device_tallies(a).items():
                t_agent.append(i)
                t_model.append(model)
                t_values += t.packed()
            if a.refusals:
                refusals[str(i)] = _short_details(a.refusals)
        labels = {key: [a.labels[k] if a.labels else None for a in live] for k, key in enumerate(keys)}
        return {
            "v": FORMAT,
            "at": now,
            "agents": {
                "id": [a.id for a in live],
                "host": [a.host for a in live],
                "instance": [a.instance for a in live],
                "version": [a.version for a in live],
                "labels": labels,
                "window_s": [a.window_s for a in live],
                "last_end": [a.last_end for a in live],
                "last_seen": [a.last_seen for a in live],
                "last_refused_at": [a.last_refused_at for a in live],
                "models_folded": [a.folded_models for a in live],
                "devices": [len(a.devices) for a in live],
                "refusals": refusals,
            },
            "tallies": {"agent": t_agent, "model": t_model, "values": t_values},
            "refused": [
                [a.id, a.host, a.last_refused_at, _short_details(a.refusals)]
                for a in fleet.refused_only.values()
                if not fleet.is_forgotten(a, now)
            ],
            "kept_out": [
                [k, r.host, r.last_seen, r.reports, r.devices, r.bound]
                for k, r in fleet.kept_out.items()
                if now - r.last_seen <= fleet.forget_after_s
            ],
        }

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
        return self.fleet.changes != self._published_changes or bool(self.totals.dirty or self.totals.pending)

    async def publish(self) -> bool:
        """Write what changed; False (logged once per outage) when the store did not take it."""
        now = self.clock()
        changes = self.fleet.changes
        lines = [*self.totals.lines(self.collector), self.live_line(now)]
        blocks = self.totals.written
        try:
            # In pieces: the blocks a long outage left dirty may be more than one request may carry.
            for i in range(0, len(lines), PUBLISH_LINES):
                await self.submit(lines[i : i + PUBLISH_LINES])
        except StorageRejected as exc:
            # For good (a field type conflict: someone else wrote these measurements): retrying the
            # same lines cannot help, and influxd took the lines it could.
            self.failures += 1
            self.rejections += 1
            self.totals.forget_old()
            now_m = time.monotonic()
            if now_m - self._rejected_logged >= 60.0:
                self._rejected_logged = now_m
                log.error("the store rejects this collector's live view (not retried): %s", exc.detail)
            return False
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
        self.totals.forget_old()
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


def _short_details(refusals: Mapping[str, list[Any]] | None) -> dict[str, list[Any]] | None:
    """Refusals as published: each reason's last detail cut to `MAX_PUBLISHED_DETAIL` characters, so
    what agents are refused for cannot swell every publish (the store's `capmon_refusal` has it whole)."""
    if not refusals:
        return None
    return {
        reason: [count, detail[:MAX_PUBLISHED_DETAIL], at] for reason, (count, detail, at) in refusals.items()
    }


# -- reading ---------------------------------------------------------------------------------------


def live_statement(now: float, forget_after_s: float) -> str:
    since = int(now - forget_after_s) // LIVE_POINT_S * LIVE_POINT_S
    return f"SELECT * FROM capmon_live WHERE time >= {since}s GROUP BY collector ORDER BY time DESC LIMIT 1"


def decode_live(row: Mapping[str, Any]) -> LivePayload | None:
    """A `capmon_live` row's payload; None (logged) when it is not one this version reads — not
    this format, corrupt, or of another shape: one bad point never breaks every answer."""
    why = None
    try:
        version, n = row.get("v"), row.get("chunks")
        if version != FORMAT:
            why = f"format {version!r}, this collector reads {FORMAT}"
        elif not isinstance(n, int | float) or not 0 < n <= len(row):
            why = f"chunks {n!r} for a point of {len(row)} columns"
        else:
            packed = "".join(row.get(f"p{i}") or "" for i in range(int(n)))
            payload = _payload.decode(zlib.decompress(base64.b64decode(packed, validate=True)))
            why = _invalid(payload)
            if why is None:
                return payload
    except msgspec.ValidationError as exc:
        why = str(exc)[:200]
    except (ValueError, TypeError, zlib.error, msgspec.DecodeError) as exc:
        why = type(exc).__name__
    log.warning("a published live view could not be read (%s): left out", why)
    return None


# What a published view decodes to (msgspec checks every type while decoding; `_invalid` the rest).
_Refusals = dict[str, tuple[int, str, float]]


class _AgentColumns(msgspec.Struct):
    id: list[str]
    host: list[str]
    instance: list[str | None]
    version: list[str]
    labels: dict[str, list[str | None]]
    window_s: list[float]
    last_end: list[int]
    last_seen: list[float]
    last_refused_at: list[float]
    models_folded: list[int]
    devices: list[int]
    refusals: dict[str, _Refusals]


class _TallyColumns(msgspec.Struct):
    agent: list[int]
    model: list[str]
    values: list[float | None]


class LivePayload(msgspec.Struct):
    v: int
    at: float
    agents: _AgentColumns
    tallies: _TallyColumns
    refused: list[tuple[str, str, float, _Refusals | None]]
    kept_out: list[tuple[str, str, float, int, int, str]]


_payload = msgspec.json.Decoder(LivePayload)


def _invalid(p: LivePayload) -> str | None:
    """What the types do not say about a decoded view: columns of one length, rows in range."""
    a, t = p.agents, p.tallies
    n = len(a.id)
    for name in _AgentColumns.__struct_fields__:
        col = getattr(a, name)
        if isinstance(col, list) and len(col) != n:
            return f"agents.{name}: {len(col)} values for {n} agents"
    if any(len(c) != n for c in a.labels.values()):
        return "agents.labels: a column of another length"
    if not all(k.isdigit() and int(k) < n for k in a.refusals):
        return "agents.refusals: a row out of range"
    if len(t.model) != len(t.agent) or len(t.values) != TALLY_WIDTH * len(t.agent):
        return "tallies: columns of other lengths"
    if t.agent and (min(t.agent) < 0 or max(t.agent) >= n):
        return "tallies.agent: a row out of range"
    if any(None in t.values[i::TALLY_WIDTH] for i in range(TALLY_WIDTH - 1)):
        return "tallies.values: a count missing"
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
        self._published: list[LivePayload] = []
        # agent id → (payload, row, last_end, last_seen): its newest record; and its latest refusal.
        self._winner: dict[str, tuple[int, int, int, float]] = {}
        self._last_refused: dict[str, float] = {}
        self.refused: dict[str, AgentState] = {}
        self.kept_out: dict[str, _KeptOut] = {}
        self.by_model: dict[str, _Tally] = {}
        self.by_label: list[dict[str, _Tally]] = [{} for _ in label_keys]
        self.publishers = 0
        # Refusals per agent, summed over the processes that refused it: reason → [count, detail, at].
        self._refusals: dict[str, dict[str, list[Any]]] = {}
        self._agents: dict[str, AgentState] | None = None

    def add_payload(self, payload: LivePayload) -> None:
        if self.now - payload.at > self.forget_after_s:
            return
        self.publishers += 1
        agents = payload.agents
        index = len(self._published)
        self._published.append(payload)
        winner = self._winner
        last_refused = self._last_refused
        for row, (agent_id, end, seen, refused_at) in enumerate(
            zip(agents.id, agents.last_end, agents.last_seen, agents.last_refused_at, strict=True)
        ):
            have = winner.get(agent_id)
            if have is None or (have[2], have[3]) < (end, seen):
                winner[agent_id] = (index, row, end, seen)
            if refused_at > last_refused.get(agent_id, 0.0):
                last_refused[agent_id] = refused_at
        ids = agents.id
        for row, refusals in agents.refusals.items():
            self._add_refusals(ids[int(row)], refusals)
        for agent_id, host, last_refused_at, refusals in payload.refused:
            self._add_refusals(agent_id, refusals)
            # An agent another process refuses is still sending: it stays listed, as in one view.
            if last_refused_at > last_refused.get(agent_id, 0.0):
                last_refused[agent_id] = last_refused_at
            have_r = self.refused.get(agent_id)
            if have_r is None or last_refused_at > have_r.last_refused_at:
                a = AgentState(agent_id)
                a.host, a.last_refused_at = host, last_refused_at
                self.refused[agent_id] = a
        for agent_id, host, last_seen, reports, devices, bound in payload.kept_out:
            have_k = self.kept_out.get(agent_id)
            if have_k is None or last_seen > have_k.last_seen:
                k = _KeptOut()
                k.host, k.last_seen, k.reports, k.devices, k.bound = host, last_seen, reports, devices, bound
                self.kept_out[agent_id] = k

    def _add_refusals(self, agent_id: str, refusals: Mapping[str, Sequence[Any]] | None) -> None:
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
        """Add `capmon_totals` points (grouped by dim, key and value) to the range totals."""
        for tags, row in rows:
            t = _Tally()
            for i, name in enumerate(TOTALS_FIELDS[:4]):
                t.seconds[i] = float(row.get(name) or 0.0)
            for i, name in enumerate(TOTALS_FIELDS[4:]):
                t.gpu_seconds[i] = float(row.get(name) or 0.0)
            t.add_energy(row.get(ENERGY_FIELD))
            value = _name(row.get(NAME_FIELD)) or tags.get("value") or ""
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
        """Settle who is in the view: kept-out and forgotten agents out, refusals merged."""
        now, forget = self.now, self.forget_after_s
        winner, last_refused = self._winner, self._last_refused
        for agent_id, k in list(self.kept_out.items()):
            live = winner.get(agent_id)
            if live is not None and live[3] >= k.last_seen:
                del self.kept_out[agent_id]
            elif live is not None:
                del winner[agent_id]  # kept out after its latest record: as the memory view
            if now - k.last_seen > forget:
                self.kept_out.pop(agent_id, None)
        for agent_id, (_, _, _, seen) in list(winner.items()):
            if now - max(seen, last_refused.get(agent_id, 0.0)) > forget:
                del winner[agent_id]
        for agent_id in list(self.refused):
            a = self.refused[agent_id]
            if agent_id in winner or now - a.last_refused_at > forget:
                del self.refused[agent_id]
            else:
                a.refusals = self._refusals.get(agent_id)

    def _stale(self, p: LivePayload, row: int, seen: float) -> bool:
        return self.now - seen > self.stale_windows * p.agents.window_s[row]

    def summary(self) -> dict[str, Any]:
        keys = self.label_keys
        winner = self._winner
        # (labels, model) → the summed device counts of the agents with those labels: the agents of
        # a fleet share a few label sets, so the breakdowns add a few hundred tallies, not one per agent.
        groups: dict[tuple[Any, ...], dict[str, list[Any]]] = {}
        stale = 0
        for index, p in enumerate(self._published):
            ids, seen_col = p.agents.id, p.agents.last_seen
            label_cols = [p.agents.labels.get(k) or [None] * len(ids) for k in keys]
            stale_rows: dict[int, bool] = {}
            mine: dict[int, tuple[Any, ...]] = {}
            for row, agent_id in enumerate(ids):
                if winner.get(agent_id, (-1, -1))[:2] == (index, row):
                    is_stale = self._stale(p, row, seen_col[row])
                    stale_rows[row] = is_stale
                    stale += is_stale
                    mine[row] = tuple(col[row] for col in label_cols)
                    groups.setdefault(mine[row], {})
            values = p.tallies.values
            for j, (row, model) in enumerate(zip(p.tallies.agent, p.tallies.model, strict=True)):
                labels = mine.get(row)
                if labels is None:
                    continue
                packed = values[j * TALLY_WIDTH : (j + 1) * TALLY_WIDTH]
                if stale_rows[row]:
                    packed = _unavailable(packed)
                per_model = groups[labels]
                have = per_model.get(model)
                if have is None:
                    per_model[model] = list(packed)
                else:
                    _add_packed(have, packed)
        parts = [
            (labels, {m: _Tally.unpacked(v) for m, v in per_model.items()})
            for labels, per_model in groups.items()
        ]
        return compose_summary(
            now=self.now,
            since=self.since,
            label_keys=keys,
            pricing=self.pricing,
            agents=len(winner),
            stale=stale,
            parts=parts,
            by_model_extra=self.by_model,
            by_label_extra=self.by_label,
        )

    def agents(self) -> dict[str, tuple[AgentState, bool, int]]:
        """Agent id → (its state as published, stale, devices), built on first use."""
        out = {}
        for agent_id, (index, row, _, _) in self._winner.items():
            col = self._published[index].agents
            a = AgentState(agent_id)
            a.host, a.instance, a.version = col.host[row], col.instance[row], col.version[row]
            a.labels = tuple(col.labels[k][row] if k in col.labels else None for k in self.label_keys)
            a.window_s, a.last_end, a.last_seen = col.window_s[row], col.last_end[row], col.last_seen[row]
            a.last_refused_at = self._last_refused.get(agent_id, 0.0)
            a.folded_models = col.models_folded[row]
            a.refusals = self._refusals.get(agent_id)
            out[agent_id] = (a, self._stale(self._published[index], row, a.last_seen), col.devices[row])
        return out

    def agent_rows(self) -> list[dict[str, Any]]:
        return agent_rows(list(self.agents().values()), self.refused.values(), self.kept_out.items())

    @property
    def agent_count(self) -> int:
        return len(self._winner)

    @property
    def device_count(self) -> int:
        return sum(self._published[i].agents.devices[row] for i, row, _, _ in self._winner.values())

    def stale_agents(self) -> int:
        return sum(self._stale(self._published[i], row, seen) for i, row, _, seen in self._winner.values())


# What `_Tally.packed()` lists: devices, 4 states, 4 GPU-equivalents, idle value, idle power.
TALLY_WIDTH = 11


def _unavailable(packed: Sequence[Any]) -> list[Any]:
    """`_Tally.as_unavailable`, on the packed form."""
    devices, gpu, power = packed[0], sum(packed[5:9]), packed[10]
    return [devices, 0, 0, 0, devices, 0.0, 0.0, 0.0, gpu, 0.0, None if power is None else 0.0]


def _add_packed(have: list[Any], packed: Sequence[Any]) -> None:
    for i in range(10):
        have[i] += packed[i]
    if packed[10] is not None:
        have[10] = (have[10] or 0.0) + packed[10]
