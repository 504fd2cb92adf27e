"""What the benchmarks share: result rows and the table, the machine's description, an `influxd` on
loopback in a temp dir, and child processes that are always stopped.

Benchmarks print numbers; they never assert them (STYLE.md: speed is measured, not tested).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
# The one influxd launcher and loopback helpers, shared with the integration tests.
from servers import InfluxdServer, stop_process
from servers import _http as http
from servers import free_port as free_port  # re-exported for the benchmark scripts

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Row:
    """One measured number; `target` is a human string and `met` None when there is no target."""

    bench: str
    measure: str
    value: float | None
    unit: str
    target: str = ""
    met: bool | None = None

    def cells(self) -> list[str]:
        if self.value is None:
            value = "n/a"
        elif abs(self.value) >= 1000:
            value = f"{self.value:,.0f}"
        elif abs(self.value) >= 10:
            value = f"{self.value:.1f}"
        else:
            value = f"{self.value:.3g}"
        met = "" if self.met is None else ("yes" if self.met else "NO")
        return [self.bench, self.measure, value, self.unit, self.target, met]


def table(rows: Sequence[Row]) -> str:
    """A Markdown table, readable as plain text too."""
    head = ["benchmark", "measure", "value", "unit", "target", "met"]
    body = [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in [head, *body]) for i in range(len(head))]
    right = {2}

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=False))
            )
            + " |"
        )

    sep = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(head), sep, *(line(c) for c in body)])


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return (
        f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {cpu}, {mem_gb:.0f} GB RAM, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average {load()}"
    )


def load() -> str:
    """The 1-minute load average: other work on the machine skews every wall-clock number."""
    return f"{os.getloadavg()[0]:.1f}"


def wait_http(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0, log: Path | None = None
) -> None:
    """Wait until `url` answers < 500; fail early when `proc` has died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {tail}")
        with contextlib.suppress(OSError):
            status, _ = http("GET", url, timeout=1.0)
            if status < 500:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """Every child a benchmark starts is stopped through here (in a finally)."""
    stop_process(proc, timeout)


class Influxd(InfluxdServer):
    """InfluxDB 1.x on free loopback ports in `workdir` (tests/servers.py's launcher)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("influxd") or "/usr/bin/influxd"
        if not os.path.exists(binary):
            raise RuntimeError("influxd is not installed: apt-get install influxdb (or `make servers`)")
        super().__init__(workdir, binary)

    def query(self, q: str, db: str | None = None, method: str = "POST") -> dict:
        return super().query(q, db, method)

    def count(self, db: str, measurement: str, field: str) -> int:
        result = self.query(f'SELECT count("{field}") FROM "{measurement}"', db)["results"][0]
        series = result.get("series")
        return int(series[0]["values"][0][1]) if series else 0


@contextlib.contextmanager
def influxd(workdir: Path) -> Iterator[Influxd]:
    server = Influxd(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def capmon_bin() -> str:
    path = VENV_BIN / "capmon"
    return str(path) if path.exists() else (shutil.which("capmon") or "capmon")
