"""The storage live view's answer latency at 1k, 10k and 100k devices in a real influxd (issue 14 item 4).

Per size: agents of 8 devices, two 60 s windows each, received by `--processes` simulated collector
processes (each a `FleetView` with its `Publisher`, agents dealt round-robin): their published views
(`capmon_live`) and range totals (`capmon_totals`) and the collector's own line protocol of every
window (`capmon_device`, ...) are written straight to influxd in bounded batches, with a day of
earlier totals blocks (the same sums at every earlier minute and hour), so `?since=24h` reads what a
day of publishing leaves. Then:

- `/api/v1/fleet` answers from `StorageLiveView.summary()`: uncached (cache 0 s: every answer asks the
  store), p50/p99, the store's seconds and influxd's CPU seconds per answer (read from its process),
  and cached (2 s), p50/p99;
- what publishing costs one collector process: the time to build its view's point, and its size;
- one uncached `/api/v1/devices` answer (a device list: it still reads `capmon_device`, per device).

    .venv/bin/python benchmarks/liveview_storage.py [--sizes 1000,10000,100000] [--uncached 10]

Targets: a fleet answer at 100k devices in < 1 s uncached and < 10 ms cached.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Influxd, Row, http, machine, table

from capmon.agent.wire import AgentIdentity, Batch, DeviceWindow, Report
from capmon.collector.config import CollectorConfig, Config, PricingConfig, StorageConfig
from capmon.collector.fleet import FleetView, Pricing
from capmon.collector.lineproto import batch_lines
from capmon.collector.liveview import StorageLiveView
from capmon.collector.published import Publisher, live_statement, totals_statements

STATES = ("busy", "allocated_idle", "free", "free", "busy", "unavailable", "busy", "free")
LABEL_KEYS = ("site", "cluster", "pool")


def fleet_batches(devices: int, end: int) -> list[Batch]:
    batches = []
    for a in range(devices // 8):
        ident = AgentIdentity(
            id=f"bench-{a:06d}",
            host=f"node-{a:06d}",
            instance=f"{a:08x}-0000-4000-8000-000000000000",
            version="0.3.0",
            labels={"site": f"s{a % 7}", "cluster": f"c{a % 31}", "pool": ("train", "infer")[a % 2]},
            window_s=60,
        )
        reports = []
        for seq, e in enumerate((end - 60, end), start=1):
            devs = []
            for i in range(8):
                state = STATES[(a + i) % 8]
                devs.append(
                    DeviceWindow(
                        device_id=f"GPU-{a:06d}-{i}",
                        vendor="nvidia",
                        model="NVIDIA H100 80GB HBM3" if a % 3 else "NVIDIA A100-SXM4-80GB",
                        index=i,
                        state=state,
                        busy_s=60.0 if state == "busy" else 0.0,
                        allocated_idle_s=60.0 if state == "allocated_idle" else 0.0,
                        free_s=60.0 if state == "free" else 0.0,
                        unavailable_s=60.0 if state == "unavailable" else 0.0,
                        util_mean_pct=90.0 if state == "busy" else 0.0,
                        memory_used_bytes=2**30,
                        memory_total_bytes=80 * 2**30,
                        power_mean_w=300.0,
                        temp_max_c=50.0,
                        processes=1,
                        idle_since=e - 3600 if state in ("free", "allocated_idle") else None,
                        state_since=e - 600,
                        energy_j=18_000.0,
                        idle_energy_j=18_000.0 if state in ("free", "allocated_idle") else 0.0,
                    )
                )
            reports.append(Report(seq=seq, start=e - 60, end=e, devices=devs))
        batches.append(Batch(agent=ident, reports=reports))
    return batches


def published_lines(
    batches: list[Batch], processes: int, pricing: Pricing, now: float
) -> tuple[list[str], float, int]:
    """What `processes` collector processes publish after receiving `batches` (dealt round-robin):
    their lines, the seconds one took to build its point (the slowest), and its size (the largest)."""
    lines: list[str] = []
    slowest, largest = 0.0, 0
    for p in range(processes):
        view = FleetView(LABEL_KEYS, pricing, clock=lambda: now, forget_after_s=86400.0)
        pub = Publisher(view, _no_submit, 2.0, f"bench:p{p}", clock=lambda: now)
        for b in batches[p::processes]:
            view.apply(b)
        t = time.perf_counter()
        lines += pub.totals.lines(pub.collector)
        lines.append(pub.live_line(now))
        slowest = max(slowest, time.perf_counter() - t)
        largest = max(largest, pub.last_bytes)
    return lines, slowest, largest


def history(lines: list[str]) -> list[str]:
    """The day before of each `capmon_totals` block line (the same sums at every earlier block of
    its resolution) and `capmon_live` point (every earlier hour): what a day of publishing leaves in
    the store for an answer to read past."""
    out = []
    for line in lines:
        if line.startswith("capmon_live,"):  # each process's point of every earlier hour
            head, ts = line.rsplit(" ", 1)
            out += [f"{head} {int(ts) - k * 3600}" for k in range(1, 25)]
        if not line.startswith("capmon_totals,"):
            continue
        head, ts = line.rsplit(" ", 1)
        size = {"1m": 60, "10m": 600, "1h": 3600}[head.split(",res=")[1].split(",")[0]]
        out += [f"{head} {int(ts) - k * size}" for k in range(1, 86400 // size + 1)]
    return out


async def _no_submit(lines: list[str]) -> None:
    raise AssertionError("the benchmark writes the lines itself")


def write(url: str, db: str, lines: list[str], chunk: int = 10_000) -> None:
    for i in range(0, len(lines), chunk):
        status, body = http(
            "POST",
            f"{url}/write?db={db}&precision=s",
            "\n".join(lines[i : i + chunk]).encode(),
            timeout=600,  # influxd 1.x creates 10k new series per batch at 100k devices: seconds
        )
        if status != 204:
            raise RuntimeError(f"influxd /write: {status} {body[:200]!r}")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def measure(
    config: Config, cache_s: float, n: int, influx_pid: int
) -> tuple[float, list[float], float, float, int, list[tuple[str, float]]]:
    """The first answer's latency (s), answer latencies (s), store seconds and influxd CPU seconds per
    store request, answer bytes, and the store's seconds per statement of a later answer."""
    cfg = dataclasses.replace(
        config, collector=dataclasses.replace(config.collector, live_view_cache_s=cache_s)
    )
    view = StorageLiveView(cfg)
    await view.start()
    proc = psutil.Process(influx_pid)
    try:
        t = time.perf_counter()
        await view.summary()  # the first answer (cached: fills the cache)
        first = time.perf_counter() - t
        req0, sec0 = view.store.requests, view.store.seconds
        cpu0 = sum(proc.cpu_times()[:2])
        times = []
        size = 0
        for _ in range(n):
            t = time.perf_counter()
            answer = await view.summary()
            times.append(time.perf_counter() - t)
            size = len(msgspec.json.encode(answer))
        reqs = view.store.requests - req0
        store_s = (view.store.seconds - sec0) / reqs if reqs else 0.0
        cpu_s = (sum(proc.cpu_times()[:2]) - cpu0) / reqs if reqs else 0.0
        per_statement = []
        if not cache_s:
            now = time.time()
            for q in [live_statement(now, 86400.0), *totals_statements(now - 86400, now)]:
                t = time.perf_counter()
                await view.store.raw([q])
                name = q.split(" WHERE ")[0].split(" FROM ")[1]
                if "res = " in q:
                    name += " " + q.split("res = ")[1][:4].strip("'") + " blocks"
                per_statement.append((f"statement: {name}", time.perf_counter() - t))
            t = time.perf_counter()
            await view.devices(frozenset({"free"}), 0.0, {}, 100)
            per_statement.append(("devices answer (first: with the older tier)", time.perf_counter() - t))
            t = time.perf_counter()
            await view.devices(frozenset({"free"}), 0.0, {}, 100)
            per_statement.append(("devices answer (recent tier only)", time.perf_counter() - t))
        return first, times, store_s, cpu_s, size, per_statement
    finally:
        await view.close()


class BigInfluxd(Influxd):
    """influxd with no cap on values per tag (100k devices are 100k `device` values)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        text = self.config_path.read_text()
        text = text.replace("max-values-per-tag = 100000", "max-values-per-tag = 0")
        # What was written is moved from the write cache into TSM files after a second idle (the
        # default is 10 minutes): a running store holds yesterday's blocks in TSM files, where a
        # range read seeks, not in the cache, where every read re-sorts the whole series.
        text = text.replace("[data]\n", '[data]\n  cache-snapshot-write-cold-duration = "1s"\n')
        self.config_path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--uncached", type=int, default=5, help="uncached answers per size")
    parser.add_argument("--cached", type=int, default=200, help="cached answers per size")
    parser.add_argument("--processes", type=int, default=4, help="collector processes publishing")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    pricing_cfg = PricingConfig(default=1.0, models={"H100": 2.5})
    pricing = Pricing(pricing_cfg)
    rows: list[Row] = []
    end = int(time.time()) // 60 * 60
    with tempfile.TemporaryDirectory(prefix="capmon-bench-lv-") as tmp:
        influx = BigInfluxd(Path(tmp))
        try:
            influx.start()
            rows += run_sizes(influx, sizes, end, pricing, pricing_cfg, args)
        finally:
            influx.stop()
    print(machine())
    print(table(rows))


def run_sizes(
    influx: Influxd, sizes: list[int], end: int, pricing: Pricing, pricing_cfg: PricingConfig, args
) -> list[Row]:  # type: ignore[no-untyped-def]
    rows: list[Row] = []
    if True:
        pid = influx.proc.pid
        for size in sizes:
            end = int(time.time()) // 60 * 60  # per size: the agents are not stale when it is read
            db = f"lv{size}"
            influx.query(f'CREATE DATABASE "{db}"')
            t = time.perf_counter()
            batches = fleet_batches(size, end)
            published, build_s, live_bytes = published_lines(batches, args.processes, pricing, end + 1)
            lines = [ln for b in batches for ln in batch_lines(b, LABEL_KEYS, pricing.for_device)]
            write(influx.url, db, history(published) + lines + published)
            time.sleep(3)  # influxd snapshots the cold cache to TSM files (see BigInfluxd)
            print(
                f"  [liveview] {size:,} devices: {len(lines) + len(published):,} lines written in "
                f"{time.perf_counter() - t:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            config = Config(
                collector=CollectorConfig(
                    label_keys=LABEL_KEYS, live_view="storage", live_view_query_timeout_s=120
                ),
                storage=StorageConfig(kind="influxdb_v1", url=influx.url, db=db),
                pricing=pricing_cfg,
            )
            first, un, store_s, cpu_s, size_b, per_statement = asyncio.run(
                measure(config, 0.0, args.uncached, pid)
            )
            _, ca, _, _, _, _ = asyncio.run(measure(config, 2.0, args.cached, pid))
            b = "liveview"
            per_process = size // args.processes
            rows += [
                Row(b, f"{size:,} devices: first answer", first * 1000, "ms"),
                Row(
                    b,
                    f"{size:,} devices: fleet answer uncached p50",
                    pct(un, 0.5) * 1000,
                    "ms",
                    "< 1 s at 100k" if size == 100_000 else "",
                    pct(un, 0.5) < 1.0 if size == 100_000 else None,
                ),
                Row(b, f"{size:,} devices: fleet answer uncached p99", pct(un, 0.99) * 1000, "ms"),
                Row(b, f"{size:,} devices: store's answer time per uncached answer", store_s * 1000, "ms"),
                Row(b, f"{size:,} devices: influxd CPU per uncached answer", cpu_s * 1000, "ms"),
                Row(
                    b,
                    f"{size:,} devices: fleet answer cached p50",
                    pct(ca, 0.5) * 1000,
                    "ms",
                    "< 10 ms at 100k" if size == 100_000 else "",
                    pct(ca, 0.5) < 0.01 if size == 100_000 else None,
                ),
                Row(b, f"{size:,} devices: fleet answer cached p99", pct(ca, 0.99) * 1000, "ms"),
                Row(b, f"{size:,} devices: answer size", size_b / 1000, "kB"),
                Row(
                    b,
                    f"{size:,} devices: one process's publish ({per_process:,} devices): build",
                    build_s * 1000,
                    "ms",
                ),
                Row(
                    b,
                    f"{size:,} devices: one process's publish ({per_process:,} devices): size",
                    live_bytes / 1000,
                    "kB",
                ),
            ]
            rows += [Row(b, f"{size:,} devices: {name}", sec * 1000, "ms") for name, sec in per_statement]
    return rows


if __name__ == "__main__":
    main()
