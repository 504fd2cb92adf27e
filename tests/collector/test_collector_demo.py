"""`capmon demo`: real agents on simulated devices deliver to a real collector, and the table shows them."""

from __future__ import annotations

import io

from capmon.collector.demo import default_args, run_demo


async def test_demo_shows_the_simulated_fleet_within_seconds():
    args = default_args(hosts=3, devices=4, window=1, port=0, seconds=3.5)
    out = io.StringIO()
    await run_demo(args, out)
    text = out.getvalue()
    last = text.rsplit("capmon fleet", 1)[1]
    assert "3 agents, 12 devices" in last
    # 3 hosts from mock_fleet(3, 4): the training host's 4 devices are busy ×2, idle, notebook, and so on;
    # every state the classifier produces must be visible, with idle devices listed longest first.
    assert "FREE " in last and "BUSY " in last
    assert "LONGEST IDLE" in last and "MOCK-" in last.split("LONGEST IDLE", 1)[1]
    assert "capmon demo stopped." in text
