"""The ingest rule, in one place: read, decode, bound, check, store, then apply to the live view
unless refused, and record every refusal where operators look.

`IngestService.ingest()` is what `POST /api/v1/reports` does once the request is authenticated; the
aiohttp handler only parses the request and calls it. Every refusal is a `Refusal` (an `ErrorBody`
with the HTTP status and the reason counted in `rejects_total`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from capmon.agent import wire
from capmon.agent.wire import Batch, DeviceWindow, ErrorBody, check_report, decode_batch, split_error

from .auth import Principal
from .config import Config
from .lineproto import batch_lines, escape_tag, string_field
from .metrics import Metrics
from .storage import (
    CollectorOverloaded,
    GroupCommitWriter,
    RequestTooLarge,
    StorageError,
    StorageRejected,
    describe,
)

log = logging.getLogger("capmon.collector")

_json = msgspec.json.Encoder()


class Refusal(Exception):
    """An ingest or API request refused with an `ErrorBody`; `reason` is what `rejects_total` counts."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str = "",
        path: str | None = None,
        reason: str = "",
        retry_after: int | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(error)
        self.status, self.body = status, ErrorBody(error=error, detail=detail, path=path)
        self.reason = reason or error.replace(" ", "_")
        self.retry_after = retry_after
        # Close the connection after answering (a body left unread: timeout, too large).
        self.close = close

    @property
    def detail(self) -> str:
        return self.body.detail

    def encode(self) -> bytes:
        return _json.encode(self.body)


class ClientDisconnected(Refusal):
    """The client went away mid-body: nobody to answer; counted, logged at info."""

    def __init__(self) -> None:
        super().__init__(499, "client disconnected", reason="client_disconnected")


# Refusals about the collector's own state, not the agent's data: kept in the live view only, never
# written to the store (which is what is failing, or busy).
_NOT_STORED_REASONS = frozenset({"overloaded", "storage_unavailable", "busy", "client_disconnected"})


@dataclass(frozen=True)
class IngestLimits:
    """Every bound ingest applies, read from the configuration in one place (`from_config`); the
    defaults live in `CollectorConfig` alone, which the loader already capped at the wire's limits."""

    max_body_bytes: int
    max_decoded_bytes: int
    max_device_windows: int
    # Decoded bytes (bodies and their decoded objects) all requests together may hold at once.
    max_inflight_decoded_bytes: int
    body_read_timeout_s: float
    # Per agent id, since the collector started: distinct device ids (and MIG parents), and distinct
    # tag values besides them (models, vendors, label values, host names, probe names).
    max_devices_per_agent: int
    max_values_per_agent: int
    max_labels: int
    max_label_value_len: int
    max_future_s: float
    max_past_s: float
    max_window_s: float
    label_keys: tuple[str, ...]
    # Refusals of one agent and reason are written to the store at most once per this many seconds.
    refusal_write_interval_s: float

    @classmethod
    def from_config(cls, config: Config) -> IngestLimits:
        c = config.collector
        return cls(
            max_body_bytes=c.max_body_bytes,
            max_decoded_bytes=c.max_decoded_bytes,
            max_device_windows=c.max_device_windows,
            max_inflight_decoded_bytes=c.max_inflight_decoded_bytes,
            body_read_timeout_s=c.body_read_timeout_s,
            max_devices_per_agent=c.max_devices_per_agent,
            max_values_per_agent=c.max_values_per_agent,
            max_labels=c.max_labels,
            max_label_value_len=c.max_label_value_len,
            max_future_s=c.max_future_s,
            max_past_s=c.max_past_s,
            max_window_s=c.max_window_s,
            label_keys=c.label_keys,
            refusal_write_interval_s=c.refusal_write_interval_s,
        )


class DecodedBudget:
    """Bytes that all in-flight requests hold decoded; a reservation beyond `limit` is refused (503).

    Only refused while others hold some: a collector with nothing in flight takes any request within
    `max_decoded_bytes`, so one large request never waits for itself.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reservation(self) -> Reservation:
        return Reservation(self)


class Reservation:
    """One request's share of the `DecodedBudget`; released in full when the request ends."""

    def __init__(self, budget: DecodedBudget) -> None:
        self.budget = budget
        self.held = 0

    def add(self, n: int) -> None:
        b = self.budget
        if b.used > self.held and b.used + n > b.limit:
            raise Refusal(
                503,
                "busy",
                f"the collector holds {b.used // 2**20} MiB of request bodies "
                f"(collector.max_inflight_decoded_bytes {b.limit // 2**20} MiB): retry later",
                reason="busy",
                retry_after=1,
                close=True,
            )
        b.used += n
        self.held += n

    def release(self, n: int | None = None) -> None:
        n = self.held if n is None else min(n, self.held)
        self.held -= n
        self.budget.used -= n

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# Gunzip output per step: the budget is charged before more is decoded.
_GUNZIP_STEP = 1024 * 1024


async def read_body(
    chunks: AsyncIterator[bytes],
    encoding: str,
    content_length: int | None,
    limits: IngestLimits,
    reservation: Reservation,
) -> bytearray:
    """The request body, gunzipped if it says so; sizes capped and the budget charged while streaming."""
    max_body, max_decoded = limits.max_body_bytes, limits.max_decoded_bytes
    if content_length is not None and content_length > max_body:
        raise Refusal(413, "body too large", f"at most {max_body} bytes", reason="too_large", close=True)
    encoding = encoding.strip().lower()
    if encoding not in ("identity", "gzip", ""):
        raise Refusal(
            415, "unsupported content encoding", f"{encoding[:40]!r}; use gzip or none", reason="encoding"
        )
    gunzip = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
    out = bytearray()
    received = 0
    try:
        async with asyncio.timeout(limits.body_read_timeout_s):
            async for chunk in chunks:
                received += len(chunk)
                if received > max_body:
                    raise Refusal(
                        413, "body too large", f"at most {max_body} bytes", reason="too_large", close=True
                    )
                if gunzip is None:
                    reservation.add(len(chunk))
                    out += chunk
                    continue
                data = chunk
                while data:
                    try:
                        piece = gunzip.decompress(data, _GUNZIP_STEP)
                    except zlib.error as exc:
                        raise Refusal(400, "invalid gzip body", str(exc), reason="bad_gzip") from None
                    data = gunzip.unconsumed_tail
                    if len(out) + len(piece) > max_decoded:
                        raise Refusal(
                            413,
                            "body too large",
                            f"at most {max_decoded} bytes after gzip decoding",
                            reason="too_large",
                            close=True,
                        )
                    reservation.add(len(piece))
                    out += piece
    except TimeoutError:
        raise Refusal(
            408,
            "body read timeout",
            f"the body did not arrive within {limits.body_read_timeout_s:g}s (collector.body_read_timeout_s)",
            reason="body_timeout",
            close=True,
        ) from None
    except (ConnectionError, aiohttp.ClientConnectionError):
        raise ClientDisconnected() from None
    if gunzip is not None and (not gunzip.eof or gunzip.unused_data):
        raise Refusal(400, "invalid gzip body", "truncated or trailing data", reason="bad_gzip")
    return out


# -- checks msgspec cannot express -----------------------------------------------------------------


def check_batch(batch: Batch, limits: IngestLimits, now: float) -> Refusal | None:
    """The wire's cross-field checks (`wire.check_report`) plus the collector's configured bounds."""
    labels = batch.agent.labels
    if len(labels) > limits.max_labels:
        return Refusal(
            400, "invalid report", f"at most {limits.max_labels} labels", "$.agent.labels", "invalid"
        )
    for key, value in labels.items():
        if len(value) > limits.max_label_value_len:
            return Refusal(
                400,
                "invalid report",
                f"label value longer than {limits.max_label_value_len} characters",
                f"$.agent.labels.{key}",
                "invalid",
            )
    seqs: set[int] = set()
    for i, r in enumerate(batch.reports):
        where = f"$.reports[{i}]"
        if r.seq in seqs:
            return Refusal(400, "invalid report", "seq repeated within the batch", f"{where}.seq", "invalid")
        seqs.add(r.seq)
        found = check_report(r, where)
        if found is not None:
            return Refusal(400, "invalid report", found[0], found[1], "invalid")
        if r.end - r.start > limits.max_window_s:
            return Refusal(
                400,
                "invalid report",
                f"window longer than {limits.max_window_s:g}s",
                f"{where}.start",
                "invalid",
            )
        if r.end > now + limits.max_future_s:
            return Refusal(
                400,
                "invalid report",
                f"end is {r.end - now:.0f}s in the future (at most {limits.max_future_s:g}s): "
                "check the agent's clock",
                f"{where}.end",
                "clock",
            )
        if r.end < now - limits.max_past_s:
            return Refusal(
                400,
                "invalid report",
                f"end is {now - r.end:.0f}s in the past (at most {limits.max_past_s:g}s)",
                f"{where}.end",
                "too_old",
            )
        if r.agent is not None and not math.isfinite(r.agent.uptime_s):
            return Refusal(400, "invalid report", "not a finite number", f"{where}.agent.uptime_s", "invalid")
    return None


# -- per-agent bounds on what becomes a tag ---------------------------------------------------------


class _AgentTags:
    __slots__ = ("devices", "last_seen", "values")

    def __init__(self) -> None:
        self.devices: set[str] = set()
        self.values: set[str] = set()
        self.last_seen = 0.0


class AgentTagBounds:
    """Distinct device ids and distinct other tag values per agent id: one agent token cannot fill
    the store's series (InfluxDB 1.x `max-values-per-tag`) for everyone."""

    def __init__(self, limits: IngestLimits, forget_after_s: float) -> None:
        self.limits = limits
        self.forget_after_s = forget_after_s
        self.agents: dict[str, _AgentTags] = {}
        self._next_sweep = 0.0

    def admit(self, batch: Batch, label_keys: tuple[str, ...], now: float) -> Refusal | None:
        """Refuse (and remember nothing) when the batch would take its agent past a bound."""
        ident = batch.agent
        tags = self.agents.get(ident.id)
        if tags is None:
            tags = _AgentTags()
        new_devices: set[str] = set()
        new_values: set[str] = set()
        known_d, known_v = tags.devices, tags.values

        def value(kind: str, v: str | None) -> None:
            if v and (kind + v) not in known_v:
                new_values.add(kind + v)

        value("h:", ident.host)
        for key in label_keys:
            value(key + ":", ident.labels.get(key))
        for r in batch.reports:
            for d in r.devices:
                if d.device_id not in known_d:
                    new_devices.add(d.device_id)
                if d.parent_id and d.parent_id not in known_d:
                    new_devices.add(d.parent_id)
                value("v:", d.vendor)
                value("m:", d.model)
                for h in d.holders or ():
                    value("u:", h.user)
                    value("n:", h.namespace)
                    value("r:", h.runtime)
            if r.agent is not None:
                for p in r.agent.probes:
                    value("p:", p.name)
        lim = self.limits
        if len(known_d) + len(new_devices) > lim.max_devices_per_agent:
            return Refusal(
                400,
                "too many devices",
                f"agent {ident.id!r} would have {len(known_d) + len(new_devices)} distinct device ids; at most "
                f"{lim.max_devices_per_agent} per agent (collector.max_devices_per_agent)",
                "$.reports",
                "limit_devices",
            )
        if len(known_v) + len(new_values) > lim.max_values_per_agent:
            return Refusal(
                400,
                "too many distinct values",
                f"agent {ident.id!r} would have {len(known_v) + len(new_values)} distinct models, vendors, labels, "
                f"host names, probe names and holders' users, namespaces and runtimes; at most {lim.max_values_per_agent} per agent "
                "(collector.max_values_per_agent)",
                "$.reports",
                "limit_values",
            )
        known_d |= new_devices
        known_v |= new_values
        tags.last_seen = now
        self.agents[ident.id] = tags
        if now >= self._next_sweep:
            self._next_sweep = now + min(3600.0, self.forget_after_s)
            for agent_id in [a for a, t in self.agents.items() if now - t.last_seen > self.forget_after_s]:
                del self.agents[agent_id]
        return None


# -- refusals where operators look ------------------------------------------------------------------


class _IdentityOnly(msgspec.Struct):
    id: str
    host: str = ""


class _AgentOnly(msgspec.Struct):
    agent: _IdentityOnly


_identity_decoder = msgspec.json.Decoder(_AgentOnly)


@dataclass
class RefusalTally:
    count: int = 0
    last_detail: str = ""
    last_at: float = 0.0
    host: str = ""
    written_count: int = 0


def _patterns(agents: tuple[str, ...], most: int = 8) -> str:
    """A token's agent-id patterns for a refusal: bounded, however many the token has."""
    shown = ", ".join(repr(p[:128]) for p in agents[:most])
    return shown + (f" and {len(agents) - most} more" if len(agents) > most else "")


class IngestService:
    """Owns the rule of `POST /api/v1/reports`: store, then apply to the live view unless refused."""

    def __init__(
        self,
        limits: IngestLimits,
        fleet: Any,
        storage: GroupCommitWriter,
        metrics: Metrics,
        clock: Callable[[], float],
        price: Callable[[DeviceWindow], float] | None,
        forget_after_s: float = 86400.0,
        energy_cost: Callable[[float], float | None] | None = None,
    ) -> None:
        self.limits = limits
        self.fleet = fleet
        self.storage = storage
        self.metrics = metrics
        self.clock = clock
        self.price = price
        self.energy_cost = energy_cost
        self.budget = DecodedBudget(limits.max_inflight_decoded_bytes)
        self.bounds = AgentTagBounds(limits, forget_after_s)
        self.refusals: dict[tuple[str, str], RefusalTally] = {}
        self._refusals_dirty = asyncio.Event()
        self._refusal_task: asyncio.Task[None] | None = None

    # -- the rule --

    async def ingest(
        self,
        principal: Principal,
        chunks: AsyncIterator[bytes],
        encoding: str,
        content_length: int | None,
    ) -> dict[str, int]:
        """Answer of a stored batch (accepted, points, duplicates); raises `Refusal` otherwise."""
        limits = self.limits
        with self.budget.reservation() as held:
            body = await read_body(chunks, encoding, content_length, limits, held)
            # The decoded objects take about as much again as their JSON: charged before decoding.
            held.add(len(body))
            batch = self._decode(body, principal)
            held.release(len(body))  # the body itself, once decoded
            del body
            try:
                return await self._admit_and_store(principal, batch)
            except Refusal as refusal:
                if not isinstance(refusal, ClientDisconnected) and refusal.reason != "wrong_agent":
                    self.record_refusal(batch.agent.id, batch.agent.host, refusal.reason, refusal.detail)
                raise

    def _decode(self, body: bytearray, principal: Principal) -> Batch:
        try:
            return decode_batch(body)
        except msgspec.MsgspecError as exc:
            reason, path = split_error(exc)
            refusal = Refusal(400, "invalid report", reason, path, reason="invalid")
        except UnicodeDecodeError:
            refusal = Refusal(400, "invalid report", "body is not valid UTF-8", reason="invalid")
        except RecursionError:  # msgspec skips unknown fields recursively: `{"x":{"x":{…`
            refusal = Refusal(400, "invalid report", "JSON nested too deeply", reason="invalid")
        # Whose report was it? An agent whose every report is invalid must show up by name.
        try:
            ident = _identity_decoder.decode(body).agent
        except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
            ident = None
        if ident is not None and principal.may_write_as(ident.id) and len(ident.id) <= wire.MAX_ID_LEN:
            self.record_refusal(ident.id, ident.host[: wire.MAX_NAME_LEN], refusal.reason, refusal.detail)
        raise refusal

    async def _admit_and_store(self, principal: Principal, batch: Batch) -> dict[str, int]:
        limits, metrics = self.limits, self.metrics
        # Before any per-window work: everything after this is linear in the device windows.
        windows = sum(len(r.devices) for r in batch.reports)
        if windows > limits.max_device_windows:
            raise Refusal(
                413,
                "too many device windows",
                f"{windows} device windows (devices summed over reports) in one request; at most "
                f"{limits.max_device_windows} (collector.max_device_windows): send fewer reports per request",
                reason="too_large",
            )
        if not principal.may_write_as(batch.agent.id):
            # The patterns are configuration, not secrets: the operator needs them to decide whether
            # the agent's [agent] id or the token's `agents` is wrong.
            may = _patterns(principal.agents)
            log.info(
                "token %s may not write as agent %r (it may write as %s)", principal.name, batch.agent.id, may
            )
            raise Refusal(
                403,
                "forbidden",
                f"this token may not write as agent id {batch.agent.id!r}; it may write as {may} "
                "(change the agent's [agent] id, or the token's `agents` in the collector's [auth])",
                "$.agent.id",
                reason="wrong_agent",
            )
        now = self.clock()
        refusal = check_batch(batch, limits, now) or self.bounds.admit(batch, limits.label_keys, now)
        if refusal is not None:
            if refusal.reason.startswith("limit_"):
                metrics.limits_hit.inc(limit=refusal.reason.removeprefix("limit_"))
            raise refusal
        dropped = sum(1 for k in batch.agent.labels if k not in limits.label_keys)
        if dropped:
            metrics.labels_dropped.inc(dropped)
        lines = batch_lines(batch, limits.label_keys, self.price, self.energy_cost)
        # The live view takes the batch once storage has answered: not when storage refuses the data
        # itself (400: the agent dead-letters it) or the request is too large (413: the agent splits it),
        # but still when storage merely cannot take it now (429/503: the agent retries, and "idle now"
        # must not freeze during an outage; the retry is then a replay and is not counted twice).
        try:
            await self.storage.submit(lines)
        except StorageRejected as exc:
            raise Refusal(400, "storage rejected the data", exc.detail, reason="storage_rejected") from None
        except RequestTooLarge as exc:
            raise Refusal(413, "too many points", exc.detail, reason="too_large") from None
        except CollectorOverloaded as exc:
            self.fleet.apply(batch)
            raise Refusal(
                429, "overloaded", exc.detail, reason="overloaded", retry_after=exc.retry_after
            ) from None
        except StorageError as exc:
            self.fleet.apply(batch)
            raise Refusal(
                503,
                "storage unavailable",
                exc.detail,
                reason="storage_unavailable",
                retry_after=exc.retry_after or 10,
            ) from None
        _applied, seen = self.fleet.apply(batch)
        metrics.reports.inc(len(batch.reports))
        metrics.duplicate_reports.inc(seen)
        metrics.device_windows.inc(windows)
        return {"accepted": len(batch.reports), "points": len(lines), "duplicates": seen}

    # -- refusals --

    def record_refusal(self, agent_id: str, host: str, reason: str, detail: str) -> None:
        """Count a refusal of a known agent: in the live view, and (coalesced) in the store."""
        now = self.clock()
        detail = detail[: wire.MAX_TEXT_LEN]
        record = getattr(self.fleet, "record_refusal", None)
        if record is not None:
            record(agent_id, reason, detail, now)
        key = (agent_id, reason)
        tally = self.refusals.get(key)
        if tally is None:
            if len(self.refusals) >= 100_000:  # bounded: agent ids are bounded by the tokens' patterns only
                self.refusals.pop(next(iter(self.refusals)))
            tally = self.refusals[key] = RefusalTally()
        tally.count += 1
        tally.last_detail, tally.last_at = detail, now
        tally.host = host or tally.host
        if reason not in _NOT_STORED_REASONS and getattr(self.storage.writer, "stores", True):
            self._refusals_dirty.set()

    def refusal_lines(self) -> list[str]:
        """`capmon_refusal` points of every tally changed since it was last written."""
        out = []
        for (agent_id, reason), t in self.refusals.items():
            if t.count == t.written_count or reason in _NOT_STORED_REASONS:
                continue
            host = f",host={escape_tag(t.host)}" if t.host else ""
            out.append(
                f"capmon_refusal,agent={escape_tag(agent_id)}{host},reason={escape_tag(reason)}"
                f" count={float(t.count)!r},last_detail={string_field(t.last_detail)} {int(t.last_at)}"
            )
            t.written_count = t.count
        return out

    async def _write_refusals(self) -> None:
        """At most one write per `refusal_write_interval_s`; a failed write is logged, never an answer."""
        while True:
            await self._refusals_dirty.wait()
            self._refusals_dirty.clear()
            lines = self.refusal_lines()
            if lines:
                try:
                    await self.storage.submit(lines)
                except StorageError as exc:
                    log.info("could not store %d refusal point(s): %s", len(lines), exc.detail)
                except Exception as exc:  # best effort: a refusal record never breaks ingest
                    log.warning("could not store refusal points: %s", describe(exc))
            await asyncio.sleep(self.limits.refusal_write_interval_s)

    def start(self) -> None:
        self._refusal_task = asyncio.create_task(self._write_refusals(), name="capmon-refusals")

    async def close(self) -> None:
        """Stop the refusal writer, writing what it has not written yet (before storage closes)."""
        if self._refusal_task is not None:
            self._refusal_task.cancel()
            await asyncio.gather(self._refusal_task, return_exceptions=True)
            self._refusal_task = None
        lines = self.refusal_lines()
        if lines and getattr(self.storage.writer, "stores", True):
            try:
                await asyncio.wait_for(self.storage.submit(lines), 5.0)
            except (StorageError, TimeoutError) as exc:
                log.info("could not store %d refusal point(s) at shutdown: %s", len(lines), describe(exc))

    def agents(self, now: float | None = None) -> list[dict[str, Any]]:
        """`GET /api/v1/agents`: the live view's agents (last report, staleness) and their refusals."""
        return self.fleet.agents(self.clock() if now is None else now)
