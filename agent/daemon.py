"""The agent daemon: probes → sampler → holders → idle classifier → report windows → a sink (spool +
transport).

Windows end on multiples of `window_s` of the wall clock, so every host's points share timestamps
and a resent window rewrites the same points. Who holds each device is resolved on each probe's
worker thread (`capmon.agent.holders`), joined here with what the allocation sources last said, and
folded per window on the classifier's clock.

Allocation matching: an `Allocation` with `device_id` holds that device (a GPU split into MIG
instances: each of its instances); one with `vendor` and `index` holds the device of that vendor
whose scheduler number is `index`: for NVIDIA the minor number (`/dev/nvidiaN`:
`info["minor_number"]`), for Ascend the physical id (`/dev/davinciN`, the N of `Ascend910-N`:
`info["phy_id"]`, else `info["logic_id"]`, which equals it when the agent sees all of the host's
chips); where the probe reports none of these, its `index`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from capmon.agent import wire
from capmon.agent.allocation import Allocation, AllocationSource
from capmon.agent.classifier import IdleClassifier
from capmon.agent.config import AgentConfig
from capmon.agent.holders import (
    AllocationHolder,
    HolderResolver,
    HoldersConfig,
    HolderWindows,
    ResolvedHolder,
    resolver_for,
)
from capmon.agent.probe import DeviceSample, HostSample, Probe
from capmon.agent.registry import ProbeRegistry, ProbeStatus, SourceStatus
from capmon.agent.sampler import AllocationTask, Sampler
from capmon.agent.sinks import JsonLinesSink, ReportSink, identity_of, make_sink
from capmon.agent.streaks import StreakFile

# Re-exported: other modules and the tests import these from here.
__all__ = [
    "Agent",
    "JsonLinesSink",
    "ReportSink",
    "StreakFile",
    "checked_report",
    "identity_of",
    "make_sink",
    "match_allocations",
]

log = logging.getLogger("capmon.agent")


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


class ProbeHolders:
    """A probe's post step: its devices' holders resolved from `/proc` on its worker thread. The
    resolver follows the probe's `proc_root` (the mock writes its tree in `setup()`)."""

    def __init__(self, probe: Probe, config: HoldersConfig) -> None:
        self.probe = probe
        self.config = config
        self._resolver: HolderResolver | None = None
        self._root: object = None

    def __call__(self, devices: list[DeviceSample]) -> dict[str, list[ResolvedHolder] | None]:
        root = getattr(self.probe, "proc_root", None)
        if self._resolver is None or root != self._root:
            self._resolver, self._root = resolver_for(self.probe, self.config), root
        return self._resolver.resolve_devices({d.device_id: d.holders for d in devices})


# The info keys that carry the number a scheduler names a device by, per vendor, best first.
_SCHEDULER_NUMBER_KEYS = {"nvidia": ("minor_number",), "ascend": ("phy_id", "logic_id")}


def _minor(d: DeviceSample) -> int | None:
    for key in _SCHEDULER_NUMBER_KEYS.get(d.vendor, ("minor_number",)):
        raw = d.info.get(key)
        if raw is not None:
            try:
                return int(str(raw).strip())
            except ValueError:
                continue
    return d.index


def _covers(source: AllocationSource, vendor: str) -> bool:
    try:
        return bool(source.covers(vendor))
    except Exception:  # a source that cannot say what it covers might cover anything
        return True


def match_allocations(
    devices: Sequence[DeviceSample], tasks: Iterable[AllocationTask]
) -> tuple[dict[str, list[Allocation]], dict[str, str]]:
    """What the allocation sources say of `devices` (one probe's listing): per device id, the
    allocations holding it, and for devices a source covers while it cannot answer, "<source>: <why>".
    The matching rule is in the module docstring."""
    by_id = {d.device_id: d for d in devices}
    by_minor: dict[tuple[str, int], DeviceSample] = {}
    children: dict[str, list[str]] = defaultdict(list)
    for d in devices:
        if d.parent_id:
            children[d.parent_id].append(d.device_id)
        minor = _minor(d)
        if minor is not None and not d.parent_id:
            by_minor.setdefault((d.vendor, minor), d)
    held: dict[str, list[Allocation]] = defaultdict(list)
    unknown: dict[str, str] = {}
    for task in tasks:
        if task.error is not None:
            for d in devices:
                if d.device_id not in unknown and _covers(task.source, d.vendor):
                    unknown[d.device_id] = f"{task.source.name}: {task.error}"
            continue
        for a in task.allocations:
            if a.device_id is not None:
                d = by_id.get(a.device_id)
            elif a.vendor is not None and a.index is not None:
                d = by_minor.get((a.vendor, a.index))
            else:
                d = None
            if d is None:
                continue
            for device_id in children.get(d.device_id) or [d.device_id]:
                held[device_id].append(a)
    return dict(held), unknown


def describe(allocations: Sequence[Allocation]) -> str:
    """Who a scheduler gave the device to, for people: "ml/train-0", "job 4242", several joined."""
    names = []
    for a in allocations:
        if a.pod:
            name = f"{a.namespace}/{a.pod}" if a.namespace else a.pod
        elif a.job_id:
            name = f"job {a.job_id}"
        else:
            name = f"{a.source} allocation {a.device}"
        if name not in names:
            names.append(name)
    more = len(names) - 3
    return ", ".join(names[:3]) + (f" and {more} more" if more > 0 else "")


def merge_holders(
    resolved: list[ResolvedHolder] | None, allocations: Sequence[Allocation], config: HoldersConfig
) -> list[ResolvedHolder | AllocationHolder] | None:
    """A device's processes with the allocations holding it: a process of the same pod (UID) or
    Slurm job carries the allocation's names; an allocation with no process of its own is a holder
    of its own. None (cannot tell) only when there is neither."""
    if not allocations:
        return None if resolved is None else list(resolved)
    out: list[ResolvedHolder | AllocationHolder] = []
    used: set[int] = set()
    for r in resolved or ():
        o = r.owner
        for i, a in enumerate(allocations):
            same_pod = a.pod_uid is not None and o.pod_uid is not None and o.pod_uid == a.pod_uid.lower()
            same_job = a.job_id is not None and o.slurm_job_id == a.job_id
            if same_pod or same_job:
                r = dataclasses.replace(r, allocation=a)
                used.add(i)
                break
        out.append(r)
    send_user = config.users == "name"
    out += [AllocationHolder(a, send_user) for i, a in enumerate(allocations) if i not in used]
    return out


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
        mono: Callable[[], float] | None = None,
        sources: Sequence[AllocationSource] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        # State seconds are measured on a monotonic clock, so a wall-clock step (NTP, VM restore)
        # neither credits nor erases time; wall time only names the windows. A test that injects
        # its own wall clock and no monotonic one gets its wall clock for both.
        self.mono = mono if mono is not None else (time.monotonic if clock is time.time else None)
        self.started = clock()
        self.source_statuses: list[SourceStatus] = []
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
            if sources is None:
                self.source_statuses = registry.activate_sources(
                    config.allocations.enable,
                    config.allocations.disable,
                    config.allocations.options,
                    boundaries,
                    where=config.source,
                )
                sources = [s.source for s in self.source_statuses if s.source is not None]
        else:
            self.statuses = [ProbeStatus(p.name, "active", "", "given", p) for p in probes]
        if sources is None:
            sources = []  # probes given, sources not: a test's agent runs none
        if not self.source_statuses:
            self.source_statuses = [SourceStatus(s.name, "active", "", "given", s) for s in sources]
        self.probes = list(probes)
        self.sources = list(sources)
        self.classifier = IdleClassifier(config.classifier)
        holders = config.holders
        self.holder_windows = HolderWindows()
        # Each device's holders at the latest tick, resolved: what the exporter serves.
        self.latest_holders: dict[str, list[ResolvedHolder | AllocationHolder] | None] = {}
        # Devices each probe listed last time, so one it stops listing holds nothing from then on.
        self._listed: dict[str, set[str]] = {}
        self.sampler = Sampler(
            self.probes,
            self._on_samples,
            clock,
            sources=self.sources,
            post_for=(lambda p: ProbeHolders(p, holders)) if holders.enabled else None,
        )
        self.sink = sink or make_sink(config)
        # The Prometheus exporter serves what the classifier already holds: nothing extra per tick.
        self.exporter = None
        if config.exporter.listen:
            from capmon.agent.exporter import AgentExporter  # only agents that export need prometheus_client

            self.exporter = AgentExporter(
                config,
                self.classifier.snapshot,
                lambda: self.agent_stats(self.clock()),
                holders=lambda: self.latest_holders,
            )
        self._host = _HostWindow()
        # Windows a sink could not take for a reason of its own (a bug, stdout closed): the spool
        # counts what it cannot write itself, durably.
        self.lost_windows = 0
        self._stop = asyncio.Event()
        self._stop_requests = 0
        self._streaks_failing: str | None = None
        self.streaks: StreakFile | None = None
        if config.transport.url:
            spool_dir = Path(config.spool.path)
            keep_s = max(3 * config.agent.window_s, 600)
            self.streaks = StreakFile(spool_dir / "idle-streaks.json", keep_s, clock)

    def _on_samples(
        self,
        probe: str,
        t: float,
        devices: list[DeviceSample],
        host: HostSample | None,
        resolved: Mapping[str, list[ResolvedHolder] | None] | None = None,
    ) -> None:
        # The accounting clock at the sample's instant `t`, not at this callback's: wall and
        # monotonic readings taken together, so the classifier's wall = mono + offset is the same
        # at every reading (a callback's latency would move every reported idle_since with it).
        mono = None
        if self.mono:
            mono_now, wall_now = self.mono(), self.clock()
            mono = mono_now - min(max(0.0, wall_now - t), 60.0)
        allocations, unknown = match_allocations(devices, self.sampler.sources)
        self.classifier.observe_probe(
            probe,
            t,
            devices,
            mono=mono,
            allocated_to={d: describe(a) for d, a in allocations.items()},
            allocation_unknown=unknown,
        )
        if host is not None:
            self._host.add(host)
        if not self.config.holders.enabled:
            return
        a = t if mono is None else mono
        listed = set()
        for d in IdleClassifier.counted(devices):
            listed.add(d.device_id)
            records = merge_holders(
                resolved.get(d.device_id) if resolved else None,
                allocations.get(d.device_id, ()),
                self.config.holders,
            )
            self.holder_windows.observe(d.device_id, a, records)
            self.latest_holders[d.device_id] = records
        for gone in self._listed.get(probe, set()) - listed:
            self.holder_windows.observe(gone, a, None)
            self.latest_holders.pop(gone, None)
        self._listed[probe] = listed

    def window_end(self, t: float) -> int:
        w = self.config.agent.window_s
        return (math.floor(t / w) + 1) * w

    def _close_devices(self, start: int, end: int) -> list[wire.DeviceWindow]:
        mono_end = self.mono() if self.mono else None
        devices = self.classifier.close_window(start, end, mono_end=mono_end)
        if not self.config.holders.enabled:
            return devices
        held = self.holder_windows.close(None, end if mono_end is None else mono_end)
        kept = {d.device_id for d in devices}
        for device_id in set(held) - kept:  # forgotten by the classifier: gone
            self.holder_windows.forget(device_id)
            self.latest_holders.pop(device_id, None)
        out = []
        for d in devices:
            records, omitted = held.get(d.device_id, (None, 0))
            if records is not None:
                d = msgspec.structs.replace(d, holders=records, holders_omitted=min(omitted, wire.MAX_COUNT))
            out.append(d)
        return out

    def close_window(self, seq: int, start: int, end: int) -> wire.Report:
        devices = self._close_devices(start, end)
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
        # Allocation sources report beside the probes, as "alloc:<name>".
        tasks = {t.health.name: t for t in self.sampler.sources}
        for src in self.source_statuses:
            name = f"alloc:{src.name}"
            task = tasks.get(name)
            h = task.health if task else None
            status = src.status if src.status in ("active", "skipped", "failed", "disabled") else "failed"
            # An active source says why it has no current answer (raised, hung, not asked yet).
            reason = (task.error if task and task.error else src.reason) or None
            probes.append(
                wire.ProbeStats(
                    name=name[: wire.MAX_ID_LEN],
                    status=status,
                    samples=min(h.samples, wire.MAX_COUNT) if h else 0,
                    errors=min(h.errors, wire.MAX_COUNT) if h else 0,
                    timeouts=min(h.timeouts, wire.MAX_COUNT) if h else 0,
                    last_duration_s=round(h.last_duration_s, 6)
                    if h and h.last_duration_s is not None
                    else None,
                    reason=reason[: wire.MAX_TEXT_LEN] if reason else None,
                )
            )
        return wire.AgentStats(
            uptime_s=round(max(0.0, now - self.started), 3),
            spool_reports=sink.get("spool_reports", 0),
            spool_bytes=sink.get("spool_bytes", 0),
            dropped_reports=min(sink.get("dropped_reports", 0), wire.MAX_COUNT),
            lost_windows=min(sink.get("lost_windows", 0) + self.lost_windows, wire.MAX_COUNT),
            dead_letter_reports=sink.get("dead_letter_reports", 0),
            probes=probes[: wire.MAX_PROBES],
        )

    async def _close(self, start: int, end: int) -> None:
        """Close the window [start, end) and keep it. A window that cannot even be built (a bug, or
        garbage a plugin slipped past the checks) is counted lost, never the end of the agent."""
        seq = self.sink.next_seq()
        try:
            report = self.close_window(seq, start, end)
        except Exception:
            self.lost_windows += 1
            log.exception("window seq %d could not be built and is lost", seq)
            return
        await self._keep(report)

    async def _keep(self, report: wire.Report) -> None:
        """Hand a finished window to the sink; a failure the sink does not count itself costs that
        window (counted in `lost_windows`), never the agent."""
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
                if self._streaks_failing != exc.strerror:
                    log.warning("could not save idle streaks to %s: %s", self.streaks.path, exc.strerror)
                self._streaks_failing = exc.strerror
            else:
                if self._streaks_failing is not None:
                    log.info("idle streaks saved to %s again", self.streaks.path)
                self._streaks_failing = None

    def request_stop(self) -> None:
        """What SIGTERM/SIGINT call. The first: finish the window, deliver what the collector takes now,
        stop. The second: stop at once (whatever is not delivered stays spooled)."""
        self._stop_requests += 1
        if self._stop_requests == 1:
            waiting = getattr(self.sink, "waiting", lambda: 0)()
            if waiting or self.config.transport.url:
                log.info(
                    "stopping: delivering %d spooled window(s) and the last, partial one, up to %gs;"
                    " Ctrl-C again to exit now",
                    waiting,
                    self.config.agent.shutdown_timeout_s,
                )
            else:
                log.info("stopping")
            self._stop.set()
        elif self._stop_requests == 2:
            log.warning("stopping now; undelivered windows stay spooled")
            getattr(self.sink, "abort", lambda: None)()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Sample and report until `stop` is set or `request_stop()` is called; then report the
        partial window and flush the sink.

        No window ends at or before the end of the last one this agent produced (the sink remembers
        it across restarts): a restart in the last second of a window would otherwise write a short
        window over the full one at the same timestamp.
        """
        if stop is not None:
            self._stop = stop
        stop = self._stop
        await self.sink.start()
        if self.exporter is not None:
            await self.exporter.start()
        if self.streaks is not None:
            self.classifier.restore(await asyncio.to_thread(self.streaks.load))
        # The sources answer once before the first sample, so no device starts "allocation unknown".
        await self.sampler.prime()
        sampling_stop = asyncio.Event()
        sampling = asyncio.create_task(self.sampler.run(sampling_stop))
        window = self.config.agent.window_s
        # Sinks written against the older protocol (no last_end/waiting/abort) still work.
        last_end = getattr(self.sink, "last_end", lambda: 0)()
        start = max(int(self.clock()), last_end)
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
                        await self._close(start, end)
                    break
                if now < start - window:
                    # The wall clock stepped back by more than a window (NTP step, VM restore): waiting
                    # for it to reach `end` again would silence the agent for that long. Restart the
                    # windows from now; points at timestamps already written are overwritten.
                    log.warning("clock stepped back %.0fs: windows restart from now", start - now)
                    self._close_devices(start, start + window)
                    start = int(now)
                    continue
                await self._close(start, end)
                start = end
        finally:
            sampling_stop.set()
            # A probe wedged in sample() is not waited for: its thread is a daemon and dies with us.
            sampling.cancel()
            await asyncio.gather(sampling, return_exceptions=True)
            if self.exporter is not None:
                await self.exporter.stop()
            await self.sink.close(self.config.agent.shutdown_timeout_s)
            for task in self.sampler.sources:
                if task.busy:
                    log.warning(
                        "allocation source %s: allocations() still running at exit; not closed",
                        task.source.name,
                    )
                    continue
                try:
                    task.source.close()
                except Exception:
                    log.exception("allocation source %s: close() failed", task.source.name)
            busy = {t.probe.name for t in self.sampler.probe_tasks if t.busy}
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
    """The report as the collector will judge it (typed decoding, then `wire.check_report`): a record
    it would refuse (and with it the whole window of every device) is dropped here, with the reason in
    the log, and the rest goes. A window that is wrong as a whole raises `ValueError`."""
    holders = sum(len(d.holders or ()) for d in report.devices)
    for _ in range(len(report.devices) + holders + 3):
        try:
            wire.decode_report(wire.encode(report))
            problem = wire.check_report(report)
        except msgspec.ValidationError as exc:
            problem = wire.split_error(exc)
        if problem is None:
            return report
        reason, path = problem[0], problem[1] or ""
        h = re.match(r"\$\.devices\[(\d+)\]\.holders\[(\d+)\]", path)
        m = re.match(r"\$\.devices\[(\d+)\]", path)
        if h:
            # One bad holder record costs that holder, not the device's whole window.
            i, k = int(h.group(1)), int(h.group(2))
            d = report.devices[i]
            log.error(
                "a holder of device %s left out of window seq %d: %s at %s",
                d.device_id,
                report.seq,
                reason,
                path,
            )
            kept = d.holders[:k] + d.holders[k + 1 :]
            d = msgspec.structs.replace(
                d, holders=kept, holders_omitted=min(d.holders_omitted + 1, wire.MAX_COUNT)
            )
            report = msgspec.structs.replace(
                report, devices=[*report.devices[:i], d, *report.devices[i + 1 :]]
            )
        elif m:
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
            raise ValueError(f"window seq {report.seq} cannot be sent: {reason} at {path}")
    return report
