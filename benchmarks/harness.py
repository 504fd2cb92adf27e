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
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, data: bytes | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


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
    """SIGTERM, then SIGKILL: every child a benchmark starts goes through here (in a finally)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Influxd:
    """InfluxDB 1.x on free loopback ports in `workdir`, configured as tests/servers.py does."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("influxd") or "/usr/bin/influxd"
        if not os.path.exists(binary):
            raise RuntimeError("influxd is not installed: apt-get install influxdb (or `make servers`)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "influxd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = workdir / "influxd.conf"
        self.config.write_text(
            f"""
reporting-disabled = true
bind-address = "127.0.0.1:{free_port()}"
[meta]
  dir = "{workdir}/meta"
[data]
  dir = "{workdir}/data"
  wal-dir = "{workdir}/wal"
  query-log-enabled = false
[coordinator]
[retention]
  enabled = false
[shard-precreation]
  enabled = false
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{self.port}"
  auth-enabled = false
  log-enabled = false
[[graphite]]
  enabled = false
[[collectd]]
  enabled = false
[[opentsdb]]
  enabled = false
[[udp]]
  enabled = false
[continuous_queries]
  enabled = false
"""
        )

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        wait_http(self.url + "/ping", self.proc, log=self.log)

    def stop(self) -> None:
        stop(self.proc)

    def query(self, q: str, db: str | None = None) -> dict:
        import json

        params = {"q": q, "epoch": "s", **({"db": db} if db else {})}
        status, body = http("POST", f"{self.url}/query", data=urllib.parse.urlencode(params).encode())
        if status != 200:
            raise RuntimeError(f"influxd {q!r}: {status} {body[:300]!r}")
        return json.loads(body)

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
