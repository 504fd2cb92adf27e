"""Collector memory: bytes per tracked device in the live fleet view (`FleetView`) at 100,000 devices.

12,500 simulated agents × 8 H100s are applied through `FleetView.apply` (the ingest path's call), then a
second window for each (the steady state: devices updated in place). Each batch is dropped after it is
applied, so what stays is what the view keeps. Measured two ways, each in a fresh interpreter:
tracemalloc (Python allocations alive after `gc.collect()`), and the RSS growth (what the OS sees,
allocator slack included).

Run: .venv/bin/python benchmarks/collector_memory.py [devices]
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time

import fleet_sim
import psutil
from harness import Row, machine, table

BENCH = "memory"
TARGET_BYTES = 2048


def fill(devices: int) -> tuple[object, int]:
    from capmon.collector.config import PricingConfig
    from capmon.collector.fleet import FleetView, Pricing

    view = FleetView(("site", "cluster", "pool"), Pricing(PricingConfig()))
    agents = devices // 8
    first_end = fleet_sim.base_end(time.time() + 6 * 86400)
    for rnd in (1, 2):
        for a in range(agents):
            view.apply(fleet_sim.batch("bench-m", a, rnd, 1, first_end))
    return view, view.device_count


def child(mode: str, devices: int) -> None:
    # Import everything and build one batch first, so the baseline holds the code, not the data.
    fill(8)
    gc.collect()
    if mode == "tracemalloc":
        import tracemalloc

        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        view, count = fill(devices)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    else:
        proc = psutil.Process()
        before = proc.memory_info().rss
        view, count = fill(devices)
        gc.collect()
        grown = proc.memory_info().rss - before
    print(json.dumps({"bytes": grown, "devices": count, "agents": len(view.by_id)}))  # type: ignore[attr-defined]


def measure(mode: str, devices: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(devices)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(devices: int = 100_000) -> list[Row]:
    rows = []
    for mode in ("tracemalloc", "rss"):
        m = measure(mode, devices)
        per = m["bytes"] / m["devices"]
        rows.append(
            Row(
                BENCH,
                f"FleetView per device, {m['devices']:,} devices / {m['agents']:,} agents ({mode})",
                per,
                "bytes",
                f"< {TARGET_BYTES}",
                per < TARGET_BYTES,
            )
        )
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
        return
    rows = run(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
    print(machine())
    print(table(rows))


if __name__ == "__main__":
    main()
