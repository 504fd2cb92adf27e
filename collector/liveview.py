"""The live view behind the capacity APIs, in two kinds: from this process's memory, or from the store.

`MemoryLiveView` answers from the `FleetView` this process feeds (one collector process). With
`[collector] live_view = "storage"`, `StorageLiveView` answers from the store, so every collector
process behind one port or a load balancer gives the same, whole-fleet answer: InfluxQL over the
InfluxDB 1.x `/query` API (2.x through its v1 compatibility API and a DBRP mapping; 3.x), the
latest window per device and agent within `forget_after_s`, and totals over a range (`?since=`,
default 24 h) summed by the store.

The fleet answer (`summary()`, `agents()`, the fleet gauges) is read from what every collector
process published (`collector.published`: one `capmon_live` point per process and the
`capmon_totals` blocks), merged by `PublishedFleet` with the memory view's rules and shaped by
`fleet.compose_summary`: its cost grows with processes, not devices. The device lists (`devices()`,
`holders()`) turn the stored `capmon_device` and `capmon_holder` points back into the windows they
came from and fold them into a fresh `FleetView`, whose `devices()` and `holders()` shape the
answer, so the JSON and its numbers are the memory view's for the same data; there an agent's window
length is the longest of its last three reports (`window_cfg_s` where the store has it), "since" is
the start of the range, and a holder's `holders_omitted` is not stored (0).

Answers are cached for `live_view_cache_s`, and concurrent requests for the same answer share one
set of queries (single-flight), so a wall of dashboards costs the store one query per interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import aiohttp
import msgspec

from capmon.agent.wire import STATES, AgentIdentity, Batch, DeviceWindow, HolderWindow, Report

from .config import Config, StorageConfig
from .fleet import HOLDER_KEYS, UNKNOWN_MODEL, FleetView, Pricing
from .ingest import Refusal
from .published import PublishedFleet, decode_live, live_statement, totals_statements

__all__ = [
    "DEFAULT_SINCE_S",
    "LiveView",
    "LiveViewUnsupported",
    "MemoryLiveView",
    "StorageLiveView",
    "make_live_view",
]

log = logging.getLogger("capmon.collector.liveview")

# `?since=` when not given: the totals cover the last day.
DEFAULT_SINCE_S = 86400.0
# Distinct answers kept (one per query string): dashboards ask a handful; a client trying every
# `limit` cannot grow the cache.
MAX_CACHED_ANSWERS = 256
# Reports per agent whose window lengths give its window (the longest: a first window may be partial).
WINDOWS_FOR_LENGTH = 3
# The recent tier: every answer reads the raw points of this horizon, without GROUP BY (influxd 1.x
# pays ~0.2 ms per series for one: 2 s at 10k devices). What is older but within `forget_after_s`
# (devices of agents silent longer than this) comes from one per-series read, reused for half this
# horizon: a point older than the recent tier is in an older-tier read at most RECENT_S / 2 old.
RECENT_S = 300.0


class LiveViewUnsupported(Exception):
    """The configured store cannot serve a live view (it does not answer InfluxQL): a startup error."""


class LiveView(Protocol):
    """What the capacity APIs and the fleet gauges of `/metrics` ask; both kinds implement it."""

    label_keys: tuple[str, ...]
    pricing: Pricing

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def summary(self, since_s: float | None = None) -> dict[str, Any]: ...

    async def devices(
        self,
        states: frozenset[str] | None,
        min_idle_s: float,
        filters: Mapping[str, str],
        limit: int,
    ) -> list[dict[str, Any]]: ...

    async def holders(
        self,
        by: str,
        states: frozenset[str] | None,
        min_idle_s: float,
        filters: Mapping[str, str],
        limit: int,
        since_s: float | None = None,
    ) -> dict[str, Any]: ...

    async def agents(self) -> list[dict[str, Any]]: ...

    async def refresh(self) -> None:
        """Bring the fleet gauges up to date (before `/metrics` renders them)."""

    def agent_count(self) -> float: ...

    def device_count(self) -> float: ...

    def stale_agents(self) -> float: ...


def _no_since(since_s: float | None) -> None:
    if since_s is not None:
        raise Refusal(
            400,
            "invalid parameter",
            'since: totals over a range need [collector] live_view = "storage"; the memory view '
            "counts since this process started",
        )


class MemoryLiveView:
    """The live view of one collector process: what it received, since it started."""

    def __init__(self, fleet: FleetView) -> None:
        self.fleet = fleet
        self.label_keys = fleet.label_keys
        self.pricing = fleet.pricing

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def summary(self, since_s: float | None = None) -> dict[str, Any]:
        _no_since(since_s)
        return self.fleet.summary()

    async def devices(self, states, min_idle_s, filters, limit):  # type: ignore[no-untyped-def]
        return self.fleet.devices(states, min_idle_s, filters, limit)

    async def holders(self, by, states, min_idle_s, filters, limit, since_s=None):  # type: ignore[no-untyped-def]
        _no_since(since_s)
        return self.fleet.holders(by, states, min_idle_s, filters, limit)

    async def agents(self) -> list[dict[str, Any]]:
        return self.fleet.agents()

    async def refresh(self) -> None:
        return None

    def agent_count(self) -> float:
        return self.fleet.agent_count

    def device_count(self) -> float:
        return self.fleet.device_count

    def stale_agents(self) -> float:
        return self.fleet.stale_agents()


# -- InfluxQL ----------------------------------------------------------------------------------------


class _Series(msgspec.Struct):
    columns: list[str]
    values: list[list[Any]]
    name: str = ""
    tags: dict[str, str] = {}


class _Result(msgspec.Struct):
    statement_id: int = 0
    series: list[_Series] = []
    error: str | None = None


class _Answer(msgspec.Struct):
    results: list[_Result] = []
    error: str | None = None


_answer = msgspec.json.Decoder(_Answer)
# What the startup check asks for: a store answering InfluxQL returns it or nothing.
_PROBE_MEASUREMENT = "capmon_agent"


class InfluxQL:
    """`GET /query` of InfluxDB 1.x, and of 2.x / 3.x through their v1 compatibility API."""

    def __init__(self, storage: StorageConfig, timeout_s: float) -> None:
        self.url = storage.url.rstrip("/") + "/query"
        self.params: dict[str, str] = {"epoch": "s"}
        self.headers: dict[str, str] = {}
        self.auth: aiohttp.BasicAuth | None = None
        if storage.kind == "influxdb_v2":
            # 2.x maps db (and rp) to a bucket through a DBRP mapping; 3.x reads db as the database.
            self.params["db"] = storage.bucket
            self.headers["Authorization"] = f"Token {storage.token}"
        else:
            self.params["db"] = storage.db
            if storage.user:
                self.auth = aiohttp.BasicAuth(storage.user, storage.password)
        if storage.rp:
            self.params["rp"] = storage.rp
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session: aiohttp.ClientSession | None = None
        # Statements sent and seconds the store took, for `/metrics` and the benchmarks.
        self.statements = 0
        self.requests = 0
        self.seconds = 0.0

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=self.timeout, auth=self.auth, headers=self.headers)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def raw(self, statements: list[str]) -> tuple[int, bytes]:
        assert self.session is not None, "start() first"
        data = {**self.params, "q": ";\n".join(statements)}
        started = time.perf_counter()
        try:
            async with self.session.post(self.url, data=data) as resp:
                body = await resp.read()
                return resp.status, body
        finally:
            self.requests += 1
            self.statements += len(statements)
            self.seconds += time.perf_counter() - started

    async def query(self, statements: list[str]) -> list[list[_Series]]:
        """Each statement's series; raises `Refusal` 503 when the store cannot answer."""
        try:
            status, body = await self.raw(statements)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _unavailable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
        if status != 200:
            raise _unavailable(f"store answered {status}: {body[:300].decode(errors='replace')}")
        try:
            answer = _answer.decode(body)
        except msgspec.DecodeError:
            raise _unavailable("store's answer is not InfluxQL JSON") from None
        if answer.error:
            raise _unavailable(answer.error[:300])
        out = []
        for result in answer.results:
            # Nothing written yet: an empty fleet, not an outage.
            if result.error and not result.error.startswith("database not found"):
                raise _unavailable(result.error[:300])
            out.append(result.series)
        while len(out) < len(statements):
            out.append([])
        return out

    async def check(self) -> None:
        """At startup: raise `LiveViewUnsupported` when the store answers, but not InfluxQL; a store
        that is down or refuses the credentials is logged (it may come up), not fatal."""
        try:
            status, body = await self.raw([f'SELECT "window_s" FROM "{_PROBE_MEASUREMENT}" LIMIT 1'])
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("live view: the store at %s does not answer yet (%s)", self.url, type(exc).__name__)
            return
        if status in (401, 403):
            log.error("live view: the store at %s refuses the credentials (%d)", self.url, status)
            return
        if status == 200:
            try:
                answer = _answer.decode(body)
            except msgspec.DecodeError:
                answer = None
            # VictoriaMetrics answers every /query with a made-up list of databases (for Grafana's
            # data-source test): an InfluxQL store answers a SELECT with that measurement, or nothing.
            if answer is not None and not answer.error:
                names = {s.name for r in answer.results for s in r.series}
                if answer.results and names <= {_PROBE_MEASUREMENT}:
                    return
                if names:
                    body = f"series {sorted(names)!r} for a SELECT from {_PROBE_MEASUREMENT}".encode()
            elif answer is not None:
                return
        text = body[:300].decode(errors="replace")
        if status >= 500:
            log.warning("live view: the store at %s answered %d: %s", self.url, status, text)
            return
        hint = ""
        if "dbrp" in text.lower() or "bucket" in text.lower():
            hint = (
                "; InfluxDB 2.x answers InfluxQL once the bucket has a DBRP mapping: "
                f"`influx v1 dbrp create --db {self.params['db']} --rp autogen --bucket-id <id> --default`"
            )
        raise LiveViewUnsupported(
            f'live_view = "storage" needs a store that answers InfluxQL at {self.url}; it answered '
            f"{status}: {text.strip()!r}{hint}. InfluxDB 1.x, 2.x (v1 API with a DBRP mapping) and 3.x "
            "serve it; VictoriaMetrics does not (it takes the writes but has no InfluxQL): use "
            'live_view = "memory" with one collector process'
        )


def _unavailable(detail: str) -> Refusal:
    return Refusal(503, "storage unavailable", f"live view: {detail}", reason="live_view", retry_after=5)


def _rows(series: list[_Series]):  # type: ignore[no-untyped-def]
    for s in series:
        cols = s.columns
        for values in s.values:
            yield s.tags, dict(zip(cols, values, strict=False))


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _str_or_none(value: Any) -> str | None:
    return value if value else None


# -- the store's latest windows, folded into a FleetView ---------------------------------------------

_DEVICE_FIELDS = (
    "state",
    "busy_s",
    "allocated_idle_s",
    "free_s",
    "unavailable_s",
    "ghost_s",
    "spin_s",
    "util_mean_pct",
    "util_max_pct",
    "memory_used_bytes",
    "memory_total_bytes",
    "power_mean_w",
    "temp_max_c",
    "processes",
    "index",
    "idle_since",
    "state_since",
    "gpu_fraction",
    "error",
    "reason",
    "info_mig_profile",
    "holders",
)
_HOLDER_FIELDS = (
    "source",
    "pid",
    "uid",
    "command",
    "container_id",
    "pod_uid",
    "pod",
    "container",
    "slurm_job_id",
    "partition",
    "memory_bytes",
    "held_s",
    "since",
)
_STATE_SET = frozenset(STATES)
# The tags each recent-tier read selects as columns (with the configured label keys where agents'
# identities are read).
_DEVICE_TAGS = ("agent", "host", "vendor", "device", "model", "parent")
_AGENT_TAGS = ("agent", "host")
_HOLDER_TAGS = ("agent", "host", "vendor", "device", "model", "user", "namespace", "runtime", "slot")


def _tag_columns(keys: tuple[str, ...]) -> str:
    return ", ".join(f'"{k}"::tag' for k in dict.fromkeys(keys))


def _flat_rows(series: list[_Series], tag_keys: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """Raw points (no GROUP BY: one series of rows) as `_rows` gives grouped ones: (tags, fields)."""
    keys = tuple(dict.fromkeys(tag_keys))
    for s in series:
        cols = s.columns
        for values in s.values:
            row = dict(zip(cols, values, strict=False))
            tags = {k: v for k in keys if (v := row.pop(k, None))}
            yield tags, row


class _OldTier:
    """The older tier's rows (per series, over the whole `forget_after_s`), and when they were read."""

    __slots__ = ("agents", "at", "devices", "holders")

    def __init__(self, at: float, devices: list, agents: list, holders: list) -> None:  # type: ignore[type-arg]
        self.at = at
        self.devices = devices
        self.agents = agents
        self.holders = holders


def _device(tags: Mapping[str, str], row: Mapping[str, Any]) -> DeviceWindow | None:
    state = row.get("state")
    if state not in _STATE_SET:
        return None
    fraction = row.get("gpu_fraction")
    profile = row.get("info_mig_profile")
    return DeviceWindow(
        device_id=tags.get("device", ""),
        vendor=tags.get("vendor") or "unknown",
        model=tags.get("model") or None,
        parent_id=tags.get("parent") or None,
        index=_int(row.get("index")),
        state=state,
        busy_s=row.get("busy_s") or 0.0,
        allocated_idle_s=row.get("allocated_idle_s") or 0.0,
        free_s=row.get("free_s") or 0.0,
        unavailable_s=row.get("unavailable_s") or 0.0,
        ghost_s=row.get("ghost_s") or 0.0,
        spin_s=row.get("spin_s") or 0.0,
        util_mean_pct=row.get("util_mean_pct"),
        util_max_pct=row.get("util_max_pct"),
        memory_used_bytes=_int(row.get("memory_used_bytes")),
        memory_total_bytes=_int(row.get("memory_total_bytes")),
        power_mean_w=row.get("power_mean_w"),
        temp_max_c=row.get("temp_max_c"),
        processes=_int(row.get("processes")),
        idle_since=_int(row.get("idle_since")),
        state_since=_int(row.get("state_since")),
        # Stored as 1.0 for a whole device; the wire's None.
        fraction=None if fraction is None or fraction == 1.0 else fraction,
        error=_str_or_none(row.get("error")),
        reason=_str_or_none(row.get("reason")),
        info={"mig_profile": profile} if profile else {},
    )


def _holder(tags: Mapping[str, str], row: Mapping[str, Any]) -> HolderWindow:
    pid = row.get("pid")
    return HolderWindow(
        source=row.get("source") or "process",
        pid=int(pid) if pid not in (None, "") else None,
        user=tags.get("user") or None,
        uid=_int(row.get("uid")),
        command=_str_or_none(row.get("command")),
        runtime=tags.get("runtime") or None,
        container_id=_str_or_none(row.get("container_id")),
        pod_uid=_str_or_none(row.get("pod_uid")),
        namespace=tags.get("namespace") or None,
        pod=_str_or_none(row.get("pod")),
        container=_str_or_none(row.get("container")),
        slurm_job_id=_str_or_none(row.get("slurm_job_id")),
        partition=_str_or_none(row.get("partition")),
        memory_bytes=_int(row.get("memory_bytes")),
        held_s=row.get("held_s") or 0.0,
        since=_int(row.get("since")),
    )


class _AgentRows:
    __slots__ = ("end", "host", "instance", "labels", "version", "window_cfg", "windows")

    def __init__(self) -> None:
        self.end = 0
        self.host = ""
        self.labels: dict[str, str] = {}
        self.version = ""
        self.instance: str | None = None
        self.window_cfg: float | None = None
        self.windows: list[float] = []


class Snapshot:
    """One answer's worth of the store: a `FleetView` built from the latest windows, at one instant."""

    def __init__(self, view: FleetView, at: float) -> None:
        self.view = view
        self.at = at
        # Groupings (`HOLDER_KEYS`) whose since-range allocated-idle seconds are loaded.
        self.held_loaded: set[str] = set()
        self.held_lock = asyncio.Lock()


class StorageLiveView:
    """The live view every collector process shares: answered from the store, cached briefly."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        c = config.collector
        self.config = config
        self.label_keys = c.label_keys
        self.pricing = Pricing(config.pricing)
        self.stale_windows = c.stale_windows
        self.forget_after_s = c.forget_after_s
        self.cache_s = c.live_view_cache_s
        self.clock = clock
        self.store = InfluxQL(config.storage, c.live_view_query_timeout_s)
        self._answers: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._inflight: dict[Any, asyncio.Future[Any]] = {}
        self.last: Snapshot | None = None
        self.last_published: PublishedFleet | None = None
        self.snapshots = 0
        self._old: _OldTier | None = None

    async def start(self) -> None:
        await self.store.start()
        await self.store.check()

    async def close(self) -> None:
        await self.store.close()

    # -- cache and single flight --

    async def _cached(self, key: Any, build: Callable[[], Awaitable[Any]]) -> Any:
        hit = self._answers.get(key)
        if hit is not None and self.clock() - hit[0] < self.cache_s:
            return hit[1]
        future = self._inflight.get(key)
        if future is None:
            future = self._inflight[key] = asyncio.ensure_future(self._fill(key, build))
        # Shielded: one client going away does not cancel the answer the others wait for.
        return await asyncio.shield(future)

    async def _fill(self, key: Any, build: Callable[[], Awaitable[Any]]) -> Any:
        try:
            value = await build()
            # Fresh from now: an answer slower than the cache time is still reused for that long.
            self._answers[key] = (self.clock(), value)
            self._answers.move_to_end(key)
            while len(self._answers) > MAX_CACHED_ANSWERS:
                self._answers.popitem(last=False)
            return value
        finally:
            self._inflight.pop(key, None)

    def _range(self, since_s: float | None) -> float:
        return DEFAULT_SINCE_S if since_s is None else float(since_s)

    async def snapshot(self, since_s: float | None = None) -> Snapshot:
        span = self._range(since_s)
        return await self._cached(("snapshot", span), lambda: self._build(span))

    # -- the answers --

    async def published(self, since_s: float | None = None) -> PublishedFleet:
        """The fleet as every collector process published it, with the totals over the range."""
        span = self._range(since_s)
        return await self._cached(("published", span), lambda: self._build_published(span))

    async def summary(self, since_s: float | None = None) -> dict[str, Any]:
        span = self._range(since_s)

        async def answer() -> dict[str, Any]:
            return (await self.published(span)).summary()

        return await self._cached(("summary", span), answer)

    async def devices(self, states, min_idle_s, filters, limit):  # type: ignore[no-untyped-def]
        key = ("devices", states, min_idle_s, tuple(sorted(filters.items())), limit)

        async def answer() -> list[dict[str, Any]]:
            return (await self.snapshot()).view.devices(states, min_idle_s, filters, limit)

        return await self._cached(key, answer)

    async def holders(self, by, states, min_idle_s, filters, limit, since_s=None):  # type: ignore[no-untyped-def]
        span = self._range(since_s)
        key = ("holders", by, states, min_idle_s, tuple(sorted(filters.items())), limit, span)

        async def answer() -> dict[str, Any]:
            snap = await self.snapshot(span)
            await self._load_held(snap, by, span)
            return snap.view.holders(by, states, min_idle_s, filters, limit)

        return await self._cached(key, answer)

    async def agents(self) -> list[dict[str, Any]]:
        async def answer() -> list[dict[str, Any]]:
            return (await self.published()).agent_rows()

        return await self._cached(("agents",), answer)

    async def refresh(self) -> None:
        self.last_published = await self.published()

    def agent_count(self) -> float:
        return self.last_published.agent_count if self.last_published else 0

    def device_count(self) -> float:
        return self.last_published.device_count if self.last_published else 0

    def stale_agents(self) -> float:
        return self.last_published.stale_agents() if self.last_published else 0

    async def _build_published(self, span: float) -> PublishedFleet:
        now = self.clock()
        statements = [live_statement(now, self.forget_after_s), *totals_statements(now - span, now)]
        live_s, *totals_s = await self.store.query(statements)
        fleet = PublishedFleet(
            self.label_keys, self.pricing, self.stale_windows, self.forget_after_s, now, now - span
        )
        for _, row in _rows(live_s):
            payload = decode_live(row)
            if payload is not None:
                fleet.add_payload(payload)
        for series in totals_s:
            fleet.add_totals(_rows(series))
        fleet.finish()
        self.last_published = fleet
        self.snapshots += 1
        return fleet

    # -- building a snapshot --

    def _statements(self, now: int, old_due: bool) -> list[str]:
        """The store's statements for one device snapshot: the recent tier (raw points, no GROUP BY)
        and, when `old_due`, the older tier (per series). Totals and refusals are the published view's."""
        forget = int(now - self.forget_after_s)
        recent = int(now - min(self.forget_after_s, RECENT_S))
        labels = tuple(self.label_keys)
        dev_fields = ", ".join(f'"{f}"' for f in _DEVICE_FIELDS)
        holder_fields = ", ".join(f'"{f}"' for f in _HOLDER_FIELDS)
        agent_fields = '"window_s", "window_cfg_s", "version", "instance"'
        out = [
            f"SELECT {dev_fields}, {_tag_columns(_DEVICE_TAGS + labels)} FROM capmon_device "
            f"WHERE time > {recent}s AND time <= {now}s",
            f"SELECT {agent_fields}, {_tag_columns(_AGENT_TAGS + labels)} FROM capmon_agent "
            f"WHERE time > {recent}s AND time <= {now}s AND probe = ''",
            f"SELECT {holder_fields}, {_tag_columns(_HOLDER_TAGS)} FROM capmon_holder "
            f"WHERE time > {recent}s AND time <= {now}s",
        ]
        if old_due:
            window = f"time > {forget}s AND time <= {now}s"
            out += [
                f"SELECT {dev_fields} FROM capmon_device WHERE {window} GROUP BY * ORDER BY time DESC LIMIT 1",
                f"SELECT {agent_fields} FROM capmon_agent WHERE {window} AND probe = '' "
                f"GROUP BY * ORDER BY time DESC LIMIT {WINDOWS_FOR_LENGTH}",
                f"SELECT {holder_fields} FROM capmon_holder WHERE {window} GROUP BY * ORDER BY time DESC LIMIT 1",
            ]
        return out

    def _old_due(self, now: float) -> bool:
        if self.forget_after_s <= RECENT_S:
            return False  # the recent tier is the whole horizon
        return self._old is None or now - self._old.at >= RECENT_S / 2

    async def _build(self, span: float) -> Snapshot:
        now_f = self.clock()
        now = int(now_f)
        since = int(now_f - span)
        forget = now - self.forget_after_s
        old_due = self._old_due(now_f)
        results = await self.store.query(self._statements(now, old_due))
        dev_new, agents_new, holders_new = results[:3]
        if old_due:
            dev_old, agents_old, holders_old = results[3:6]
            self._old = _OldTier(
                now_f,
                list(_rows(dev_old)),
                [row for s in agents_old for row in _rows([s])],
                list(_rows(holders_old)),
            )
        old = self._old or _OldTier(now_f, [], [], [])
        label_keys = self.label_keys
        dev_rows = [*old.devices, *_flat_rows(dev_new, _DEVICE_TAGS + label_keys)]
        agent_rows_all = [*old.agents, *_flat_rows(agents_new, _AGENT_TAGS + label_keys)]
        holder_rows = [*old.holders, *_flat_rows(holders_new, _HOLDER_TAGS)]

        agents: dict[str, _AgentRows] = {}

        def agent_rows(tags: Mapping[str, str]) -> _AgentRows:
            agent_id = tags.get("agent", "")
            a = agents.get(agent_id)
            if a is None:
                a = agents[agent_id] = _AgentRows()
            return a

        # As a per-series `ORDER BY time DESC LIMIT 3`: each series' latest three reports, once each.
        by_series: dict[tuple[tuple[str, str], ...], dict[int, tuple[Mapping[str, str], dict]]] = {}
        for tags, row in agent_rows_all:
            t = int(row["time"])
            if t <= forget:
                continue
            key = tuple(sorted((k, v) for k, v in tags.items() if v))
            by_series.setdefault(key, {})[t] = (tags, row)
        for per_time in by_series.values():
            for t in sorted(per_time, reverse=True)[:WINDOWS_FOR_LENGTH]:
                tags, row = per_time[t]
                a = agent_rows(tags)
                if t > a.end:  # the latest report: its identity
                    a.end = t
                    a.host = tags.get("host", "")
                    a.labels = {k: tags[k] for k in label_keys if tags.get(k)}
                    a.version = row.get("version") or ""
                    a.instance = row.get("instance") or None
                    a.window_cfg = row.get("window_cfg_s")
                if row.get("window_s"):
                    a.windows.append(float(row["window_s"]))

        # (agent, device) → (end, window): a device whose model changed has two series; the latest wins.
        latest: dict[tuple[str, str], tuple[int, DeviceWindow]] = {}
        # Devices whose probe said nobody holds them (a `holders` count of 0, where the store has it).
        known_unheld: dict[str, set[tuple[int, str]]] = {}
        for tags, row in dev_rows:
            t = int(row["time"])
            if t <= forget:
                continue
            key = (tags.get("agent", ""), tags.get("device", ""))
            seen = latest.get(key)
            if seen is not None and t <= seen[0]:
                continue
            d = _device(tags, row)
            if d is None:
                continue
            if row.get("holders") == 0:
                known_unheld.setdefault(key[0], set()).add((t, d.device_id))
            latest[key] = (t, d)
            a = agent_rows(tags)
            if not a.host:
                a.host = tags.get("host", "")
                a.labels = {k: tags[k] for k in label_keys if tags.get(k)}

        holders: dict[tuple[str, str, int], list[tuple[int, HolderWindow]]] = {}
        seen_holders: set[tuple[str, ...]] = set()
        for tags, row in holder_rows:
            key3 = (tags.get("agent", ""), tags.get("device", ""), int(row["time"]))
            if key3[2] <= forget:
                continue
            # The same point from both tiers counts once.
            ident = (*map(str, key3), *(tags.get(k) or "" for k in ("slot", "user", "namespace", "runtime")))
            if ident in seen_holders:
                continue
            seen_holders.add(ident)
            slot = int(tags.get("slot") or 0)
            holders.setdefault(key3, []).append((slot, _holder(tags, row)))

        per_agent: dict[str, dict[int, list[DeviceWindow]]] = {}
        for (agent_id, _), (t, d) in latest.items():
            held = holders.get((agent_id, d.device_id, t))
            if held is not None:
                held.sort(key=lambda sh: (sh[1].user or "", sh[1].namespace or "", sh[0]))
                d.holders = [h for _, h in held]
            elif (t, d.device_id) in known_unheld.get(agent_id, ()):
                d.holders = []  # the probe told: nobody (else None: it cannot tell)
            per_agent.setdefault(agent_id, {}).setdefault(t, []).append(d)

        clock_now = [0.0]
        view = FleetView(
            label_keys,
            self.pricing,
            self.stale_windows,
            lambda: clock_now[0],
            forget_after_s=self.forget_after_s,
        )
        # Windows are not counted as they are folded in: the totals are the store's sums below.
        view.started_at = float("inf")
        view._next_sweep = float("inf")
        for agent_id, a in agents.items():
            by_end = per_agent.get(agent_id, {})
            ends = sorted(by_end)
            if a.end and (not ends or ends[-1] < a.end):
                ends.append(a.end)  # its latest report listed none of the devices seen before
            if not ends:
                continue
            window_s = a.window_cfg or (max(a.windows) if a.windows else None)
            reports = [
                Report(seq=i + 1, start=end - 1, end=end, devices=sorted(by_end.get(end, []), key=_by_id))
                for i, end in enumerate(ends)
            ]
            ident = AgentIdentity(
                id=agent_id,
                host=a.host,
                instance=a.instance,
                version=a.version,
                labels=a.labels,
                window_s=window_s,
            )
            # "Last seen" is the latest window's end: the store keeps no arrival time.
            clock_now[0] = float(ends[-1])
            view.apply(Batch(agent=ident, reports=reports))

        view.started_at = float(since)
        clock_now[0] = now_f
        self.snapshots += 1
        snap = Snapshot(view, now_f)
        self.last = snap
        return snap

    async def _load_held(self, snap: Snapshot, by: str, span: float) -> None:
        """The since-range allocated-idle seconds per holder key for one grouping, from `capmon_holder`
        (user and namespace are tags the store groups by; pod, job and container are fields, read
        from the allocated-idle holder points only); devices held by nobody known count as None."""
        async with snap.held_lock:
            if by in snap.held_loaded:
                return
            view = snap.view
            now = int(snap.at)
            since = int(view.started_at)
            where = f"time >= {since}s AND time <= {now}s"
            device_alloc = (
                'SELECT sum("allocated_idle_s"), sum("allocated_idle_gpu_s") FROM capmon_device '
                f"WHERE {where} AND allocated_idle_s > 0 GROUP BY agent, model"
            )
            if by in ("user", "namespace"):
                held_q = (
                    'SELECT sum("allocated_idle_s"), sum("allocated_idle_gpu_s") FROM capmon_holder '
                    f'WHERE {where} AND allocated_idle_s > 0 GROUP BY agent, model, "{by}"'
                )
            else:
                held_q = (
                    'SELECT "allocated_idle_s", "allocated_idle_gpu_s", "pod", "pod_uid", "container", '
                    '"container_id", "slurm_job_id" FROM capmon_holder '
                    f"WHERE {where} AND allocated_idle_s > 0 GROUP BY agent, model, namespace"
                )
            alloc_s, held_s = await self.store.query([device_alloc, held_q])
            key_of = HOLDER_KEYS[by]
            sums: dict[str, dict[str | None, dict[str, list[float]]]] = {}
            for tags, row in _rows(held_s):
                if by in ("user", "namespace"):
                    key: str | None = tags.get(by) or None
                    s, gs = row.get("sum") or 0.0, row.get("sum_1") or 0.0
                else:
                    h = HolderWindow(
                        namespace=tags.get("namespace") or None,
                        pod=row.get("pod") or None,
                        pod_uid=row.get("pod_uid") or None,
                        container=row.get("container") or None,
                        container_id=row.get("container_id") or None,
                        slurm_job_id=row.get("slurm_job_id") or None,
                    )
                    key = key_of(h)
                    s, gs = row.get("allocated_idle_s") or 0.0, row.get("allocated_idle_gpu_s") or 0.0
                model = tags.get("model") or UNKNOWN_MODEL
                acc = (
                    sums.setdefault(tags.get("agent", ""), {})
                    .setdefault(key, {})
                    .setdefault(model, [0.0, 0.0])
                )
                acc[0] += s
                acc[1] += gs
            for tags, row in _rows(alloc_s):
                # What no listed holder accounts for: devices with no holder, held by nobody known.
                per_key = sums.setdefault(tags.get("agent", ""), {})
                model = tags.get("model") or UNKNOWN_MODEL
                known = sum(m[model][0] for k, m in per_key.items() if k is not None and model in m)
                known_g = sum(m[model][1] for k, m in per_key.items() if k is not None and model in m)
                rest, rest_g = (row.get("sum") or 0.0) - known, (row.get("sum_1") or 0.0) - known_g
                if rest > 1e-6:
                    acc = per_key.setdefault(None, {}).setdefault(model, [0.0, 0.0])
                    acc[0], acc[1] = rest, max(0.0, rest_g)
            for agent in view.by_id.values():
                if agent.held is None:
                    agent.held = {b: OrderedDict() for b in HOLDER_KEYS}
                    agent.held_folded = dict.fromkeys(HOLDER_KEYS, 0)
                agent.held[by] = OrderedDict(sums.get(agent.id, {}))
            snap.held_loaded.add(by)


def _by_id(d: DeviceWindow) -> str:
    return d.device_id


def make_live_view(config: Config, fleet: FleetView, clock: Callable[[], float]) -> LiveView:
    if config.collector.live_view == "storage":
        return StorageLiveView(config, clock)
    return MemoryLiveView(fleet)
