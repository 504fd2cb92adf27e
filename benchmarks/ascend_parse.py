"""Parse time of `npu-smi info` per call and per chip, for the largest recorded default table.

Run: .venv/bin/python benchmarks/ascend_parse.py [iterations]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from capmon.plugins.ascend import parse_npu_smi_info

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ascend"


def largest_default_table() -> Path:
    tables = [p for p in FIXTURES.glob("*.txt") if parse_npu_smi_info(p.read_text()).chips]
    return max(tables, key=lambda p: p.stat().st_size)


def main() -> None:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    path = largest_default_table()
    text = path.read_text()
    info = parse_npu_smi_info(text)
    chips = len(info.chips)
    timings = []
    for _ in range(iterations):
        started = time.perf_counter_ns()
        parse_npu_smi_info(text)
        timings.append(time.perf_counter_ns() - started)
    median_us = statistics.median(timings) / 1000
    p99_us = sorted(timings)[int(len(timings) * 0.99) - 1] / 1000
    print(f"fixture     {path.name}")
    print(f"size        {len(text)} bytes, {chips} chips, {len(info.processes)} process rows")
    print(f"iterations  {iterations}")
    print()
    print(f"{'measure':<22}{'median µs':>12}{'p99 µs':>12}")
    print(f"{'per call':<22}{median_us:>12.1f}{p99_us:>12.1f}")
    print(f"{'per chip':<22}{median_us / chips:>12.1f}{p99_us / chips:>12.1f}")


if __name__ == "__main__":
    main()
