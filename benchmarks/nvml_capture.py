"""Capture what NvmlProbe reads on a real NVIDIA host, and what one sample costs next to nvidia-smi.

    PYTHONPATH=/path/to/capmon-site python benchmarks/nvml_capture.py [--out DIR] [-n 20]

Prints the probe's samples (two ticks, one interval apart) as JSON, then a table of per-sample cost
(median and p95 milliseconds) of `NvmlProbe.sample()`, `nvidia-smi -q -x` and
`nvidia-smi --query-gpu=...`, then the time each NVML function took per GPU per tick inside those
samples (which call is worth moving to the slow cadence). With `--out DIR` it also writes `nvml_probe.json` (the fixture format
read by tests/plugins/test_nvml_fixture.py), `nvidia_smi_q.xml` and `cost.txt` there.
Needs the NVIDIA driver, nvidia-ml-py and capmon importable; no network.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from capmon.agent import ProbeUnavailable
from capmon.plugins.nvml import NvmlProbe

QUERY = [
    "nvidia-smi",
    "--query-gpu=uuid,utilization.gpu,memory.used,memory.total,power.draw,temperature.gpu",
    "--format=csv,noheader,nounits",
]
XML = ["nvidia-smi", "-q", "-x"]


def as_json(sample) -> dict:
    record = dataclasses.asdict(sample)
    record["extra"] = dict(sample.extra)
    record["info"] = dict(sample.info)
    return record


def timed(fn, n: int) -> list[float]:
    fn()  # warm-up: first NVML calls and the first nvidia-smi start are not the steady state
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


class TimedNvml:
    """The real pynvml module, with the time spent in each `nvml*` function summed by name."""

    def __init__(self, module) -> None:
        self._module = module
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str):
        value = getattr(self._module, name)
        if not (name.startswith("nvml") and callable(value) and not isinstance(value, type)):
            return value

        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed_call


def run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, help="directory to write nvml_probe.json, nvidia_smi_q.xml, cost.txt"
    )
    parser.add_argument("-n", type=int, default=20, help="timed repetitions per method (default 20)")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between the two ticks (default 1)"
    )
    args = parser.parse_args()

    import pynvml

    nvml = TimedNvml(pynvml)
    probe = NvmlProbe(nvml=nvml)
    try:
        probe.setup()
    except ProbeUnavailable as exc:
        print(f"nvml probe unavailable: {exc}", file=sys.stderr)
        return 2
    try:
        first = probe.sample()
        time.sleep(args.interval)
        second = probe.sample()
        capture = {
            "captured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "python": platform.python_version(),
            "driver_version": pynvml.nvmlSystemGetDriverVersion(),
            "nvml_version": pynvml.nvmlSystemGetNVMLVersion(),
            "interval_s": args.interval,
            "ticks": [[as_json(s) for s in first], [as_json(s) for s in second]],
        }
        print(json.dumps(capture, indent=2))

        nvml.seconds.clear()
        nvml.calls.clear()
        rows = [("NvmlProbe.sample()", timed(probe.sample, args.n))]
        ticks = args.n + 1  # timed() warms up once
        per_call = dict(nvml.seconds), dict(nvml.calls)
    finally:
        probe.close()

    xml = None
    if shutil.which("nvidia-smi"):
        xml = run(XML)
        rows.append(("nvidia-smi -q -x", timed(lambda: run(XML), args.n)))
        rows.append(("nvidia-smi --query-gpu=... csv", timed(lambda: run(QUERY), args.n)))
    else:
        print("nvidia-smi not on PATH: timing the probe only", file=sys.stderr)

    gpus = sum(1 for s in second if s.parent_id is None)
    lines = [
        f"per-sample cost, {gpus} GPU(s), {len(second)} device(s), n={args.n}, driver {capture['driver_version']}",
        f"{'method':<34}{'median ms':>12}{'p95 ms':>12}",
    ]
    for name, values in rows:
        lines.append(f"{name:<34}{statistics.median(values):>12.2f}{p95(values):>12.2f}")
    seconds, calls = per_call
    lines.append("")
    lines.append(f"{'NVML function (inside sample())':<44}{'calls/GPU/tick':>16}{'us/GPU/tick':>14}")
    for name in sorted(seconds, key=seconds.get, reverse=True):
        lines.append(
            f"{name:<44}{calls[name] / ticks / gpus:>16.2f}{seconds[name] / ticks / gpus * 1e6:>14.1f}"
        )
    table = "\n".join(lines)
    print(table, file=sys.stderr)

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "nvml_probe.json").write_text(json.dumps(capture, indent=2) + "\n")
        (args.out / "cost.txt").write_text(table + "\n")
        if xml is not None:
            (args.out / "nvidia_smi_q.xml").write_text(xml)
    return 0


if __name__ == "__main__":
    sys.exit(main())
