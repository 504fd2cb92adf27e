"""`capmon`: the one console script. `agent …` lives here; `collector …` and `demo` register through
the `capmon.commands` entry-point group, so the agent never imports the collector."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any

from capmon.agent import __version__
from capmon.agent.classifier import IdleClassifier
from capmon.agent.config import AgentConfig, ConfigError, load_config, sample_config
from capmon.agent.probe import DeviceSample, HostSample
from capmon.agent.registry import ProbeRegistry, ProbeStatus, SourceStatus
from capmon.agent.sampler import ProbeTask

log = logging.getLogger("capmon")

MIB = 1024 * 1024


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load(args: argparse.Namespace) -> AgentConfig:
    config = load_config(args.config)
    enable = tuple(args.enable or ()) + (("mock",) if getattr(args, "mock", False) else ())
    disable = tuple(args.disable or ())
    if enable or disable:
        from dataclasses import replace

        config = replace(
            config,
            probes=replace(
                config.probes, enable=config.probes.enable + enable, disable=config.probes.disable + disable
            ),
        )
    return config


def _activate_all(config: AgentConfig) -> tuple[list[ProbeStatus], list[SourceStatus]]:
    """Probes and allocation sources, from one registry."""
    registry = ProbeRegistry()
    probes = registry.activate(
        config.probes.enable, config.probes.disable, config.probes.options, where=config.source
    )
    try:
        sources = registry.activate_sources(
            config.allocations.enable,
            config.allocations.disable,
            config.allocations.options,
            where=config.source,
        )
    except BaseException:
        _close_all(probes, [])
        raise
    return probes, sources


def _close_all(probes: Sequence[ProbeStatus], sources: Sequence[SourceStatus]) -> None:
    for s in probes:
        if s.probe is not None:
            s.probe.close()
    for src in sources:
        if src.source is not None:
            try:
                src.source.close()
            except Exception:
                log.exception("allocation source %s: close() failed", src.name)


# -- capmon agent probes ---------------------------------------------------------------------


def cmd_probes(args: argparse.Namespace) -> int:
    config = _load(args)
    statuses, sources = _activate_all(config)
    try:
        if args.json:
            print(
                json.dumps(
                    [_status_json(s.name, "probe", s.status, s.reason, s.source) for s in statuses]
                    + [_status_json(s.name, "allocations", s.status, s.reason, s.plugin) for s in sources],
                    indent=2,
                )
            )
        else:
            rows = [(s.name, s.status, s.source, s.reason) for s in statuses]
            print(_table(("PROBE", "STATUS", "PLUGIN", "WHY"), rows))
            if sources:
                rows = [(s.name, s.status, s.plugin, s.reason) for s in sources]
                print()
                print(_table(("ALLOCATION SOURCE", "STATUS", "PLUGIN", "WHY"), rows))
    finally:
        _close_all(statuses, sources)
    return 0


def _status_json(name: str, kind: str, status: str, reason: str, plugin: str) -> dict[str, str]:
    return {"name": name, "kind": kind, "status": status, "reason": reason, "plugin": plugin}


# -- capmon agent probe ----------------------------------------------------------------------


# (devices, host, error, resolved holders per device)
_Result = tuple[list[DeviceSample], HostSample | None, str | None, Any]


async def _sample_once(
    statuses: list[ProbeStatus], config: AgentConfig | None = None, sources: Sequence[Any] = ()
) -> dict[str, _Result]:
    """One sample of every active probe, with its holders resolved on its worker thread as the
    agent does, after one answer of every allocation source (`sources`: their `AllocationTask`s)."""
    from capmon.agent.daemon import ProbeHolders

    holders = config.holders if config is not None else None
    results: dict[str, _Result] = {}

    def collect(
        name: str, t: float, devices: list[DeviceSample], host: HostSample | None, resolved: Any = None
    ) -> None:
        results[name] = (devices, host, None, resolved)

    tasks = [
        ProbeTask(
            s.probe,
            collect,
            post=ProbeHolders(s.probe, holders) if holders is not None and holders.enabled else None,
        )
        for s in statuses
        if s.probe is not None
    ]
    # A rate (host CPU %) needs time between setup() and the sample; without it the figure is absent.
    warmup_s = max((float(getattr(t.probe, "warmup_s", 0.0)) for t in tasks), default=0.0)
    await asyncio.gather(*(t.tick() for t in sources))
    if warmup_s > 0:
        await asyncio.sleep(min(warmup_s, 2.0))
    await asyncio.gather(*(t.tick() for t in tasks))
    for t in tasks:
        if t.health.last_error:
            devices, host, _, resolved = results.get(t.probe.name, ([], None, None, None))
            results[t.probe.name] = (devices, host, t.health.last_error, resolved)
    return results


def _holder_record(record: Any, reason: str | None) -> dict[str, Any]:
    """One holder for `--json`: the fields the agent would send (never a command line), without the
    window's seconds, and why only the pid is known where that is so."""
    import msgspec

    out = msgspec.to_builtins(record.window(0.0, record.memory_bytes))
    out.pop("held_s", None)
    if reason:
        out["reason"] = reason
    return out


def _held_by(h: dict[str, Any]) -> str:
    """The owner column of the holders table: pod, job, container, session or why unknown."""
    if h.get("pod"):
        who = f"pod {h['namespace']}/{h['pod']}" if h.get("namespace") else f"pod {h['pod']}"
        return who + (f" ({h['container']})" if h.get("container") else "")
    if h.get("slurm_job_id"):
        return f"job {h['slurm_job_id']}" + (f" ({h['partition']})" if h.get("partition") else "")
    if h.get("pod_uid"):
        return f"pod uid {h['pod_uid']}"
    if h.get("container_id"):
        return f"{h.get('runtime') or 'container'} {h['container_id'][:12]}"
    if h.get("runtime") in ("systemd-session", "systemd-service"):
        return h["runtime"].removeprefix("systemd-")
    return h.get("reason") or "-"


def cmd_probe(args: argparse.Namespace) -> int:
    from capmon.agent.daemon import describe, match_allocations, merge_holders
    from capmon.agent.sampler import AllocationTask

    config = _load(args)
    statuses, source_statuses = _activate_all(config)
    source_tasks = [AllocationTask(s.source) for s in source_statuses if s.source is not None]
    try:
        results = asyncio.run(_sample_once(statuses, config, source_tasks))
    finally:
        _close_all(statuses, source_statuses)
    classifier = IdleClassifier(config.classifier)
    records: list[dict[str, Any]] = []
    host_record: dict[str, Any] | None = None
    errors: dict[str, str] = {}
    for probe, (devices, host, error, resolved) in results.items():
        if error:
            errors[probe] = error
        if host is not None:
            host_record = {"host": config.host, **{k: getattr(host, k) for k in host.__slots__}}
        allocations, unknown = match_allocations(devices, source_tasks)
        # What the agent would report: a MIG parent only through its instances, which share its health.
        for d in IdleClassifier.counted(devices):
            held = allocations.get(d.device_id, ())
            obs = classifier.classify(
                d,
                allocated_to=describe(held) if held else None,
                allocation_unknown=unknown.get(d.device_id),
            )
            rec = {"probe": probe, "state": obs.state}
            rec.update({k: getattr(d, k) for k in d.__slots__})
            rec["extra"], rec["info"] = dict(d.extra), dict(d.info)
            owners = None
            if config.holders.enabled:
                owners = merge_holders(resolved.get(d.device_id) if resolved else None, held, config.holders)
            rec["holders"] = (
                None
                if owners is None
                else [_holder_record(h, getattr(getattr(h, "owner", None), "reason", None)) for h in owners]
            )
            rec["util_unknown"], rec["ghost"], rec["spin"] = obs.util_unknown, obs.ghost, obs.spin
            rec["why"] = obs.reason
            records.append(rec)
    not_running = {s.name: f"{s.status}: {s.reason}" for s in statuses if s.status != "active"}
    sources_not_running = {
        s.name: f"{s.status}: {s.reason}" for s in source_statuses if s.status != "active"
    }
    source_errors = {t.source.name: t.error for t in source_tasks if t.error}
    if args.json:
        print(
            json.dumps(
                {
                    "host": host_record,
                    "devices": records,
                    "probe_errors": errors,
                    "probes_not_running": not_running,
                    "allocation_errors": source_errors,
                    "allocations_not_running": sources_not_running,
                },
                indent=2,
            )
        )
        return 0
    if host_record:
        h = host_record
        mem = f"{(h['memory_used_bytes'] or 0) / 2**30:.1f}/{(h['memory_total_bytes'] or 0) / 2**30:.1f} GiB"
        print(f"host {h['host']}: cpu {_num(h['cpu_pct'], '%')}  memory {mem}  load {_num(h['load1'])}")
    if records:
        rows = []
        for r in records:
            mem = "-"
            if r["memory_used_bytes"] is not None and r["memory_total_bytes"]:
                mem = f"{r['memory_used_bytes'] / MIB:.0f}/{r['memory_total_bytes'] / MIB:.0f}"
            rows.append(
                (
                    r["device_id"],
                    r["model"] or "-",
                    _num(r["index"]),
                    r["state"].upper(),
                    _num(r["util_pct"], "%"),
                    mem,
                    _num(r["power_w"], "W"),
                    _num(r["temp_c"], "C"),
                    _num(r["processes"]),
                    r["why"] or "",
                )
            )
        print(
            _table(
                ("DEVICE", "MODEL", "IDX", "STATE", "UTIL", "MEM MiB", "POWER", "TEMP", "PROCS", "WHY"), rows
            )
        )
        rows = []
        for r in records:
            for h in r["holders"] or ():
                mem = f"{h['memory_bytes'] / MIB:.0f}" if h.get("memory_bytes") is not None else "-"
                rows.append(
                    (
                        r["device_id"],
                        _num(h.get("pid")),
                        h.get("user") or "-",
                        h.get("command") or "-",
                        mem,
                        _held_by(h),
                    )
                )
        if rows:
            print()
            print(_table(("DEVICE", "PID", "USER", "COMMAND", "MEM MiB", "HELD BY"), rows))
    else:
        print("no accelerators found (see `capmon agent probes` for why each probe is not running)")
    for probe, error in errors.items():
        print(f"probe {probe}: {error}")
    for source, error in source_errors.items():
        print(f"allocation source {source}: {error}")
    return 0


def _num(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}{unit}" if abs(value) >= 10 else f"{value:.1f}{unit}"
    return f"{value}{unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells)


# -- capmon agent config / run ---------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(sample_config())
    return 0


def _log_probe_statuses(
    statuses: Sequence[ProbeStatus | SourceStatus], enabled: Sequence[str], kind: str = "probe"
) -> None:
    # A probe (or allocation source) whose hardware or scheduler is absent is normal (a collector host
    # has no GPU, most hosts no Slurm): INFO. WARNING only for a broken one, or a missing one the
    # configuration asked for by name.
    for s in statuses:
        warn = s.status == "failed" or (s.status == "skipped" and s.name in enabled)
        log.log(
            logging.WARNING if warn else logging.INFO,
            "%s %s: %s%s",
            kind,
            s.name,
            s.status,
            f": {s.reason}" if s.reason else "",
        )


def _startup_error(exc: BaseException) -> str | None:
    """One line for a spool (or output file) the agent cannot open, or None for any other error."""
    from capmon.agent import spool

    spool_errors = tuple(
        c for c in (getattr(spool, "SpoolUnavailable", None), spool.SpoolLocked) if isinstance(c, type)
    )
    if isinstance(exc, spool_errors):
        return str(exc)
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else ""
        cause = exc.strerror or str(exc)
        return f"{where}: {cause}" if where else cause
    if isinstance(exc, sqlite3.Error):
        return f"spool database: {exc}"
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from capmon.agent.daemon import Agent

    config = _load(args)
    setup_logging(args.log_level or config.agent.log_level)
    agent = Agent(config)
    _log_probe_statuses(agent.statuses, config.probes.enable)
    _log_probe_statuses(agent.source_statuses, config.allocations.enable, "allocation source")
    if not agent.probes:
        log.warning("no probe is active: the agent reports nothing but its own health")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        received: list[int] = []

        def on_signal(signum: int) -> None:
            received.append(signum)
            name = signal.Signals(signum).name
            if len(received) == 1:
                request_stop = getattr(agent, "request_stop", None)
                if callable(request_stop):
                    request_stop()  # logs "stopping: …" itself
                else:
                    log.info("%s: stopping (%s again exits at once; spooled windows are kept)", name, name)
                stop.set()
                return
            # The spool is durable (fsynced SQLite): exiting now loses nothing that was kept.
            logging.shutdown()
            os.write(2, f"capmon agent: second {name}: exiting now; unsent windows stay in the spool\n".encode())
            os._exit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        log.info(
            "capmon agent %s running as %s (window %ss)", __version__, config.agent_id, config.agent.window_s
        )
        await agent.run(stop)
        log.info("capmon agent stopped")

    try:
        asyncio.run(main())
    except Exception as exc:
        line = _startup_error(exc)
        if line is None:
            raise
        print(f"capmon agent: cannot run: {line}", file=sys.stderr)
        return 1
    return 0


# -- the parser ------------------------------------------------------------------------------


def _agent_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="agent TOML file (default: built-in defaults)")
    p.add_argument("--mock", action="store_true", help="enable the mock probe (simulated devices)")
    p.add_argument("--enable", action="append", metavar="PROBE", help="enable a probe (repeatable)")
    p.add_argument("--disable", action="append", metavar="PROBE", help="disable a probe (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capmon", description="Idle accelerator capacity monitoring.")
    parser.add_argument("--version", action="version", version=f"capmon {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    agent = sub.add_parser("agent", help="the agent that runs on every GPU/NPU host")
    agent_sub = agent.add_subparsers(dest="agent_command", metavar="COMMAND")

    p = agent_sub.add_parser("run", help="run the agent daemon")
    _agent_options(p)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_run)

    p = agent_sub.add_parser("probe", help="sample every active probe once and show each device's state")
    _agent_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_probe)

    p = agent_sub.add_parser("probes", help="list probes: active, skipped (and why) or failed")
    _agent_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_probes)

    p = agent_sub.add_parser("config", help="print the commented sample configuration")
    p.set_defaults(func=cmd_config)
    agent.set_defaults(func=lambda args: (agent.print_help(), 2)[1])

    for ep in importlib.metadata.entry_points(group="capmon.commands"):
        try:
            ep.load()(sub)
        except Exception as exc:  # e.g. the collector's extras are not installed
            msg = f"`capmon {ep.name}` is unavailable: {type(exc).__name__}: {exc}"
            broken = sub.add_parser(ep.name, help=f"unavailable: {exc}")
            broken.set_defaults(func=lambda args, msg=msg: (print(msg, file=sys.stderr), 1)[1])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except ConfigError as exc:
        print(f"capmon: configuration error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"capmon: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
