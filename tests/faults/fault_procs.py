"""Real `capmon agent run` and `capmon collector run` processes for the fault tests, and the tally of what
reached InfluxDB.

Every process runs in its own session (process group), logs to a file in the test's temp dir, and is
killed with its group at teardown (`ProcessSet.kill_all`), so a failing test leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from servers import InfluxdServer, free_port

from capmon.collector.config import hash_token

AGENT_TOKEN = "fault-agent-token-4c1e9b"
READ_TOKEN = "fault-read-token-77d2aa"
CAPMON = str(Path(sys.executable).with_name("capmon"))


def wait_until(what: str, check: Callable[[], object], timeout: float, every: float = 0.2) -> object:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


class _Child:
    """One capmon subprocess in its own process group, with its output in `log_path`."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def spawn(self) -> None:
        assert not self.running, f"{self.name} is already running"
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {time.time():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> float:
        """SIGKILL the process group; returns the wall-clock time of the kill."""
        assert self.proc is not None
        t = time.time()
        _killpg(self.proc)
        self.proc.wait(10)
        return t

    def terminate(self, timeout: float) -> int:
        """SIGTERM, wait up to `timeout` s for a graceful exit; the exit status (SIGKILLed past it)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _killpg(self.proc)
            self.proc.wait(10)
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s of SIGTERM: {self.log_tail()}"
            ) from None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log()[-n:]


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class CollectorProc(_Child):
    """`capmon collector run` on a fixed loopback port (kept across restarts) writing to influxd."""

    def __init__(self, workdir: Path, influxd: InfluxdServer, db: str, **storage: object) -> None:
        super().__init__("collector", workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ingest_url = self.url + "/api/v1/reports"
        self.influxd = influxd
        self.db = db
        self.config_path = workdir / "collector.toml"
        self.configure(**storage)

    def configure(self, **storage: object) -> None:
        """(Re)write the config, `[storage]` options on top of fast test defaults; used at the next start."""
        options = {"flush_interval_s": 0.05, "retry_after_s": 1, "timeout_s": 5.0, **storage}
        extra = "\n".join(f"{k} = {v!r}" for k, v in options.items())
        self.config_path.write_text(
            f"""
[collector]
host = "127.0.0.1"
port = {self.port}
drain_timeout_s = 5.0
[auth]
agent_tokens = [{{ name = "faults", sha256 = "{hash_token(AGENT_TOKEN)}", agents = ["fault-*"] }}]
read_tokens = [{{ name = "test", sha256 = "{hash_token(READ_TOKEN)}" }}]
[storage]
kind = "influxdb_v1"
url = "{self.influxd.url}"
db = "{self.db}"
create_database = true
{extra}
"""
        )

    def argv(self) -> list[str]:
        return [CAPMON, "collector", "run", "--config", str(self.config_path)]

    def start(self, timeout: float = 20.0) -> None:
        self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise AssertionError(f"collector exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"collector not healthy within {timeout}s: {self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        """`/metrics` as {'name{labels}': value}; {} when the collector does not answer."""
        req = urllib.request.Request(self.url + "/metrics", headers={"Authorization": f"Bearer {READ_TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                text = resp.read().decode()
        except (OSError, urllib.error.URLError):
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


class AgentProc(_Child):
    """`capmon agent run` on the mock probe, delivering to `ingest_url` through its own spool."""

    def __init__(
        self,
        workdir: Path,
        index: int,
        ingest_url: str,
        *,
        devices: int = 8,
        max_bytes: int = 64 * 1024 * 1024,
        batch_reports: int = 100,
        timeout_s: float = 5.0,
        window_s: int = 1,
        spool_dir: Path | None = None,
        clock_offset_s: float = 0.0,
    ) -> None:
        self.agent_id = f"fault-{index}"
        super().__init__(self.agent_id, workdir)
        self.spool_dir = spool_dir or workdir / f"spool-{index}"
        self.max_bytes = max_bytes
        self.window_s = window_s
        self.clock_offset_s = clock_offset_s
        self.config_path = workdir / f"{self.agent_id}.toml"
        self.config_path.write_text(
            f"""
[agent]
id = "{self.agent_id}"
host = "fault-host-{index}"
window_s = {window_s}
shutdown_timeout_s = 10.0
[transport]
url = "{ingest_url}"
token = "{AGENT_TOKEN}"
timeout_s = {timeout_s}
backoff_min_s = 0.2
backoff_max_s = 1.0
batch_reports = {batch_reports}
[spool]
path = "{self.spool_dir}"
max_bytes = {max_bytes}
[probes]
enable = ["mock"]
disable = ["host"]
[probes.mock]
devices = {devices}
host_index = {index}
interval_s = 0.2
"""
        )
        self.starts = 0

    def argv(self) -> list[str]:
        if self.clock_offset_s:
            # The agent's own clock off by this much: time.time is replaced before capmon is imported,
            # so every default `clock=time.time` is the skewed one.
            code = (
                "import sys, time; real = time.time; "
                f"time.time = lambda: real() + {self.clock_offset_s!r}; "
                "from capmon.agent.cli import main; sys.exit(main(sys.argv[1:]))"
            )
            return [sys.executable, "-c", code, "agent", "run", "--config", str(self.config_path)]
        return [CAPMON, "agent", "run", "--config", str(self.config_path)]

    def start(self, timeout: float = 20.0) -> None:
        """Start and wait until the spool is open (the agent logged its instance)."""
        self.starts += 1
        self.spawn()
        wait_until(
            f"{self.name} to open its spool ({self.log_tail()})",
            lambda: len(self.instances()) >= self.starts or not self.running,
            timeout,
            every=0.05,
        )
        assert self.running, f"{self.name} exited at start: {self.log_tail()}"

    def instances(self) -> list[str]:
        """The spool instance each start logged, in order."""
        return re.findall(r"instance ([0-9a-f]{32}), last seq", self.log())

    def logged_last_seqs(self) -> list[int]:
        """The `last seq` each start found in its spool."""
        return [int(s) for s in re.findall(r"instance [0-9a-f]{32}, last seq (\d+)", self.log())]

    def waiting_now(self) -> set[int]:
        """Seqs the running agent's spool holds (a read-only WAL reader beside the agent)."""
        db = sqlite3.connect(f"file:{self.spool_dir / 'spool.db'}?mode=ro", uri=True)
        try:
            return {seq for (seq,) in db.execute("SELECT seq FROM reports")}
        finally:
            db.close()

    def spool(self) -> SpoolState:
        """What the spool holds, read through SQLite's own recovery; only while the agent is not running."""
        assert not self.running, "the agent holds its spool"
        db = sqlite3.connect(self.spool_dir / "spool.db", isolation_level=None)
        try:
            assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
            meta = dict(db.execute("SELECT key, value FROM meta"))
            waiting = [seq for (seq,) in db.execute("SELECT seq FROM reports ORDER BY seq")]
            report_bytes = db.execute("SELECT coalesce(sum(size), 0) FROM reports").fetchone()[0]
        finally:
            db.close()
        return SpoolState(
            instance=meta["instance"],
            last_seq=meta["last_seq"],
            dropped=meta["dropped"],
            lost=meta.get("lost", 0),
            dead_lettered=meta["dead_lettered"],
            waiting=waiting,
            report_bytes=report_bytes,
            corrupt_files=sorted(p.name for p in self.spool_dir.glob("spool.db.corrupt-*")),
        )


@dataclass(frozen=True)
class SpoolState:
    instance: str
    last_seq: int
    dropped: int
    lost: int
    dead_lettered: int
    waiting: list[int]
    report_bytes: int
    corrupt_files: list[str]


@dataclass
class Landed:
    """What InfluxDB holds for one agent: its `capmon_agent` report points and `capmon_device` points."""

    agent_id: str
    seq_at: dict[int, int] = field(default_factory=dict)  # seq → timestamp (s)
    seq_rows: int = 0  # capmon_agent points (one per stored report timestamp)
    dropped_reported: int = 0  # dropped_reports in the newest point
    lost_reported: int | None = None  # lost_windows in the newest point (None: the store has no such field)
    window_s_at: dict[int, float] = field(default_factory=dict)  # timestamp → window_s of the point
    devices_expected: int = 0  # Σ `devices` over the report points
    device_points: int = 0
    device_times_outside: int = 0  # capmon_device timestamps without a report point

    @property
    def seqs(self) -> list[int]:
        return sorted(self.seq_at)

    @property
    def max_seq(self) -> int:
        return max(self.seq_at, default=0)

    def missing(self, upto: int) -> list[int]:
        return [s for s in range(1, upto + 1) if s not in self.seq_at]

    @property
    def seqs_at_two_times(self) -> int:
        """Reports stored at more than one timestamp (a resend that was not idempotent)."""
        return self.seq_rows - len(self.seq_at)


def landed(influxd: InfluxdServer, db: str, agent_id: str) -> Landed:
    out = Landed(agent_id)
    rows = influxd.rows(
        "SELECT seq, devices, dropped_reports, lost_windows, window_s FROM capmon_agent"
        f" WHERE probe = '' AND agent = '{agent_id}'",
        db,
    )
    out.seq_rows = len(rows)
    for row in rows:
        out.seq_at[int(row["seq"])] = int(row["time"])
        out.window_s_at[int(row["time"])] = row["window_s"]
        out.devices_expected += int(row["devices"] or 0)
    if rows:
        newest = max(rows, key=lambda r: r["time"])
        out.dropped_reported = int(newest["dropped_reports"] or 0)
        lost = [r["lost_windows"] for r in rows if r.get("lost_windows") is not None]
        out.lost_reported = int(newest.get("lost_windows") or 0) if lost else None
    times = set(out.seq_at.values())
    device_rows = influxd.rows(f"SELECT window_s FROM capmon_device WHERE agent = '{agent_id}'", db)
    out.device_points = len(device_rows)
    out.device_times_outside = sum(1 for r in device_rows if int(r["time"]) not in times)
    return out


def caught_up(influxd: InfluxdServer, db: str, agents: Iterable[AgentProc], lag_s: float = 3.0) -> bool:
    """Has every agent's newest window reached InfluxDB (its backlog is delivered)?"""
    now = time.time()
    for agent in agents:
        rows = influxd.rows(
            f"SELECT last(seq) FROM capmon_agent WHERE probe = '' AND agent = '{agent.agent_id}'", db
        )
        if not rows or rows[0]["time"] < now - lag_s:
            return False
    return True


class ProcessSet:
    """Every child a test started; `kill_all()` at teardown kills each one's process group."""

    def __init__(self) -> None:
        self.children: list[_Child] = []

    def add(self, child: _Child) -> _Child:
        self.children.append(child)
        return child

    def kill_all(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                _killpg(child.proc)
                child.proc.wait(10)
