"""`capmon demo`'s simulated fleet has a scheduler: pods and Slurm jobs holding idle devices (issue 13)."""

from __future__ import annotations

import io

from capmon.collector.demo import MockAllocations, default_args, run_demo
from capmon.plugins.mock import MockProbe, mock_fleet


def test_the_mock_scheduler_allocates_idle_devices_and_names_the_running_pods_and_jobs():
    for host in mock_fleet(3, 8):
        probe = MockProbe(host.config)
        allocations = MockAllocations(probe, since=1_700_000_000).allocations()
        ids = {a.device_id for a in allocations}
        idle = [
            f"MOCK-{host.config.host_index:03d}-{i:02d}"
            for i, p in enumerate(host.config.profiles)
            if p == "idle"
        ]
        if len(idle) >= 2:
            assert set(idle) & ids and set(idle) - ids  # some idle devices given away, some truly free
        assert all(a.pod or a.job_id for a in allocations)


async def test_the_demo_shows_pods_and_jobs_holding_idle_devices():
    args = default_args(hosts=3, devices=8, window=1, port=0, seconds=3.5)
    out = io.StringIO()
    await run_demo(args, out)
    last = out.getvalue().rsplit("capmon fleet", 1)[1]
    table = last.split("ALLOCATED IDLE BY", 1)[1]
    rows = [line.split() for line in table.splitlines()[1:] if line.strip()]
    assert any(r[0] == "pod" and r[1].startswith("research/notebook-") for r in rows)
    assert any(r[0] == "job" and r[1].isdigit() for r in rows)
