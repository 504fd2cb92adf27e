"""`capmon collector …`: run the service, print the sample config, hash a token.

The `capmon` console script finds `register_collector` through the `capmon.commands` entry point.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from importlib import resources

from .config import Config, ConfigError, hash_token, load, validate


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
    run.set_defaults(func=cmd_run)

    config = commands.add_parser("config", help="print the commented sample configuration")
    config.set_defaults(func=cmd_config)

    hashing = commands.add_parser("hash-token", help="print the sha256 of a token for [auth] in the config")
    hashing.add_argument("token", nargs="?", help="the token (default: read from stdin; never echoed)")
    hashing.add_argument("--generate", action="store_true", help="make a new random token and print both")
    hashing.set_defaults(func=cmd_hash_token)


def sample_config() -> str:
    return resources.files("capmon.collector").joinpath("sample.toml").read_text(encoding="utf-8")


def cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(sample_config())
    return 0


def cmd_hash_token(args: argparse.Namespace) -> int:
    if args.generate:
        token = secrets.token_urlsafe(32)
        print(f"token:  {token}")
        print(f"sha256: {hash_token(token)}")
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
    from .app import run

    try:
        run(config)
    except OSError as exc:  # the listening socket: port in use, no permission, unknown address
        # asyncio's message restates the address: the errno's text alone, as `ss` would say it.
        reason = os.strerror(exc.errno).lower() if exc.errno else (str(exc) or type(exc).__name__)
        host, port = config.collector.host, config.collector.port
        print(f"capmon collector: cannot listen on {host}:{port}: {reason}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m capmon.collector.cli run …`, for when the `capmon` script is not installed."""
    parser = argparse.ArgumentParser(prog="capmon")
    register_collector(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["collector", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
