"""The live fleet view: staleness with an injected clock, seq dedupe, and the capacity APIs."""

from __future__ import annotations

import pytest
from collector_helpers import (
    AGENT_TOKEN,
    JSON,
    NOW,
    RACK_TOKEN,
    READ_TOKEN,
    Clock,
    RecordingWriter,
    auth,
    batch,
    body,
    device,
    make_config,
    report,
)

from capmon.collector.app import FLEET, create_app


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW + 1)


@pytest.fixture
def writer() -> RecordingWriter:
    return RecordingWriter()


@pytest.fixture
async def client(aiohttp_client, clock, writer):
    # The collector started an hour before the reports the tests send (since-start totals count them).
    now, clock.now = clock.now, NOW - 3600
    app = create_app(make_config(), writer=writer, clock=clock)
    clock.now = now
    return await aiohttp_client(app)


async def send(client, payload, token=AGENT_TOKEN):
    resp = await client.post("/api/v1/reports", data=body(payload), headers={**JSON, **auth(token)})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def get(client, path, **params):
    resp = await client.get(path, params=params, headers=auth(READ_TOKEN))
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_silent_agent_turns_unavailable(client, clock):
    await send(client, batch([report(devices=[device("GPU-0", idle_since=NOW - 600)])]))
    fleet = await get(client, "/api/v1/fleet")
    assert fleet["totals"]["states"]["free"] == 1 and fleet["agents"]["stale"] == 0
    clock.advance(3 * 60)  # exactly three windows: not yet
    assert (await get(client, "/api/v1/fleet"))["totals"]["states"]["free"] == 1
    clock.advance(1)
    fleet = await get(client, "/api/v1/fleet")
    assert fleet["totals"]["states"] == {"busy": 0, "allocated_idle": 0, "free": 0, "unavailable": 1}
    assert fleet["agents"]["stale"] == 1
    assert fleet["totals"]["idle_value_per_hour"] == 0
    devices = (await get(client, "/api/v1/devices", state="all"))["devices"]
    assert devices[0]["state"] == "unavailable" and devices[0]["reported_state"] == "free"
    assert devices[0]["stale"] is True
    # The agent comes back: its devices are live again.
    await send(client, batch([report(seq=2, end=NOW + 240)]))
    assert (await get(client, "/api/v1/fleet"))["totals"]["states"]["free"] == 1


async def test_seq_already_seen_is_ignored_and_new_instance_resets(client, writer, clock):
    await send(client, batch([report(seq=5, devices=[device(state="free")])]))
    # A replay of seq 5 (the agent never saw the ack) is stored again but leaves the view alone.
    replay = await send(client, batch([report(seq=5, devices=[device(state="busy")])]))
    assert replay["duplicates"] == 1
    assert (await get(client, "/api/v1/fleet"))["totals"]["states"]["free"] == 1
    assert len([w for w in writer.writes]) == 2
    # An older seq arriving late does not overwrite newer state either.
    await send(client, batch([report(seq=4, end=NOW - 60, devices=[device(state="busy")])]))
    assert (await get(client, "/api/v1/fleet"))["totals"]["states"]["free"] == 1
    # A fresh spool (new instance) starts again at seq 1 and is applied.
    await send(
        client, batch([report(seq=1, end=NOW + 60, devices=[device(state="busy")])], instance="spool-b")
    )
    fleet = await get(client, "/api/v1/fleet")
    assert fleet["totals"]["states"]["busy"] == 1 and fleet["totals"]["states"]["free"] == 0


async def test_idle_hours_accumulate_once_per_report(client):
    for seq in (1, 2, 2, 3):
        await send(client, batch([report(seq=seq, end=NOW - 180 + 60 * seq)]))
    fleet = await get(client, "/api/v1/fleet")
    assert fleet["totals"]["idle_device_hours"] == pytest.approx(3 * 60 / 3600, rel=1e-4)
    assert fleet["totals"]["device_hours"]["free"] == pytest.approx(3 * 60 / 3600, rel=1e-4)


async def fill(client):
    """Two sites, several models and states, different idle streaks."""
    await send(
        client,
        batch(
            [
                report(
                    devices=[
                        device("GPU-a", idle_since=NOW - 3600),
                        device("GPU-b", idle_since=NOW - 600),
                        device("GPU-c", state="busy"),
                        device("GPU-d", state="allocated_idle", idle_since=NOW - 7200, processes=1),
                    ]
                )
            ],
            labels={"site": "fra1", "cluster": "c1", "pool": "train"},
        ),
    )
    await send(
        client,
        batch(
            [
                report(
                    devices=[
                        device("npu0-chip0", vendor="ascend", model="Ascend 910B3", idle_since=NOW - 1800),
                        device("npu1-chip0", vendor="ascend", model="Ascend 910B3", idle_since=NOW - 60),
                    ]
                )
            ],
            agent_id="rack2-n1",
            host="ascend-1",
            labels={"site": "ams2", "pool": "infer"},
        ),
        token=RACK_TOKEN,
    )


async def test_devices_filters_and_order(client, clock):
    await fill(client)
    found = (await get(client, "/api/v1/devices"))["devices"]
    assert [d["device_id"] for d in found] == ["GPU-a", "npu0-chip0", "GPU-b", "npu1-chip0"]
    assert found[0]["idle_for_s"] == pytest.approx(3601)
    assert found[0]["value_per_hour"] == 2.5 and found[1]["value_per_hour"] == 1.25
    assert found[1]["labels"] == {"site": "ams2", "pool": "infer"}
    assert found[1]["host"] == "ascend-1" and found[1]["agent"] == "rack2-n1"

    ids = lambda res: [d["device_id"] for d in res["devices"]]  # noqa: E731
    assert ids(await get(client, "/api/v1/devices", min_idle="15m")) == ["GPU-a", "npu0-chip0"]
    assert ids(await get(client, "/api/v1/devices", site="ams2")) == ["npu0-chip0", "npu1-chip0"]
    assert ids(await get(client, "/api/v1/devices", model="Ascend 910B3", limit="1")) == ["npu0-chip0"]
    assert ids(await get(client, "/api/v1/devices", state="idle", min_idle="1h")) == ["GPU-d", "GPU-a"]
    assert ids(await get(client, "/api/v1/devices", state="busy")) == ["GPU-c"]
    assert ids(await get(client, "/api/v1/devices", state="free", pool="train", vendor="nvidia")) == [
        "GPU-a",
        "GPU-b",
    ]
    assert len((await get(client, "/api/v1/devices", state="all"))["devices"]) == 6


@pytest.mark.parametrize(
    "params",
    [{"state": "sleeping"}, {"min_idle": "soon"}, {"limit": "0"}, {"limit": "x"}, {"colour": "red"}],
)
async def test_devices_bad_parameters(client, params):
    resp = await client.get("/api/v1/devices", params=params, headers=auth(READ_TOKEN))
    assert resp.status == 400
    assert (await resp.json())["error"] in ("invalid parameter", "unknown parameter")


async def test_fleet_summary_breakdowns(client):
    await fill(client)
    fleet = await get(client, "/api/v1/fleet")
    assert fleet["agents"] == {"total": 2, "stale": 0}
    assert fleet["totals"]["states"] == {"busy": 1, "allocated_idle": 1, "free": 4, "unavailable": 0}
    # Idle value: 3 idle H100 × 2.5 + 2 idle 910B × 1.25.
    assert fleet["totals"]["idle_value_per_hour"] == pytest.approx(10.0)
    assert fleet["by_model"]["NVIDIA H100 80GB HBM3"]["idle"] == 3
    assert fleet["by_model"]["Ascend 910B3"]["idle_value_per_hour"] == pytest.approx(2.5)
    assert fleet["by_label"]["site"]["fra1"]["devices"] == 4
    assert fleet["by_label"]["site"]["ams2"]["idle_value_per_hour"] == pytest.approx(2.5)
    assert fleet["by_label"]["cluster"]["(none)"]["devices"] == 2
    assert fleet["totals"]["idle_device_hours"] == pytest.approx(5 * 60 / 3600, rel=1e-4)


async def test_device_gone_from_report_is_unavailable_not_capacity(client):
    """Issue 19 item 3: a device its agent stops listing is never shown as capacity."""
    await send(client, batch([report(devices=[device("GPU-0"), device("GPU-1")])]))
    await send(client, batch([report(seq=2, end=NOW + 60, devices=[device("GPU-1")])]))
    fleet = client.server.app[FLEET]
    gone = fleet.devices(frozenset({"unavailable"}))
    assert [(d["device_id"], d["reason"], d["reported_state"]) for d in gone] == [
        ("GPU-0", "no longer reported", "free")
    ]
    assert [d["device_id"] for d in fleet.devices()] == ["GPU-1"]
    summary = fleet.summary()["totals"]
    assert summary["states"]["free"] == 1 and summary["states"]["unavailable"] == 1
    assert summary["idle_value_per_hour"] == pytest.approx(2.5)


def test_device_state_is_compact():
    """Tracked devices stay small: __slots__, no per-instance dict."""
    import msgspec

    from capmon.agent.wire import DeviceWindow
    from capmon.collector.fleet import AgentState, DeviceState

    dev = DeviceState(msgspec.convert(device(), DeviceWindow), NOW)
    assert not hasattr(dev, "__dict__") and not hasattr(AgentState("a"), "__dict__")


async def test_agents_silent_longer_than_forget_after_s_leave_the_view(aiohttp_client, clock, writer):
    """Decommissioned hosts do not stay `unavailable` forever, and the view's memory stays bounded."""
    app = create_app(make_config(forget_after_s=3600.0), writer=writer, clock=clock)
    client = await aiohttp_client(app)
    await send(client, batch([report(devices=[device("GPU-0"), device("GPU-1")])]))
    clock.advance(3600)  # silent exactly forget_after_s: stale, still shown
    fleet = await get(client, "/api/v1/fleet")
    assert fleet["agents"] == {"total": 1, "stale": 1} and fleet["totals"]["states"]["unavailable"] == 2
    clock.advance(1)
    # Filtered at read time, before any sweep has run.
    fleet = await get(client, "/api/v1/fleet")
    assert fleet["agents"] == {"total": 0, "stale": 0} and fleet["totals"]["devices"] == 0
    assert (await get(client, "/api/v1/devices", state="all"))["devices"] == []
    assert (await get(client, "/api/v1/devices", state="all", agent="node-1"))["devices"] == []
    text = await (await client.get("/metrics", headers=auth(READ_TOKEN))).text()
    assert "capmon_collector_agents 0" in text and "capmon_collector_live_devices 0" in text
    # Another agent's report sweeps the forgotten one out of memory, and the sweep is counted.
    await send(
        client,
        batch([report(end=int(clock.now) - 1)], agent_id="rack2-n1", host="h2"),
        token=RACK_TOKEN,
    )
    assert list(app[FLEET].by_id) == ["rack2-n1"]
    text = await (await client.get("/metrics", headers=auth(READ_TOKEN))).text()
    assert "capmon_collector_forgotten_agents_total 1" in text
    # It comes back: a fresh entry.
    await send(client, batch([report(seq=2, end=int(clock.now) - 1)]))
    assert (await get(client, "/api/v1/fleet"))["agents"]["total"] == 2


def test_sweep_runs_at_most_once_per_interval():
    import msgspec

    from capmon.agent import wire
    from capmon.collector.config import PricingConfig
    from capmon.collector.fleet import FleetView, Pricing

    clock = Clock(NOW + 1)
    view = FleetView(("site",), Pricing(PricingConfig()), clock=clock, forget_after_s=600.0)

    def apply(agent_id, end):
        view.apply(msgspec.convert(batch([report(end=end)], agent_id=agent_id), wire.Batch))

    apply("a", NOW)
    clock.advance(601)
    apply("b", NOW + 600)  # swept: "a" is gone
    assert list(view.by_id) == ["b"]
    apply("c", NOW + 600)
    clock.advance(30)
    apply("d", NOW + 630)  # no sweep within the interval even though nothing changed
    assert view.sweeps == 1


async def test_since_start_totals_skip_reports_that_ended_before_the_collector_started(
    aiohttp_client, clock, writer
):
    """Catch-up reports from an agent's spool (up to max_past_s old) are stored, shown if newest, but
    are not seconds "since this collector started"."""
    client = await aiohttp_client(create_app(make_config(), writer=writer, clock=clock))  # starts NOW + 1
    old = [report(seq=s, end=NOW - 7200 + 60 * s) for s in range(1, 4)]
    # A window ending exactly at the start counts.
    await send(client, batch([*old, report(seq=4, end=NOW + 1, devices=[device("GPU-0", "busy")])]))
    fleet = await get(client, "/api/v1/fleet")
    assert fleet["since"] == NOW + 1
    assert fleet["totals"]["device_hours"] == {
        "busy": 0.016667,
        "allocated_idle": 0,
        "free": 0,
        "unavailable": 0,
    }
    assert fleet["totals"]["idle_device_hours"] == 0
    assert len(writer.lines) == 4 * 4  # all stored
    await send(client, batch([report(seq=5, end=NOW + 61)]))
    assert (await get(client, "/api/v1/fleet"))["totals"]["idle_device_hours"] == pytest.approx(
        60 / 3600, rel=1e-4
    )


async def test_batch_storage_rejects_as_bad_data_leaves_the_live_view_alone(client, writer):
    """The agent dead-letters a 400: the live view must not keep what storage never will."""
    from capmon.collector.storage import StorageRejected

    writer.fail = StorageRejected("field type conflict")
    resp = await client.post("/api/v1/reports", data=body(batch()), headers={**JSON, **auth(AGENT_TOKEN)})
    assert resp.status == 400
    fleet = await get(client, "/api/v1/fleet")
    assert fleet["agents"]["total"] == 0 and fleet["totals"]["devices"] == 0
    assert fleet["totals"]["idle_device_hours"] == 0
    # The same seq, once storage takes it, is applied (not mistaken for a replay).
    writer.fail = None
    assert (await send(client, batch()))["duplicates"] == 0
    assert (await get(client, "/api/v1/fleet"))["totals"]["idle_device_hours"] == pytest.approx(
        60 / 3600, rel=1e-4
    )


@pytest.mark.parametrize("unavailable", ["storage down", "overloaded"])
async def test_batch_storage_cannot_take_now_still_updates_the_live_view(client, writer, unavailable):
    """503/429: the agent keeps the reports and retries; "idle now" must not freeze meanwhile."""
    from capmon.collector.storage import CollectorOverloaded, StorageUnavailable

    writer.fail = (
        StorageUnavailable("connection refused", 5)
        if unavailable == "storage down"
        else CollectorOverloaded("too many lines waiting", 3)
    )
    resp = await client.post("/api/v1/reports", data=body(batch()), headers={**JSON, **auth(AGENT_TOKEN)})
    assert resp.status in (503, 429)
    fleet = await get(client, "/api/v1/fleet")
    assert fleet["totals"]["states"]["free"] == 1
    assert fleet["totals"]["idle_device_hours"] == pytest.approx(60 / 3600, rel=1e-4)
    writer.fail = None
    assert (await send(client, batch()))["duplicates"] == 1  # the retry is not counted twice
    assert (await get(client, "/api/v1/fleet"))["totals"]["idle_device_hours"] == pytest.approx(
        60 / 3600, rel=1e-4
    )
