"""The agent's Prometheus exporter: each device's current state, idle streak and readings on /metrics.

Built with prometheus_client (text format, or OpenMetrics when the scraper asks for it): a custom
collector reads the classifier's `snapshot()` and the agent's stats at scrape time, so a scrape
serves what the sampler already has and adds no work to any tick. Names and units are the ones the
collector's remote write uses (`capmon.collector.remote_write`): a dashboard reads either.

Every series carries `host`, `agent` and the agent's labels (`[agent] labels`); device series add
`device`, `vendor` and `model`. A label key that would collide with one of those (or with
Prometheus's own `job` and `instance`) is left out.

Who holds a device (`capmon_device_holder_info`, `…_holder_memory_bytes`) comes from the owners the
agent resolved at its latest tick (`holders`: device id → its `HolderRecord`s, the user, pod,
Slurm job and process name, with `[holders]` applied), never from a pid. Without `holders` (an
exporter over a bare classifier) the probe's raw holders are served (process name only);
`[holders] enabled = false` serves no holder series at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from capmon.agent import wire
from capmon.agent.classifier import DeviceView
from capmon.agent.config import AgentConfig, listen_address
from capmon.agent.holders import HolderRecord

__all__ = ["RESERVED_LABELS", "AgentExporter", "ExporterView", "ViewCollector"]

log = logging.getLogger("capmon.agent.exporter")

ExporterView = Sequence[DeviceView]
# Device id → the holders the agent resolved at its latest tick (None: it cannot tell).
LatestHolders = Mapping[str, Sequence[HolderRecord | wire.HolderWindow] | None]

# Labels the exporter sets itself: an agent label of the same name is not exported.
RESERVED_LABELS = frozenset(
    {
        "host",
        "agent",
        "device",
        "vendor",
        "model",
        "parent",
        "state",
        "probe",
        "source",
        "user",
        "namespace",
        "pod",
        "container",
        "slurm_job_id",
        "command",
        # Prometheus attaches these to every scraped series; a clash is renamed `exported_…`.
        "job",
        "instance",
    }
)

_HOLDER_LABELS = ("source", "user", "namespace", "pod", "container", "slurm_job_id", "command")


def _holder_labels(holder: object) -> tuple[str, ...]:
    """A holder's bounded identities: a resolved one (`wire.HolderWindow`) or a probe's `Holder`
    (pid, name); never the pid itself, which would make a series per process."""
    if not isinstance(holder, wire.HolderWindow) and hasattr(holder, "window"):
        # A HolderRecord: its wire record carries the names, bounded and with [holders] applied.
        holder = holder.window(0.0, holder.memory_bytes)
    values = []
    for name in _HOLDER_LABELS:
        value = getattr(holder, name, None)
        if name == "command" and value is None:
            value = getattr(holder, "name", None)
        if name == "source" and value is None:
            value = "process"
        values.append("" if value is None else str(value)[: wire.MAX_LABEL_VALUE_LEN])
    return tuple(values)


class ViewCollector:
    """A prometheus_client collector over the agent's current view; `collect()` runs per scrape."""

    def __init__(
        self,
        config: AgentConfig,
        snapshot: Callable[[], ExporterView],
        agent_stats: Callable[[], wire.AgentStats | None],
        clock: Callable[[], float] = time.time,
        holders: Callable[[], LatestHolders] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.agent_stats = agent_stats
        self.clock = clock
        self.holders = holders
        self.holders_enabled = config.holders.enabled
        labels = {k: v for k, v in sorted(config.agent.labels.items()) if k not in RESERVED_LABELS}
        self.base_names = ("host", "agent", *labels)
        self.base_values = (config.host, config.agent_id, *labels.values())
        self.device_names = (*self.base_names, "device", "vendor", "model")

    def describe(self) -> list[Metric]:
        # Registering must not call the agent: an empty describe() keeps collect() lazy.
        return []

    def collect(self) -> Iterator[Metric]:
        return self.families(self.snapshot(), self.agent_stats(), self.latest_holders())

    def latest_holders(self) -> LatestHolders | None:
        """A copy of the agent's latest holders (taken on the loop: the agent updates them there)."""
        return None if self.holders is None else dict(self.holders())

    def families(
        self, views: ExporterView, stats: wire.AgentStats | None, held: LatestHolders | None = None
    ) -> Iterator[Metric]:
        yield from self._devices(views, held)
        if stats is not None:
            yield from self._agent(stats)

    def _holders_of(self, v: DeviceView, held: LatestHolders | None) -> Sequence[object]:
        if not self.holders_enabled:
            return ()
        if self.holders is None:
            return v.holders or ()  # no resolution wired in: what the probe saw
        return (held or {}).get(v.device_id) or ()

    def _devices(self, views: ExporterView, held: LatestHolders | None = None) -> Iterator[Metric]:
        dn = self.device_names
        state = GaugeMetricFamily(
            "capmon_device_state",
            "1 for the state the device is in now (busy, allocated_idle, free, unavailable), else 0",
            labels=(*dn, "state"),
        )
        seconds = CounterMetricFamily(
            "capmon_device_state_seconds",
            "Seconds the device spent in each state since the agent started; rate() is the share of time",
            labels=(*dn, "state"),
        )
        info = InfoMetricFamily("capmon_device", "The device's identity", labels=dn)
        fraction = GaugeMetricFamily(
            "capmon_device_gpu_fraction",
            "Share of a physical accelerator the device is (a MIG instance its slices; whole devices 1)",
            labels=dn,
        )
        idle_since = GaugeMetricFamily(
            "capmon_device_idle_since_seconds",
            "Start of the current idle streak (unix seconds); absent when the device is not idle",
            labels=dn,
        )
        idle_for = GaugeMetricFamily(
            "capmon_device_idle_for_seconds", "Length of the current idle streak", labels=dn
        )
        state_since = GaugeMetricFamily(
            "capmon_device_state_since_seconds",
            "Since when the device has been in its current state (unix seconds)",
            labels=dn,
        )
        util = GaugeMetricFamily(
            "capmon_device_utilization_ratio", "Compute utilisation, 0 to 1 (last sample)", labels=dn
        )
        mem_used = GaugeMetricFamily("capmon_device_memory_used_bytes", "Device memory in use", labels=dn)
        mem_total = GaugeMetricFamily("capmon_device_memory_total_bytes", "Device memory", labels=dn)
        power = GaugeMetricFamily("capmon_device_power_watts", "Board power (last sample)", labels=dn)
        temp = GaugeMetricFamily("capmon_device_temperature_celsius", "Temperature (last sample)", labels=dn)
        energy = CounterMetricFamily(
            "capmon_device_energy_joules",
            "Energy since the agent started: each sample's power held until the next",
            labels=dn,
        )
        procs = GaugeMetricFamily("capmon_device_processes", "Processes holding the device", labels=dn)
        holder = InfoMetricFamily(
            "capmon_device_holder", "Who holds the device (bounded identities, never a pid)", labels=dn
        )
        holder_mem = GaugeMetricFamily(
            "capmon_device_holder_memory_bytes",
            "Device memory of the device's holders, by holder identity",
            labels=(*dn, *_HOLDER_LABELS),
        )
        now = self.clock()
        base = self.base_values
        for v in views:
            lv = (*base, v.device_id, v.vendor, v.model or "")
            for s in wire.STATES:
                state.add_metric((*lv, s), 1.0 if v.state == s else 0.0)
                seconds.add_metric((*lv, s), v.state_seconds.get(s, 0.0))
            info.add_metric(lv, {"parent": v.parent_id or ""})
            fraction.add_metric(lv, v.fraction)
            if v.idle_since is not None:
                idle_since.add_metric(lv, v.idle_since)
                idle_for.add_metric(lv, max(0.0, now - v.idle_since))
            if v.state_since is not None:
                state_since.add_metric(lv, v.state_since)
            for family, value in (
                (util, None if v.util_pct is None else v.util_pct / 100),
                (mem_used, v.memory_used_bytes),
                (mem_total, v.memory_total_bytes),
                (power, v.power_w),
                (temp, v.temp_c),
                (energy, v.energy_joules),
                (procs, v.processes),
            ):
                if value is not None:
                    family.add_metric(lv, float(value))
            holders_now = self._holders_of(v, held)
            if holders_now:
                memory: dict[tuple[str, ...], float | None] = {}
                ordered = sorted(holders_now, key=lambda h: -(getattr(h, "memory_bytes", None) or 0))
                for h in ordered[: wire.MAX_HOLDERS]:
                    key = _holder_labels(h)
                    used = getattr(h, "memory_bytes", None)
                    before = memory.get(key)
                    memory[key] = before if used is None else (before or 0.0) + used
                for key, used in memory.items():
                    holder.add_metric(lv, dict(zip(_HOLDER_LABELS, key, strict=True)))
                    if used is not None:
                        holder_mem.add_metric((*lv, *key), used)
        yield from (state, seconds, info, fraction, idle_since, idle_for, state_since, util)
        yield from (mem_used, mem_total, power, temp, energy, procs, holder, holder_mem)

    def _agent(self, a: wire.AgentStats) -> Iterator[Metric]:
        bn, bv = self.base_names, self.base_values
        for name, doc, value, counter in (
            ("capmon_agent_uptime_seconds", "Seconds since the agent started", a.uptime_s, False),
            ("capmon_agent_spool_reports", "Windows spooled, not yet delivered", a.spool_reports, False),
            ("capmon_agent_spool_bytes", "Bytes of spooled windows", a.spool_bytes, False),
            ("capmon_agent_dropped_reports", "Windows the spool bound dropped", a.dropped_reports, True),
            ("capmon_agent_lost_windows", "Windows that could not be kept at all", a.lost_windows, True),
            (
                "capmon_agent_dead_letter_reports",
                "Windows the collector refused as invalid",
                a.dead_letter_reports,
                True,
            ),
        ):
            family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc, labels=bn)
            family.add_metric(bv, float(value))
            yield family
        pn = (*bn, "probe")
        up = GaugeMetricFamily("capmon_agent_probe_up", "1 while the probe is active, else 0", labels=pn)
        samples = CounterMetricFamily("capmon_agent_probe_samples", "Samples the probe returned", labels=pn)
        errors = CounterMetricFamily("capmon_agent_probe_errors", "Samples that raised", labels=pn)
        timeouts = CounterMetricFamily("capmon_agent_probe_timeouts", "Samples that timed out", labels=pn)
        duration = GaugeMetricFamily(
            "capmon_agent_probe_last_duration_seconds", "How long the last sample took", labels=pn
        )
        for p in a.probes:
            lv = (*bv, p.name)
            up.add_metric(lv, 1.0 if p.status == "active" else 0.0)
            samples.add_metric(lv, float(p.samples))
            errors.add_metric(lv, float(p.errors))
            timeouts.add_metric(lv, float(p.timeouts))
            if p.last_duration_s is not None:
                duration.add_metric(lv, p.last_duration_s)
        yield from (up, samples, errors, timeouts, duration)


class AgentExporter:
    """Serves `/metrics` on `[exporter] listen` while the agent runs: `await start()`, `await stop()`."""

    def __init__(
        self,
        config: AgentConfig,
        snapshot: Callable[[], ExporterView],
        agent_stats: Callable[[], wire.AgentStats | None],
        clock: Callable[[], float] = time.time,
        holders: Callable[[], LatestHolders] | None = None,
    ) -> None:
        self.config = config
        self.collector = ViewCollector(config, snapshot, agent_stats, clock, holders)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._runner: web.AppRunner | None = None
        # The (host, port) actually bound, once started (port 0 in the config picks a free one).
        self.address: tuple[str, int] | None = None

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type, as `prometheus_client` encodes it for `accept`."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def _metrics(self, request: web.Request) -> web.Response:
        # The view is read on the loop (the classifier is not thread-safe; the views are frozen
        # copies) and encoded off it: hundreds of devices take a tenth of a second to encode.
        views, stats = self.collector.snapshot(), self.collector.agent_stats()
        held = self.collector.latest_holders()
        body, content_type = await asyncio.to_thread(
            self._encode, views, stats, request.headers.get("Accept", ""), held
        )
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _encode(
        self,
        views: ExporterView,
        stats: wire.AgentStats | None,
        accept: str,
        held: LatestHolders | None = None,
    ) -> tuple[bytes, str]:
        collector = self.collector

        class _Read:
            def collect(self) -> Iterator[Metric]:
                return collector.families(views, stats, held)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Read())
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._index)
        return app

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text="capmon agent exporter: /metrics\n")

    async def start(self) -> None:
        """Listen; a port in use is one clear error (`OSError` naming the address)."""
        host, port = listen_address(self.config.exporter.listen, any_port=True)
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno, f"exporter cannot listen on {self.config.exporter.listen}: {exc.strerror}"
            ) from None
        self._runner = runner
        bound = runner.addresses[0]
        self.address = (bound[0], bound[1])
        log.info("exporter serving http://%s/metrics", self.config.exporter.listen)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
