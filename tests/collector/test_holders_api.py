"""`GET /api/v1/holders` and the holders in `/api/v1/devices`, through the collector (issue 12 item 6)."""

from __future__ import annotations

import time

import pytest
from collector_helpers import (
    AGENT_TOKEN,
    JSON,
    NOW,
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

from capmon.collector.app import create_app
from capmon.collector.config import StorageConfig


def h(pid: int, user: str, **kw) -> dict:
    return {"pid": pid, "user": user, "command": "python3", "held_s": 60.0, **kw}


def devices_at(end: int) -> list[dict]:
    return [
        device("GPU-0", "allocated_idle", holders=[h(1, "alice"), h(2, "bob")], state_since=end - 7200),
        device("GPU-1", "allocated_idle", holders=[h(3, "alice", slurm_job_id="889")], state_since=end - 60),
        device("GPU-2", "busy", holders=[h(4, "carol")]),
        device("GPU-3", "free", holders=[]),
    ]


async def post(client, payload) -> None:
    resp = await client.post("/api/v1/reports", data=body(payload), headers={**JSON, **auth(AGENT_TOKEN)})
    assert resp.status == 200, await resp.text()


@pytest.fixture
async def client(aiohttp_client):
    clock = Clock(NOW - 3600)
    app = create_app(make_config(), writer=RecordingWriter(), clock=clock)
    clock.now = NOW + 1
    c = await aiohttp_client(app)
    await post(c, batch([report(end=NOW, devices=devices_at(NOW))]))
    return c


async def test_holders_ranks_reclaim_candidates(client):
    resp = await client.get("/api/v1/holders", params={"by": "user"}, headers=auth(READ_TOKEN))
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    # alice: half of GPU-0 + all of GPU-1 (H100s at 2.5/h); bob: half of GPU-0; carol is busy.
    assert [(x["holder"], x["allocated_idle_value_per_hour"], x["allocated_idle_device_hours"]) for x in answer["holders"]] == [
        ("alice", 3.75, round(90 / 3600, 6)),
        ("bob", 1.25, round(30 / 3600, 6)),
    ]  # fmt: skip
    assert answer["holders"][0]["longest_for_s"] == 7201.0
    jobs = await (await client.get("/api/v1/holders?by=job&state=busy", headers=auth(READ_TOKEN))).json()
    assert [(x["holder"], x["states"]["busy"], x["value_per_hour"]) for x in jobs["holders"]] == [
        (None, 1, 2.5)
    ]
    recent = await (
        await client.get("/api/v1/holders?min_idle=1h&site=fra1", headers=auth(READ_TOKEN))
    ).json()
    assert [(x["holder"], x["devices"]) for x in recent["holders"]] == [("alice", 1), ("bob", 1)]


async def test_devices_list_their_holders(client):
    resp = await client.get("/api/v1/devices", params={"state": "all"}, headers=auth(READ_TOKEN))
    by_id = {d["device_id"]: d for d in (await resp.json())["devices"]}
    assert [(x["pid"], x["user"], x["command"]) for x in by_id["GPU-0"]["holders"]] == [
        (1, "alice", "python3"),
        (2, "bob", "python3"),
    ]
    assert by_id["GPU-1"]["holders"][0]["slurm_job_id"] == "889" and by_id["GPU-3"]["holders"] == []


@pytest.mark.parametrize(
    ("params", "error", "named"),
    [
        ({"colour": "red", "size": "2"}, "unknown parameter", ["'colour'", "'size'"]),
        ({"vendor": "nvidia"}, "unknown parameter", ["'vendor'"]),
        ({"by": "group"}, "invalid parameter", ["by 'group'", "user, namespace, pod, job, container"]),
        ({"state": "free"}, "invalid parameter", ["state 'free'", "allocated_idle, busy, all"]),
        ({"min_idle": "soon"}, "invalid parameter", ["min_idle"]),
        ({"limit": "0"}, "invalid parameter", ["limit"]),
    ],
)
async def test_bad_parameters_are_400_naming_them(client, params, error, named):
    resp = await client.get("/api/v1/holders", params=params, headers=auth(READ_TOKEN))
    assert resp.status == 400
    err = await resp.json()
    assert err["error"] == error and all(n in err["detail"] for n in named), err


async def test_holders_need_a_read_token(client):
    assert (await client.get("/api/v1/holders")).status == 401
    assert (await client.get("/api/v1/holders", headers=auth(AGENT_TOKEN))).status == 403


@pytest.mark.integration
async def test_the_api_and_the_store_agree(aiohttp_client, influxd):
    """What /api/v1/holders says each user holds idle is what InfluxQL sums from `capmon_holder`."""
    influxd.create_database("capmon_holders_api")
    storage = StorageConfig(
        kind="influxdb_v1", url=influxd.url, db="capmon_holders_api", flush_interval_s=0.0
    )
    now = int(time.time())
    end = now - now % 60
    clock = Clock(end - 600)
    client = await aiohttp_client(create_app(make_config(storage), clock=clock))
    for i in range(3):
        clock.now = end + 60 * i + 1
        await post(client, batch([report(seq=i + 1, end=end + 60 * i, devices=devices_at(end + 60 * i))]))
    answer = await (await client.get("/api/v1/holders", headers=auth(READ_TOKEN))).json()
    api = {x["holder"]: x["allocated_idle_device_hours"] for x in answer["holders"]}
    assert api == {"alice": round(3 * 90 / 3600, 6), "bob": round(3 * 30 / 3600, 6)}
    rows = influxd.rows(
        'SELECT SUM(allocated_idle_s) / 3600 AS hours FROM capmon_holder WHERE time >= 0 GROUP BY "user"',
        "capmon_holders_api",
    )
    store = {r["user"]: round(r["hours"], 6) for r in rows if r["hours"]}
    assert store == api
