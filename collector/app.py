"""The collector's aiohttp application: ingest, live fleet APIs, metrics, health.

`create_app(config)` builds everything; storage writers and the group commit are owned by a
`cleanup_ctx`, so a graceful stop (SIGTERM in `web.run_app`) stops accepting connections, lets the
in-flight requests finish, flushes queued writes and only then closes the storage client.
"""

from __future__ import annotations

import logging
import math
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import msgspec
from aiohttp import web

from capmon.agent.wire import IDLE_STATES, STATES, Batch, ErrorBody, decode_batch, split_error

from .auth import Principal, TokenStore
from .config import Config
from .fleet import FleetView, Pricing
from .lineproto import batch_lines
from .metrics import Metrics
from .storage import (
    CollectorOverloaded,
    GroupCommitWriter,
    RequestTooLarge,
    StorageError,
    StorageRejected,
    StorageWriter,
    make_writer,
)

log = logging.getLogger("capmon.collector")

CONFIG = web.AppKey("capmon_config", Config)
TOKENS = web.AppKey("capmon_tokens", TokenStore)
FLEET = web.AppKey("capmon_fleet", FleetView)
METRICS = web.AppKey("capmon_metrics", Metrics)
STORAGE = web.AppKey("capmon_storage", GroupCommitWriter)
CLOCK = web.AppKey("capmon_clock", Callable[[], float])

_json = msgspec.json.Encoder()


class Refusal(Exception):
    """An ingest or API request refused with an `ErrorBody`."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str = "",
        path: str | None = None,
        reason: str = "",
        retry_after: int | None = None,
    ) -> None:
        super().__init__(error)
        self.status, self.body = status, ErrorBody(error=error, detail=detail, path=path)
        self.reason = reason or error.replace(" ", "_")
        self.retry_after = retry_after

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="capmon"'
        return web.Response(
            status=self.status, body=_json.encode(self.body), content_type="application/json", headers=headers
        )


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_json.encode(data), content_type="application/json")


# -- request body ----------------------------------------------------------------------------------


async def read_body(request: web.Request, max_body: int, max_decoded: int) -> bytes:
    """The request body, gunzipped if it says so; both sizes capped while streaming (zip bombs)."""
    if request.content_length is not None and request.content_length > max_body:
        raise Refusal(413, "body too large", f"at most {max_body} bytes", reason="too_large")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", ""):
        raise Refusal(
            415, "unsupported content encoding", f"{encoding[:40]!r}; use gzip or none", reason="encoding"
        )
    gunzip = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
    out: list[bytes] = []
    received = decoded = 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        received += len(chunk)
        if received > max_body:
            raise Refusal(413, "body too large", f"at most {max_body} bytes", reason="too_large")
        if gunzip is None:
            out.append(chunk)
            continue
        try:
            data = gunzip.decompress(chunk, max_decoded - decoded + 1)
        except zlib.error as exc:
            raise Refusal(400, "invalid gzip body", str(exc), reason="bad_gzip") from None
        decoded += len(data)
        if decoded > max_decoded or gunzip.unconsumed_tail:
            raise Refusal(
                413, "body too large", f"at most {max_decoded} bytes after gzip decoding", reason="too_large"
            )
        out.append(data)
    if gunzip is not None and (not gunzip.eof or gunzip.unused_data):
        raise Refusal(400, "invalid gzip body", "truncated or trailing data", reason="bad_gzip")
    return b"".join(out)


# -- checks msgspec cannot express -----------------------------------------------------------------


def check_batch(batch: Batch, config: Config, now: float) -> Refusal | None:
    c = config.collector
    labels = batch.agent.labels
    if len(labels) > c.max_labels:
        return Refusal(400, "invalid report", f"at most {c.max_labels} labels", "$.agent.labels", "invalid")
    for key, value in labels.items():
        if len(value) > c.max_label_value_len:
            return Refusal(
                400,
                "invalid report",
                f"label value longer than {c.max_label_value_len} characters",
                f"$.agent.labels.{key}",
                "invalid",
            )
    seqs: set[int] = set()
    for i, r in enumerate(batch.reports):
        where = f"$.reports[{i}]"
        if r.seq in seqs:
            return Refusal(400, "invalid report", "seq repeated within the batch", f"{where}.seq", "invalid")
        seqs.add(r.seq)
        if r.end <= r.start:
            return Refusal(400, "invalid report", "end must be after start", f"{where}.end", "invalid")
        if r.end - r.start > c.max_window_s:
            return Refusal(
                400, "invalid report", f"window longer than {c.max_window_s:g}s", f"{where}.start", "invalid"
            )
        if r.end > now + c.max_future_s:
            return Refusal(
                400,
                "invalid report",
                f"end is {r.end - now:.0f}s in the future (at most {c.max_future_s:g}s): check the agent's clock",
                f"{where}.end",
                "clock",
            )
        if r.end < now - c.max_past_s:
            return Refusal(
                400,
                "invalid report",
                f"end is {now - r.end:.0f}s in the past (at most {c.max_past_s:g}s)",
                f"{where}.end",
                "too_old",
            )
        if r.agent is not None and not math.isfinite(r.agent.uptime_s):
            return Refusal(400, "invalid report", "not a finite number", f"{where}.agent.uptime_s", "invalid")
        window = r.end - r.start
        slack = max(2.0, 0.1 * window)
        ids: set[str] = set()
        for j, d in enumerate(r.devices):
            dwhere = f"{where}.devices[{j}]"
            if d.device_id in ids:
                return Refusal(
                    400,
                    "invalid report",
                    "device_id repeated in one report",
                    f"{dwhere}.device_id",
                    "invalid",
                )
            ids.add(d.device_id)
            if d.busy_s + d.allocated_idle_s + d.free_s + d.unavailable_s > window + slack:
                return Refusal(
                    400, "invalid report", "state seconds exceed the window", f"{dwhere}.busy_s", "invalid"
                )
            if d.idle_since is not None and d.idle_since > r.end + slack:
                return Refusal(
                    400,
                    "invalid report",
                    "idle_since after the window's end",
                    f"{dwhere}.idle_since",
                    "invalid",
                )
    return None


# -- auth ------------------------------------------------------------------------------------------


def authenticate(request: web.Request, role: str) -> Principal:
    principal = request.app[TOKENS].authenticate(request.headers.get("Authorization"))
    if principal is None:
        raise Refusal(401, "unauthorized", "missing or unknown bearer token", reason="unauthorized")
    if principal.role != role:
        what = "write reports" if role == "agent" else "read the fleet"
        raise Refusal(403, "forbidden", f"a {principal.role} token cannot {what}", reason="forbidden")
    return principal


# -- handlers --------------------------------------------------------------------------------------


async def ingest(request: web.Request) -> web.Response:
    """`POST /api/v1/reports`: 200 only once storage holds every point of the batch."""
    app = request.app
    config, metrics = app[CONFIG], app[METRICS]
    principal = authenticate(request, "agent")
    if request.content_type != "application/json":
        raise Refusal(
            415,
            "unsupported content type",
            f"{request.content_type[:60]!r}; use application/json",
            reason="type",
        )
    body = await read_body(request, config.collector.max_body_bytes, config.collector.max_decoded_bytes)
    try:
        batch = decode_batch(body)
    except msgspec.MsgspecError as exc:
        reason, path = split_error(exc)
        raise Refusal(400, "invalid report", reason, path, reason="invalid") from None
    except UnicodeDecodeError:
        raise Refusal(400, "invalid report", "body is not valid UTF-8", reason="invalid") from None
    except RecursionError:  # msgspec skips unknown fields recursively: `{"x":{"x":{…`
        raise Refusal(400, "invalid report", "JSON nested too deeply", reason="invalid") from None
    # Before any per-window work: everything after this is linear in the device windows.
    windows = sum(len(r.devices) for r in batch.reports)
    if windows > config.collector.max_device_windows:
        raise Refusal(
            413,
            "too many device windows",
            f"{windows} device windows (devices summed over reports) in one request; at most "
            f"{config.collector.max_device_windows} (collector.max_device_windows): send fewer reports per request",
            reason="too_large",
        )
    if not principal.may_write_as(batch.agent.id):
        log.info("token %s may not write as agent %r", principal.name, batch.agent.id)
        raise Refusal(
            403, "forbidden", "this token may not write as this agent id", "$.agent.id", reason="wrong_agent"
        )
    refusal = check_batch(batch, config, app[CLOCK]())
    if refusal is not None:
        raise refusal
    dropped = sum(1 for k in batch.agent.labels if k not in config.collector.label_keys)
    if dropped:
        metrics.labels_dropped.inc(dropped)
    lines = batch_lines(batch, config.collector.label_keys, app[FLEET].pricing.price)
    # The live view takes the batch once storage has answered: not when storage refuses the data
    # itself (400: the agent dead-letters it) or the request is too large (413: the agent splits it),
    # but still when storage merely cannot take it now (429/503: the agent retries, and "idle now"
    # must not freeze during an outage; the retry is then a replay and is not counted twice).
    try:
        await app[STORAGE].submit(lines)
    except StorageRejected as exc:
        raise Refusal(400, "storage rejected the data", exc.detail, reason="storage_rejected") from None
    except RequestTooLarge as exc:
        raise Refusal(413, "too many points", exc.detail, reason="too_large") from None
    except CollectorOverloaded as exc:
        app[FLEET].apply(batch)
        raise Refusal(
            429, "overloaded", exc.detail, reason="overloaded", retry_after=exc.retry_after
        ) from None
    except StorageError as exc:
        app[FLEET].apply(batch)
        raise Refusal(
            503,
            "storage unavailable",
            exc.detail,
            reason="storage_unavailable",
            retry_after=exc.retry_after or 10,
        ) from None
    _applied, seen = app[FLEET].apply(batch)
    metrics.reports.inc(len(batch.reports))
    metrics.duplicate_reports.inc(seen)
    metrics.device_windows.inc(windows)
    return json_response({"accepted": len(batch.reports), "points": len(lines), "duplicates": seen})


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `2h`, `1d` → seconds."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_states(text: str) -> frozenset[str] | None:
    wanted: set[str] = set()
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            return None
        if part == "idle":
            wanted |= IDLE_STATES
        elif part in STATES:
            wanted.add(part)
        else:
            raise ValueError(part)
    return frozenset(wanted)


async def devices(request: web.Request) -> web.Response:
    """`GET /api/v1/devices?state=free&min_idle=15m&model=…&site=…&limit=100`: longest idle first."""
    authenticate(request, "read")
    fleet = request.app[FLEET]
    query: Mapping[str, str] = request.query
    known = {"state", "min_idle", "limit", "model", "vendor", "host", "agent", *fleet.label_keys}
    for key in query:
        if key not in known:
            raise Refusal(400, "unknown parameter", f"{key[:64]!r}; known: {', '.join(sorted(known))}")
    try:
        states = parse_states(query.get("state", "free"))
    except ValueError as exc:
        raise Refusal(
            400, "invalid parameter", f"state {str(exc)[:64]!r}: one of {', '.join(STATES)}, idle, all"
        ) from None
    try:
        min_idle = parse_duration(query.get("min_idle", "0"))
    except ValueError:
        raise Refusal(
            400, "invalid parameter", "min_idle: seconds, or a duration like 90s, 15m, 2h, 1d"
        ) from None
    try:
        limit = int(query.get("limit", "100"))
        if not 1 <= limit <= 100_000:
            raise ValueError
    except ValueError:
        raise Refusal(400, "invalid parameter", "limit: an integer 1..100000") from None
    filters = {k: v for k, v in query.items() if k not in ("state", "min_idle", "limit")}
    found = fleet.devices(states, min_idle, filters, limit)
    return json_response({"devices": found, "count": len(found), "currency": fleet.pricing.currency})


async def fleet_summary(request: web.Request) -> web.Response:
    authenticate(request, "read")
    return json_response(request.app[FLEET].summary())


async def metrics_page(request: web.Request) -> web.Response:
    authenticate(request, "read")
    return web.Response(text=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "storage": request.app[CONFIG].storage.kind})


# -- wiring ----------------------------------------------------------------------------------------


@web.middleware
async def errors_and_counts(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error as a JSON `ErrorBody`; requests counted by route and status."""
    metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
    try:
        response = await handler(request)
    except Refusal as refusal:
        if request.path == "/api/v1/reports":
            metrics.rejects.inc(reason=refusal.reason)
        response = refusal.response()
    except web.HTTPException as exc:
        response = Refusal(exc.status, exc.reason.lower(), reason=f"http_{exc.status}").response()
    except Exception:
        log.exception("unexpected error in %s %s", request.method, route)
        response = Refusal(500, "internal error", reason="internal").response()
    metrics.requests.inc(route=route, status=str(response.status))
    return response


def create_app(
    config: Config,
    *,
    writer: StorageWriter | None = None,
    clock: Callable[[], float] = time.time,
    env: Mapping[str, str] | None = None,
) -> web.Application:
    """The collector. `writer` replaces the configured storage (unit tests); `clock` is unix seconds."""
    import os

    # auto_decompress off: `read_body` gunzips itself, with a cap.
    app = web.Application(middlewares=[errors_and_counts], handler_args={"auto_decompress": False})
    app[CONFIG] = config
    app[CLOCK] = clock
    app[TOKENS] = TokenStore(config.auth, os.environ if env is None else env)
    app[METRICS] = metrics = Metrics()
    app[FLEET] = fleet = FleetView(
        config.collector.label_keys,
        Pricing(config.pricing),
        config.collector.stale_windows,
        clock,
        forget_after_s=config.collector.forget_after_s,
        on_forget=metrics.forgotten_agents.inc,
    )
    app[STORAGE] = storage = GroupCommitWriter(writer or make_writer(config.storage), config.storage, metrics)
    metrics.gauge("live_devices", "Devices in the live view.", lambda: fleet.device_count)
    metrics.gauge("agents", "Agents in the live view.", lambda: fleet.agent_count)
    metrics.gauge("stale_agents", "Agents silent for more than stale_windows windows.", fleet.stale_agents)
    metrics.gauge(
        "pending_lines", "Lines waiting for or being written to storage.", lambda: storage.pending_lines
    )

    async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
        await storage.start()
        if not len(app[TOKENS]):
            log.warning("no tokens configured in %s: every request except /healthz is refused", config.source)
        yield
        await storage.close(config.collector.drain_timeout_s)

    app.cleanup_ctx.append(storage_ctx)
    app.router.add_post("/api/v1/reports", ingest)
    app.router.add_get("/api/v1/fleet", fleet_summary)
    app.router.add_get("/api/v1/devices", devices)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    return app


def run(config: Config) -> None:
    """Serve until SIGINT/SIGTERM; then drain (stop accepting, finish requests, flush writes)."""
    web.run_app(
        create_app(config),
        host=config.collector.host,
        port=config.collector.port,
        shutdown_timeout=config.collector.drain_timeout_s,
        reuse_port=config.collector.reuse_port or None,
        access_log=None,
        print=lambda *a: log.info(
            "capmon collector listening on %s:%s", config.collector.host, config.collector.port
        ),
    )
