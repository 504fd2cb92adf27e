"""Refusals per agent where operators look (issue 11 item 8): the live view, /api/v1/agents and the
store (`capmon_refusal`), coalesced and best effort."""

from __future__ import annotations

import dataclasses

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
    make_config,
    report,
)

from capmon.collector.app import INGEST, create_app
from capmon.collector.storage import StorageUnavailable

HEADERS = {**JSON, **auth(AGENT_TOKEN)}


async def make_client(aiohttp_client, writer, interval=3600.0):
    app = create_app(make_config(), writer=writer, clock=Clock())
    service = app[INGEST]
    service.limits = dataclasses.replace(service.limits, refusal_write_interval_s=interval)
    return await aiohttp_client(app)


def refusal_lines(writer):
    return [line for line in writer.lines if line.startswith("capmon_refusal")]


async def test_a_clock_far_ahead_shows_in_the_agents_api_and_the_store(aiohttp_client):
    writer = RecordingWriter()
    client = await make_client(aiohttp_client, writer)
    ahead = batch([report(end=NOW + 400)])
    for _ in range(3):
        resp = await client.post("/api/v1/reports", data=body(ahead), headers=HEADERS)
        assert resp.status == 400
    resp = await client.get("/api/v1/agents", headers=auth(READ_TOKEN))
    assert resp.status == 200
    (agent,) = [a for a in (await resp.json())["agents"] if a["id"] == "node-1"]
    clock = agent["refusals"]["clock"]
    assert clock["count"] == 3 and "in the future" in clock["last_detail"]
    # Coalesced: the first refusal is written at once, the rest wait for the interval (or shutdown).
    for _ in range(50):
        if refusal_lines(writer):
            break
        await __import__("asyncio").sleep(0.01)
    first = refusal_lines(writer)
    assert len(first) == 1
    assert first[0].startswith(
        "capmon_refusal,agent=node-1,host=gpu-node-1,reason=clock count=1.0,last_detail="
    )
    await client.close()
    last = refusal_lines(writer)[-1]
    assert " count=3.0," in last and len(refusal_lines(writer)) == 2


async def test_an_invalid_body_is_recorded_under_the_agent_it_names(aiohttp_client):
    writer = RecordingWriter()
    client = await make_client(aiohttp_client, writer)
    bad = batch(labels={"site": "x" * 300})  # over wire.MAX_LABEL_VALUE_LEN: the typed decode refuses
    resp = await client.post("/api/v1/reports", data=body(bad), headers=HEADERS)
    assert resp.status == 400
    listed = (await (await client.get("/api/v1/agents", headers=auth(READ_TOKEN))).json())["agents"]
    assert listed[0]["id"] == "node-1" and listed[0]["refusals"]["invalid"]["count"] == 1


async def test_another_agents_id_is_not_recorded(aiohttp_client):
    writer = RecordingWriter()
    client = await make_client(aiohttp_client, writer)
    resp = await client.post("/api/v1/reports", data=body(batch(agent_id="node-2")), headers=HEADERS)
    assert resp.status == 403
    listed = (await (await client.get("/api/v1/agents", headers=auth(READ_TOKEN))).json())["agents"]
    assert listed == []


async def test_a_failed_refusal_write_never_turns_into_a_5xx(aiohttp_client):
    writer = RecordingWriter()
    writer.fail = StorageUnavailable("down")
    client = await make_client(aiohttp_client, writer, interval=0.0)
    for _ in range(3):
        resp = await client.post(
            "/api/v1/reports", data=body(batch([report(end=NOW + 400)])), headers=HEADERS
        )
        assert resp.status == 400
    assert client.server.app[INGEST].refusals[("node-1", "clock")].count == 3


async def test_agents_api_needs_a_read_token(aiohttp_client):
    client = await make_client(aiohttp_client, RecordingWriter())
    assert (await client.get("/api/v1/agents")).status == 401
    assert (await client.get("/api/v1/agents", headers=auth(AGENT_TOKEN))).status == 403


async def test_refusal_points_land_in_influxd(aiohttp_client, influxd):
    from collector_helpers import wall_now

    from capmon.collector.config import StorageConfig

    influxd.create_database("capmon_refusals")
    storage = StorageConfig(kind="influxdb_v1", url=influxd.url, db="capmon_refusals", flush_interval_s=0.0)
    client = await aiohttp_client(create_app(make_config(storage)))
    resp = await client.post(
        "/api/v1/reports", data=body(batch([report(end=wall_now() + 400)])), headers=HEADERS
    )
    assert resp.status == 400
    await client.close()
    rows = influxd.rows("SELECT * FROM capmon_refusal", "capmon_refusals")
    assert len(rows) == 1
    assert rows[0]["agent"] == "node-1" and rows[0]["reason"] == "clock" and rows[0]["count"] == 1.0
    assert "in the future" in rows[0]["last_detail"]
    assert influxd.field_types("capmon_refusals", "capmon_refusal") == {
        "count": "float",
        "last_detail": "string",
    }
