"""Where the agent's finished windows go: `SpoolingSink` spools each one durably, a `Transport` delivers.

It implements the daemon's `ReportSink` protocol (`capmon.agent.daemon`):
`start()` → per window `seq = next_seq()`, build the report, `await put(report)` → `close(timeout_s)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import msgspec

from capmon.agent import wire
from capmon.agent.spool import Spool, SpoolConfig
from capmon.agent.transport import Transport, TransportConfig

log = logging.getLogger(__name__)


class SpoolingSink:
    """Spool every report durably, deliver it to the collector in the background.

    `identity` is the agent's, without `instance`: the sink fills it with the spool's, so the collector
    can tell a restarted agent (same instance, seq continues) from a fresh spool (new instance, seq 1).
    `transport_options` go to `Transport` (tests inject `sleep`, `clock`, `rng`, `environ`).
    """

    def __init__(
        self,
        identity: wire.AgentIdentity,
        spool: SpoolConfig,
        transport: TransportConfig,
        **transport_options: Any,
    ) -> None:
        self._identity = identity
        self._spool_config = spool
        self._transport_config = transport
        self._transport_options = transport_options
        self._spool: Spool | None = None
        self._transport: Transport | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(
        cls,
        identity: wire.AgentIdentity,
        spool: Mapping[str, Any],
        transport: Mapping[str, Any],
        *,
        where: str = "<defaults>",
        **transport_options: Any,
    ) -> SpoolingSink:
        """Build from the `[spool]` and `[transport]` TOML tables; an unknown key or bad value raises
        `ConfigError` naming the key and the file."""
        from capmon.agent.config import section

        return cls(
            identity,
            section(SpoolConfig, spool, f"{where}: [spool]"),
            section(TransportConfig, transport, f"{where}: [transport]"),
            **transport_options,
        )

    @property
    def identity(self) -> wire.AgentIdentity:
        """The identity sent with every batch (with `instance`), once started."""
        if self._spool is None:
            raise RuntimeError("SpoolingSink.start() first")
        return msgspec.structs.replace(self._identity, instance=self._spool.instance)

    async def start(self) -> None:
        """Open the spool (recovering whatever a crash left) and start delivering what it holds."""
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

    async def put(self, report: wire.Report) -> None:
        """Durable (fsynced) when this returns; then the transport is woken to send it."""
        await asyncio.to_thread(self._require_spool().append, report)
        if self._transport is not None:
            self._transport.wake()

    def stats(self) -> dict[str, int]:
        """`spool_reports`, `spool_bytes`, `dropped_reports`, `dead_letter_reports` (as in `wire.AgentStats`)."""
        if self._spool is None:
            return {"spool_reports": 0, "spool_bytes": 0, "dropped_reports": 0, "dead_letter_reports": 0}
        return self._spool.stats()

    async def close(self, timeout_s: float) -> None:
        """Deliver what the spool holds for up to `timeout_s`, then stop; what is left stays spooled."""
        if self._task is not None and self._transport is not None:
            self._transport.finish()
            done, _ = await asyncio.wait({self._task}, timeout=max(timeout_s, 0.0))
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            await self._transport.close()
            self._task = None
        if self._spool is not None:
            left = self._spool.stats()["spool_reports"]
            if left:
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
