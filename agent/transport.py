"""The agent's only network I/O: delivers spooled reports to the collector, oldest first.

A report leaves the spool only when the collector answered 2xx (it did so after storage accepted the
write), or when the collector rejected *that report* as invalid (400), in which case it moves to the
dead-letter file, counted. Everything else keeps the reports and retries:

| answer | what the transport does |
|---|---|
| 2xx | remove the batch from the spool, send the next at once |
| 400 on a batch of several | bisect: send each half on its own, so good reports beside a bad one are delivered |
| 400 on one report | dead-letter it with the collector's error, carry on |
| 400 naming `$.agent…`/`$.protocol` | the identity (config) is bad, not a report: keep everything, log, slow retry |
| 401, 403 | keep everything, log loudly (never the token), retry every `auth_retry_s` |
| 413 | halve the batch (count and bytes) for the rest of this run; one report alone too large: dead-letter |
| 429, 5xx, network error, timeout | back off exponentially with jitter; `Retry-After` (seconds or HTTP date) wins |
| anything else (3xx, 404, …) | keep everything, log, back off (a wrong URL is a config error, not bad data) |

Before each POST the batch is marked in the spool as "maybe stored"; an answer that says it was not
stored (no connection, 4xx) clears the mark, so the spool's size bound never drops (and counts) a
report the collector may hold: a timeout, a cut connection or a 5xx leaves it marked until a 2xx.

After `finish(retry=False)` (the agent is stopping) the spool is durable, so nothing is waited for:
the backlog is sent while the collector takes it, and the first failure ends delivery.

The body is a `wire.Batch` built by splicing the spooled report bytes into the JSON (no re-encoding),
gzip-compressed off the event loop.
"""

from __future__ import annotations

import asyncio
import enum
import gzip
import logging
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import aiohttp
import msgspec
from yarl import URL

from capmon.agent import __version__, wire
from capmon.agent.spool import Spool, SpoolUnavailable

log = logging.getLogger(__name__)

TOKEN_ENV = "CAPMON_AGENT_TOKEN"


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """`[transport]` in the agent's TOML file."""

    # The collector's ingest endpoint, e.g. "https://capmon.example.net/api/v1/reports". Empty: no
    # collector; the agent writes windows to `[agent] output` instead and no spool is kept.
    url: str = ""
    # Bearer token the collector expects. The environment variable CAPMON_AGENT_TOKEN, when set,
    # overrides it, so the secret need not live in the config file.
    token: str = ""
    # PEM CA bundle to verify the collector's certificate; empty: the system's trust store.
    ca_file: str = ""
    # PEM client certificate and key, for collectors (or proxies) that require mutual TLS.
    cert_file: str = ""
    key_file: str = ""
    # Whole-request limit (connect, send, collector's storage write, answer).
    timeout_s: float = 30.0
    # Most reports per POST (the collector accepts up to wire.MAX_REPORTS_PER_BATCH, 1000). A
    # backlog drains in batches of this size.
    batch_reports: int = 100
    # Most report bytes (JSON, before gzip) per POST; one report larger than this is still sent alone.
    batch_bytes: int = 4 * 1024 * 1024
    # Exponential backoff after a failure: starts at backoff_min_s, doubles, caps at backoff_max_s;
    # each wait is drawn between half and all of that (jitter, so a fleet does not retry in lockstep).
    backoff_min_s: float = 1.0
    backoff_max_s: float = 300.0
    # A collector's Retry-After is honoured up to this many seconds (a larger one is taken as this).
    retry_after_max_s: float = 3600.0
    # Pace of retries while the collector refuses the token (401/403) or the identity is invalid.
    auth_retry_s: float = 60.0
    # gzip the body (Content-Encoding: gzip): windows are repetitive JSON and shrink about tenfold.
    gzip: bool = True

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"transport url must be http:// or https://, got {self.url!r}")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("transport cert_file and key_file go together")
        if not 1 <= self.batch_reports <= wire.MAX_REPORTS_PER_BATCH:
            raise ValueError(
                f"transport batch_reports must be 1..{wire.MAX_REPORTS_PER_BATCH}, got {self.batch_reports}"
            )
        if self.batch_bytes <= 0 or self.timeout_s <= 0:
            raise ValueError("transport batch_bytes and timeout_s must be positive")
        if not 0 < self.backoff_min_s <= self.backoff_max_s:
            raise ValueError("transport needs 0 < backoff_min_s <= backoff_max_s")


class Outcome(enum.Enum):
    """What one delivery attempt of the oldest batch came to."""

    EMPTY = "empty"  # nothing to send
    DELIVERED = "delivered"  # at least one report left the spool (sent, or dead-lettered)
    RETRY = "retry"  # nothing left the spool; wait `Attempt.delay_s` and try again


@dataclass(frozen=True, slots=True)
class Attempt:
    outcome: Outcome
    delay_s: float = 0.0
    reason: str = ""


Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int | None  # None: no HTTP answer came
    headers: Mapping[str, str]
    text: str
    # False only when the collector cannot have stored the batch: no connection was made.
    maybe_stored: bool = True


class Transport:
    """Delivers the spool's reports to the collector. Run `run()` as a task; `wake()` on each new report."""

    def __init__(
        self,
        config: TransportConfig,
        spool: Spool,
        identity: wire.AgentIdentity,
        *,
        sleep: Sleep | None = None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        if not config.url:
            raise ValueError("transport needs a collector url")
        self.config = config
        self._spool = spool
        self._identity_json = wire.encode(identity)
        self._agent_id = identity.id
        self._token = environ.get(TOKEN_ENV) or config.token
        if not self._token:
            # Otherwise the first hint is the collector's 401, up to a window later.
            log.warning(
                "no token for the collector at %s: set [transport] token or $%s (a collector that checks "
                "tokens refuses every report with HTTP 401)",
                config.url,
                TOKEN_ENV,
            )
        self._sleep = sleep or self._interruptible_sleep
        self._clock = clock
        self._rng = rng
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._finish = False
        self._give_up = False
        self._failures = 0
        # Confirming that delivery works, once per start and once per recovery (never per window):
        # attempts that failed in a row, reports delivered since the last confirmation, and whether
        # delivery has been confirmed since the last failure.
        self._failed_in_row = 0
        self._delivered_unconfirmed = 0
        self._confirmed = False
        # Lowered by 413 answers for the rest of this run.
        self.batch_reports = config.batch_reports
        self.batch_bytes = config.batch_bytes

    # -- lifecycle ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until `stop()`, or, after `finish()`, until the spool is empty."""
        try:
            while not self._stop.is_set():
                # Cleared before looking, so a report spooled while we look is not slept through.
                self._wake.clear()
                try:
                    attempt = await self.attempt()
                except Exception as exc:  # a bug must not end delivery for good
                    log.exception("delivery attempt failed unexpectedly")
                    attempt = Attempt(Outcome.RETRY, self._backoff(), repr(exc))
                self._confirm(attempt)
                if attempt.outcome is Outcome.EMPTY:
                    if self._finish:
                        return
                    await self._wake.wait()
                elif attempt.outcome is Outcome.RETRY:
                    if self._give_up and attempt.delay_s > 0:
                        # Stopping, and the collector cannot take the backlog now: it is spooled
                        # durably, so there is nothing to wait for (the failure said so already).
                        return
                    await self._sleep(attempt.delay_s)
        finally:
            await self.close()

    def _confirm(self, attempt: Attempt) -> None:
        """One INFO line when delivery is seen to work: after the first backlog drains after a start
        or a failure ("delivered N report(s); spool empty"), and at the first delivery after failed
        attempts. Silent in steady state."""
        if attempt.outcome is Outcome.RETRY and attempt.delay_s > 0:
            self._failed_in_row += 1
            self._confirmed = False
        elif attempt.outcome is Outcome.DELIVERED and self._failed_in_row:
            log.info(
                "delivering to %s again after %d failed attempt(s)", self.config.url, self._failed_in_row
            )
            self._failed_in_row = 0
        elif attempt.outcome is Outcome.EMPTY:
            if not self._confirmed and self._delivered_unconfirmed:
                log.info(
                    "delivered %d report(s) to %s; spool empty", self._delivered_unconfirmed, self.config.url
                )
                self._confirmed = True
            if self._confirmed:
                self._delivered_unconfirmed = 0

    def _then(self, delay_s: float, every: bool = False) -> str:
        """What happens next, as the end of a failure's log line: only what is true while stopping."""
        if self._give_up:
            return (
                f"not retrying while stopping; {self._spool.stats()['spool_reports']} report(s) stay spooled"
            )
        if every:
            return f"keeping {self._spool.stats()['spool_reports']} report(s), retrying every {delay_s:g}s"
        return f"retrying in {delay_s:.1f}s"

    def wake(self) -> None:
        """A report was spooled: send now unless backing off."""
        self._wake.set()

    def finish(self, retry: bool = True) -> None:
        """Make `run()` return once the spool is empty. `retry=False` (the agent is stopping): return at
        the first failure too, and cut a backoff in progress short for one last attempt."""
        self._finish = True
        self._give_up = not retry
        self._wake.set()
        if not retry:
            self._hurry.set()

    def stop(self) -> None:
        """Make `run()` return after the request in flight, waking it from any sleep."""
        self._stop.set()
        self._wake.set()
        self._hurry.set()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- one attempt ----------------------------------------------------------------------------------

    async def attempt(self) -> Attempt:
        """Try to deliver the oldest batch once (bisecting on 400). Never sleeps; says how long to wait."""
        try:
            batch = await asyncio.to_thread(self._spool.oldest, self.batch_reports, self.batch_bytes)
            if not batch:
                return Attempt(Outcome.EMPTY)
            attempt = await self._deliver(batch)
        except SpoolUnavailable as exc:
            # Logged by the spool once per change of state. Nothing is sent while it cannot be
            # written: what was sent could not be taken out of it, and would be sent again and again.
            return Attempt(Outcome.RETRY, self._backoff(), str(exc))
        if attempt.outcome is Outcome.DELIVERED:
            self._failures = 0
        return attempt

    async def _deliver(self, batch: list[tuple[int, bytes]]) -> Attempt:
        seqs = [seq for seq, _ in batch]
        marked = await asyncio.to_thread(self._spool.sending, seqs)
        answer = await self._post(batch)
        status, headers, text = answer.status, answer.headers, answer.text
        if status is not None and 200 <= status < 300:
            await asyncio.to_thread(self._spool.remove, seqs)
            self._delivered_unconfirmed += len(seqs)
            return Attempt(Outcome.DELIVERED)
        if not answer.maybe_stored or (status is not None and 300 <= status < 500):
            # The collector stores nothing of a batch it answers 3xx/4xx to (it validates first).
            await asyncio.to_thread(self._spool.not_delivered, marked)
        if status == 400:
            if _names_batch_field(text):
                log.error(
                    "collector rejects this agent's identity, not a report (%s); check the agent's id, "
                    "host and labels; %s",
                    text,
                    self._then(self.config.auth_retry_s, every=True),
                )
                return Attempt(Outcome.RETRY, self.config.auth_retry_s, "400 identity")
            if len(batch) == 1:
                await asyncio.to_thread(self._spool.dead_letter, seqs[0], f"400 {text}")
                return Attempt(Outcome.DELIVERED)
            half = len(batch) // 2
            first = await self._deliver(batch[:half])
            if first.outcome is not Outcome.DELIVERED:
                return first
            second = await self._deliver(batch[half:])
            # The first half left the spool, so this attempt made progress; a failure in the second
            # half still asks for its wait.
            return second
        if status == 413:
            if len(batch) == 1:
                await asyncio.to_thread(
                    self._spool.dead_letter, seqs[0], f"413 too large for the collector even alone: {text}"
                )
                return Attempt(Outcome.DELIVERED)
            self.batch_reports = max(1, len(batch) // 2)
            self.batch_bytes = max(1, sum(len(body) for _, body in batch) // 2)
            log.warning(
                "collector answered 413 to %d reports; sending at most %d reports / %d bytes per POST",
                len(batch),
                self.batch_reports,
                self.batch_bytes,
            )
            return Attempt(Outcome.RETRY, 0.0, "413")
        if status == 403 and _names_agent_id(text):
            # The token is right, but bound to other agent ids: setting a token would not help.
            log.error(
                "collector %s: the collector's token is not bound to agent id %r: change [agent] id or the "
                "token's agents patterns on the collector (HTTP 403: %s); %s",
                self.config.url,
                self._agent_id,
                text,
                self._then(self.config.auth_retry_s, every=True),
            )
            return Attempt(Outcome.RETRY, self.config.auth_retry_s, "403 agent id")
        if status in (401, 403):
            log.error(
                "collector %s refuses this agent's token (HTTP %d: %s); set the token in the config or %s; %s",
                self.config.url,
                status,
                text,
                TOKEN_ENV,
                self._then(self.config.auth_retry_s, every=True),
            )
            return Attempt(Outcome.RETRY, self.config.auth_retry_s, f"{status}")
        delay = self._backoff()
        retry_after = _retry_after(headers.get("Retry-After"), self._clock()) if headers else None
        if retry_after is not None:
            delay = min(retry_after, self.config.retry_after_max_s)
        what = f"HTTP {status}: {text}" if status is not None else text
        level = logging.WARNING if status is None or status in (429, 503) or status >= 500 else logging.ERROR
        log.log(level, "delivery to %s failed (%s); %s", self.config.url, what, self._then(delay))
        return Attempt(Outcome.RETRY, delay, what)

    async def _post(self, batch: list[tuple[int, bytes]]) -> _Answer:
        """POST one batch: the status, headers and error text, or (None, {}, why) when no answer came."""
        body = await asyncio.to_thread(self._body, batch)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"capmon-agent/{__version__}",
        }
        if self.config.gzip:
            headers["Content-Encoding"] = "gzip"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            session = await self._open_session()
            async with session.post(
                self.config.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                text = "" if 200 <= resp.status < 300 else _error_text(await resp.read())
                return _Answer(resp.status, resp.headers, text)
        except aiohttp.ClientConnectorError as exc:
            # aiohttp's own text says "ssl:default" even for http:// URLs: say what was tried.
            url = URL(self.config.url)
            reason = _os_reason(exc.os_error) if exc.os_error else str(exc)
            return _Answer(
                None, {}, f"cannot connect to {url.scheme}://{url.host}:{url.port}: {reason}", False
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return _Answer(None, {}, f"{type(exc).__name__}: {exc}")

    def _body(self, batch: list[tuple[int, bytes]]) -> bytes:
        body = b"".join(
            [
                b'{"protocol":%d,"agent":' % wire.PROTOCOL_VERSION,
                self._identity_json,
                b',"reports":[',
                b",".join(report for _, report in batch),
                b"]}",
            ]
        )
        return gzip.compress(body, compresslevel=6) if self.config.gzip else body

    async def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            ssl_context: ssl.SSLContext | bool = True
            if self.config.url.startswith("https://"):
                ssl_context = ssl.create_default_context(cafile=self.config.ca_file or None)
                if self.config.cert_file:
                    ssl_context.load_cert_chain(self.config.cert_file, self.config.key_file)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
                connector=aiohttp.TCPConnector(ssl=ssl_context, limit=1),
            )
        return self._session

    # -- waiting --------------------------------------------------------------------------------------

    def _backoff(self) -> float:
        self._failures += 1
        ceiling = min(self.config.backoff_max_s, self.config.backoff_min_s * 2 ** min(self._failures - 1, 30))
        return ceiling * (0.5 + 0.5 * self._rng())

    async def _interruptible_sleep(self, seconds: float) -> None:
        """Sleep, cut short only by `stop()` or `finish()` (a new report does not shorten a backoff)."""
        try:
            await asyncio.wait_for(self._hurry.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass


def _os_reason(err: OSError) -> str:
    """ "Connection refused", not asyncio's "Connect call failed ('127.0.0.1', 8080)"."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {err.verify_message}"
    if isinstance(err, ssl.SSLError):
        return str(err)
    return os.strerror(err.errno) if err.errno else str(err)


def _error_text(body: bytes) -> str:
    """The collector's `{"error", "detail", "path"}` as one line; other bodies shortened."""
    try:
        err = msgspec.json.decode(body, type=wire.ErrorBody)
    except msgspec.MsgspecError:
        return body[:512].decode("utf-8", "replace").strip()
    text = err.error
    if err.detail:
        text += f": {err.detail}"
    if err.path:
        text += f" at {err.path}"
    return text


def _names_batch_field(text: str) -> bool:
    """Does a 400's error point at the batch's own fields (identity, protocol) rather than a report?"""
    _, sep, path = text.rpartition(" at ")
    return bool(sep) and path.startswith(("$.agent", "$.protocol"))


def _names_agent_id(text: str) -> bool:
    """Does a 403 say this token may not write as this agent id (the error's path `$.agent.id`)?"""
    _, sep, path = text.rpartition(" at ")
    return bool(sep) and path.strip() == "$.agent.id"


def _retry_after(value: str | None, now: float) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)
