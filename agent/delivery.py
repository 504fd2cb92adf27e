"""Where the agent's finished windows go: `SpoolingSink` spools each one durably, a `Transport` delivers.

It implements the `ReportSink` protocol (`capmon.agent.sinks`): `start()` → per window
`seq = next_seq()`, build the report, `await put(report)` → `close(timeout_s)` (`abort()` cuts it short).
A window the spool cannot write (disk full, read-only, I/O error) is counted there as lost, its seq
and end stay used, and `put` returns: the agent keeps sampling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec

from capmon.agent import wire
from capmon.agent.spool import Spool, SpoolConfig, SpoolUnavailable
from capmon.agent.transport import Transport, TransportConfig

log = logging.getLogger(__name__)


class SpoolingSink:
    """Spool every report durably, deliver it to the collector in the background.

    `identity` is the agent's, without `instance`: the sink fills it with the spool's, so the collector
    can tell a restarted agent (same instance, seq continues) from a fresh spool (new instance, seq 1);
    everything else in it (labels, `window_s`) goes as given.
    `transport_options` go to `Transport` (tests inject `sleep`, `clock`, `rng`, `environ`).
    `discarded_at_exit`: the spool is thrown away after `close()` (`capmon demo`), so what is left in it
    is not "sent when the agent starts again".
    """

    def __init__(
        self,
        identity: wire.AgentIdentity,
        spool: SpoolConfig,
        transport: TransportConfig,
        *,
        discarded_at_exit: bool = False,
        **transport_options: Any,
    ) -> None:
        self._identity = identity
        self._discarded_at_exit = discarded_at_exit
        self._spool_config = spool
        self._transport_config = transport
        self._transport_options = transport_options
        self._spool: Spool | None = None
        self._transport: Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._aborted = False

    @property
    def identity(self) -> wire.AgentIdentity:
        """The identity sent with every batch (with `instance`), once started."""
        if self._spool is None:
            raise RuntimeError("SpoolingSink.start() first")
        return msgspec.structs.replace(self._identity, instance=self._spool.instance)

    async def start(self) -> None:
        """Open the spool (recovering whatever a crash left) and start delivering what it holds.

        Raises `SpoolUnavailable` (one line: the path and the cause) when the spool cannot be used.
        """
        self._spool = await asyncio.to_thread(Spool.open, self._spool_config)
        self._transport = Transport(
            self._transport_config, self._spool, self.identity, **self._transport_options
        )
        self._task = asyncio.create_task(self._transport.run(), name="capmon-transport")
        self._task.add_done_callback(_log_crash)
        stats = self._spool.stats()
        log.info(
            "spool %s: instance %s, last seq %d, %d report(s) waiting; delivering to %s",
            self._spool_config.path,
            self._spool.instance,
            self._spool.last_seq,
            stats["spool_reports"],
            self._transport_config.url,
        )

    def next_seq(self) -> int:
        return self._require_spool().next_seq()

    def last_end(self) -> int:
        return self._require_spool().last_end

    async def put(self, report: wire.Report) -> None:
        """Durable (fsynced) when this returns, or counted as lost; then the transport is woken."""
        try:
            await asyncio.to_thread(self._require_spool().append, report)
        except SpoolUnavailable:
            return  # counted by the spool, and logged once per change of its state
        if self._transport is not None:
            self._transport.wake()

    def stats(self) -> dict[str, int]:
        """`spool_reports`, `spool_bytes`, `dropped_reports`, `lost_windows`, `dead_letter_reports`
        (as in `wire.AgentStats`)."""
        if self._spool is None:
            return {
                "spool_reports": 0,
                "spool_bytes": 0,
                "dropped_reports": 0,
                "lost_windows": 0,
                "dead_letter_reports": 0,
            }
        return self._spool.stats()

    def waiting(self) -> int:
        return self.stats()["spool_reports"]

    def abort(self) -> None:
        """Make `close()` return now (a second Ctrl-C): the request in flight is abandoned, the spool
        keeps everything not acknowledged."""
        self._aborted = True
        if self._task is not None:
            self._task.cancel()

    async def close(self, timeout_s: float) -> None:
        """Deliver what the spool holds while the collector takes it, for up to `timeout_s`, then stop;
        what is left stays spooled. Returns at the first failed delivery: the spool is durable."""
        if self._task is not None and self._transport is not None:
            self._transport.finish(retry=False)
            if self._aborted:
                self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=max(timeout_s, 0.0))
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            await self._transport.close()
            self._task = None
        if self._spool is not None:
            left = self._spool.stats()["spool_reports"]
            if left and self._discarded_at_exit:
                log.info("stopping with %d report(s) not delivered; this spool is discarded", left)
            elif left:
                log.warning(
                    "stopping with %d report(s) spooled; they are sent when the agent starts again", left
                )
            await asyncio.to_thread(self._spool.close)
            self._spool = None

    def _require_spool(self) -> Spool:
        if self._spool is None:
            raise RuntimeError("SpoolingSink.start() first")
        return self._spool


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("report delivery stopped by an unexpected error", exc_info=task.exception())
