"""What the agent exporter costs: µs per scrape (rendered and over HTTP) by device count, body size,
and the classifier's tick with and without the exporter's counters.

    .venv/bin/python benchmarks/exporter_scrape.py [--before REV] [-n 200]

Devices are the mock probe's (mixed profiles, one holder each). "tick" is `observe_probe` for all
devices once: the classifier at git revision REV (default a9e9bd1~1, before the exporter's counters)
loaded from `git show`, against the working tree. A scrape reads the snapshot on the event loop and encodes it in a
thread; its cost is per scrape, not per tick.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, Row, machine, table

from capmon.agent import classifier as after
from capmon.agent import wire
from capmon.agent.config import AgentConfig, AgentSection, ExporterSection
from capmon.agent.exporter import AgentExporter
from capmon.agent.probe import Holder
from capmon.plugins.mock import MockConfig, MockProbe

T0 = 1_760_000_000.0


def load_before(rev: str):
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:agent/classifier.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader("capmon.agent._classifier_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, f"{rev}:agent/classifier.py", "exec"), module.__dict__)
    return module


def devices(n: int, t: float):
    probe = MockProbe(MockConfig(devices=n), clock=lambda: t)
    return [
        dataclasses.replace(d, holders=(Holder(1000 + i, 2**30, "python"),))
        for i, d in enumerate(probe.sample())
    ]


def per_call_us(fn, n: int) -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


def tick_us(module, n_devices: int, n: int) -> float:
    c = module.IdleClassifier()
    ticks = [devices(n_devices, T0 + i) for i in range(120)]
    state = {"i": 0}

    def tick():
        i = state["i"] = state["i"] + 1
        c.observe_probe("mock", T0 + i, ticks[i % len(ticks)])

    return per_call_us(tick, n)


async def http_us(exporter: AgentExporter, n: int) -> float:
    await exporter.start()
    try:
        url = f"http://127.0.0.1:{exporter.address[1]}/metrics"
        async with aiohttp.ClientSession() as session:
            times = []
            for _ in range(n):
                start = time.perf_counter()
                async with session.get(url) as resp:
                    await resp.read()
                times.append((time.perf_counter() - start) * 1e6)
        return statistics.median(times)
    finally:
        await exporter.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="a9e9bd1~1")
    parser.add_argument("-n", type=int, default=200)
    args = parser.parse_args()
    before = load_before(args.before)
    cfg = AgentConfig(
        agent=AgentSection(id="node-1", host="node-1", labels={"site": "ams1"}),
        exporter=ExporterSection(listen="127.0.0.1:0"),
    )
    stats = wire.AgentStats(probes=[wire.ProbeStats(name="mock", status="active", samples=100)])
    rows = []
    for n_devices in (8, 64, 512):
        c = after.IdleClassifier()
        for i in range(120):
            c.observe_probe("mock", T0 + i, devices(n_devices, T0 + i))
        exporter = AgentExporter(cfg, c.snapshot, lambda: stats, clock=lambda: T0 + 120)
        body, _ = exporter.render()
        n = max(10, args.n * 8 // n_devices)
        rows += [
            Row(
                "exporter_scrape",
                f"render, {n_devices} devices",
                per_call_us(exporter.render, n),
                "µs/scrape",
            ),
            Row(
                "exporter_scrape",
                f"render OpenMetrics, {n_devices} devices",
                per_call_us(lambda e=exporter: e.render("application/openmetrics-text"), n),
                "µs/scrape",
            ),
            Row(
                "exporter_scrape",
                f"GET /metrics, {n_devices} devices",
                asyncio.run(http_us(exporter, n)),
                "µs/scrape",
            ),
            Row(
                "exporter_scrape",
                f"snapshot on the loop, {n_devices} devices",
                per_call_us(c.snapshot, n),
                "µs/scrape",
            ),
            Row("exporter_scrape", f"body, {n_devices} devices", len(body) / 1024, "KiB"),
            Row(
                "exporter_scrape",
                f"tick before ({args.before}), {n_devices} devices",
                tick_us(before, n_devices, n),
                "µs/tick",
            ),
            Row(
                "exporter_scrape", f"tick after, {n_devices} devices", tick_us(after, n_devices, n), "µs/tick"
            ),
        ]
    print(f"exporter scrape cost — {machine()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
