"""Agent overhead: CPU per tick and peak RSS of a real `capmon agent run` (host probe + 8 mock devices,
1 s tick, JSON lines to /dev/null), and the cost of one `sample()` per probe.

Run: .venv/bin/python benchmarks/agent_overhead.py [--duration 60 | --quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from harness import ROOT, Row, capmon_bin, machine, stop, table

BENCH = "agent"
CPU_TARGET_PCT = 1.0
RSS_TARGET_MB = 60.0
AGENT_TOML = """
[agent]
id = "bench-agent"
output = "/dev/null"
log_level = "warning"

[probes]
enable = ["mock"]

[probes.mock]
devices = 8
"""


def _vm_hwm_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_process(duration_s: float, warmup_s: float = 3.0) -> list[Row]:
    """Start the agent, let imports and setup finish (`warmup_s`), then measure `duration_s` of ticks."""
    with tempfile.TemporaryDirectory(prefix="capmon-bench-agent-") as tmp:
        config = Path(tmp) / "agent.toml"
        config.write_text(AGENT_TOML)
        log = open(Path(tmp) / "agent.log", "wb")
        proc = subprocess.Popen(
            [capmon_bin(), "agent", "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            p = psutil.Process(proc.pid)
            time.sleep(warmup_s)
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited: {(Path(tmp) / 'agent.log').read_text()[-2000:]}")
            start_cpu = p.cpu_times()
            start = time.monotonic()
            peak_rss = p.memory_info().rss
            while time.monotonic() - start < duration_s:
                time.sleep(0.25)
                peak_rss = max(peak_rss, p.memory_info().rss)
            end_cpu = p.cpu_times()
            wall = time.monotonic() - start
            hwm = _vm_hwm_bytes(proc.pid) or peak_rss
            threads = p.num_threads()
        finally:
            stop(proc)
            log.close()
        status = proc.returncode
    cpu_s = (end_cpu.user + end_cpu.system) - (start_cpu.user + start_cpu.system)
    ticks = wall / 1.0
    cpu_pct = 100 * cpu_s / wall
    rss_mb = max(hwm, peak_rss) / 1e6
    return [
        Row(BENCH, f"CPU per 1 s tick (host + 8 mock, {wall:.0f} s)", 1000 * cpu_s / ticks, "ms"),
        Row(
            BENCH, "CPU share of one core", cpu_pct, "%", f"< {CPU_TARGET_PCT:g} %", cpu_pct < CPU_TARGET_PCT
        ),
        Row(BENCH, "peak RSS (VmHWM)", rss_mb, "MB", f"< {RSS_TARGET_MB:g} MB", rss_mb < RSS_TARGET_MB),
        Row(BENCH, f"threads at end (exit status {status})", threads, ""),
    ]


def time_calls(fn: Callable[[], object], seconds: float = 0.5, min_calls: int = 20) -> float:
    """Median seconds of one call."""
    fn()
    timings: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(timings) < min_calls:
        t = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - t)
    return statistics.median(timings)


def probe_rows() -> list[Row]:
    from capmon.plugins.ascend import AscendProbe, parse_npu_smi_info
    from capmon.plugins.ascend.probe import AscendConfig
    from capmon.plugins.host.probe import HostProbe
    from capmon.plugins.mock.probe import MockConfig, MockProbe

    rows: list[Row] = []
    mock = MockProbe(MockConfig(devices=8))
    mock.setup()
    rows.append(Row(BENCH, "mock sample(), 8 devices", 1e6 * time_calls(mock.sample), "µs"))

    host = HostProbe()
    host.setup()
    rows.append(Row(BENCH, "host sample() (psutil)", 1e6 * time_calls(host.sample), "µs"))

    fixtures = ROOT / "tests" / "fixtures" / "ascend"
    tables = [p for p in fixtures.glob("*.txt") if parse_npu_smi_info(p.read_text()).chips]
    largest = max(tables, key=lambda p: p.stat().st_size)
    text = largest.read_text()
    # The table alone: per-NPU `-t` calls are measured by benchmarks/ascend_parse.py.
    ascend = AscendProbe(AscendConfig(usages_interval_s=0), run=lambda argv, timeout_s: (0, text, ""))
    ascend.setup()
    chips = len(ascend.sample())
    rows.append(
        Row(
            BENCH,
            f"ascend sample(), {chips} chips ({largest.name[:28]}…)",
            1e6 * time_calls(ascend.sample),
            "µs",
        )
    )

    rows.extend(_nvml_rows())
    return rows


def _nvml_rows() -> list[Row]:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from fakes.fake_pynvml import FakeGpu, FakeNvml

        from capmon.plugins.nvml import NvmlConfig, NvmlProbe
    except ImportError as exc:  # pynvml is a dev extra
        return [Row(BENCH, f"nvml sample() skipped: {exc}", None, "")]
    finally:
        sys.path.remove(str(ROOT / "tests"))
    gpus = [
        FakeGpu(uuid=f"GPU-8007978{i}-2286-22f7-d75b-8f72cfce78f9", bus_id=f"00000000:{0x18 + i:02X}:00.0")
        for i in range(8)
    ]
    nvml = FakeNvml(gpus)
    probe = NvmlProbe(NvmlConfig(xid_events=False), nvml=nvml)
    probe.setup()
    try:

        def tick() -> None:
            nvml.advance(1)
            probe.sample()

        advance_only = time_calls(lambda: nvml.advance(1))
        per_call = time_calls(tick) - advance_only
    finally:
        probe.close()
    return [Row(BENCH, "nvml sample(), 8 fake H100s (fake's own cost subtracted)", 1e6 * per_call, "µs")]


def run(duration_s: float = 60.0) -> list[Row]:
    return measure_process(duration_s) + probe_rows()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of ticks measured (default 60)")
    parser.add_argument("--quick", action="store_true", help="15 s instead")
    args = parser.parse_args()
    rows = run(15.0 if args.quick else args.duration)
    print(machine())
    print(table(rows))


if __name__ == "__main__":
    main()
