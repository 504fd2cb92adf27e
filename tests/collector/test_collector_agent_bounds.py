"""One agent token cannot exhaust the store's series for everyone (issue 11 item 10)."""

from __future__ import annotations

import asyncio
import dataclasses

from collector_helpers import (
    AGENT_TOKEN,
    JSON,
    RACK_TOKEN,
    Clock,
    RecordingWriter,
    auth,
    batch,
    body,
    device,
    make_config,
    report,
    wall_now,
)

from capmon.collector.app import INGEST, METRICS, create_app
from capmon.collector.config import StorageConfig


async def client_with(aiohttp_client, writer=None, storage=None, clock=None, **limits):
    app = create_app(make_config(storage), writer=writer, clock=clock or Clock())
    service = app[INGEST]
    service.limits = dataclasses.replace(service.limits, **limits)
    service.bounds.limits = service.limits
    return await aiohttp_client(app)


def post(client, payload, token=AGENT_TOKEN):
    return client.post("/api/v1/reports", data=body(payload), headers={**JSON, **auth(token)})


async def test_distinct_devices_per_agent_are_bounded_for_that_agent_only(aiohttp_client):
    client = await client_with(aiohttp_client, RecordingWriter(), max_devices_per_agent=5)
    ok = batch([report(devices=[device(f"GPU-{i}") for i in range(5)])])
    assert (await post(client, ok)).status == 200
    resp = await post(client, batch([report(seq=2, devices=[device("GPU-new")])]))
    assert resp.status == 400
    err = await resp.json()
    assert (
        err["error"] == "too many devices"
        and "max_devices_per_agent" in err["detail"]
        and "5" in err["detail"]
    )
    # The same agent's known devices still go through; another agent is not affected.
    assert (await post(client, batch([report(seq=3, devices=[device("GPU-1")])]))).status == 200
    other = batch([report(devices=[device("GPU-x")])], agent_id="rack2-a", host="rack2-a")
    assert (await post(client, other, RACK_TOKEN)).status == 200
    assert client.server.app[METRICS].limits_hit.get(limit="devices") == 1


async def test_distinct_models_and_labels_per_agent_are_bounded(aiohttp_client):
    client = await client_with(aiohttp_client, RecordingWriter(), max_values_per_agent=8)
    models = [device(f"GPU-{i}", model=f"model-{i}") for i in range(10)]
    resp = await post(client, batch([report(devices=models)]))
    assert resp.status == 400
    assert "max_values_per_agent" in (await resp.json())["detail"]
    assert client.server.app[METRICS].limits_hit.get(limit="values") == 1


async def test_a_partial_write_refuses_only_the_request_whose_points_were_dropped(
    aiohttp_client, influxd_small_tags
):
    influxd = influxd_small_tags
    influxd.create_database("capmon_tags")
    storage = StorageConfig(kind="influxdb_v1", url=influxd.url, db="capmon_tags", flush_interval_s=0.2)
    # Per-agent bounds looser than this store: the store's own limit is what is hit here.
    client = await client_with(aiohttp_client, storage=storage, clock=lambda: float(wall_now()))
    now = wall_now()
    first = batch([report(end=now - 60, devices=[device("GPU-a")])], agent_id="rack2-b", host="rack2-b")
    assert (await post(client, first, RACK_TOKEN)).status == 200
    # One agent floods new device ids past max-values-per-tag (20; influxd checks it against the
    # values it already holds), then sends more while another agent sends a known device in the same
    # group-commit batch (the 0.2 s flush interval lets both join one write).
    fill = batch([report(end=now - 60, devices=[device(f"GPU-{i}") for i in range(25)])])
    assert (await post(client, fill)).status == 200
    flood = batch([report(seq=2, end=now, devices=[device(f"GPU-new-{i}") for i in range(5)])])
    known = batch([report(seq=2, end=now, devices=[device("GPU-a")])], agent_id="rack2-b", host="rack2-b")
    flooded, kept = await asyncio.gather(post(client, flood), post(client, known, RACK_TOKEN))
    assert flooded.status == 400 and "max-values-per-tag" in (await flooded.json())["detail"]
    assert kept.status == 200, await kept.text()
    rows = influxd.rows("SELECT busy_s FROM capmon_device WHERE agent = 'rack2-b'", "capmon_tags")
    assert len(rows) == 2
