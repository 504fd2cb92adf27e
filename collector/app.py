"""The collector's aiohttp application: ingest, live fleet APIs, metrics, health.

`create_app(config)` builds everything; storage writers and the group commit are owned by a
`cleanup_ctx`, so a graceful stop (SIGTERM in `web.run_app`) stops accepting connections, lets the
in-flight requests finish, flushes queued writes and only then closes the storage client.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from importlib import resources
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from capmon.agent.wire import IDLE_STATES, STATES

from .auth import AuthFailureLog, Principal, TokenStore, credentials_kind
from .config import Config
from .fleet import HOLDER_KEYS, FleetView, Pricing
from .ingest import ClientDisconnected, IngestLimits, IngestService, Refusal
from .liveview import LiveView, make_live_view
from .metrics import Metrics
from .published import Publisher, collector_id
from .storage import GroupCommitWriter, StorageWriter, make_writer

log = logging.getLogger("capmon.collector")

CONFIG = web.AppKey("capmon_config", Config)
TOKENS = web.AppKey("capmon_tokens", TokenStore)
FLEET = web.AppKey("capmon_fleet", FleetView)
METRICS = web.AppKey("capmon_metrics", Metrics)
STORAGE = web.AppKey("capmon_storage", GroupCommitWriter)
CLOCK = web.AppKey("capmon_clock", Callable[[], float])
INGEST = web.AppKey("capmon_ingest", IngestService)
AUTH_LOG = web.AppKey("capmon_auth_log", AuthFailureLog)
# What the capacity APIs answer from: this process's FleetView, or the store (live_view = "storage").
LIVE = web.AppKey("capmon_live_view", LiveView)
# With the storage view: what publishes this process's view for every process to answer from.
PUBLISHER = web.AppKey("capmon_publisher", Publisher)
WORKER = web.AppKey("capmon_worker", str)

_json = msgspec.json.Encoder()

__all__ = ["CONFIG", "FLEET", "INGEST", "LIVE", "METRICS", "STORAGE", "Refusal", "create_app", "run"]


def refusal_response(refusal: Refusal) -> web.Response:
    headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after is not None else {}
    if refusal.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="capmon"'
    response = web.Response(
        status=refusal.status, body=refusal.encode(), content_type="application/json", headers=headers
    )
    if refusal.close:
        response.force_close()
    return response


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_json.encode(data), content_type="application/json")


# -- auth ------------------------------------------------------------------------------------------


def authenticate(request: web.Request, role: str) -> Principal:
    header = request.headers.get("Authorization")
    principal = request.app[TOKENS].authenticate(header)
    if principal is None:
        request.app[AUTH_LOG].note(
            401, credentials_kind(header), request.remote, f"unauthorized {request.path}"
        )
        raise Refusal(401, "unauthorized", "missing or unknown bearer token", reason="unauthorized")
    if principal.role != role:
        what = "write reports" if role == "agent" else "read the fleet"
        article = "an" if principal.role[0] in "aeiou" else "a"
        request.app[AUTH_LOG].note(
            403,
            f"token {principal.name!r}",
            request.remote,
            f"forbidden {request.path} ({principal.role} token)",
        )
        raise Refusal(403, "forbidden", f"{article} {principal.role} token cannot {what}", reason="forbidden")
    return principal


# -- handlers --------------------------------------------------------------------------------------


async def ingest(request: web.Request) -> web.Response:
    """`POST /api/v1/reports`: 200 only once storage holds every point of the batch."""
    principal = authenticate(request, "agent")
    if request.content_type != "application/json":
        raise Refusal(
            415,
            "unsupported content type",
            f"{request.content_type[:60]!r}; use application/json",
            reason="type",
        )
    answer = await request.app[INGEST].ingest(
        principal,
        request.content.iter_chunked(256 * 1024),
        request.headers.get("Content-Encoding", "identity"),
        request.content_length,
    )
    return json_response(answer)


# ASCII only: `\d` and `int()` also take other scripts' digits (`１２`, `١`) and `int()` takes `1_0`.
_DURATION = re.compile(r"[ ]*([0-9]{1,12}(?:\.[0-9]{1,9})?)[ ]*(s|m|h|d)?[ ]*")
_LIMIT = re.compile(r"[0-9]{1,6}")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Longer than any idle time or range a store holds: beyond it a duration is a typo or a probe.
MAX_DURATION_S = 100 * 365 * 86400


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `2h`, `1d` → seconds (ASCII digits, at most MAX_DURATION_S)."""
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ValueError(text)
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not seconds <= MAX_DURATION_S:
        raise ValueError(text)
    return seconds


def refuse_unknown(query: Mapping[str, str], known: set[str] | frozenset[str]) -> None:
    """Every read endpoint answers a parameter it does not know alike: 400 naming it and the known."""
    unknown = sorted({key[:64] for key in query if key not in known})
    if unknown:
        raise Refusal(
            400,
            "unknown parameter",
            f"{', '.join(map(repr, unknown[:8]))}; known: {', '.join(sorted(known)) or 'none'}",
        )


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


def min_idle_and_limit(query: Mapping[str, str]) -> tuple[float, int]:
    """The `min_idle` and `limit` parameters of the live-view lists."""
    try:
        min_idle = parse_duration(query.get("min_idle", "0"))
    except ValueError:
        raise Refusal(
            400,
            "invalid parameter",
            "min_idle: seconds, or a duration like 90s, 15m, 2h, 1d (ASCII digits, at most 36500d)",
        ) from None
    text = query.get("limit", "100")
    limit = int(text) if _LIMIT.fullmatch(text) else 0
    if not 1 <= limit <= 100_000:
        raise Refusal(400, "invalid parameter", "limit: an integer 1..100000 (ASCII digits)")
    return min_idle, limit


def since_param(query: Mapping[str, str]) -> float | None:
    """`since`: how far back the totals reach (storage live view), a duration like 24h, 7d, 3600."""
    text = query.get("since")
    if text is None:
        return None
    try:
        seconds = parse_duration(text)
        if not 0 < seconds <= 366 * 86400:
            raise ValueError
    except ValueError:
        raise Refusal(
            400, "invalid parameter", "since: a duration up to 366d, like 3600, 90m, 24h, 7d"
        ) from None
    return seconds


async def devices(request: web.Request) -> web.Response:
    """`GET /api/v1/devices?state=free&min_idle=15m&model=…&site=…&limit=100`: longest idle first."""
    authenticate(request, "read")
    fleet = request.app[LIVE]
    query: Mapping[str, str] = request.query
    refuse_unknown(
        query, {"state", "min_idle", "limit", "model", "vendor", "host", "agent", *fleet.label_keys}
    )
    try:
        states = parse_states(query.get("state", "free"))
    except ValueError as exc:
        raise Refusal(
            400, "invalid parameter", f"state {str(exc)[:64]!r}: one of {', '.join(STATES)}, idle, all"
        ) from None
    min_idle, limit = min_idle_and_limit(query)
    filters = {k: v for k, v in query.items() if k not in ("state", "min_idle", "limit")}
    found = await fleet.devices(states, min_idle, filters, limit)
    return json_response({"devices": found, "count": len(found), "currency": fleet.pricing.currency})


_HOLDER_STATES: dict[str, frozenset[str] | None] = {
    "allocated_idle": frozenset({"allocated_idle"}),
    "busy": frozenset({"busy"}),
    "all": None,
}


async def holders(request: web.Request) -> web.Response:
    """`GET /api/v1/holders?by=user&state=allocated_idle&min_idle=1h&model=…&site=…`: reclaim candidates."""
    authenticate(request, "read")
    fleet = request.app[LIVE]
    query: Mapping[str, str] = request.query
    refuse_unknown(
        query, {"by", "state", "min_idle", "limit", "since", "model", "host", "agent", *fleet.label_keys}
    )
    by = query.get("by", "user")
    if by not in HOLDER_KEYS:
        raise Refusal(400, "invalid parameter", f"by {by[:64]!r}: one of {', '.join(HOLDER_KEYS)}")
    state = query.get("state", "allocated_idle")
    if state not in _HOLDER_STATES:
        raise Refusal(400, "invalid parameter", f"state {state[:64]!r}: one of {', '.join(_HOLDER_STATES)}")
    min_idle, limit = min_idle_and_limit(query)
    since = since_param(query)
    filters = {k: v for k, v in query.items() if k not in ("by", "state", "min_idle", "limit", "since")}
    answer = await fleet.holders(by, _HOLDER_STATES[state], min_idle, filters, limit, since)
    return json_response(answer)


async def fleet_summary(request: web.Request) -> web.Response:
    """`GET /api/v1/fleet?since=24h`: counts now, totals since start (memory) or over `since` (storage)."""
    authenticate(request, "read")
    refuse_unknown(request.query, {"since"})
    return json_response(await request.app[LIVE].summary(since_param(request.query)))


# Gauges that describe the fleet: the same in every worker (with the storage view), so unlabelled.
FLEET_GAUGES = frozenset(
    {"capmon_collector_live_devices", "capmon_collector_agents", "capmon_collector_stale_agents"}
)


def label_worker(text: str, worker: str) -> str:
    """Add `worker="…"` to every sample of this process's own metrics (not to the fleet gauges), so
    counters of several workers behind one port tell apart."""
    pair = f'worker="{worker}"'
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
            name = line[:name_end]
            if name not in FLEET_GAUGES:
                if line[name_end] == "{":
                    line = f"{name}{{{pair},{line[name_end + 1 :]}"
                else:
                    line = f"{name}{{{pair}}}{line[name_end:]}"
        out.append(line)
    return "\n".join(out) + "\n"


async def metrics_page(request: web.Request) -> web.Response:
    authenticate(request, "read")
    try:
        await request.app[LIVE].refresh()
    except Refusal as exc:  # the store is down: this process's own metrics still answer
        log.info("metrics: fleet gauges from the last answer (%s)", exc.detail)
    text = request.app[METRICS].render()
    worker = request.app[WORKER]
    if worker:
        text = label_worker(text, worker)
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def agents(request: web.Request) -> web.Response:
    """`GET /api/v1/agents`: each agent's last report and its refusals (a clock far off shows here)."""
    authenticate(request, "read")
    refuse_unknown(request.query, frozenset())
    listed = await request.app[LIVE].agents()
    return json_response({"agents": listed, "count": len(listed)})


async def healthz(request: web.Request) -> web.Response:
    """Always 200 while the process serves; `degraded` while storage is not ready (or failing)."""
    storage = request.app[STORAGE]
    return json_response(
        {
            "status": "ok" if storage.ready else "degraded",
            "storage": {
                "kind": request.app[CONFIG].storage.kind,
                "ready": storage.ready,
                "last_error": storage.last_error,
            },
        }
    )


# -- the live page (GET /) ------------------------------------------------------------------------

# Everything the page needs ships in the package (collector/page/); it talks only to this origin.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_PAGE_TYPES = {"index.html": "text/html", "page.js": "text/javascript", "page.css": "text/css"}


def _page_assets() -> dict[str, bytes]:
    folder = resources.files("capmon.collector") / "page"
    return {name: (folder / name).read_bytes() for name in _PAGE_TYPES}


def page_handler(assets: Mapping[str, bytes]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`GET /` and `GET /page/{name}`: the live page; no token needed to load it, only to read the API."""

    async def page(request: web.Request) -> web.Response:
        name = request.match_info.get("name", "index.html")
        if name not in assets:
            raise Refusal(404, "not found", reason="not_found")
        return web.Response(
            body=assets[name],
            content_type=_PAGE_TYPES[name],
            charset="utf-8",
            headers={
                "Content-Security-Policy": PAGE_CSP,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY",
                "Cache-Control": "no-cache",
            },
        )

    return page


class HttpErrorLog:
    """Stands in for aiohttp's server logger: its parser errors carry the raw request line or header
    (`Authorization: Bearer tok\\x01`), so no exception text or traceback from it is logged; a
    malformed request is one warning naming the peer and the kind of error."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.log = logging.getLogger("capmon.collector.http")

    @staticmethod
    def _exc(kw: dict[str, Any]) -> BaseException | None:
        exc = kw.get("exc_info")
        if isinstance(exc, BaseException):
            return exc
        return sys.exc_info()[1] if exc else None

    def _line(self, level: int, msg: str, args: tuple[Any, ...], exc: BaseException | None) -> None:
        # aiohttp's own messages take only the peer address as an argument.
        text = msg % args if args else msg
        if exc is not None:
            code = getattr(exc, "code", None)
            text += f": {type(exc).__name__}" + (f" ({code})" if code else "")
        self.log.log(level, "%s", text)

    def exception(self, msg: str, *args: Any, **kw: Any) -> None:
        exc = self._exc(kw)
        if isinstance(exc, HttpProcessingError):
            self.metrics.malformed_requests.inc()
            self._line(logging.WARNING, "malformed request: " + msg, args, exc)
        elif isinstance(exc, ConnectionError):
            self._line(logging.INFO, msg, args, exc)
        else:
            self._line(logging.ERROR, msg, args, exc)

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        self._line(logging.ERROR, msg, args, self._exc(kw))

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        self._line(logging.WARNING, msg, args, self._exc(kw))

    def info(self, msg: str, *args: Any, **kw: Any) -> None:
        self._line(logging.INFO, msg, args, self._exc(kw))

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        if self.log.isEnabledFor(logging.DEBUG):
            self._line(logging.DEBUG, msg, args, self._exc(kw))


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
        if isinstance(refusal, ClientDisconnected):
            log.info("client %s disconnected during %s %s", request.remote, request.method, route)
        elif refusal.reason == "body_timeout":
            log.info("client %s: %s", request.remote, refusal.detail)
        response = refusal_response(refusal)
    except web.HTTPException as exc:
        response = refusal_response(Refusal(exc.status, exc.reason.lower(), reason=f"http_{exc.status}"))
    except Exception:
        log.exception("unexpected error in %s %s", request.method, route)
        response = refusal_response(Refusal(500, "internal error", reason="internal"))
    metrics.requests.inc(route=route, status=str(response.status))
    return response


def create_app(
    config: Config,
    *,
    writer: StorageWriter | None = None,
    clock: Callable[[], float] = time.time,
    env: Mapping[str, str] | None = None,
    worker: str = "",
) -> web.Application:
    """The collector. `writer` replaces the configured storage (unit tests); `clock` is unix seconds;
    `worker` (one of `--workers N`) labels this process's own metrics."""
    import os

    metrics = Metrics()
    # auto_decompress off: ingest gunzips itself, with caps; the logger keeps header values out of logs.
    app = web.Application(
        middlewares=[errors_and_counts],
        handler_args={"auto_decompress": False, "logger": HttpErrorLog(metrics)},
    )
    app[CONFIG] = config
    app[CLOCK] = clock
    app[TOKENS] = TokenStore(config.auth, os.environ if env is None else env)
    app[AUTH_LOG] = AuthFailureLog()
    app[METRICS] = metrics
    app[FLEET] = fleet = FleetView(
        config.collector.label_keys,
        Pricing(config.pricing),
        config.collector.stale_windows,
        clock,
        forget_after_s=config.collector.forget_after_s,
        on_forget=metrics.forgotten_agents.inc,
        max_agents=config.collector.live_view_max_agents,
        max_devices=config.collector.live_view_max_devices,
        max_holders=config.collector.live_view_max_holders,
    )
    app[WORKER] = worker
    app[LIVE] = live = make_live_view(config, fleet, clock)
    app[STORAGE] = storage = GroupCommitWriter(writer or make_writer(config.storage), config.storage, metrics)
    pricing = fleet.pricing
    publisher = None
    if config.collector.live_view == "storage":
        # This process's view answers nothing itself: it is published, and every process answers
        # from what all of them published.
        app[PUBLISHER] = publisher = Publisher(
            fleet, storage.submit, config.collector.live_publish_interval_s, collector_id(worker), clock
        )
        metrics.gauge(
            "live_publishes",
            "Times this process published its view to the store (a counter).",
            lambda: publisher.publishes,
        )
        metrics.gauge(
            "live_publish_failures",
            "Publishes the store did not take (retried next interval; a counter).",
            lambda: publisher.failures,
        )
        metrics.gauge(
            "live_published_bytes",
            "Size of this process's last published view (compressed, base64).",
            lambda: publisher.last_bytes,
        )
        metrics.gauge(
            "totals_late_windows",
            "Windows that arrived too late to be added to the range totals' blocks (a counter).",
            lambda: publisher.totals.late_windows,
        )
    app[INGEST] = service = IngestService(
        IngestLimits.from_config(config),
        fleet,
        storage,
        metrics,
        clock,
        pricing.for_device,
        forget_after_s=config.collector.forget_after_s,
        energy_cost=pricing.energy_cost,
    )
    metrics.gauge("live_devices", "Devices in the live view.", live.device_count)
    metrics.gauge("agents", "Agents in the live view.", live.agent_count)
    metrics.gauge("stale_agents", "Agents silent for more than stale_windows windows.", live.stale_agents)
    metrics.gauge(
        "live_view_kept_out_reports",
        "Reports stored but kept out of the live view by its fleet-wide bound (a running total).",
        lambda: fleet.kept_out_reports,
    )
    metrics.gauge(
        "live_view_kept_out_agents",
        "Agents kept out of the live view by its fleet-wide bound now.",
        lambda: len(fleet.kept_out),
    )
    store = getattr(live, "store", None)
    if store is not None:
        metrics.gauge(
            "live_view_store_requests",
            "Query requests this process sent the store for the live view (a counter).",
            lambda: store.requests,
        )
        metrics.gauge(
            "live_view_store_seconds",
            "Seconds the store took to answer them (a counter).",
            lambda: store.seconds,
        )
    metrics.gauge(
        "pending_lines", "Lines waiting for or being written to storage.", lambda: storage.pending_lines
    )
    metrics.gauge(
        "inflight_decoded_bytes",
        "Request bytes (decoded bodies and objects) held by requests in flight.",
        lambda: service.budget.used,
    )
    metrics.gauge("storage_ready", "1 when storage answered its last check or write.", lambda: storage.ready)

    async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
        # Quick: storage readiness (ping, CREATE DATABASE) runs in the background, see /healthz.
        try:
            await live.start()  # LiveViewUnsupported: the store answers, but not InfluxQL
        except BaseException:
            await live.close()  # one clear error, no unclosed sessions after it
            raise
        await storage.start()
        service.start()
        if publisher is not None:
            publisher.start()
        if not len(app[TOKENS]):
            log.warning("no tokens configured in %s: every request except /healthz is refused", config.source)
        yield
        if publisher is not None:
            await publisher.close()
        await service.close()
        await storage.close(config.collector.drain_timeout_s)
        await live.close()
        log.info("capmon collector%s stopped", f" worker {worker}" if worker else "")

    app.cleanup_ctx.append(storage_ctx)
    app.router.add_post("/api/v1/reports", ingest)
    app.router.add_get("/api/v1/fleet", fleet_summary)
    app.router.add_get("/api/v1/devices", devices)
    app.router.add_get("/api/v1/holders", holders)
    app.router.add_get("/api/v1/agents", agents)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    page = page_handler(_page_assets())
    app.router.add_get("/", page)
    app.router.add_get("/page/{name}", page)
    return app


def run(config: Config, worker: str = "", worker_restarts: int = 0) -> None:
    """Serve until SIGINT/SIGTERM; then drain (stop accepting, finish requests, flush writes).

    `worker`: this process is one of `--workers N`, sharing the port with the others; its slot was
    restarted `worker_restarts` times."""
    app = create_app(config, worker=worker)
    if worker:
        app[METRICS].gauge(
            "worker_restarts",
            "Times the supervisor restarted this worker after it died (--workers).",
            lambda: worker_restarts,
        )
    web.run_app(
        app,
        host=config.collector.host,
        port=config.collector.port,
        shutdown_timeout=config.collector.drain_timeout_s,
        reuse_port=(config.collector.reuse_port or bool(worker)) or None,
        access_log=None,
        print=lambda *a: log.info(
            "capmon collector%s listening on %s:%s (live view: %s)",
            f" worker {worker}" if worker else "",
            config.collector.host,
            config.collector.port,
            config.collector.live_view,
        ),
    )
