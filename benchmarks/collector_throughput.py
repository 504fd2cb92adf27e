"""Collector throughput: simulated agents (separate processes) POST gzip JSON batches to a real
`capmon collector run` writing to a real `influxd`; the same points written straight to influxd for
comparison; acknowledgement latency at half the maximum rate; 1 → 2 collectors behind SO_REUSEPORT.

Phases (each bounded in time, loopback only, every child stopped in a finally):
  max     closed loop: every sender keeps `concurrency` requests in flight → device-windows/s, per
          collector CPU second (psutil on the collector process, threads included)
  half    open loop at half the max request rate (sends on schedule whether or not earlier ones
          were answered; latency counted from the scheduled send, so a stall is not hidden)
  direct  the same points' line protocol (collector's own `batch_lines`) POSTed to influxd /write in
          batches as large as the collector's mean storage write, gzip level 1, as many in flight
  scale   the max phase against 2 `capmon collector run` processes sharing the port (`reuse_port = true`)

Run: .venv/bin/python benchmarks/collector_throughput.py [--quick] [--seconds 15] [--senders 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import math
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import fleet_sim
import psutil
from harness import Row, capmon_bin, free_port, influxd, machine, stop, table, wait_http

BENCH = "collector"
TOKEN = "bench-agent-token"
READ_TOKEN = "bench-read-token"
PER_CORE_TARGET = 20_000
RATIO_TARGET = 0.5
P99_TARGET_MS = 200.0
LABEL_KEYS = ("site", "cluster", "pool")


def collector_toml(port: int, influx_url: str, db: str, storage_extra: str = "", reuse_port: bool = False) -> str:
    """Storage influxdb_v1 at `influx_url`, or kind "none" when `db` is empty (the collector alone)."""
    from capmon.collector.config import hash_token

    return f"""
[collector]
host = "127.0.0.1"
port = {port}
drain_timeout_s = 10.0
reuse_port = {"true" if reuse_port else "false"}
# Several processes on one port must answer from the store: the memory view is refused with them.
live_view = "{"storage" if reuse_port else "memory"}"

[auth]
agent_tokens = [{{ name = "bench", sha256 = "{hash_token(TOKEN)}", agents = ["bench-*"] }}]
read_tokens = [{{ name = "bench-read", sha256 = "{hash_token(READ_TOKEN)}" }}]

""" + (
        f"""
[storage]
kind = "influxdb_v1"
url = "{influx_url}"
db = "{db}"
create_database = true
{storage_extra}
"""
        if db
        else '\n[storage]\nkind = "none"\n'
    )


@dataclass(frozen=True)
class Load:
    """What one sender process does in one phase."""

    mode: str  # "closed", "open" or "direct"
    url: str
    sender: int
    agents: int  # agents simulated by this sender
    prefix: str
    reports_per_post: int
    rounds: int  # POSTs per agent built ahead of the clock
    first_end: int
    concurrency: int
    seconds: float
    rate: float = 0.0  # open loop: requests per second from this sender
    direct_lines: int = 0  # direct: lines per influxd write
    db: str = ""


@dataclass
class Outcome:
    requests: int = 0
    device_windows: int = 0
    lines: int = 0
    errors: int = 0
    statuses: dict[int, int] | None = None
    latencies_ms: list[float] | None = None
    replays: int = 0
    late: int = 0


def _bodies(load: Load) -> list[tuple[bytes, int, int]]:
    """(body, device windows, lines) per request, built before the clock starts, round-major so an
    agent's seqs arrive in order. The direct mode regroups the same points' lines into `direct_lines`."""
    out: list[tuple[bytes, int, int]] = []
    first_agent = load.sender * load.agents
    if load.mode != "direct":
        for rnd in range(load.rounds):
            for a in range(first_agent, first_agent + load.agents):
                b = fleet_sim.batch(
                    load.prefix, a, 1 + rnd * load.reports_per_post, load.reports_per_post, load.first_end
                )
                dws = sum(len(r.devices) for r in b.reports)
                out.append((fleet_sim.gzip_body(b), dws, 0))
        return out
    from capmon.collector.lineproto import batch_lines

    pending: list[str] = []
    dws = 0
    for rnd in range(load.rounds):
        for a in range(first_agent, first_agent + load.agents):
            b = fleet_sim.batch(
                load.prefix, a, 1 + rnd * load.reports_per_post, load.reports_per_post, load.first_end
            )
            pending += batch_lines(b, LABEL_KEYS)
            dws += sum(len(r.devices) for r in b.reports)
            if len(pending) >= load.direct_lines:
                out.append((gzip.compress("\n".join(pending).encode(), 1), dws, len(pending)))
                pending, dws = [], 0
    if pending:
        out.append((gzip.compress("\n".join(pending).encode(), 1), dws, len(pending)))
    return out


async def _drive(load: Load, bodies: list[tuple[bytes, int, int]], start_at: float) -> Outcome:
    import aiohttp

    out = Outcome(statuses={}, latencies_ms=[])
    if load.mode == "direct":
        target = f"{load.url}/write?db={load.db}&precision=s"
        headers = {"Content-Type": "text/plain; charset=utf-8", "Content-Encoding": "gzip"}
    else:
        target = f"{load.url}/api/v1/reports"
        headers = {
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        }
    connector = aiohttp.TCPConnector(limit=load.concurrency if load.mode != "open" else 0)
    timeout = aiohttp.ClientTimeout(total=60)
    next_body = 0

    def take() -> tuple[bytes, int, int]:
        nonlocal next_body
        body = bodies[next_body % len(bodies)]
        if next_body >= len(bodies):
            out.replays += 1
        next_body += 1
        return body

    async def post(session: aiohttp.ClientSession, body: tuple[bytes, int, int], t0: float) -> None:
        data, dws, lines = body
        try:
            async with session.post(target, data=data, headers=headers) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            status = 0
        out.statuses[status] = out.statuses.get(status, 0) + 1
        out.requests += 1
        if 200 <= status < 300:
            out.device_windows += dws
            out.lines += lines
            out.latencies_ms.append(1000 * (time.perf_counter() - t0))
        else:
            out.errors += 1

    await asyncio.sleep(max(0.0, start_at - time.time()))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        end = time.perf_counter() + load.seconds
        if load.mode in ("closed", "direct"):

            async def loop() -> None:
                while time.perf_counter() < end:
                    await post(session, take(), time.perf_counter())

            await asyncio.gather(*(loop() for _ in range(load.concurrency)))
        else:
            tasks: set[asyncio.Task[None]] = set()
            begin = time.perf_counter()
            for i in range(int(load.rate * load.seconds)):
                due = begin + i / load.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(tasks) >= 2000:  # bounded: a collector that stalls does not grow this forever
                    out.late += 1
                    continue
                task = asyncio.create_task(post(session, take(), due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=30)
    return out


def _sender(load: Load, barrier: mp.Barrier, results: mp.Queue) -> None:
    bodies = _bodies(load)
    barrier.wait()  # every sender has built its bodies: start together
    results.put((load.sender, asyncio.run(_drive(load, bodies, time.time()))))


def run_senders(loads: list[Load], on_start=None) -> tuple[list[Outcome], float]:
    """Start one process per load; they build their bodies, then all start at once. Returns the
    outcomes and the wall seconds between the common start and the last sender's end."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(loads) + 1)
    results: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_sender, args=(load, barrier, results), daemon=True) for load in loads]
    try:
        for p in procs:
            p.start()
        barrier.wait(timeout=300)
        started = time.perf_counter()
        if on_start is not None:
            on_start()
        outcomes = [results.get(timeout=max(load.seconds for load in loads) + 120) for _ in loads]
        wall = time.perf_counter() - started
        for p in procs:
            p.join(10)
        return [o for _, o in sorted(outcomes, key=lambda so: so[0])], wall
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def _metric(url: str, name: str) -> float:
    _status, body = http_get(f"{url}/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        m = re.match(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", line)
        if m:
            total += float(m.group(1))
    return total


def http_get(url: str) -> tuple[int, bytes]:
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {READ_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read()


class Collectors:
    """`capmon collector run`: one process, or N sharing one port with `reuse_port = true`."""

    def __init__(
        self, workdir: Path, influx_url: str, db: str, processes: int = 1, storage_extra: str = ""
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / f"collector-{db or 'none'}.toml"
        self.config.write_text(collector_toml(self.port, influx_url, db, storage_extra, reuse_port=processes > 1))
        self.processes = processes
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = workdir / f"collector-{db or 'none'}.log"

    def __enter__(self) -> Collectors:
        log = open(self.log, "ab")
        try:
            argv = [capmon_bin(), "collector", "run", "--config", str(self.config), "--log-level", "warning"]
            for _ in range(self.processes):
                self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
            for p in self.procs:
                wait_http(self.url + "/healthz", p, log=self.log)
            if self.processes > 1:
                time.sleep(0.5)  # the last one may bind a moment after the first answers
        except BaseException:
            self.__exit__()
            raise
        finally:
            log.close()
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            stop(p)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


@dataclass
class PhaseResult:
    device_windows: int
    requests: int
    errors: int
    wall_s: float
    cpu_s: float
    statuses: dict[int, int]
    latencies_ms: list[float]
    replays: int
    late: int

    @property
    def rate(self) -> float:
        return self.device_windows / self.wall_s

    @property
    def per_core(self) -> float:
        return self.device_windows / self.cpu_s if self.cpu_s else math.nan


def phase(loads: list[Load], cpu_pids: list[int]) -> PhaseResult:
    cpu0: list[float] = []
    outcomes, wall = run_senders(loads, on_start=lambda: cpu0.append(_cpu(cpu_pids)) if cpu_pids else None)
    cpu = _cpu(cpu_pids) - cpu0[0] if cpu_pids else 0.0
    statuses: dict[int, int] = {}
    for o in outcomes:
        for k, v in (o.statuses or {}).items():
            statuses[k] = statuses.get(k, 0) + v
    return PhaseResult(
        device_windows=sum(o.device_windows for o in outcomes),
        requests=sum(o.requests for o in outcomes),
        errors=sum(o.errors for o in outcomes),
        wall_s=wall,
        cpu_s=cpu,
        statuses=statuses,
        latencies_ms=sorted(x for o in outcomes for x in (o.latencies_ms or [])),
        replays=sum(o.replays for o in outcomes),
        late=sum(o.late for o in outcomes),
    )


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, int(q * len(values)))]


def run(
    seconds: float = 15.0,
    senders: int = 2,
    agents_per_sender: int = 500,
    reports_per_post: int = 4,
    concurrency: int = 200,
    direct_concurrency: int = 2,
    scale: bool = True,
    storage_extra: str = "",
    verbose: bool = True,
) -> list[Row]:
    def say(msg: str) -> None:
        if verbose:
            print(f"  [collector] {msg}", file=sys.stderr, flush=True)

    # Enough distinct bodies for ~60,000 device-windows/s per phase before any replay.
    rounds = max(4, math.ceil(60_000 * seconds / (8 * reports_per_post) / (senders * agents_per_sender)))
    first_end = fleet_sim.base_end()
    base = Load(
        mode="closed",
        url="",
        sender=0,
        agents=agents_per_sender,
        prefix="bench-a",
        reports_per_post=reports_per_post,
        rounds=rounds,
        first_end=first_end,
        concurrency=concurrency,
        seconds=seconds,
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="capmon-bench-collector-") as tmp, influxd(Path(tmp)) as influx:
        say(
            f"influxd on {influx.url}; {senders} senders × {agents_per_sender} agents × {rounds} POSTs built ahead"
        )
        with Collectors(Path(tmp), influx.url, "capmon", storage_extra=storage_extra) as coll:
            say(f"max: closed loop, {senders}×{concurrency} in flight, {seconds:g} s")
            top = phase([replace(base, url=coll.url, sender=i) for i in range(senders)], coll.pids)
            write_lines = _metric(coll.url, "capmon_collector_batch_lines_sum")
            writes = _metric(coll.url, "capmon_collector_batch_lines_count")
            stored_dw = _metric(coll.url, "capmon_collector_device_windows_total")
            mean_write = int(write_lines / writes) if writes else 5000
            say(
                f"max: {top.rate:,.0f} dw/s wall, {top.per_core:,.0f} dw/s per collector CPU s, statuses "
                f"{top.statuses}, mean storage write {mean_write} lines"
            )
            req_rate = top.requests / top.wall_s / 2
            say(f"half: open loop at {req_rate:,.0f} requests/s for {seconds:g} s")
            w_sum0 = _metric(coll.url, "capmon_collector_write_seconds_sum")
            w_n0 = _metric(coll.url, "capmon_collector_write_seconds_count")
            half = phase(
                [
                    replace(
                        base, url=coll.url, sender=i, mode="open", rate=req_rate / senders, prefix="bench-h"
                    )
                    for i in range(senders)
                ],
                coll.pids,
            )
            w_n = _metric(coll.url, "capmon_collector_write_seconds_count") - w_n0
            w_sum = _metric(coll.url, "capmon_collector_write_seconds_sum") - w_sum0
            write_ms = 1000 * w_sum / w_n if w_n else math.nan
        say(
            f"half: p50 {pct(half.latencies_ms, 0.5):.1f} ms, p99 {pct(half.latencies_ms, 0.99):.1f} ms, {half.statuses}"
        )
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
                )
                for i in range(senders)
            ],
            [],
        )
        say(f"direct: {direct.rate:,.0f} dw/s, statuses {direct.statuses}")
        in_db = influx.count("capmon", "capmon_device", "state_code")
        with Collectors(Path(tmp), influx.url, "") as bare:
            say(f"no storage: the collector alone (kind none), closed loop, {seconds:g} s")
            alone = phase(
                [replace(base, url=bare.url, sender=i, prefix="bench-n") for i in range(senders)], bare.pids
            )
            say(f"no storage: {alone.rate:,.0f} dw/s, {alone.per_core:,.0f} per core, {alone.statuses}")
            alone_half = phase(
                [
                    replace(
                        base, url=bare.url, sender=i, mode="open", rate=req_rate / senders, prefix="bench-nh"
                    )
                    for i in range(senders)
                ],
                bare.pids,
            )
        two = None
        if scale:
            with Collectors(
                Path(tmp), influx.url, "scale", processes=2, storage_extra=storage_extra
            ) as coll2:
                say(f"scale: 2 collectors behind SO_REUSEPORT, {seconds:g} s")
                two = phase(
                    [replace(base, url=coll2.url, sender=i, prefix="bench-s") for i in range(senders)],
                    coll2.pids,
                )
            say(f"scale: {two.rate:,.0f} dw/s wall, {two.statuses}")

    ratio = top.rate / direct.rate if direct.rate else math.nan
    p50, p99 = pct(half.latencies_ms, 0.5), pct(half.latencies_ms, 0.99)
    dpp = 8 * reports_per_post
    rows += [
        Row(
            BENCH, f"max rate, {senders}×{concurrency} in flight, {dpp} device-windows/POST", top.rate, "dw/s"
        ),
        Row(
            BENCH,
            f"per collector core ({top.cpu_s:.1f} CPU s in {top.wall_s:.0f} s)",
            top.per_core,
            "dw/s/core",
            f"≥ {PER_CORE_TARGET:,}",
            top.per_core >= PER_CORE_TARGET,
        ),
        Row(BENCH, "collector CPU busy during max phase", 100 * top.cpu_s / top.wall_s, "% of a core"),
        Row(BENCH, f"failed requests at max (statuses {_short(top.statuses)})", top.errors, "requests"),
        Row(
            BENCH,
            f"direct influxd /write, {mean_write} lines/write, {senders}×{direct_concurrency} in flight"
            + (f" (statuses {_short(direct.statuses)})" if direct.errors else ""),
            direct.rate,
            "dw/s",
        ),
        Row(BENCH, "ratio collector path / direct", ratio, "", f"≥ {RATIO_TARGET}", ratio >= RATIO_TARGET),
        Row(BENCH, f"ack latency p50 at half load ({half.requests / half.wall_s:,.0f} req/s)", p50, "ms"),
        Row(BENCH, "ack latency p99 at half load", p99, "ms", f"< {P99_TARGET_MS:g} ms", p99 < P99_TARGET_MS),
        Row(BENCH, "mean influxd write during half load (collector's write_seconds)", write_ms, "ms"),
        Row(
            BENCH,
            "device-windows in influxd after max+half (acked)",
            in_db,
            f"of {top.device_windows + half.device_windows:,}",
        ),
        Row(BENCH, "collector's device_windows_total after max", stored_dw, "dw"),
    ]
    rows += [
        Row(BENCH, "no storage (kind none): max rate", alone.rate, "dw/s"),
        Row(BENCH, f"no storage: per collector core ({alone.cpu_s:.1f} CPU s)", alone.per_core, "dw/s/core"),
        Row(
            BENCH,
            "no storage: ack latency p50 at the same half load",
            pct(alone_half.latencies_ms, 0.5),
            "ms",
        ),
        Row(
            BENCH,
            "no storage: ack latency p99 at the same half load",
            pct(alone_half.latencies_ms, 0.99),
            "ms",
        ),
    ]
    if two is not None:
        rows += [
            Row(BENCH, "scale: 2 collectors (SO_REUSEPORT), max rate", two.rate, "dw/s"),
            Row(BENCH, f"scale: 2 collectors, per core ({two.cpu_s:.1f} CPU s)", two.per_core, "dw/s/core"),
            Row(BENCH, f"scale: speed-up 1 → 2 processes ({os.cpu_count()}-core machine)", two.rate / top.rate, "×"),
        ]
    if top.replays or half.replays or half.late:
        rows.append(
            Row(
                BENCH,
                "replayed bodies (ran out of prebuilt) / late sends",
                top.replays + half.replays + half.late,
                "",
            )
        )
    return rows


def _short(statuses: dict[int, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(statuses.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per phase (default 15)")
    parser.add_argument("--quick", action="store_true", help="6 s phases")
    parser.add_argument("--senders", type=int, default=2, help="sender processes (default 2)")
    parser.add_argument("--agents", type=int, default=500, help="agents per sender (default 500)")
    parser.add_argument("--reports-per-post", type=int, default=4)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=200,
        help="requests in flight per sender (an agent has one at most)",
    )
    parser.add_argument(
        "--direct-concurrency", type=int, default=2, help="influxd writes in flight per sender"
    )
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='extra [storage] TOML line for the collector, e.g. "write_concurrency = 4" (to try a setting)',
    )
    parser.add_argument("--no-scale", action="store_true", help="skip the 2-process phase")
    args = parser.parse_args()
    rows = run(
        seconds=6.0 if args.quick else args.seconds,
        senders=args.senders,
        agents_per_sender=args.agents,
        reports_per_post=args.reports_per_post,
        concurrency=args.concurrency,
        direct_concurrency=args.direct_concurrency,
        scale=not args.no_scale,
        storage_extra="\n".join(args.storage_option),
    )
    print(machine())
    print(table(rows))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
