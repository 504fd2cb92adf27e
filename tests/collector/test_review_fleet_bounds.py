"""The live view's fleet-wide bound (review of issue 11 item 12): agents, devices and holder records.

A reviewer filled a collector's memory with one `agents = ["*"]` token: each new agent id's report of
2000 devices × 32 holders was kept whole, with no bound over agents. Beyond the bound a report is
still stored, but kept out of the live view and said so in `GET /api/v1/agents`.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from collector_helpers import (
    JSON,
    NOW,
    RACK_TOKEN,
    READ_TOKEN,
    Clock,
    RecordingWriter,
    auth,
    body,
    make_config,
)
from collector_helpers import batch as batch_payload
from collector_helpers import device as device_payload
from collector_helpers import report as report_payload

from capmon.agent import wire
from capmon.collector.app import create_app
from capmon.collector.config import PricingConfig
from capmon.collector.fleet import FleetView, Pricing


def holder(pid: int, **kw: Any) -> dict[str, Any]:
    return {"pid": pid, "user": f"user-{pid}", "command": "python3", "held_s": 60.0, **kw}


def devices(n: int, holders: int = 0, prefix: str = "GPU") -> list[dict[str, Any]]:
    return [
        device_payload(
            f"{prefix}-{i}", "allocated_idle", holders=[holder(i * 100 + j) for j in range(holders)]
        )
        for i in range(n)
    ]


def send(view: FleetView, agent_id: str, devs: list[dict[str, Any]], end: int = NOW) -> tuple[int, int]:
    payload = batch_payload(
        [report_payload(end=end, devices=devs)], agent_id=agent_id, host=f"{agent_id}-host"
    )
    return view.apply(msgspec.convert(payload, wire.Batch))


def make_view(clock: Clock, **bounds: int) -> FleetView:
    return FleetView(
        ("site",), Pricing(PricingConfig(default=1.0)), clock=clock, forget_after_s=3600, **bounds
    )


def row(view: FleetView, agent_id: str) -> dict[str, Any]:
    return next(a for a in view.agents() if a["id"] == agent_id)


def kept(view: FleetView) -> tuple[int, int, int]:
    """What the view keeps: devices, holder records, counted from the devices themselves."""
    devs = [d for a in view.by_id.values() for d in a.devices.values()]
    return len(view.by_id), len(devs), sum(len(d.holders or ()) for d in devs)


def test_a_new_agent_beyond_the_device_bound_is_kept_out_and_listed():
    clock = Clock(NOW + 1)
    view = make_view(clock, max_devices=10)
    assert send(view, "rack2-a", devices(8)) == (1, 0)
    assert send(view, "rack2-b", devices(4)) == (0, 0)
    assert view.summary()["totals"]["devices"] == 8 and kept(view) == (1, 8, 0)
    assert view.kept_out_reports == 1
    b = row(view, "rack2-b")
    assert b["live_view"] == "not in the live view: fleet bound (10 devices)"
    assert b["host"] == "rack2-b-host" and b["devices"] == 4 and b["kept_out_reports"] == 1
    assert row(view, "rack2-a")["live_view"] is None
    # Once room is made (rack2-a forgotten), rack2-b's next report is in the view again.
    clock.advance(3601)
    assert send(view, "rack2-b", devices(4), end=NOW + 3600) == (1, 0)
    assert kept(view) == (1, 4, 0) and row(view, "rack2-b")["live_view"] is None


def test_holder_records_are_bounded_fleet_wide():
    view = make_view(Clock(NOW + 1), max_holders=100)
    assert send(view, "rack2-a", devices(2, holders=32)) == (1, 0)
    assert send(view, "rack2-b", devices(2, holders=32)) == (0, 0)
    assert kept(view) == (1, 2, 64) and view.holder_total == 64
    assert "100 holder records" in row(view, "rack2-b")["live_view"]


def test_agents_are_bounded_even_with_no_devices():
    view = make_view(Clock(NOW + 1), max_agents=2)
    for name in ("rack2-a", "rack2-b", "rack2-c"):
        send(view, name, [])
    assert sorted(view.by_id) == ["rack2-a", "rack2-b"]
    assert row(view, "rack2-c")["live_view"] == "not in the live view: fleet bound (2 agents)"


def test_an_agent_in_the_view_that_grows_beyond_the_bound_leaves_it():
    """Otherwise many small agents admitted early could each grow to the per-agent bound."""
    view = make_view(Clock(NOW + 1), max_devices=10)
    send(view, "rack2-a", devices(4))
    send(view, "rack2-b", devices(4))
    assert send(view, "rack2-b", devices(7), end=NOW + 60) == (0, 0)
    assert kept(view) == (1, 4, 0) and view.device_total == 4
    assert row(view, "rack2-b")["live_view"].startswith("not in the live view")
    assert [a["id"] for a in view.agents() if a["live_view"] is None] == ["rack2-a"]


def test_a_device_no_longer_reported_keeps_no_holders():
    view = make_view(Clock(NOW + 1))
    send(view, "rack2-a", devices(3, holders=32))
    assert view.holder_total == 96
    send(view, "rack2-a", devices(1, holders=1), end=NOW + 60)
    assert kept(view) == (1, 3, 1) and view.holder_total == 1
    gone = [d for d in view.devices(None) if d["reason"] == "no longer reported"]
    assert len(gone) == 2 and all(d["holders"] is None for d in gone)
    # Not listed as held by anyone (nor by "nobody known") while it is not reported.
    everything = view.holders("user", None)["holders"]
    assert [x["holder"] for x in everything] == ["user-0"]


def test_totals_follow_replays_sweeps_and_forgetting():
    clock = Clock(NOW + 1)
    view = make_view(clock, max_devices=10)
    send(view, "rack2-a", devices(5, holders=2))
    send(view, "rack2-a", devices(5, holders=2))  # a replay: nothing changes
    assert (view.device_total, view.holder_total) == (5, 10)
    clock.advance(3601)
    send(view, "rack2-b", devices(6), end=NOW + 3600)  # fits once rack2-a is swept
    assert kept(view) == (1, 6, 0) and (view.device_total, view.holder_total) == (6, 0)


@pytest.fixture
async def client(aiohttp_client):
    import dataclasses

    writer = RecordingWriter()
    config = make_config()
    # The bound comes from [collector] live_view_max_devices.
    config = dataclasses.replace(
        config, collector=dataclasses.replace(config.collector, live_view_max_devices=10)
    )
    app = create_app(config, writer=writer, clock=Clock(NOW + 1))
    client = await aiohttp_client(app)
    client.writer = writer
    return client


async def test_over_http_the_report_is_stored_and_answered_but_kept_out_of_the_view(client):
    for name in ("rack2-a", "rack2-b"):
        payload = batch_payload([report_payload(devices=devices(6))], agent_id=name, host=f"{name}-host")
        resp = await client.post(
            "/api/v1/reports",
            data=body(payload, compress=True),
            headers={**JSON, **auth(RACK_TOKEN), "Content-Encoding": "gzip"},
        )
        assert resp.status == 200, await resp.text()
    stored = {
        line.split("agent=")[1].split(",")[0] for line in client.writer.report_lines if "agent=" in line
    }
    assert stored == {"rack2-a", "rack2-b"}
    fleet = await (await client.get("/api/v1/fleet", headers=auth(READ_TOKEN))).json()
    assert fleet["totals"]["devices"] == 6
    agents = await (await client.get("/api/v1/agents", headers=auth(READ_TOKEN))).json()
    by_id = {a["id"]: a for a in agents["agents"]}
    assert by_id["rack2-a"]["live_view"] is None
    assert by_id["rack2-b"]["live_view"] == "not in the live view: fleet bound (10 devices)"
