"""`capmon demo`: a collector and a simulated fleet in one process on loopback — capmon with zero setup.

Each simulated host is a real agent (mock probe → sampler → classifier → spool → transport) posting
to a real collector over HTTP; only the devices are simulated. This is the one module that composes
both sides, which is why it alone may import the agent's runtime (see collector/ruff.toml).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web

from capmon.agent.allocation import Allocation, AllocationSource
from capmon.agent.config import AgentConfig, AgentSection
from capmon.agent.daemon import Agent
from capmon.agent.delivery import SpoolingSink
from capmon.agent.holders import parse_cgroup
from capmon.agent.sinks import identity_of
from capmon.agent.spool import SpoolConfig
from capmon.agent.transport import TransportConfig
from capmon.collector.app import create_app
from capmon.collector.config import (
    AuthConfig,
    CollectorConfig,
    Config,
    ConfigError,
    PricingConfig,
    StorageConfig,
    TokenConfig,
    hash_token,
    validate,
)
from capmon.plugins.mock import MockProbe, mock_fleet
from capmon.plugins.mock.probe import USERS

log = logging.getLogger("capmon.demo")

# Well-known tokens: the demo listens on loopback only, and the README's curl lines use them.
AGENT_TOKEN = "demo-agent-token"
READ_TOKEN = "demo-read-token"

DEMO_PRICES = {"H100": 2.10, "A100": 1.20, "910B3": 0.90}


def register_demo(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "demo",
        help="a collector plus a simulated fleet on this machine: see capmon work with zero setup",
        description="Runs a collector and simulated GPU/NPU hosts in one process on 127.0.0.1, and prints "
        "a live table of fleet capacity. Ctrl-C stops it.",
    )
    p.add_argument("--hosts", type=int, default=4, help="simulated hosts (default 4)")
    p.add_argument("--devices", type=int, default=8, help="devices per host (default 8)")
    p.add_argument("--window", type=int, default=5, help="report window in seconds (default 5)")
    p.add_argument("--port", type=int, default=8900, help="collector port on 127.0.0.1 (0: any free port)")
    p.add_argument(
        "--seconds", type=float, default=0, help="stop after this many seconds (default: run until Ctrl-C)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    p.add_argument("--influx-url", help="also write to this InfluxDB (default: live view only)")
    p.add_argument("--influx-version", choices=("1", "2"), default="2", help="InfluxDB write API (default 2)")
    p.add_argument("--influx-token", default="", help="InfluxDB 2.x token (or $CAPMON_INFLUX_TOKEN)")
    p.add_argument("--influx-org", default="", help="InfluxDB 2.x organisation")
    p.add_argument("--influx-bucket", default="capmon", help="InfluxDB 2.x bucket (default capmon)")
    p.add_argument("--influx-db", default="capmon", help="InfluxDB 1.x database (default capmon; created)")
    p.set_defaults(func=cmd_demo)


def default_args(**overrides: Any) -> argparse.Namespace:
    """`capmon demo`'s options at their defaults, as its parser gives them, with `overrides` (tests)."""
    parser = argparse.ArgumentParser(prog="capmon")
    register_demo(parser.add_subparsers())
    args = parser.parse_args(["demo"])
    unknown = set(overrides) - set(vars(args))
    if unknown:
        raise TypeError(f"capmon demo has no option {sorted(unknown)[0]!r}")
    vars(args).update(overrides)
    return args


def demo_config(args: argparse.Namespace) -> Config:
    storage = StorageConfig()
    if args.influx_url:
        if args.influx_version == "1":
            storage = StorageConfig(
                kind="influxdb_v1", url=args.influx_url, db=args.influx_db, create_database=True
            )
        else:
            storage = StorageConfig(
                kind="influxdb_v2",
                url=args.influx_url,
                token=args.influx_token,
                org=args.influx_org,
                bucket=args.influx_bucket,
            )
    return Config(
        collector=CollectorConfig(host="127.0.0.1", port=args.port, drain_timeout_s=5.0),
        auth=AuthConfig(
            agent_tokens=(
                TokenConfig(sha256=hash_token(AGENT_TOKEN), agents=("sim-*",), name="demo-agents"),
            ),
            read_tokens=(TokenConfig(sha256=hash_token(READ_TOKEN), name="demo-read"),),
        ),
        storage=storage,
        pricing=PricingConfig(currency="USD", default=1.0, models=DEMO_PRICES),
        source="<demo>",
    )


class MockAllocations(AllocationSource):
    """The simulated fleet's scheduler: the pods and Slurm jobs whose processes hold its mock devices
    get names (namespace/pod, job and partition), and every other idle device is allocated to a pod
    or a job that runs nothing on it — the reserved-but-wasted capacity `allocated_idle` is about."""

    name = "mock-scheduler"
    default_interval_s = 5.0

    def __init__(self, probe: MockProbe, since: float | None = None) -> None:
        super().__init__()
        self.probe = probe
        self.since = since if since is not None else time.time() - 3 * 3600
        self._allocations = self._plan()

    def _plan(self) -> list[Allocation]:
        cfg = self.probe.config
        host = cfg.host_index
        out: list[Allocation] = []
        idle = 0
        for i in range(cfg.devices):
            device_id = f"MOCK-{host:03d}-{i:02d}"
            profile = cfg.profiles[i % len(cfg.profiles)].partition(":")[0]
            processes = self.probe.processes(i, profile)
            since = self.since - 600 * i
            if processes:
                p = processes[0]
                owner = parse_cgroup(p.cgroup)
                if owner.pod_uid:
                    out.append(
                        Allocation(
                            self.name,
                            device_id,
                            device_id=device_id,
                            namespace="inference" if profile == "inference" else "research",
                            pod=f"{p.command}-{host}-{i}",
                            container="main",
                            pod_uid=owner.pod_uid,
                            since=since,
                        )
                    )
                elif owner.slurm_job_id:
                    out.append(
                        Allocation(
                            self.name,
                            device_id,
                            device_id=device_id,
                            job_id=owner.slurm_job_id,
                            user=USERS.get(p.uid),
                            partition="gpu",
                            since=since,
                        )
                    )
            elif profile == "idle":
                idle += 1
                if idle % 2:  # every other idle device: given away, nothing runs on it
                    continue
                user = sorted(USERS.values())[(host + i) % len(USERS)]
                if (host + i) % 3:
                    out.append(
                        Allocation(
                            self.name,
                            device_id,
                            device_id=device_id,
                            namespace="research",
                            pod=f"notebook-{user}-{host}-{i}",
                            container="jupyter",
                            pod_uid=f"00000000-0000-4000-8000-{host:06d}{i:06d}",
                            since=since,
                        )
                    )
                else:
                    out.append(
                        Allocation(
                            self.name,
                            device_id,
                            device_id=device_id,
                            job_id=str(900_000 + host * 64 + i),
                            user=user,
                            partition="gpu",
                            since=since,
                        )
                    )
        return out

    def allocations(self) -> list[Allocation]:
        return list(self._allocations)

    def covers(self, vendor: str) -> bool:
        return vendor == "mock"


class CannotStart(Exception):
    """The demo cannot start as asked; the message is the one line a person sees."""


class CannotListen(CannotStart):
    """The demo's collector port cannot be bound."""


INSTALL_COLLECTOR = "pip install '.[collector]' in a capmon checkout (README: Install)"


def checked_config(args: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    """The demo's collector configuration, checked by the collector's own validator, so what the
    options miss is one line in the demo's terms (its flags), never a traceback from a writer."""
    if args.influx_url and args.influx_version == "2":
        try:
            importlib.import_module("influxdb_client.client.influxdb_client_async")
        except ImportError as exc:
            raise CannotStart(
                f"--influx-version 2 writes through the influxdb-client package ({exc}): "
                f"{INSTALL_COLLECTOR}; or --influx-version 1 for an InfluxDB 1.x"
            ) from None
    try:
        return validate(demo_config(args), env)
    except ConfigError as exc:
        text = str(exc).removeprefix("<demo>: ")
        for key, flag in (
            ("storage.token or $CAPMON_INFLUX_TOKEN", "--influx-token or $CAPMON_INFLUX_TOKEN"),
            ("storage.org", "--influx-org"),
            ("storage.bucket", "--influx-bucket"),
        ):
            text = text.replace(key, flag)
        raise CannotStart(text) from None


async def check_influx(args: argparse.Namespace, timeout_s: float = 5.0) -> None:
    """Ask the store once, before any agent starts, whether it is there and speaks the write API
    --influx-version names: an InfluxDB before 1.8 has no v2 API, and every write would answer 404."""
    if not args.influx_url:
        return
    url = args.influx_url.rstrip("/")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
            async with http.get(f"{url}/ping") as resp:
                version = resp.headers.get("X-Influxdb-Version", "")
    except aiohttp.ClientConnectorError as exc:
        reason = os.strerror(exc.os_error.errno) if exc.os_error and exc.os_error.errno else str(exc)
        reason = reason[:1].lower() + reason[1:]
        raise CannotStart(f"cannot reach InfluxDB at {url}: {reason}") from None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise CannotStart(f"cannot reach InfluxDB at {url}: {type(exc).__name__}: {exc}") from None
    major_minor = re.match(r"v?(\d+)\.(\d+)", version)
    if args.influx_version == "2" and major_minor and (int(major_minor[1]), int(major_minor[2])) < (1, 8):
        raise CannotStart(f"{url} is InfluxDB {version}, which has no v2 write API: use --influx-version 1")


def cmd_demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run_demo(args))
    except CannotStart as exc:
        print(f"capmon demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _cannot_listen(host: str, port: int, exc: OSError) -> CannotListen:
    # asyncio rewrites strerror as "error while attempting to bind on address …": say just the cause.
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    reason = reason[:1].lower() + reason[1:]
    hint = ""
    if exc.errno == errno.EADDRINUSE:
        hint = " (try --port 0 or another port)"
    elif exc.errno == errno.EACCES:
        hint = " (ports below 1024 need privileges; try --port 0 or another port)"
    return CannotListen(f"cannot listen on {host}:{port}: {reason}{hint}")


async def run_demo(args: argparse.Namespace, out=None) -> None:
    out = out or sys.stdout
    config = checked_config(args)
    await check_influx(args)
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise _cannot_listen("127.0.0.1", args.port, exc) from None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    spool_root = tempfile.mkdtemp(prefix="capmon-demo-")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    agents = []
    for host in mock_fleet(args.hosts, args.devices, args.seed):
        agent_config = AgentConfig(
            agent=AgentSection(
                id=host.host, host=host.host, window_s=args.window, labels=host.labels, shutdown_timeout_s=3.0
            ),
            spool=SpoolConfig(path=f"{spool_root}/{host.host}"),
            transport=TransportConfig(
                url=f"{url}/api/v1/reports", token=AGENT_TOKEN, backoff_min_s=0.5, backoff_max_s=5.0
            ),
            source="<demo>",
        )
        probe = MockProbe(host.config)
        # The demo's spools are removed when it stops: its agents never start again to send them.
        sink = SpoolingSink(
            identity_of(agent_config), agent_config.spool, agent_config.transport, discarded_at_exit=True
        )
        agents.append(Agent(agent_config, probes=[probe], sources=[MockAllocations(probe)], sink=sink))
    tasks = [asyncio.create_task(a.run(stop)) for a in agents]
    print(f"capmon demo: live page {url}/  (read token: {READ_TOKEN})", file=out)
    print(
        f"capmon demo: collector on {url}, {_count(args.hosts, 'simulated host')} × "
        f"{_count(args.devices, 'device')}, "
        f"{args.window}s windows. Ctrl-C stops.",
        file=out,
    )
    hint = f"  try: curl -s -H 'Authorization: Bearer {READ_TOKEN}' {url}/api/v1/fleet"
    print(hint, file=out)
    out.flush()
    clear = out.isatty()
    started = time.monotonic()
    deadline = started + args.seconds if args.seconds else None
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {READ_TOKEN}"}) as http:

            async def frame() -> None:
                fleet = await (await http.get(f"{url}/api/v1/fleet")).json()
                devices = await (
                    await http.get(f"{url}/api/v1/devices", params={"state": "idle", "limit": "8"})
                ).json()
                wasted = {}
                for by in ("pod", "job"):
                    params = {"by": by, "state": "allocated_idle", "limit": "5"}
                    answer = await http.get(f"{url}/api/v1/holders", params=params)
                    if answer.status == 200:
                        wasted[by] = (await answer.json()).get("holders", [])
                # A cleared screen would erase the hint printed above, so each frame carries it.
                print(
                    render(fleet, devices, url, clear=clear, hint=hint if clear else "", holders=wasted),
                    file=out,
                )
                out.flush()

            while not stop.is_set():
                wait = args.window if deadline is None else min(args.window, deadline - time.monotonic())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(wait, 0.0))
                if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                    break
                await frame()
            if deadline is not None and not stop.is_set():
                # --seconds ends the demo on time, not at the next window: the agents stop first and
                # deliver their last, partial window, so the final frame shows the whole run even when
                # it is shorter than one window.
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                await frame()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        shutil.rmtree(spool_root, ignore_errors=True)
        print("capmon demo stopped.", file=out)


def _count(n: int, noun: str) -> str:
    """ "1 agent", "3 agents": the plural only for more than one."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fmt_hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f}"


def render(
    fleet: dict[str, Any],
    devices: dict[str, Any] | list[Any],
    url: str,
    clear: bool = False,
    hint: str = "",
    holders: dict[str, list[dict[str, Any]]] | None = None,
) -> str:
    """The demo's screen: capacity by state and model, by site, the longest-idle devices, and the
    pods and jobs holding devices they leave idle (`holders`: /api/v1/holders answers by pod and
    job); `hint` (the curl line) below them."""
    lines = []
    if clear:
        lines.append("\x1b[2J\x1b[H")
    currency = fleet.get("currency", "")
    states = ("free", "allocated_idle", "busy", "unavailable")
    totals = fleet.get("totals", {})
    total = totals.get("states", {})
    agents = fleet.get("agents", {})
    lines.append(
        f"capmon fleet  {time.strftime('%H:%M:%S')}  {_count(agents.get('total', 0), 'agent')}, "
        f"{_count(totals.get('devices', 0), 'device')}  ({url})"
    )
    lines.append(
        "  ".join(f"{s.upper()} {total.get(s, 0)}" for s in states)
        + f"   idle now worth {totals.get('idle_value_per_hour', 0):.2f} {currency}/h"
        + f"   idle device-hours so far {totals.get('idle_device_hours', 0):.3f}"
    )
    lines.append("")
    rows = [("MODEL", "FREE", "ALLOC-IDLE", "BUSY", "UNAVAIL", f"IDLE {currency}/h")]
    for model, m in sorted(fleet.get("by_model", {}).items()):
        c = m.get("states", {})
        rows.append((model, *(str(c.get(s, 0)) for s in states), f"{m.get('idle_value_per_hour', 0):.2f}"))
    lines.extend(_table(rows))
    lines.append("")
    for key, values in sorted(fleet.get("by_label", {}).items()):
        rows = [(key.upper(), "FREE", "ALLOC-IDLE", "BUSY", "UNAVAIL", f"IDLE {currency}/h")]
        for value, m in sorted(values.items()):
            c = m.get("states", {})
            rows.append(
                (value, *(str(c.get(s, 0)) for s in states), f"{m.get('idle_value_per_hour', 0):.2f}")
            )
        lines.extend(_table(rows))
        lines.append("")
    # The None holder is what no pod (or job) holds: not a holder to name.
    wasted = [(by, h) for by, hs in (holders or {}).items() for h in hs if h.get("holder")]
    if wasted:
        rows = [("ALLOCATED IDLE BY", "HOLDER", "DEVICES", "LONGEST", f"{currency}/h")]
        for by, h in wasted:
            rows.append(
                (
                    by,
                    str(h.get("holder") or "-"),
                    str(h.get("devices", 0)),
                    f"{h.get('longest_for_s') or 0:.0f}s",
                    f"{h.get('allocated_idle_value_per_hour') or 0:.2f}",
                )
            )
        lines.extend(_table(rows))
        lines.append("")
    items = devices.get("devices", []) if isinstance(devices, dict) else devices
    rows = [("LONGEST IDLE", "HOST", "MODEL", "STATE", "IDLE FOR", f"{currency}/h")]
    for d in items:
        rows.append(
            (
                d.get("device_id", ""),
                d.get("host", ""),
                d.get("model") or "-",
                d.get("state", ""),
                f"{d.get('idle_for_s') or 0:.0f}s",
                f"{d.get('value_per_hour') or 0:.2f}",
            )
        )
    lines.extend(_table(rows))
    if hint:
        lines.extend(("", hint))
    return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
