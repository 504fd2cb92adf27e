"""The agent daemon: probes → sampler → idle classifier → report windows → a sink (spool + transport).

Windows end on multiples of `window_s` of the wall clock, so every host's points share timestamps
and a resent window rewrites the same points.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import msgspec

from capmon.agent import __version__, wire
from capmon.agent.classifier import IdleClassifier
from capmon.agent.config import AgentConfig
from capmon.agent.probe import DeviceSample, HostSample, Probe
from capmon.agent.registry import ProbeRegistry, ProbeStatus
from capmon.agent.sampler import Sampler

log = logging.getLogger("capmon.agent")


class ReportSink(Protocol):
    """Where finished windows go. `put` returns only when the report is durable."""

    async def start(self) -> None: ...

    def next_seq(self) -> int: ...

    async def put(self, report: wire.Report) -> None: ...

    def stats(self) -> dict[str, int]: ...

    async def close(self, timeout_s: float) -> None: ...


class JsonLinesSink:
    """Writes each finished window as one JSON `Batch` per line (stdout or a file): no collector needed."""

    def __init__(self, identity: wire.AgentIdentity, output: str | IO[str] = "-") -> None:
        self.identity = identity
        self.output = output
        self._file: IO[str] | None = None
        self._seq = 0

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

    async def put(self, report: wire.Report) -> None:
        self._seq = report.seq
        assert self._file is not None
        line = wire.encode(wire.Batch(agent=self.identity, reports=[report])).decode()
        self._file.write(line + "\n")
        self._file.flush()

    def stats(self) -> dict[str, int]:
        return {}

    async def close(self, timeout_s: float) -> None:
        if self._file is not None and isinstance(self.output, str) and self.output != "-":
            self._file.close()


class _HostWindow:
    """Folds host samples (cpu mean/max, last memory and load) into one `HostWindow`."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.last: HostSample | None = None

    def add(self, s: HostSample) -> None:
        if s.cpu_pct is not None:
            self.cpu.append(s.cpu_pct)
        self.last = s

    def close(self) -> wire.HostWindow | None:
        s, cpu = self.last, self.cpu
        self.cpu, self.last = [], None
        if s is None:
            return None
        return wire.HostWindow(
            cpu_mean_pct=round(sum(cpu) / len(cpu), 3) if cpu else None,
            cpu_max_pct=max(cpu) if cpu else None,
            memory_used_bytes=s.memory_used_bytes,
            memory_total_bytes=s.memory_total_bytes,
            load1=s.load1,
            load5=s.load5,
            load15=s.load15,
            cpu_count=s.cpu_count,
        )


def identity_of(config: AgentConfig) -> wire.AgentIdentity:
    return wire.AgentIdentity(
        id=config.agent_id,
        host=config.host,
        version=__version__,
        labels=dict(config.agent.labels),
        window_s=config.agent.window_s,
    )


class StreakFile:
    """Idle streaks and memory baselines kept across agent restarts (a JSON file beside the spool).

    Without it an agent upgrade would turn "idle for three weeks" into "idle for two minutes"
    fleet-wide. What it holds is trusted only if it was saved recently: an agent that was down for
    long cannot know what its devices did meanwhile.
    """

    def __init__(self, path: Path, max_age_s: float, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_age_s = max_age_s
        self.clock = clock

    def load(self) -> dict[str, tuple[float | None, int | None]]:
        try:
            data = json.loads(self.path.read_text())
            age = self.clock() - float(data["saved_at"])
            devices = {str(k): (v[0], v[1]) for k, v in data["devices"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            log.warning("ignoring %s: %s", self.path, exc)
            return {}
        if not 0 <= age <= self.max_age_s:
            log.info("idle streaks in %s are %.0fs old: starting them afresh", self.path, age)
            return {}
        return devices

    def save(self, devices: Mapping[str, tuple[float | None, int | None]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"saved_at": self.clock(), "devices": devices}))
        os.replace(tmp, self.path)


def make_sink(config: AgentConfig) -> ReportSink:
    """A spooling HTTP sink when a collector url is configured, else JSON lines."""
    identity = identity_of(config)
    if config.transport.url:
        from capmon.agent.delivery import SpoolingSink  # only agents that deliver need aiohttp's client

        return SpoolingSink(identity, config.spool, config.transport)
    return JsonLinesSink(identity, config.agent.output)


class Agent:
    """One agent: activates its probes, samples them, and turns every window into a durable report."""

    def __init__(
        self,
        config: AgentConfig,
        registry: ProbeRegistry | None = None,
        sink: ReportSink | None = None,
        boundaries: Mapping[str, Mapping[str, Any]] | None = None,
        probes: Sequence[Probe] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.started = clock()
        if probes is None:
            registry = registry or ProbeRegistry()
            self.statuses: list[ProbeStatus] = registry.activate(
                config.probes.enable,
                config.probes.disable,
                config.probes.options,
                boundaries,
                where=config.source,
            )
            probes = [s.probe for s in self.statuses if s.probe is not None]
        else:
            self.statuses = [ProbeStatus(p.name, "active", "", "given", p) for p in probes]
        self.probes = list(probes)
        self.classifier = IdleClassifier(config.classifier)
        self.sampler = Sampler(self.probes, self._on_samples, clock)
        self.sink = sink or make_sink(config)
        self._host = _HostWindow()
        self.lost_windows = 0
        self.streaks: StreakFile | None = None
        if config.transport.url:
            spool_dir = Path(config.spool.path)
            keep_s = max(3 * config.agent.window_s, 600)
            self.streaks = StreakFile(spool_dir / "idle-streaks.json", keep_s, clock)

    def _on_samples(self, probe: str, t: float, devices: list[DeviceSample], host: HostSample | None) -> None:
        self.classifier.observe_probe(probe, t, devices)
        if host is not None:
            self._host.add(host)

    def window_end(self, t: float) -> int:
        w = self.config.agent.window_s
        return (math.floor(t / w) + 1) * w

    def close_window(self, seq: int, start: int, end: int) -> wire.Report:
        devices = self.classifier.close_window(start, end)
        return wire.Report(
            seq=seq,
            start=start,
            end=end,
            devices=devices,
            host=self._host.close(),
            agent=self.agent_stats(end),
        )

    def agent_stats(self, now: float) -> wire.AgentStats:
        sink = self.sink.stats()
        health = {h.name: h for h in self.sampler.health()}
        probes = []
        for s in self.statuses:
            h = health.get(s.name)
            status = s.status if s.status in ("active", "skipped", "failed", "disabled") else "failed"
            reason = (h.last_error if h and h.last_error else s.reason) or None
            probes.append(
                wire.ProbeStats(
                    name=s.name[:128],
                    status=status,
                    samples=min(h.samples, 1_000_000) if h else 0,
                    errors=min(h.errors, 1_000_000) if h else 0,
                    timeouts=min(h.timeouts, 1_000_000) if h else 0,
                    last_duration_s=round(h.last_duration_s, 6)
                    if h and h.last_duration_s is not None
                    else None,
                    reason=reason[:1024] if reason else None,
                )
            )
        return wire.AgentStats(
            uptime_s=round(max(0.0, now - self.started), 3),
            spool_reports=sink.get("spool_reports", 0),
            spool_bytes=sink.get("spool_bytes", 0),
            dropped_reports=min(sink.get("dropped_reports", 0) + self.lost_windows, 1_000_000),
            dead_letter_reports=sink.get("dead_letter_reports", 0),
            probes=probes[:64],
        )

    async def _keep(self, report: wire.Report) -> None:
        """Hand a finished window to the sink; a sink failure (disk full, EIO) costs that window, not the agent."""
        try:
            await self.sink.put(checked_report(report))
        except Exception as exc:
            self.lost_windows += 1
            log.error(
                "window seq %d could not be kept and is lost: %s: %s", report.seq, type(exc).__name__, exc
            )
        if self.streaks is not None:
            try:
                await asyncio.to_thread(self.streaks.save, self.classifier.remember())
            except OSError as exc:
                log.warning("could not save idle streaks to %s: %s", self.streaks.path, exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Sample and report until `stop` is set; then report the partial window and flush the sink."""
        await self.sink.start()
        if self.streaks is not None:
            self.classifier.restore(await asyncio.to_thread(self.streaks.load))
        sampling_stop = asyncio.Event()
        sampling = asyncio.create_task(self.sampler.run(sampling_stop))
        window = self.config.agent.window_s
        start = int(self.clock())
        try:
            while True:
                end = self.window_end(start)
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, end - self.clock()))
                except asyncio.TimeoutError:
                    pass
                now = self.clock()
                if stop.is_set():
                    # Round up: samples already taken this second belong inside the window.
                    end = math.ceil(now)
                    if end > start:
                        await self._keep(self.close_window(self.sink.next_seq(), start, end))
                    break
                if now < start - window:
                    # The wall clock stepped back by more than a window (NTP step, VM restore): waiting
                    # for it to reach `end` again would silence the agent for that long. Restart the
                    # windows from now; points at timestamps already written are overwritten.
                    log.warning("clock stepped back %.0fs: windows restart from now", start - now)
                    self.classifier.close_window(start, start + window)
                    start = int(now)
                    continue
                await self._keep(self.close_window(self.sink.next_seq(), start, end))
                start = end
        finally:
            sampling_stop.set()
            # A probe wedged in sample() is not waited for: its thread is a daemon and dies with us.
            sampling.cancel()
            await asyncio.gather(sampling, return_exceptions=True)
            await self.sink.close(self.config.agent.shutdown_timeout_s)
            busy = {t.probe.name for t in self.sampler.tasks if t.busy}
            for probe in self.probes:
                if probe.name in busy:
                    # close() under a running sample() would free what the sample is using (NVML).
                    log.warning("probe %s: sample() still running at exit; not closed", probe.name)
                    continue
                try:
                    probe.close()
                except Exception:
                    log.exception("probe %s: close() failed", probe.name)


def checked_report(report: wire.Report) -> wire.Report:
    """The report as the collector will judge it: a record it would refuse (and with it the whole
    window of every device) is dropped here, with the reason in the log, and the rest goes."""
    for _ in range(len(report.devices) + 3):
        try:
            wire.decode_report(wire.encode(report))
            return report
        except msgspec.ValidationError as exc:
            reason, path = wire.split_error(exc)
            path = path or ""
            m = re.match(r"\$\.devices\[(\d+)\]", path)
            if m:
                i = int(m.group(1))
                log.error(
                    "device %s left out of window seq %d: %s at %s",
                    report.devices[i].device_id,
                    report.seq,
                    reason,
                    path,
                )
                report = msgspec.structs.replace(report, devices=report.devices[:i] + report.devices[i + 1 :])
            elif path.startswith("$.host"):
                log.error("host record left out of window seq %d: %s at %s", report.seq, reason, path)
                report = msgspec.structs.replace(report, host=None)
            elif path.startswith("$.agent"):
                log.error("agent stats left out of window seq %d: %s at %s", report.seq, reason, path)
                report = msgspec.structs.replace(report, agent=None)
            else:
                raise
    return report
