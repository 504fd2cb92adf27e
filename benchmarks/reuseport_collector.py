"""One collector process that shares its port with others (SO_REUSEPORT), for the scaling benchmark.

`[collector]` has no reuse_port option, so this launcher does what `capmon.collector.app.run` does with
`reuse_port=True` added. Run: .venv/bin/python benchmarks/reuseport_collector.py collector.toml
"""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from capmon.collector.app import create_app
from capmon.collector.config import load


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config = load(sys.argv[1])
    web.run_app(
        create_app(config),
        host=config.collector.host,
        port=config.collector.port,
        reuse_port=True,
        shutdown_timeout=config.collector.drain_timeout_s,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
