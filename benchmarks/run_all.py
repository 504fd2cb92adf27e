"""Every capmon benchmark in one run, one combined table (`make bench`). About 6 minutes at the defaults.

Run: .venv/bin/python benchmarks/run_all.py [--quick] [--save]   (--save rewrites benchmarks/RESULTS.md)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import agent_overhead
import collector_memory
import collector_throughput
from harness import Row, load, machine, table

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="agent 15 s, collector phases 6 s")
    parser.add_argument("--save", action="store_true", help="write the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    started = time.monotonic()
    loads = [load()]
    rows: list[Row] = []
    steps = [
        ("collector memory", lambda: collector_memory.run()),
        ("agent overhead", lambda: agent_overhead.run(15.0 if args.quick else 60.0)),
        ("collector throughput", lambda: collector_throughput.run(seconds=6.0 if args.quick else 15.0)),
    ]
    for name, step in steps:
        print(f"running {name} …", file=sys.stderr, flush=True)
        rows += step()
        loads.append(load())
    about = machine()
    text = table(rows)
    elapsed = time.monotonic() - started
    print(about)
    print(f"took {elapsed:.0f} s; 1-min load average before/after each part: {' → '.join(loads)}")
    print(text)
    if args.save:
        command = ".venv/bin/python benchmarks/run_all.py" + (" --quick" if args.quick else "") + " --save"
        RESULTS.write_text(
            "# Benchmark results (latest run)\n\n"
            f"Command: `{command}` (or `make bench`, which prints without saving)\n\n"
            f"Machine: {about}\n\n"
            f"Run took {elapsed:.0f} s; 1-minute load average before/after each part: {' → '.join(loads)}. "
            "Wall-clock rates and latencies depend on everything else the machine runs; the per-core "
            "figures (device-windows per collector CPU second) much less.\n\n"
            f"{text}\n"
        )
        print(f"saved {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
