"""The real agent pipeline in-process, driven tick by tick on the test's clock.

`InProcessAgent` builds a `capmon.agent.daemon.Agent` (its sampler, with every `sample()` on a worker
thread under the probe's timeout; its idle classifier; its window records, checked as the collector
will check them) and steps it: each tick samples the probes that are due, advances the clock by
`tick_s`, and closes every window whose end the clock reached, exactly where `Agent.run()` closes
them. Nothing sleeps: a 60 s window takes 60 ticks and a few milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from capmon.agent import wire
from capmon.agent.allocation import AllocationSource
from capmon.agent.config import AgentConfig, AgentSection
from capmon.agent.daemon import Agent, checked_report
from capmon.agent.probe import Probe
from capmon.agent.sinks import ReportSink, identity_of

__all__ = ["InProcessAgent", "MemorySink", "agent_config"]


class SteppedClock(Protocol):
    def __call__(self) -> float: ...

    def advance(self, seconds: float) -> float: ...


def agent_config(
    window_s: int = 60, agent_id: str = "test-agent", host: str = "test-host", **sections: Any
) -> AgentConfig:
    """An `AgentConfig` for tests: a known id and host, `window_s`, no collector (unless
    `transport=TransportConfig(url=...)`); `sections` replace whole sections (`classifier=...`) and
    `labels=` sets the agent's labels."""
    labels = sections.pop("labels", {})
    agent = AgentSection(id=agent_id, host=host, window_s=window_s, labels=dict(labels))
    return AgentConfig(agent=agent, source="<capmon.testing>", **sections)


class MemorySink:
    """A `ReportSink` that keeps every window in `reports`; with `deliver`, it also hands each window,
    as the `Batch` the agent would send, to `deliver` (an in-process collector's `deliver`)."""

    def __init__(
        self,
        identity: wire.AgentIdentity,
        deliver: Callable[[wire.Batch], Awaitable[Any]] | None = None,
    ) -> None:
        self.identity = identity
        self.deliver = deliver
        self.reports: list[wire.Report] = []

    async def start(self) -> None:
        pass

    def next_seq(self) -> int:
        return len(self.reports) + 1

    def last_end(self) -> int:
        return self.reports[-1].end if self.reports else 0

    async def put(self, report: wire.Report) -> None:
        self.reports.append(report)
        if self.deliver is not None:
            await self.deliver(wire.Batch(agent=self.identity, reports=[report]))

    def stats(self) -> dict[str, int]:
        return {}

    def waiting(self) -> int:
        return 0

    async def close(self, timeout_s: float) -> None:
        pass

    def abort(self) -> None:
        pass


class InProcessAgent:
    """One agent of the test: `await tick(n)`, `await run_until_window()`, then read `windows`."""

    def __init__(
        self,
        clock: SteppedClock,
        config: AgentConfig | None = None,
        probes: Sequence[Probe] | None = None,
        *,
        sink: ReportSink | None = None,
        deliver: Callable[[wire.Batch], Awaitable[Any]] | None = None,
        tick_s: float = 1.0,
        boundaries: dict[str, dict[str, Any]] | None = None,
        sources: Sequence[AllocationSource] | None = None,
    ) -> None:
        if not hasattr(clock, "advance"):
            raise TypeError("InProcessAgent needs a clock it can advance (capmon.testing.CapmonClock)")
        if not (isinstance(tick_s, (int, float)) and 0 < tick_s < math.inf):
            raise ValueError(f"tick_s: a positive number of seconds, got {tick_s!r}")
        self.clock = clock
        self.config = config if config is not None else agent_config()
        self.tick_s = float(tick_s)
        self.identity = identity_of(self.config)
        self.sink: ReportSink = sink if sink is not None else MemorySink(self.identity, deliver)
        # Probes the registry builds from the configuration run on the test clock where they take one.
        boundaries = {"mock": {"clock": clock}, **(boundaries or {})}
        self.agent = Agent(
            self.config,
            sink=self.sink,
            probes=probes,
            clock=clock,
            boundaries=None if probes else boundaries,
            sources=sources,
        )
        self.windows: list[wire.Report] = []
        self._start: int | None = None
        self._due: list[float] = []
        self._sources_due: list[float] = []
        self._closed = False

    @property
    def probes(self) -> list[Probe]:
        return self.agent.probes

    @property
    def statuses(self) -> list[Any]:
        """Each probe's fate (active, skipped with why, failed), as `capmon agent probes` lists them."""
        return self.agent.statuses

    async def _begin(self) -> None:
        if self._start is None:
            await self.sink.start()
            self._start = max(int(self.clock()), self.sink.last_end())
            self._due = [self.clock()] * len(self.agent.sampler.tasks)
            self._sources_due = [self.clock()] * len(self.agent.sampler.sources)

    def window_end(self) -> int:
        """The end of the window in progress."""
        start = self._start if self._start is not None else int(self.clock())
        return self.agent.window_end(start)

    async def tick(self, n: int = 1) -> list[wire.Report]:
        """`n` ticks: sample the probes that are due, advance the clock by `tick_s`, close the windows
        that ended. Returns the windows closed during these ticks."""
        if self._closed:
            raise RuntimeError("this agent was stopped")
        await self._begin()
        closed: list[wire.Report] = []
        for _ in range(n):
            now = self.clock()
            # Allocation sources first, as the agent asks them before its first sample.
            for i, source in enumerate(self.agent.sampler.sources):
                if now >= self._sources_due[i]:
                    await source.tick()
                    self._sources_due[i] = now + source.source.interval_s
            for i, task in enumerate(self.agent.sampler.tasks):
                if now >= self._due[i]:
                    await task.tick()
                    self._due[i] = now + task.probe.interval_s
            self.clock.advance(self.tick_s)
            closed += await self._close_ended()
        return closed

    async def run_for(self, seconds: float) -> list[wire.Report]:
        """Ticks covering `seconds` of the test clock."""
        return await self.tick(max(1, math.ceil(seconds / self.tick_s)))

    async def run_until_window(self, count: int = 1) -> list[wire.Report]:
        """Tick until `count` more windows closed; returns them."""
        await self._begin()
        window = self.config.agent.window_s
        limit = math.ceil((count + 1) * window / self.tick_s) + 1
        closed: list[wire.Report] = []
        for _ in range(limit):
            closed += await self.tick()
            if len(closed) >= count:
                return closed
        raise AssertionError(f"no {count} window(s) closed in {limit} ticks of {self.tick_s:g} s")

    async def _close_ended(self) -> list[wire.Report]:
        assert self._start is not None
        closed = []
        while self.clock() >= self.agent.window_end(self._start):
            end = self.agent.window_end(self._start)
            closed.append(await self._keep(self._start, end))
            self._start = end
        return closed

    async def _keep(self, start: int, end: int) -> wire.Report:
        report = checked_report(self.agent.close_window(self.sink.next_seq(), start, end))
        await self.sink.put(report)
        self.windows.append(report)
        return report

    async def stop(self) -> wire.Report | None:
        """Stop as SIGTERM does: the partial window is reported, the sink closed, the probes closed.
        Returns that last window (None when no second of it had passed)."""
        if self._closed:
            return None
        self._closed = True
        last = None
        try:
            if self._start is not None:
                end = math.ceil(self.clock())
                if end > self._start:
                    last = await self._keep(self._start, end)
                await self.sink.close(self.config.agent.shutdown_timeout_s)
        finally:
            busy = {t.probe.name for t in self.agent.sampler.tasks if t.busy}
            for probe in self.agent.probes:
                if probe.name not in busy:
                    probe.close()
            for source in self.agent.sampler.sources:
                if not source.busy:
                    source.source.close()
        return last

    # -- reading what it produced -------------------------------------------------------------------

    @property
    def last_window(self) -> wire.Report:
        if not self.windows:
            raise AssertionError("no window has closed yet (run_until_window() first)")
        return self.windows[-1]

    def device(self, device_id: str, window: int = -1) -> wire.DeviceWindow:
        """One device's record in a window (the last by default)."""
        report = self.windows[window] if self.windows else self.last_window
        for d in report.devices:
            if d.device_id == device_id:
                return d
        known = ", ".join(d.device_id for d in report.devices) or "none"
        raise KeyError(f"device {device_id!r} not in window seq {report.seq} (devices: {known})")

    def states(self, window: int = -1) -> dict[str, str]:
        """`{device_id: state}` at the end of a window (the last by default)."""
        report = self.windows[window] if self.windows else self.last_window
        return {d.device_id: d.state for d in report.devices}

    def batch(self, window: int = -1) -> wire.Batch:
        """A window as the agent sends it: its identity and the report."""
        report = self.windows[window] if self.windows else self.last_window
        return wire.Batch(agent=self.identity, reports=[report])
