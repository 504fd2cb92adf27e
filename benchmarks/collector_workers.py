"""Ingest throughput of `capmon collector run --workers N` (N = 1, 2, 4) against direct line-protocol
writes to the same influxd, in one run (issue 14 item 4).

Every phase is collector_throughput.py's closed loop (sender processes, gzip JSON batches of the
simulated fleet, `concurrency` requests in flight each), bounded in time; the collector stores in a
real influxd (influxdb_v1) with `live_view = "storage"` (what --workers needs). The direct phase
POSTs the same points' line protocol (the collector's own `batch_lines`) straight to influxd /write,
in batches as large as the collector's mean storage write. CPU seconds are the supervisor's and its
workers'. Every child is stopped in a finally.

    .venv/bin/python benchmarks/collector_workers.py [--seconds 10] [--workers 1,2,4] [--senders 2]

Target: with workers, ingest ≥ 0.8 of direct writes where the machine has cores for both.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fleet_sim
from collector_throughput import Load, _metric, _short, collector_toml, phase
from harness import Row, capmon_bin, free_port, influxd, machine, stop, table, wait_http

BENCH = "workers"
RATIO_TARGET = 0.8


class Supervisor:
    """`capmon collector run --workers N` on a free port, storage influxdb_v1, live view from the store."""

    def __init__(self, workdir: Path, influx_url: str, db: str, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.config = workdir / f"collector-{db}.toml"
        # reuse_port = true gives live_view = "storage" (several processes on one port need it).
        self.config.write_text(collector_toml(self.port, influx_url, db, reuse_port=True))
        self.log = workdir / f"collector-{db}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Supervisor:
        argv = [capmon_bin(), "collector", "run", "--config", str(self.config), "--log-level", "warning"]
        argv += ["--workers", str(self.workers)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(self.url + "/healthz", self.proc, log=self.log)
            deadline = time.monotonic() + 30
            while len(self.pids) < self.workers + 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # the last worker may bind a moment after the first answers
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.proc, timeout=30)

    @property
    def pids(self) -> list[int]:
        """The supervisor and its workers (the processes whose CPU the phase counts)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        parent = psutil.Process(self.proc.pid)
        return [parent.pid, *(c.pid for c in parent.children(recursive=True))]


def run(
    seconds: float,
    workers: list[int],
    senders: int,
    agents_per_sender: int,
    reports_per_post: int,
    concurrency: int,
    direct_concurrency: int,
) -> list[Row]:
    def say(msg: str) -> None:
        print(f"  [workers] {msg}", file=sys.stderr, flush=True)

    rounds = max(4, math.ceil(60_000 * seconds / (8 * reports_per_post) / (senders * agents_per_sender)))
    base = Load(
        mode="closed",
        url="",
        sender=0,
        agents=agents_per_sender,
        prefix="bench-w",
        reports_per_post=reports_per_post,
        rounds=rounds,
        first_end=fleet_sim.base_end(),
        concurrency=concurrency,
        seconds=seconds,
    )
    results = {}
    mean_write = 5000
    with tempfile.TemporaryDirectory(prefix="capmon-bench-workers-") as tmp, influxd(Path(tmp)) as influx:
        for n in workers:
            db = f"workers{n}"
            with Supervisor(Path(tmp), influx.url, db, n) as sup:
                pids = sup.pids
                say(
                    f"--workers {n}: {len(pids) - 1} workers up, closed loop {senders}×{concurrency}, {seconds:g} s"
                )
                loads = [replace(base, url=sup.url, sender=i, prefix=f"bench-w{n}") for i in range(senders)]
                res = phase(loads, pids)
                if n == workers[0]:
                    lines = _metric(sup.url, "capmon_collector_batch_lines_sum")
                    writes = _metric(sup.url, "capmon_collector_batch_lines_count")
                    mean_write = int(lines / writes) if writes else mean_write
                say(f"--workers {n}: {res.rate:,.0f} dw/s, {res.cpu_s:.1f} CPU s, statuses {res.statuses}")
                results[n] = res
        influx.query('CREATE DATABASE "direct"')
        say(f"direct: {senders}×{direct_concurrency} writers, {mean_write} lines per write, {seconds:g} s")
        direct = phase(
            [
                replace(
                    base,
                    url=influx.url,
                    sender=i,
                    mode="direct",
                    direct_lines=mean_write,
                    db="direct",
                    concurrency=direct_concurrency,
                    prefix="bench-wd",
                )
                for i in range(senders)
            ],
            [],
        )
        say(f"direct: {direct.rate:,.0f} dw/s, statuses {direct.statuses}")
    rows = [
        Row(
            BENCH,
            f"direct influxd /write, {mean_write} lines/write, {senders}×{direct_concurrency} in flight"
            + (f" (statuses {_short(direct.statuses)})" if direct.errors else ""),
            direct.rate,
            "dw/s",
        )
    ]
    for n, res in results.items():
        ratio = res.rate / direct.rate if direct.rate else math.nan
        failed = f", failed {_short(res.statuses)}" if res.errors else ""
        rows += [
            Row(BENCH, f"--workers {n}: ingest{failed}", res.rate, "dw/s"),
            Row(
                BENCH,
                f"--workers {n}: collector CPU ({res.cpu_s:.1f} s in {res.wall_s:.0f} s)",
                100 * res.cpu_s / res.wall_s,
                "% of a core",
            ),
            Row(BENCH, f"--workers {n}: per collector core", res.per_core, "dw/s/core"),
            Row(
                BENCH,
                f"--workers {n}: ratio to direct writes ({os.cpu_count()} cores for senders, collector and influxd)",
                ratio,
                "",
                f"≥ {RATIO_TARGET}",
                ratio >= RATIO_TARGET,
            ),
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per phase (default 10)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts (default 1,2,4)")
    parser.add_argument("--senders", type=int, default=2, help="sender processes (default 2)")
    parser.add_argument("--agents", type=int, default=500, help="agents per sender (default 500)")
    parser.add_argument("--reports-per-post", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=200, help="requests in flight per sender")
    parser.add_argument(
        "--direct-concurrency", type=int, default=2, help="influxd writes in flight per sender"
    )
    args = parser.parse_args()
    rows = run(
        seconds=args.seconds,
        workers=[int(w) for w in args.workers.split(",")],
        senders=args.senders,
        agents_per_sender=args.agents,
        reports_per_post=args.reports_per_post,
        concurrency=args.concurrency,
        direct_concurrency=args.direct_concurrency,
    )
    print(machine())
    print(table(rows))


if __name__ == "__main__":
    main()
