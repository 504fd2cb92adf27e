"""Where the agent's finished windows go: the `ReportSink` protocol, and the sinks that need no collector.

The spooling HTTP sink lives in `capmon.agent.delivery` (it imports aiohttp's client); `make_sink`
picks it when a collector url is configured.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import IO, Protocol

from capmon.agent import __version__, wire
from capmon.agent.config import AgentConfig


class ReportSink(Protocol):
    """Where finished windows go. `put` returns once the report is durable, or counted as lost."""

    async def start(self) -> None: ...

    def next_seq(self) -> int: ...

    def last_end(self) -> int:
        """The end of the newest window this agent produced before (0: unknown): never produced again."""
        ...

    async def put(self, report: wire.Report) -> None: ...

    def stats(self) -> dict[str, int]: ...

    def waiting(self) -> int:
        """Reports kept but not yet delivered."""
        ...

    async def close(self, timeout_s: float) -> None: ...

    def abort(self) -> None:
        """Make a `close()` in progress return now; what is not delivered stays kept."""
        ...


class JsonLinesSink:
    """Writes each finished window as one JSON `Batch` per line (stdout or a file): no collector needed."""

    def __init__(self, identity: wire.AgentIdentity, output: str | IO[str] = "-") -> None:
        self.identity = identity
        self.output = output
        self._file: IO[str] | None = None
        self._seq = 0
        self._last_end = 0

    async def start(self) -> None:
        if isinstance(self.output, str):
            path = Path(self.output)
            self._file = (
                sys.stdout
                if self.output == "-"
                else await asyncio.to_thread(path.open, "a", encoding="utf-8")
            )
        else:
            self._file = self.output

    def next_seq(self) -> int:
        return self._seq + 1

    def last_end(self) -> int:
        # Nothing is kept across restarts in this mode: only this run's windows are known.
        return self._last_end

    async def put(self, report: wire.Report) -> None:
        self._seq = report.seq
        self._last_end = max(self._last_end, report.end)
        assert self._file is not None
        line = wire.encode(wire.Batch(agent=self.identity, reports=[report])).decode()
        self._file.write(line + "\n")
        self._file.flush()

    def stats(self) -> dict[str, int]:
        return {}

    def waiting(self) -> int:
        return 0

    async def close(self, timeout_s: float) -> None:
        if self._file is not None and isinstance(self.output, str) and self.output != "-":
            self._file.close()

    def abort(self) -> None:
        pass


def identity_of(config: AgentConfig) -> wire.AgentIdentity:
    """The identity every batch carries; `window_s` lets the collector judge staleness by the
    configured window, never by a short first or last window."""
    return wire.AgentIdentity(
        id=config.agent_id,
        host=config.host,
        version=__version__,
        labels=dict(config.agent.labels),
        window_s=config.agent.window_s,
    )


def make_sink(config: AgentConfig) -> ReportSink:
    """A spooling HTTP sink when a collector url is configured, else JSON lines."""
    identity = identity_of(config)
    if config.transport.url:
        from capmon.agent.delivery import SpoolingSink  # only agents that deliver need aiohttp's client

        return SpoolingSink(identity, config.spool, config.transport)
    return JsonLinesSink(identity, config.agent.output)
