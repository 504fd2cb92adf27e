"""Cost of the ascend probe: parse time per chip for the largest recorded default table, and the
probe's whole cost per tick on 16 NPUs with per-NPU usages on (in-process, then with real
subprocesses of a fake `npu-smi` that prints the recorded outputs).

Run: .venv/bin/python benchmarks/ascend_parse.py [iterations]
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from capmon.plugins.ascend import AscendConfig, AscendProbe, parse_npu_smi_info
from capmon.testing.npu_smi import mapping_for

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ascend"
A5 = FIXTURES / "info_a5_atlas350_doc_npu_id_header_no_processes.txt"
USAGES = FIXTURES / "info_t_usages_a5_atlas350_doc.txt"
BOARD = FIXTURES / "info_t_board_910b_v25.5.1_telegraf.txt"


def largest_default_table() -> Path:
    tables = [p for p in FIXTURES.glob("*.txt") if parse_npu_smi_info(p.read_text()).chips]
    return max(tables, key=lambda p: p.stat().st_size)


def a5_table(npus: int) -> str:
    """The Ascend 950 doc table with its one row pair repeated for `npus` NPUs."""
    lines = A5.read_text().splitlines(keepends=True)
    head, pair, tail = lines[:6], lines[6:9], lines[9:]
    rows = [re.sub(r"^\| 0 {6}", f"| {n:<6} ", pair[0]) + "".join(pair[1:]) for n in range(npus)]
    no_proc = tail[-2]
    procs = [
        no_proc.replace("NPU 0 ", f"NPU {n:<2}")[: len(no_proc) - 1].rstrip("|").rstrip() for n in range(npus)
    ]
    width = len(no_proc.rstrip("\n")) - 1
    proc_rows = [p.ljust(width) + "|\n" + tail[-1] for p in procs]
    return "".join(head + rows + tail[:-2] + proc_rows)


def timed(fn, iterations: int) -> tuple[float, float]:
    timings = []
    for _ in range(iterations):
        started = time.perf_counter_ns()
        fn()
        timings.append(time.perf_counter_ns() - started)
    timings.sort()
    return statistics.median(timings) / 1000, timings[max(0, int(len(timings) * 0.99) - 1)] / 1000


class TickClock:
    """Simulated time: each tick is `interval_s` later, so the round-robin schedule runs as deployed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def probe_tick_cost(run, iterations: int, interval_s: float = 10.0) -> tuple[float, float, float]:
    """Median and p99 µs of one `sample()`, and the calls per tick, with usages on."""
    clock = TickClock()
    calls = []

    def counting(argv, timeout_s):
        calls.append(argv)
        return run(argv, timeout_s)

    probe = AscendProbe(
        AscendConfig(interval_s=interval_s, usages_interval_s=60.0), run=counting, clock=clock
    )
    probe.setup()
    for _ in range(20):  # past the identity reads: steady state is one info + one usages call
        probe.sample()
        clock.now += interval_s
    calls.clear()

    def tick():
        probe.sample()
        clock.now += interval_s

    median, p99 = timed(tick, iterations)
    return median, p99, len(calls) / iterations


def main() -> None:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    # 16 NPUs at 10 s ticks take 160 s per usages round; the probe says so once, not in this table.
    logging.disable(logging.WARNING)
    path = largest_default_table()
    text = path.read_text()
    info = parse_npu_smi_info(text)
    chips = len(info.chips)
    median_us, p99_us = timed(lambda: parse_npu_smi_info(text), iterations)
    table16 = a5_table(16)
    assert len(parse_npu_smi_info(table16).chips) == 16
    a5_median, a5_p99 = timed(lambda: parse_npu_smi_info(table16), iterations)

    answers = {
        "info": table16,
        "usages": USAGES.read_text(),
        "board": BOARD.read_text(),
        "-m": mapping_for(table16),
    }

    def in_process(argv, timeout_s):
        if len(argv) == 2:
            return 0, answers["info"], ""
        return 0, answers[argv[2] if argv[2] == "-m" else argv[3]], ""

    inproc = probe_tick_cost(in_process, iterations)
    with tempfile.TemporaryDirectory() as tmp:
        table_path = Path(tmp) / "info.txt"
        table_path.write_text(table16)
        script = Path(tmp) / "npu-smi"
        script.write_text(
            "#!/bin/sh\n"
            f'case "$2" in -t) case "$3" in usages) cat "{USAGES}";; *) cat "{BOARD}";; esac;;'
            f' *) cat "{table_path}";; esac\n'
        )
        script.chmod(0o755)
        from capmon.agent import run_command

        real_iterations = max(20, iterations // 40)
        real = probe_tick_cost(lambda argv, t: run_command([str(script), *argv[1:]], t), real_iterations)
        info_only = timed(lambda: run_command([str(script), "info"], 5.0), real_iterations)

    print(f"fixture     {path.name}")
    print(f"size        {len(text)} bytes, {chips} chips, {len(info.processes)} process rows")
    print(f"iterations  {iterations} (subprocess rows: {real_iterations})")
    print(f"cpu         {os.cpu_count()} cores")
    print()
    print(f"{'measure':<58}{'median µs':>12}{'p99 µs':>12}{'calls/tick':>12}")
    print(f"{'parse, largest recorded table, per call':<58}{median_us:>12.1f}{p99_us:>12.1f}")
    print(f"{'parse, largest recorded table, per chip':<58}{median_us / chips:>12.1f}{p99_us / chips:>12.1f}")
    print(f"{'parse, 16-NPU Ascend 950 table, per call':<58}{a5_median:>12.1f}{a5_p99:>12.1f}")
    print(f"{'parse, 16-NPU Ascend 950 table, per chip':<58}{a5_median / 16:>12.1f}{a5_p99 / 16:>12.1f}")
    print(
        f"{'probe tick, 16 NPUs, usages on, in-process runner':<58}{inproc[0]:>12.1f}{inproc[1]:>12.1f}{inproc[2]:>12.2f}"
    )
    print(
        f"{'probe tick, 16 NPUs, usages on, real subprocesses':<58}{real[0]:>12.1f}{real[1]:>12.1f}{real[2]:>12.2f}"
    )
    print(
        f"{'one subprocess (fake npu-smi info), for comparison':<58}{info_only[0]:>12.1f}{info_only[1]:>12.1f}"
    )
    print()
    print("A real npu-smi call costs far more than the fake's (tens to hundreds of ms in DCMI); the")
    print("point of the table is the call count: one `npu-smi info` + at most one `-t` call per tick.")


if __name__ == "__main__":
    main()
