"""Live view bounds (issue 11 item 12): what one agent sending a unique model name per window costs.

88,001 windows from one agent, each with one device under a new model name, are applied through
`FleetView.apply`; then 100,000 refusals under distinct agent ids through `FleetView.record_refusal`.
Measured: Python allocations alive afterwards (tracemalloc, after `gc.collect()`), the size of
`GET /api/v1/fleet`'s JSON and the time to build it.

Run: .venv/bin/python benchmarks/fleet_bounds.py [windows]
"""

from __future__ import annotations

import gc
import json
import sys
import time
import tracemalloc

from harness import Row, machine, table

from capmon.agent import wire

BENCH = "fleet_bounds"
NOW = 1_760_000_000


def models_memory(windows: int) -> tuple[object, int]:
    """(view, bytes kept) after `windows` windows from one agent, each under a new model name."""
    from capmon.collector.config import PricingConfig
    from capmon.collector.fleet import FleetView, Pricing

    view = FleetView(("site",), Pricing(PricingConfig(models={"H100": 2.5})), clock=lambda: NOW + windows)
    ident = wire.AgentIdentity(id="node-1", host="h", window_s=60, labels={"site": "fra1"})
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(windows):
        d = wire.DeviceWindow(
            device_id="GPU-0", vendor="nvidia", model=f"model-{i:06d}", state="free", free_s=1.0
        )
        view.apply(
            wire.Batch(
                agent=ident, reports=[wire.Report(seq=i + 1, start=NOW + i, end=NOW + i + 1, devices=[d])]
            )
        )
    gc.collect()
    models_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return view, models_bytes


def run(windows: int = 88_001) -> list[Row]:
    # Twice the windows first: what the view keeps must not grow with them.
    _, double_bytes = models_memory(2 * windows)
    view, models_bytes = models_memory(windows)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for a in range(100_000):
        view.record_refusal(f"ghost-{a:06d}", "forbidden", "this token may not write as this agent id", NOW)
    gc.collect()
    refusal_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    t = time.perf_counter()
    size = len(json.dumps(view.summary()))  # type: ignore[attr-defined]
    summary_ms = (time.perf_counter() - t) * 1000
    return [
        Row(
            BENCH,
            f"memory kept after {windows:,} unique models from one agent",
            models_bytes / 1024,
            "KiB",
            "< 4096",
            models_bytes < 4 * 2**20,
        ),
        Row(
            BENCH,
            f"memory kept after {2 * windows:,} unique models from one agent",
            double_bytes / 1024,
            "KiB",
            "< 1.5x the row above",
            double_bytes < 1.5 * models_bytes,
        ),
        Row(
            BENCH,
            "memory kept after 100,000 refusals under distinct agent ids",
            refusal_bytes / 1024,
            "KiB",
            "< 4096",
            refusal_bytes < 4 * 2**20,
        ),
        Row(BENCH, "/api/v1/fleet JSON size", size / 1024, "KiB", "< 100", size < 100 * 1024),
        Row(BENCH, "/api/v1/fleet build time", summary_ms, "ms"),
    ]


def main() -> None:
    rows = run(int(sys.argv[1]) if len(sys.argv) > 1 else 88_001)
    print(machine())
    print(table(rows))


if __name__ == "__main__":
    main()
