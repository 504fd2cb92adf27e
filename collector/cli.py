"""`capmon collector …`: run the service, print the sample config, hash a token.

The `capmon` console script finds `register_collector` through the `capmon.commands` entry point.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from importlib import resources

from .config import SEVERAL_PROCESSES_NEED_STORAGE, Config, ConfigError, hash_token, load, validate


def register_collector(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "collector", help="the collector service: ingest, storage, live fleet view"
    )
    commands = parser.add_subparsers(dest="collector_command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="serve the collector until SIGTERM")
    run.add_argument(
        "--config",
        "-c",
        default=os.environ.get("CAPMON_COLLECTOR_CONFIG"),
        help="TOML file (default: $CAPMON_COLLECTOR_CONFIG; without one, built-in defaults)",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help='N processes on one port (SO_REUSEPORT), restarted when one dies; needs live_view = "storage"',
    )
    # Internal: this process is worker K of a supervisor (and how often its slot was restarted).
    run.add_argument("--worker-index", default="", help=argparse.SUPPRESS)
    run.add_argument("--worker-restarts", type=int, default=0, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    config = commands.add_parser("config", help="print the commented sample configuration")
    config.set_defaults(func=cmd_config)

    hashing = commands.add_parser("hash-token", help="print the sha256 of a token for [auth] in the config")
    hashing.add_argument("token", nargs="?", help="the token (default: read from stdin; never echoed)")
    hashing.add_argument(
        "--generate",
        action="store_true",
        help="make a new random token; print it, its sha256 and the [auth] lines to paste",
    )
    hashing.set_defaults(func=cmd_hash_token)


def sample_config() -> str:
    return resources.files("capmon.collector").joinpath("sample.toml").read_text(encoding="utf-8")


def cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(sample_config())
    return 0


def cmd_hash_token(args: argparse.Namespace) -> int:
    if args.generate:
        token = secrets.token_urlsafe(32)
        digest = hash_token(token)
        print(f"token:  {token}")
        print(f"sha256: {digest}")
        print()
        print("# The token goes to the client (the agent, Grafana, the live page); only the sha256")
        print("# goes in the collector's [auth]. Paste one of these lines there (or add the { … } entry")
        print("# to the list you have) and replace every <…> placeholder first:")
        print("# an agent token, writing only as the agent ids it names (fnmatch patterns):")
        print(
            f'agent_tokens = [{{ name = "<name for logs>", sha256 = "{digest}", agents = ["<agent id or pattern, e.g. rack7-*>"] }}]'
        )
        print("# or a read token, for /api/v1/*, /metrics and the live page:")
        print(f'read_tokens = [{{ name = "<name for logs>", sha256 = "{digest}" }}]')
        return 0
    token = args.token if args.token is not None else sys.stdin.readline().strip()
    if not token:
        print("capmon collector hash-token: no token given", file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load(args.config) if args.config else validate(Config())
    except ConfigError as exc:
        print(f"capmon: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("capmon collector: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1:
        if config.collector.live_view != "storage":
            print(
                f"capmon: configuration error: {config.source}: [collector] live_view: --workers "
                f"{args.workers} {SEVERAL_PROCESSES_NEED_STORAGE}",
                file=sys.stderr,
            )
            return 2
        if config.collector.port == 0:
            print(
                f"capmon: configuration error: {config.source}: [collector] port: --workers needs a "
                "fixed port (with 0 each worker would listen on a port of its own)",
                file=sys.stderr,
            )
            return 2
        return WorkerSupervisor(config, args.config, args.workers, args.log_level).run()
    from .app import run
    from .liveview import LiveViewUnsupported

    try:
        run(config, worker=args.worker_index, worker_restarts=args.worker_restarts)
    except LiveViewUnsupported as exc:
        print(f"capmon collector: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the listening socket: port in use, no permission, unknown address
        # asyncio's message restates the address: the errno's text alone, as `ss` would say it.
        reason = os.strerror(exc.errno).lower() if exc.errno else (str(exc) or type(exc).__name__)
        host, port = config.collector.host, config.collector.port
        print(f"capmon collector: cannot listen on {host}:{port}: {reason}", file=sys.stderr)
        return 1
    return 0


log = logging.getLogger("capmon.collector.workers")

# A worker that dies within this many seconds of its start is restarted after a growing pause (up to
# RESTART_PAUSE_MAX_S), so one that cannot start does not spin.
QUICK_DEATH_S = 10.0
RESTART_PAUSE_MAX_S = 30.0
# Exit status of a worker that will never start (a store that cannot serve the live view).
FATAL_STATUS = 2


class WorkerSupervisor:
    """`capmon collector run --workers N`: N collector processes sharing one port (SO_REUSEPORT).

    A worker that dies is restarted (and counted: logged, and `capmon_collector_worker_restarts` in
    the new worker's /metrics); SIGTERM or SIGINT drains them all (each stops accepting, finishes
    its requests and writes) and waits up to `drain_timeout_s` before killing what is left."""

    def __init__(self, config: Config, config_path: str, workers: int, log_level: str) -> None:
        self.config = config
        self.config_path = os.path.abspath(config_path)
        self.workers = workers
        self.log_level = log_level
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started_at: dict[int, float] = {}
        self.restarts = dict.fromkeys(range(1, workers + 1), 0)
        self.next_start: dict[int, float] = {}
        self.stopping = False

    def command(self, index: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "capmon.collector.cli",
            "run",
            "--config",
            self.config_path,
            "--log-level",
            self.log_level,
            "--worker-index",
            str(index),
            "--worker-restarts",
            str(self.restarts[index]),
        ]

    def start(self, index: int) -> None:
        # A session of its own: a terminal's Ctrl-C reaches the supervisor, which drains the workers
        # once, instead of every worker receiving it as well.
        self.procs[index] = subprocess.Popen(self.command(index), start_new_session=True)
        self.started_at[index] = time.monotonic()

    def check_port(self) -> str | None:
        """Why host:port cannot be shared, or None (bound with SO_REUSEPORT, then released)."""
        c = self.config.collector
        try:
            infos = socket.getaddrinfo(c.host, c.port, type=socket.SOCK_STREAM)
            with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                probe.bind(infos[0][4])
        except OSError as exc:
            return os.strerror(exc.errno).lower() if exc.errno else str(exc)
        return None

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        c = self.config.collector
        reason = self.check_port()
        if reason is not None:
            print(f"capmon collector: cannot listen on {c.host}:{c.port}: {reason}", file=sys.stderr)
            return 1
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        log.info("capmon collector: %d workers on %s:%s", self.workers, c.host, c.port)
        for index in range(1, self.workers + 1):
            self.start(index)
        status = 0
        while not self.stopping:
            now = time.monotonic()
            for index, proc in list(self.procs.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del self.procs[index]
                if rc == FATAL_STATUS:
                    log.error("worker %d cannot start (status %d): stopping the others", index, rc)
                    self.stopping, status = True, FATAL_STATUS
                    break
                self.restarts[index] += 1
                quick = now - self.started_at[index] < QUICK_DEATH_S
                pause = min(RESTART_PAUSE_MAX_S, 2.0 ** min(self.restarts[index], 5)) if quick else 0.0
                how = f"signal {-rc}" if rc < 0 else f"status {rc}"
                log.warning(
                    "worker %d (pid %d) exited with %s; restarting it%s (restart %d of this worker)",
                    index,
                    proc.pid,
                    how,
                    f" in {pause:g}s" if pause else "",
                    self.restarts[index],
                )
                self.next_start[index] = now + pause
            for index, at in list(self.next_start.items()):
                if not self.stopping and at <= now:
                    del self.next_start[index]
                    self.start(index)
            time.sleep(0.1)
        self.drain()
        return status

    def drain(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.collector.drain_timeout_s + 5.0
        for index, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d (pid %d) did not drain in time: killed", index, proc.pid)
                proc.kill()
                proc.wait()
        log.info("capmon collector: all workers stopped")


def main(argv: list[str] | None = None) -> int:
    """`python -m capmon.collector.cli run …`, for when the `capmon` script is not installed."""
    parser = argparse.ArgumentParser(prog="capmon")
    register_collector(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["collector", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
