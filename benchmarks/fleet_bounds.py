"""Live view bounds (issue 11 item 12): what one agent sending a unique model name per window costs.

88,001 windows from one agent, each with one device under a new model name, are applied through
`FleetView.apply`; then 100,000 refusals under distinct agent ids through `FleetView.record_refusal`.
Measured: Python allocations alive afterwards (tracemalloc, after `gc.collect()`), the size of
`GET /api/v1/fleet`'s JSON and the time to build it.

Fleet-wide bound (the reviewer's shape): one request per new agent id (one `agents = ["*"]` token),
each 2000 devices x 32 holders with unique strings (11 MiB of JSON decoded), applied through
`FleetView.apply`: memory kept after each agent, which must stop growing at the view's bound of holder
records; and one agent that lists 2000 other devices in its next window (the first 2000 become "no
longer reported" and must not keep their holders).

Run: .venv/bin/python benchmarks/fleet_bounds.py [windows] [agents]
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


def reviewer_batch(agent: int, first_device: int = 0) -> bytes:
    """2000 devices x 32 holders, every string unique, as the JSON an agent sends."""
    devices = []
    for i in range(first_device, first_device + 2000):
        holders = [
            {
                "pid": j + 1,
                "user": f"user-{agent}-{i}-{j}-xxxxxxxx",
                "command": f"cmd-{agent}-{i}-{j}-yyyyy",
                "namespace": f"ns-{agent}-{i}-{j}",
                "pod": f"pod-{agent}-{i}-{j}-zzzzzzzzzzzz",
                "container": f"ctr-{agent}-{i}-{j}",
                "held_s": 60.0,
            }
            for j in range(32)
        ]
        devices.append(
            {
                "device_id": f"GPU-{agent}-{i}",
                "vendor": "nvidia",
                "model": "NVIDIA H100 80GB HBM3",
                "state": "allocated_idle",
                "allocated_idle_s": 60.0,
                "holders": holders,
            }
        )
    end = NOW + first_device
    report = {"seq": 1 + first_device, "start": end - 60, "end": end, "devices": devices}
    body = {
        "protocol": 1,
        "agent": {"id": f"ghost-{agent:04d}", "host": "h", "version": "1"},
        "reports": [report],
    }
    return json.dumps(body).encode()


def fleet_memory(agents: int) -> list[Row]:
    """Memory the view keeps after each new agent id's request of the reviewer's shape."""
    import msgspec

    from capmon.collector import fleet
    from capmon.collector.config import PricingConfig

    view = fleet.FleetView(("site",), fleet.Pricing(PricingConfig(default=1.0)), clock=lambda: NOW + 10_000)
    bound = getattr(fleet, "MAX_VIEW_HOLDERS", None)
    rows = []
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for a in range(agents):
        raw = reviewer_batch(a)
        view.apply(msgspec.json.decode(raw, type=wire.Batch))
        del raw
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
        in_view = sum(1 for _ in view.by_id)
        rows.append(
            Row(
                BENCH,
                f"memory kept after {a + 1} new agent ids (2000 devices x 32 holders each); in view: {in_view}",
                kept / 2**20,
                "MiB",
            )
        )
    last_growth = rows[-1].value - rows[-2].value if len(rows) > 1 else None
    rows.append(
        Row(
            BENCH,
            f"growth from the last agent id (bound: {bound} holder records)",
            last_growth,
            "MiB",
            "< 1",
            last_growth is not None and last_growth < 1,
        )
    )
    tracemalloc.stop()
    del view
    gc.collect()
    # One agent whose next window lists 2000 other devices: the first 2000 are "no longer reported".
    view = fleet.FleetView(("site",), fleet.Pricing(PricingConfig(default=1.0)), clock=lambda: NOW + 10_000)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    view.apply(msgspec.json.decode(reviewer_batch(0), type=wire.Batch))
    gc.collect()
    one = tracemalloc.get_traced_memory()[0] - before
    view.apply(msgspec.json.decode(reviewer_batch(0, first_device=2000), type=wire.Batch))
    gc.collect()
    two = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    rows.append(Row(BENCH, "one agent, 2000 devices x 32 holders", one / 2**20, "MiB"))
    rows.append(
        Row(
            BENCH,
            # What remains above the first row is the interpreter's table of interned names at its
            # high-water mark (64,000 x 3 unique names), not the missing devices.
            "the same agent, next window 2000 other devices (2000 of them missing)",
            two / 2**20,
            "MiB",
            "< 1.5x the row above (2x: missing devices' holders kept)",
            two < 1.5 * one,
        )
    )
    return rows


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
    rows += fleet_memory(int(sys.argv[2]) if len(sys.argv) > 2 else 10)
    print(machine())
    print(table(rows))


if __name__ == "__main__":
    main()
