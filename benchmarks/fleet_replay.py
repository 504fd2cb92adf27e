"""A simulated 100k-device fleet replayed at an accelerated clock into a real influxd: the per-core
figures the sizing in collector/README.md uses, measured (issue 14 item 5).

  line protocol  the simulated agents' reports (benchmarks/fleet_sim.py: 8 H100s, host and agent
                 records, as the agent sends them) as the collector writes them (`batch_lines`):
                 bytes per device window (the `capmon_device` line, and with the host/agent lines
                 of its report), fields per `capmon_device` line, counted
  store          `--windows` consecutive 60 s windows of the whole fleet written as fast as influxd
                 takes them (10k lines per /write): device-windows/s and influxd CPU per
                 device-window; the first window creates the fleet's series, the next ones append
  collector      one `capmon collector run` (storage influxdb_v1 on the same influxd) fed the
                 fleet's reports by sender processes (collector_throughput.py's closed loop) for
                 `--seconds`: device-windows/s per collector CPU second

    .venv/bin/python benchmarks/fleet_replay.py [--devices 100000] [--windows 3] [--seconds 15]
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fleet_sim
from collector_throughput import LABEL_KEYS, Collectors, Load, phase
from harness import Row, http, machine, table
from liveview_storage import BigInfluxd

from capmon.collector.lineproto import batch_lines

BENCH = "replay"
CHUNK = 10_000


def window_lines(agents: int, seq: int, first_end: int) -> tuple[list[str], int]:
    lines: list[str] = []
    for a in range(agents):
        lines += batch_lines(fleet_sim.batch("replay", a, seq, 1, first_end), LABEL_KEYS)
    return lines, agents * 8


def fields_of(line: str) -> int:
    """Fields of one line-protocol line (string fields here hold no commas or spaces; tags escape theirs)."""
    return len(re.split(r"(?<!\\) ", line)[1].split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--windows", type=int, default=3, help="consecutive windows written (default 3)")
    parser.add_argument("--seconds", type=float, default=15.0, help="collector phase (default 15 s)")
    args = parser.parse_args()
    agents = args.devices // 8
    first_end = fleet_sim.base_end()
    rows: list[Row] = []

    sample, _ = window_lines(agents=100, seq=1, first_end=first_end)
    dev = [ln for ln in sample if ln.startswith("capmon_device")]
    total_bytes = sum(len(ln) + 1 for ln in sample)
    rows += [
        Row(BENCH, "capmon_device line, mean", statistics.mean(len(ln) + 1 for ln in dev), "bytes"),
        Row(
            BENCH,
            "all lines of a report per device window (host, agent, probes)",
            total_bytes / len(dev),
            "bytes",
        ),
        Row(BENCH, "fields per capmon_device line (counted)", statistics.mean(map(fields_of, dev)), "fields"),
        Row(BENCH, "lines per device window", len(sample) / len(dev), "lines"),
    ]

    with tempfile.TemporaryDirectory(prefix="capmon-bench-replay-") as tmp:
        influx = BigInfluxd(Path(tmp))
        try:
            influx.start()
            influx.query('CREATE DATABASE "replay"')
            proc = psutil.Process(influx.proc.pid)
            for w in range(1, args.windows + 1):
                t = time.perf_counter()
                lines, dws = window_lines(agents, w, first_end)
                built = time.perf_counter() - t
                cpu0 = sum(proc.cpu_times()[:2])
                t = time.perf_counter()
                for i in range(0, len(lines), CHUNK):
                    body = "\n".join(lines[i : i + CHUNK]).encode()
                    status, text = http(
                        "POST", f"{influx.url}/write?db=replay&precision=s", body, timeout=600
                    )
                    if status != 204:
                        raise RuntimeError(f"influxd /write: {status} {text[:200]!r}")
                wall = time.perf_counter() - t
                cpu = sum(proc.cpu_times()[:2]) - cpu0
                what = "first (creates the series)" if w == 1 else f"{w}"
                print(
                    f"  [replay] window {w}: {dws:,} dw, {len(lines):,} lines built in {built:.1f} s, "
                    f"written in {wall:.1f} s ({cpu:.1f} influxd CPU s)",
                    file=sys.stderr,
                    flush=True,
                )
                rows += [
                    Row(BENCH, f"store: window {what}, {dws:,} device windows", dws / wall, "dw/s"),
                    Row(BENCH, f"store: window {what}, per influxd core", dws / cpu, "dw/s/core"),
                ]
            coll = Collectors(Path(tmp), influx.url, "replay_collector")
            with coll:
                senders = 2
                base = Load(
                    mode="closed",
                    url=coll.url,
                    sender=0,
                    agents=agents // senders,
                    prefix="bench-replay-c",
                    reports_per_post=1,
                    # Enough reports that none is sent twice (a replay is a cheap duplicate).
                    rounds=max(1, math.ceil(40_000 * args.seconds / (8 * agents))),
                    first_end=first_end,
                    concurrency=200,
                    seconds=args.seconds,
                )
                res = phase([replace(base, sender=i) for i in range(senders)], coll.pids)
            print(f"  [replay] collector: {res.rate:,.0f} dw/s, {res.statuses}", file=sys.stderr, flush=True)
            rows += [
                Row(BENCH, f"collector: ingest ({agents:,} agents, 1 report per POST)", res.rate, "dw/s"),
                Row(
                    BENCH,
                    f"collector: per core ({res.cpu_s:.1f} CPU s in {res.wall_s:.0f} s)",
                    res.per_core,
                    "dw/s/core",
                ),
            ]
        finally:
            influx.stop()
    print(machine())
    print(table(rows))


if __name__ == "__main__":
    main()
