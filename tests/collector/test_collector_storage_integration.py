"""Reports through the collector into real storage, read back: influxd (v1 API) and VictoriaMetrics (v2 API)."""

from __future__ import annotations

import time

import pytest
from collector_helpers import AGENT_TOKEN, JSON, auth, batch, body, device, make_config, report

from capmon.collector.app import create_app
from capmon.collector.config import StorageConfig

pytestmark = pytest.mark.integration

HOSTILE = 'fra 1,"rack"=7\\b\nsecond line\tü✓ '
HOSTILE_READ_BACK = 'fra 1,"rack"=7/b second line ü✓ '
STRING_FIELD = 'XID 79: "fallen off the bus"\nsee C:\\logs\\'
STRING_READ_BACK = 'XID 79: "fallen off the bus" see C:\\logs\\'
STRING_FIELDS = {"state", "error", "info_driver"}


def window_end() -> int:
    now = int(time.time())
    return now - now % 60


def hostile_batch(end: int) -> dict:
    devices = [
        device("GPU-0", idle_since=end - 900, extra={"sm_clock_mhz": 1410}, info={"driver": "550.54"}),
        device("MIG 1,g=2\\x", state="busy", parent_id="GPU-0", util_mean_pct=87.5, processes=3),
        device("GPU-2", state="unavailable", model=None, error=STRING_FIELD, util_mean_pct=None),
    ]
    return batch([report(seq=1, end=end, devices=devices)], labels={"site": HOSTILE, "pool": "train"})


async def post(client, payload):
    return await client.post(
        "/api/v1/reports",
        data=body(payload, compress=True),
        headers={**JSON, **auth(AGENT_TOKEN), "Content-Encoding": "gzip"},
    )


def v1_config(influxd, db: str) -> StorageConfig:
    return StorageConfig(kind="influxdb_v1", url=influxd.url, db=db, flush_interval_s=0.0, retry_after_s=4)


async def test_influxdb_v1_round_trip(aiohttp_client, influxd):
    influxd.create_database("capmon_rt")
    client = await aiohttp_client(create_app(make_config(v1_config(influxd, "capmon_rt"))))
    end = window_end()
    resp = await post(client, hostile_batch(end))
    assert resp.status == 200, await resp.text()
    # A resent report rewrites identical points: nothing doubles.
    assert (await post(client, hostile_batch(end))).status == 200

    rows = influxd.rows("SELECT * FROM capmon_device GROUP BY *", "capmon_rt")
    assert len(rows) == 3
    by_id = {r["device"]: r for r in rows}
    assert set(by_id) == {"GPU-0", "MIG 1,g=2/x", "GPU-2"}
    gpu0, mig, lost = by_id["GPU-0"], by_id["MIG 1,g=2/x"], by_id["GPU-2"]
    assert gpu0["time"] == end
    assert gpu0["site"] == HOSTILE_READ_BACK and gpu0["pool"] == "train" and "cluster" not in gpu0
    assert gpu0["host"] == "gpu-node-1" and gpu0["agent"] == "node-1" and gpu0["vendor"] == "nvidia"
    assert gpu0["model"] == "NVIDIA H100 80GB HBM3"
    assert gpu0["state"] == "free" and gpu0["state_code"] == 2.0
    assert gpu0["free_s"] == 60.0 and gpu0["idle_s"] == 60.0 and gpu0["window_s"] == 60.0
    assert gpu0["idle_since"] == end - 900 and gpu0["idle_for_s"] == 900.0
    assert gpu0["memory_total_bytes"] == 80 * 2**30 and gpu0["extra_sm_clock_mhz"] == 1410.0
    assert gpu0["info_driver"] == "550.54"
    assert mig["parent"] == "GPU-0" and mig["util_mean_pct"] == 87.5 and mig["processes"] == 3.0
    assert lost["error"] == STRING_READ_BACK and lost["util_mean_pct"] is None and lost.get("model", "") == ""

    types = influxd.field_types("capmon_rt", "capmon_device")
    assert {k for k, t in types.items() if t != "float"} == STRING_FIELDS
    for measurement in ("capmon_host", "capmon_agent"):
        types = influxd.field_types("capmon_rt", measurement)
        assert types and {k for k, t in types.items() if t != "float"} <= {"status", "version"}

    host = influxd.rows("SELECT * FROM capmon_host", "capmon_rt")
    assert len(host) == 1 and host[0]["cpu_mean_pct"] == 12.5 and host[0]["devices"] == 3.0
    probes = influxd.rows("SELECT * FROM capmon_agent WHERE probe = 'nvml'", "capmon_rt")
    assert len(probes) == 1 and probes[0]["samples"] == 60.0 and probes[0]["status"] == "active"
    agent = influxd.rows("SELECT seq, uptime_s, spool_bytes FROM capmon_agent WHERE probe = ''", "capmon_rt")
    assert [(r["seq"], r["uptime_s"], r["spool_bytes"]) for r in agent] == [(1.0, 3600.0, 4096.0)]


async def test_influxdb_v1_rejects_conflicting_type_as_400(aiohttp_client, influxd):
    influxd.create_database("capmon_conflict")
    end = window_end()
    status, _ = influxd.write(
        "capmon_conflict", f'capmon_device,agent=someone-else util_mean_pct="text" {end}'
    )
    assert status == 204
    client = await aiohttp_client(create_app(make_config(v1_config(influxd, "capmon_conflict"))))
    resp = await post(client, batch([report(end=end)]))
    assert resp.status == 400
    err = await resp.json()
    assert err["error"] == "storage rejected the data" and "field type conflict" in err["detail"]


async def test_influxdb_v1_down_is_503_then_recovers(aiohttp_client, influxd):
    influxd.create_database("capmon_down")
    client = await aiohttp_client(create_app(make_config(v1_config(influxd, "capmon_down"))))
    end = window_end()
    influxd.stop()
    try:
        resp = await post(client, batch([report(end=end)]))
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "4"
        assert (await resp.json())["error"] == "storage unavailable"
    finally:
        influxd.start()
    # The agent retries the same report once storage is back: stored once.
    assert (await post(client, batch([report(end=end)]))).status == 200
    assert len(influxd.rows("SELECT * FROM capmon_device", "capmon_down")) == 1


async def test_influxdb_v1_missing_database_is_503(aiohttp_client, influxd):
    client = await aiohttp_client(create_app(make_config(v1_config(influxd, "never_created"))))
    resp = await post(client, batch([report(end=window_end())]))
    assert resp.status == 503 and "database not found" in (await resp.json())["detail"]


async def test_influxdb_v2_api_round_trip_into_victoria_metrics(aiohttp_client, victoria_metrics):
    storage = StorageConfig(
        kind="influxdb_v2",
        url=victoria_metrics.url,
        token="unused",
        org="capmon",
        bucket="b",
        flush_interval_s=0.0,
    )
    client = await aiohttp_client(create_app(make_config(storage)))
    end = window_end()
    resp = await post(client, hostile_batch(end))
    assert resp.status == 200, await resp.text()

    series = victoria_metrics.export('{__name__=~"capmon_device_.*"}')
    got = {(s["metric"]["__name__"], s["metric"]["device"]): s for s in series}
    util = got[("capmon_device_util_mean_pct", "MIG 1,g=2/x")]
    assert util["values"] == [87.5] and util["timestamps"] == [end * 1000]
    labels = got[("capmon_device_free_s", "GPU-0")]["metric"]
    assert (
        labels["site"] == HOSTILE_READ_BACK and labels["agent"] == "node-1" and labels["host"] == "gpu-node-1"
    )
    assert labels["model"] == "NVIDIA H100 80GB HBM3" and labels["vendor"] == "nvidia"
    assert got[("capmon_device_idle_for_s", "GPU-0")]["values"] == [900.0]
    assert got[("capmon_device_extra_sm_clock_mhz", "GPU-0")]["values"] == [1410.0]
    assert got[("capmon_device_state_code", "GPU-2")]["values"] == [3.0]
    host = victoria_metrics.export('{__name__="capmon_host_cpu_mean_pct"}')
    assert [s["values"] for s in host] == [[12.5]]


async def test_influxdb_v2_unreachable_is_503(aiohttp_client):
    from servers import free_port

    storage = StorageConfig(
        kind="influxdb_v2",
        url=f"http://127.0.0.1:{free_port()}",
        token="t",
        org="o",
        bucket="b",
        flush_interval_s=0.0,
        timeout_s=2.0,
    )
    client = await aiohttp_client(create_app(make_config(storage)))
    resp = await post(client, batch([report(end=window_end())]))
    assert resp.status == 503 and resp.headers["Retry-After"] == "10"
