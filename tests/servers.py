"""Real storage servers for integration tests: `influxd` (InfluxDB 1.x), `victoria-metrics` and
`prometheus` (Debian's 2.42, with the remote-write receiver).

Each starts the installed binary on free loopback ports in a temp dir, waits until it answers its
health endpoint, and stops it at teardown (terminate, then kill). A missing binary skips the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

__all__ = [
    "InfluxdServer",
    "PrometheusServer",
    "VictoriaMetricsServer",
    "influxd",
    "influxd_small_tags",
    "prometheus",
    "victoria_metrics",
]

_INSTALL_HINT = "apt-get install influxdb victoria-metrics prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, data: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`: how every server and child process here is stopped."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _find(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/bin/{binary}" if os.path.exists(f"/usr/bin/{binary}") else None)
    if path is None:
        pytest.skip(f"{binary} is not installed: {_INSTALL_HINT}")
    return path


class _Process:
    """A server binary run in the background; `start()`/`stop()` may be called repeatedly."""

    name = "server"
    health_path = "/health"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                status, _ = _http("GET", self.url + self.health_path, timeout=1.0)
                if status < 300:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not become healthy in {timeout}s: {self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class InfluxdServer(_Process):
    """InfluxDB 1.x (`influxd`): the HTTP API on one free port, the RPC (backup) service on another."""

    name = "influxd"
    health_path = "/ping"

    def __init__(self, workdir: Path, binary: str, max_values_per_tag: int = 100_000) -> None:
        super().__init__(workdir)
        self.binary = binary
        self.rpc_port = free_port()
        self.config_path = workdir / "influxd.conf"
        self.config_path.write_text(
            f"""
reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"
[meta]
  dir = "{workdir}/meta"
[data]
  dir = "{workdir}/data"
  wal-dir = "{workdir}/wal"
  query-log-enabled = false
  max-values-per-tag = {max_values_per_tag}
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

    def command(self) -> list[str]:
        return [self.binary, "-config", str(self.config_path)]

    def query(self, q: str, db: str | None = None, method: str = "GET") -> dict:
        params = {"q": q, "epoch": "s"}
        if db:
            params["db"] = db
        qs = urllib.parse.urlencode(params)
        if method == "POST":
            status, body = _http("POST", f"{self.url}/query", data=qs.encode())
        else:
            status, body = _http("GET", f"{self.url}/query?{qs}")
        if status != 200:
            raise RuntimeError(f"influxd query {q!r}: {status} {body[:500]!r}")
        return json.loads(body)

    def create_database(self, db: str) -> None:
        self.query(f'CREATE DATABASE "{db}"', method="POST")

    def rows(self, q: str, db: str) -> list[dict]:
        """Run InfluxQL; every series' rows as dicts (column → value), tags merged in."""
        out: list[dict] = []
        for result in self.query(q, db).get("results", []):
            if "error" in result:
                raise RuntimeError(result["error"])
            for series in result.get("series", []):
                tags = series.get("tags", {})
                for values in series["values"]:
                    row = dict(zip(series["columns"], values, strict=True))
                    row.update(tags)
                    row["_measurement"] = series.get("name")
                    out.append(row)
        return out

    def field_types(self, db: str, measurement: str) -> dict[str, str]:
        rows = self.rows(f'SHOW FIELD KEYS FROM "{measurement}"', db)
        return {r["fieldKey"]: r["fieldType"] for r in rows}

    def write(self, db: str, lines: str) -> tuple[int, bytes]:
        return _http("POST", f"{self.url}/write?db={db}&precision=s", data=lines.encode())


class VictoriaMetricsServer(_Process):
    """VictoriaMetrics single node: accepts InfluxDB line protocol on /write and /api/v2/write."""

    name = "victoria-metrics"
    health_path = "/health"

    def __init__(self, workdir: Path, binary: str) -> None:
        super().__init__(workdir)
        self.binary = binary

    def command(self) -> list[str]:
        return [
            self.binary,
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.workdir}/data",
            "-loggerLevel=ERROR",
            "-search.latencyOffset=0s",
            "-search.disableCache",
        ]

    @property
    def remote_write_url(self) -> str:
        """Prometheus remote write (snappy protobuf) into VictoriaMetrics."""
        return f"{self.url}/api/v1/write"

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """A PromQL (MetricsQL) instant query: [{"metric": {...}, "value": [ts, "v"]}, ...]."""
        self.flush()
        params = {"query": promql}
        if at is not None:
            params["time"] = str(at)
        status, body = _http("GET", f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        if status != 200:
            raise RuntimeError(f"victoria-metrics query {promql!r}: {status} {body[:500]!r}")
        return json.loads(body)["data"]["result"]

    def flush(self) -> None:
        """Make just-written samples visible to queries (`/internal/force_flush`)."""
        _http("GET", f"{self.url}/internal/force_flush")

    def export(self, match: str = '{__name__=~".+"}') -> list[dict]:
        """Series read back via `/api/v1/export`: [{"metric": {...}, "values": [...], "timestamps": [...]}]."""
        self.flush()
        qs = urllib.parse.urlencode({"match[]": match, "start": "0"})
        status, body = _http("GET", f"{self.url}/api/v1/export?{qs}")
        if status != 200:
            raise RuntimeError(f"victoria-metrics export: {status} {body[:500]!r}")
        return [json.loads(line) for line in body.splitlines() if line.strip()]


class PrometheusServer(_Process):
    """Prometheus with `--web.enable-remote-write-receiver` (POST /api/v1/write) and a reloadable
    scrape config (`scrape()`), queried with PromQL through the HTTP API (`query()`)."""

    name = "prometheus"
    health_path = "/-/ready"

    def __init__(self, workdir: Path, binary: str) -> None:
        super().__init__(workdir)
        self.binary = binary
        self.config_path = workdir / "prometheus.yml"
        self.remote_write_url = f"{self.url}/api/v1/write"
        self.write_config([])

    def write_config(self, targets: list[str], interval_s: float = 1.0) -> None:
        scrape = ""
        if targets:
            listed = ", ".join(f'"{t}"' for t in targets)
            scrape = f"""
scrape_configs:
  - job_name: capmon-agent
    scrape_interval: {int(interval_s * 1000)}ms
    static_configs:
      - targets: [{listed}]
"""
        self.config_path.write_text(f"global:\n  scrape_interval: {int(interval_s * 1000)}ms\n{scrape}")

    def command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir}/data",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-remote-write-receiver",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]

    def scrape(self, targets: list[str], interval_s: float = 1.0) -> None:
        """Scrape `targets` ("host:port", path /metrics) from now on (config reload, no restart)."""
        self.write_config(targets, interval_s)
        status, body = _http("POST", f"{self.url}/-/reload", data=b"")
        if status != 200:
            raise RuntimeError(f"prometheus reload: {status} {body[:500]!r}")

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """An instant query: [{"metric": {...}, "value": [ts, "v"]}, ...]."""
        params = {"query": promql}
        if at is not None:
            params["time"] = str(at)
        status, body = _http("GET", f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            raise RuntimeError(f"prometheus query {promql!r}: {status} {body[:500]!r}")
        return data["data"]["result"]

    def values(self, promql: str, at: float | None = None, by: str = "device") -> dict[str, float]:
        """An instant query's values keyed by one label."""
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in self.query(promql, at)}

    def wait_for(self, promql: str, timeout: float = 30.0, at: float | None = None) -> list[dict]:
        """Poll until the query returns something (a scrape has landed); raises after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql, at)
            if result:
                return result
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus: no result for {promql!r} in {timeout}s: {self.log_tail()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory):
    """A running Prometheus 2.x: remote-write receiver at `.remote_write_url`, `scrape()`, `query()`."""
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), _find("prometheus"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def influxd(tmp_path_factory: pytest.TempPathFactory):
    """A running InfluxDB 1.x; the object can `stop()`, `start()` and `restart()` on the same data dir."""
    server = InfluxdServer(tmp_path_factory.mktemp("influxd"), _find("influxd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def influxd_small_tags(tmp_path_factory: pytest.TempPathFactory):
    """InfluxDB 1.x with `max-values-per-tag = 20`: a store whose series one agent could exhaust."""
    server = InfluxdServer(tmp_path_factory.mktemp("influxd-small"), _find("influxd"), max_values_per_tag=20)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def victoria_metrics(tmp_path_factory: pytest.TempPathFactory):
    server = VictoriaMetricsServer(tmp_path_factory.mktemp("victoria-metrics"), _find("victoria-metrics"))
    server.start()
    yield server
    server.stop()
