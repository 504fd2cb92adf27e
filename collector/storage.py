"""Storage writers and the group commit in front of them.

A `StorageWriter` writes one batch of line-protocol lines and classifies failure the way Telegraf's
influxdb_v2 output does: the storage calling the data bad (400/422) is `StorageRejected`, never
retried; 413 is `StorageTooLarge` (split and retry halves); everything else (401/403, 404, 429, 5xx,
network errors, timeouts) is `StorageUnavailable`: the agent keeps its reports and retries later.

`GroupCommitWriter` lets concurrent ingest requests share storage writes: each request submits its
lines and awaits a future that resolves only once every one of its lines is stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gzip
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from .config import StorageConfig
from .metrics import Metrics

log = logging.getLogger("capmon.collector.storage")


def describe(exc: BaseException) -> str:
    """An exception as text that always says something (`TimeoutError()` has an empty `str`)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class StorageError(Exception):
    def __init__(self, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class StorageRejected(StorageError):
    """The storage refused the data itself (400/422): retrying the same lines cannot help."""


class StorageTooLarge(StorageError):
    """The request body was too large (413): split the batch."""


class StorageUnavailable(StorageError):
    """Down, overloaded, misconfigured or unreachable: the agent should keep the data and retry."""


class CollectorOverloaded(StorageError):
    """Too many lines already wait for storage: answer 429."""


class RequestTooLarge(StorageError):
    """One request alone has more lines than `max_pending_lines`: answer 413 (the agent splits it)."""


def classify(status: int, detail: str, retry_after: str | None, default_retry: int) -> StorageError:
    if status in (400, 422):
        return StorageRejected(detail)
    if status == 413:
        return StorageTooLarge(detail)
    seconds = default_retry
    if retry_after:
        with contextlib.suppress(ValueError):
            seconds = max(1, min(3600, int(float(retry_after))))
    return StorageUnavailable(f"storage answered {status}: {detail}"[:1000], seconds)


class StorageWriter(Protocol):
    """Writes line-protocol lines; raises a `StorageError` subclass on failure."""

    name: str

    async def start(self) -> None:
        """Open clients only: quick, never waits for the storage (the collector listens at once)."""

    async def ready(self) -> None:
        """Check the storage answers (and create the database if configured); raises `StorageError`."""

    async def write(self, lines: Sequence[str]) -> None: ...

    async def close(self) -> None: ...


def _body(lines: Sequence[str], compress: bool) -> bytes:
    data = "\n".join(lines).encode()
    return gzip.compress(data, compresslevel=1) if compress else data


class NullWriter:
    """kind = "none": the collector serves the live view alone."""

    name = "none"
    # Nothing is written anywhere: no lines count as written.
    stores = False

    async def start(self) -> None:
        log.info("no storage configured: serving the live fleet view only; reports are not stored")

    async def ready(self) -> None:
        return None

    async def write(self, lines: Sequence[str]) -> None:
        return None

    async def close(self) -> None:
        return None


class InfluxV1Writer:
    """InfluxDB 1.x API: `POST /write?db=&rp=&precision=s`, basic auth with user/password.

    The URLs are built absolute from `url` (no `base_url`: aiohttp 3.9 takes neither a path in it nor
    relative request URLs), so a path prefix behind a reverse proxy (`http://proxy/influx/`) is kept.
    """

    name = "influxdb_v1"

    def __init__(self, cfg: StorageConfig) -> None:
        self.cfg = cfg
        self.session: aiohttp.ClientSession | None = None
        self._params = {"db": cfg.db, "precision": "s"}
        if cfg.rp:
            self._params["rp"] = cfg.rp
        self._last_create = 0.0
        base = cfg.url.rstrip("/")
        self._write_url = base + "/write"
        self._query_url = base + "/query"
        self._ping_url = base + "/ping"

    async def start(self) -> None:
        auth = aiohttp.BasicAuth(self.cfg.user, self.cfg.password) if self.cfg.user else None
        self.session = aiohttp.ClientSession(
            auth=auth,
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
        )

    async def ready(self) -> None:
        assert self.session is not None
        if self.cfg.create_database:
            await self._create_database()
            return
        try:
            async with self.session.get(self._ping_url) as resp:
                if resp.status < 300:
                    return
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise StorageUnavailable(f"influxdb_v1 {self._ping_url} unreachable: {describe(exc)}") from None
        raise StorageUnavailable(f"influxdb_v1 {self._ping_url} answered {status}")

    async def _create_database(self) -> None:
        """CREATE DATABASE; raises `StorageUnavailable` naming the reason when it does not succeed."""
        assert self.session is not None
        self._last_create = time.monotonic()
        name = self.cfg.db.replace("\\", "\\\\").replace('"', '\\"')
        try:
            async with self.session.post(self._query_url, data={"q": f'CREATE DATABASE "{name}"'}) as resp:
                if resp.status < 300:
                    return
                text = _error_message((await resp.text(errors="replace"))[:2000])
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise StorageUnavailable(f"CREATE DATABASE {self.cfg.db} failed: {describe(exc)}") from None
        raise StorageUnavailable(f"CREATE DATABASE {self.cfg.db} answered {status}: {text}")

    async def write(self, lines: Sequence[str]) -> None:
        assert self.session is not None
        body = (
            await asyncio.to_thread(_body, lines, self.cfg.gzip)
            if len(lines) > 500
            else _body(lines, self.cfg.gzip)
        )
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if self.cfg.gzip:
            headers["Content-Encoding"] = "gzip"
        try:
            async with self.session.post(
                self._write_url, params=self._params, data=body, headers=headers
            ) as resp:
                if resp.status < 300:
                    return
                text = (await resp.text(errors="replace"))[:2000]
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise StorageUnavailable(
                f"influxdb_v1 unreachable: {describe(exc)}", self.cfg.retry_after_s
            ) from None
        detail = _error_message(text)
        if status == 404 and "database not found" in detail and self.cfg.create_database:
            if time.monotonic() - self._last_create > 10:
                with contextlib.suppress(StorageError):
                    await self._create_database()
        raise classify(status, detail, retry_after, self.cfg.retry_after_s)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class InfluxV2Writer:
    """InfluxDB 2.x API (also 3.x, VictoriaMetrics) through influxdb-client's async write API."""

    name = "influxdb_v2"

    def __init__(self, cfg: StorageConfig) -> None:
        self.cfg = cfg
        self.client = None
        self.api = None

    async def start(self) -> None:
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

        self.client = InfluxDBClientAsync(
            url=self.cfg.url,
            token=self.cfg.token,
            org=self.cfg.org,
            timeout=int(self.cfg.timeout_s * 1000),
            enable_gzip=self.cfg.gzip,
        )
        self.api = self.client.write_api()

    async def ready(self) -> None:
        assert self.client is not None
        try:
            ok = await self.client.ping()
        except Exception as exc:  # the client raises what its HTTP stack raises
            raise StorageUnavailable(f"influxdb_v2 {self.cfg.url} unreachable: {describe(exc)}") from None
        if not ok:
            raise StorageUnavailable(f"influxdb_v2 {self.cfg.url} did not answer /ping")

    async def write(self, lines: Sequence[str]) -> None:
        from influxdb_client import WritePrecision
        from influxdb_client.rest import ApiException

        assert self.api is not None
        body = "\n".join(lines).encode()
        try:
            await self.api.write(
                bucket=self.cfg.bucket, org=self.cfg.org, record=body, write_precision=WritePrecision.S
            )
        except ApiException as exc:
            headers = exc.headers or {}
            body_text = (
                exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or "")
            )
            raise classify(
                exc.status or 0,
                _error_message(body_text) or str(exc.reason or ""),
                headers.get("Retry-After"),
                self.cfg.retry_after_s,
            ) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise StorageUnavailable(
                f"influxdb_v2 unreachable: {describe(exc)}", self.cfg.retry_after_s
            ) from None

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def _error_message(text: str) -> str:
    """InfluxDB answers `{"error": "..."}` (1.x) or `{"code":…, "message": "..."}` (2.x)."""
    import json

    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:1000]
    if isinstance(data, dict):
        msg = data.get("error") or data.get("message")
        if isinstance(msg, str):
            return msg[:1000]
    return text.strip()[:1000]


def make_writer(cfg: StorageConfig) -> StorageWriter:
    if cfg.kind == "influxdb_v1":
        return InfluxV1Writer(cfg)
    if cfg.kind == "influxdb_v2":
        return InfluxV2Writer(cfg)
    if cfg.kind == "prometheus_remote_write":
        from .remote_write import RemoteWriteWriter

        return RemoteWriteWriter(cfg)
    return NullWriter()


@dataclass(eq=False)
class _Pending:
    """One request's lines (or a slice of them) waiting for a storage write."""

    lines: Sequence[str]
    future: asyncio.Future[None]
    # The request's parts: the future resolves when all are stored; the first error fails it.
    parts: list[int] = field(default_factory=lambda: [1])


class GroupCommitWriter:
    """Coalesces concurrent requests into storage writes of up to `batch_size` lines.

    A write waits at most `flush_interval_s` for more requests to join, and up to `write_concurrency`
    writes run at once. When storage rejects a batch built from several requests, each request is
    retried on its own so that only the request carrying the bad data is refused (InfluxDB may have
    stored the others' points already; writing them again is idempotent).
    """

    def __init__(
        self,
        writer: StorageWriter,
        cfg: StorageConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer = writer
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_lines = 0
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._inflight = 0
        # Storage readiness, for /healthz: checked in the background so that the collector listens
        # at once even while the storage hangs; a write's outcome updates it too.
        self.ready = False
        self.last_error: str | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self._stores = getattr(writer, "stores", True)

    @property
    def pending_lines(self) -> int:
        return self._queued_lines + self._inflight

    async def start(self) -> None:
        await self.writer.start()
        self._tasks = [
            asyncio.create_task(self._flusher(), name=f"capmon-flush-{i}")
            for i in range(self.cfg.write_concurrency)
        ]
        self._ready_task = asyncio.create_task(self._become_ready(), name="capmon-storage-ready")

    async def _become_ready(self) -> None:
        """Ping (or CREATE DATABASE) until the storage answers; each new error is logged once."""
        check = getattr(self.writer, "ready", None)
        delay = 1.0
        while not self.ready and not self._closing:
            try:
                if check is not None:
                    await check()
            except Exception as exc:
                error = exc.detail if isinstance(exc, StorageError) else describe(exc)
                if error != self.last_error:
                    log.warning("storage %s not ready: %s (retrying)", self.writer.name, error)
                self.last_error = error
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if not self.ready:
                self.ready, self.last_error = True, None
                log.info("storage %s ready", self.writer.name)

    async def submit(self, lines: Sequence[str]) -> None:
        """Returns once all `lines` are stored; raises a `StorageError` otherwise."""
        if not lines:
            return
        if self._closing:
            raise StorageUnavailable("collector is shutting down", self.cfg.retry_after_s)
        if len(lines) > self.cfg.max_pending_lines:
            raise RequestTooLarge(
                f"{len(lines)} points in one request; at most {self.cfg.max_pending_lines} "
                "(storage.max_pending_lines): send fewer reports per request"
            )
        # Only refused while others are pending: an idle collector always takes a request that fits.
        if self.pending_lines and self.pending_lines + len(lines) > self.cfg.max_pending_lines:
            raise CollectorOverloaded(
                "too many lines waiting for storage", max(1, self.cfg.retry_after_s // 2)
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        size = self.cfg.batch_size
        if len(lines) <= size:
            self._queue.append(_Pending(lines, future))
        else:
            chunks = [lines[i : i + size] for i in range(0, len(lines), size)]
            parts = [len(chunks)]
            for chunk in chunks:
                self._queue.append(_Pending(chunk, future, parts))
        self._queued_lines += len(lines)
        self._wakeup.set()
        await future

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        n = 0
        while self._queue and n + len(self._queue[0].lines) <= self.cfg.batch_size:
            item = self._queue.popleft()
            if item.future.done():  # a sibling part already failed this request
                self._queued_lines -= len(item.lines)
                continue
            batch.append(item)
            n += len(item.lines)
        self._queued_lines -= n
        return batch

    async def _flusher(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            if (
                self._queued_lines < self.cfg.batch_size
                and self.cfg.flush_interval_s > 0
                and not self._closing
            ):
                await asyncio.sleep(self.cfg.flush_interval_s)
            batch = self._take_batch()
            if batch:
                n = sum(len(p.lines) for p in batch)
                self._inflight += n
                try:
                    await self._write(batch)
                finally:
                    self._inflight -= n

    async def _write(self, batch: list[_Pending]) -> None:
        lines: list[str] = []
        for p in batch:
            lines.extend(p.lines)
        try:
            await self._write_lines(lines)
        except StorageRejected as exc:
            if len(batch) > 1:
                for p in batch:  # find the request that carries the bad data
                    await self._write([p])
                return
            self._fail(batch, exc)
        except StorageError as exc:
            self._fail(batch, exc)
        except Exception as exc:  # a writer bug must not leave requests hanging
            log.exception("storage writer %s failed unexpectedly", self.writer.name)
            self._fail(batch, StorageUnavailable(f"storage writer error: {exc!r}", self.cfg.retry_after_s))
        else:
            for p in batch:
                if not p.future.done():
                    p.parts[0] -= 1
                    if p.parts[0] == 0:
                        p.future.set_result(None)

    def _fail(self, batch: list[_Pending], exc: StorageError) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)

    async def _write_lines(self, lines: list[str]) -> None:
        """One storage write; on 413, the halves are written separately."""
        started = self.clock()
        try:
            await self.writer.write(lines)
        except StorageTooLarge as exc:
            self.metrics.storage_errors.inc(kind="too_large")
            if len(lines) == 1:
                raise StorageRejected(f"a single point is too large for storage: {exc.detail}") from None
            half = len(lines) // 2
            await self._write_lines(lines[:half])
            await self._write_lines(lines[half:])
            return
        except StorageRejected:
            self.metrics.storage_errors.inc(kind="rejected")
            raise
        except StorageError as exc:
            self.metrics.storage_errors.inc(kind="unavailable")
            self.ready, self.last_error = False, exc.detail
            raise
        finally:
            self.metrics.write_seconds.observe(self.clock() - started)
        self.ready, self.last_error = True, None
        if self._stores:
            self.metrics.batch_lines.observe(len(lines))
            self.metrics.lines_written.inc(len(lines))

    async def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, write what is queued (within `timeout`), then close the writer."""
        self._closing = True
        self._wakeup.set()
        if self._ready_task is not None:
            self._ready_task.cancel()
            await asyncio.gather(self._ready_task, return_exceptions=True)
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(StorageUnavailable("collector shut down", self.cfg.retry_after_s))
        self._queued_lines = 0
        await self.writer.close()
