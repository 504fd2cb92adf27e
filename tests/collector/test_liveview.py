"""The storage live view (`live_view = "storage"`) against a real influxd: the memory view's answers
for the same reports, one store query for a wall of concurrent requests, a store that cannot serve it."""

from __future__ import annotations

import asyncio
import copy

import pytest
from collector_helpers import (
    AGENT_TOKEN,
    JSON,
    NOW,
    RACK_TOKEN,
    READ_TOKEN,
    Clock,
    auth,
    batch,
    body,
    device,
    make_config,
    report,
)
from servers import free_port

from capmon.collector import config as collector_config
from capmon.collector.app import LIVE, PUBLISHER, create_app
from capmon.collector.config import ConfigError, StorageConfig
from capmon.collector.liveview import LiveViewUnsupported
from capmon.collector.published import range_start

pytestmark = pytest.mark.integration


def h(pid: int, user: str, **kw) -> dict:
    return {"pid": pid, "user": user, "command": "python3", "held_s": 60.0, **kw}


def mig(device_id: str, state: str, **kw) -> dict:
    return device(
        device_id,
        state,
        parent_id="GPU-2",
        fraction=0.5,
        model="NVIDIA H100 80GB HBM3",
        info={"mig_profile": "3g.40gb"},
        **kw,
    )


def fleet_reports() -> list[tuple[str, dict]]:
    """(token, batch): three agents over five windows, with what the view must get right — holders
    (two on one device, a pod, a Slurm job), MIG instances, a device no longer listed, a model-less
    device with an error, an agent gone silent, labels on a second site."""
    out = []
    for i, end in enumerate((NOW - 120, NOW - 60, NOW)):
        devices = [
            device(
                "GPU-0",
                "allocated_idle",
                state_since=NOW - 7200,
                idle_since=NOW - 7200,
                holders=[h(11, "alice"), h(12, "bob", namespace="ml", pod="train-0", container="main")],
            ),
            mig("MIG-a", "busy", holders=[h(13, "carol", slurm_job_id="889")]),
            mig("MIG-b", "free", idle_since=NOW - 300, state_since=NOW - 300),
        ]
        if i < 2:  # GPU-1 stops being listed in the last window: "no longer reported"
            devices.append(device("GPU-1", "free", idle_since=NOW - 900, state_since=NOW - 900))
        out.append(
            ("rack", batch([report(seq=i + 1, end=end, devices=devices)], agent_id="rack2-a", host="a"))
        )
    silent = [
        device("GPU-0", "free", idle_since=NOW - 4000),
        device("GPU-1", "busy", model="910B3", vendor="ascend"),
    ]
    out.append(
        (
            "rack",
            batch(
                [report(seq=1, end=NOW - 600, devices=silent)],
                agent_id="rack2-b",
                host="b",
                labels={"site": "ams1", "pool": "infer"},
            ),
        )
    )
    for i, end in enumerate((NOW - 60, NOW)):
        devices = [
            device(
                "GPU-0", "unavailable", model=None, error="XID 79: fallen off the bus", util_mean_pct=None
            ),
            # No holders listed (a scheduler's allocation): `holders` None, as the store cannot tell
            # None from [] until capmon_device carries a holder count.
            device("GPU-1", "allocated_idle", state_since=NOW - 90),
        ]
        b = batch([report(seq=i + 1, end=end, devices=devices)])
        b["agent"]["window_s"] = 60
        out.append(("agent", b))
    return out


async def post(client, token: str, payload: dict) -> None:
    resp = await client.post("/api/v1/reports", data=body(payload), headers={**JSON, **auth(token)})
    assert resp.status == 200, await resp.text()


async def get(client, path: str, **params) -> dict:
    resp = await client.get(path, params=params, headers=auth(READ_TOKEN))
    assert resp.status == 200, await resp.text()
    return await resp.json()


def storage(influxd, db: str) -> StorageConfig:
    return StorageConfig(kind="influxdb_v1", url=influxd.url, db=db, flush_interval_s=0.0)


def fresh_database(influxd, db: str) -> None:
    influxd.create_database(db)
    influxd.query(f'DROP DATABASE "{db}"', method="POST")
    influxd.create_database(db)


@pytest.fixture
async def both(aiohttp_client, influxd):
    """A memory-view collector fed the fleet's reports (writing them to influxd), a storage-view
    collector fed the same reports (it publishes its view), and a storage-view collector on the same
    database that received none of them."""
    db = "capmon_lv"
    fresh_database(influxd, db)
    clock = Clock(NOW - 3600)
    memory = await aiohttp_client(create_app(make_config(storage(influxd, db)), clock=clock))
    feeder_app = create_app(
        make_config(storage(influxd, db), live_view="storage", live_view_cache_s=0.0), clock=clock
    )
    feeder = await aiohttp_client(feeder_app)
    stored = await aiohttp_client(
        create_app(make_config(storage(influxd, db), live_view="storage", live_view_cache_s=0.0), clock=clock)
    )
    tokens = {"rack": RACK_TOKEN, "agent": AGENT_TOKEN}
    # Each report arrives a second after its window ends, as from a live agent.
    for token, payload in sorted(fleet_reports(), key=lambda tp: tp[1]["reports"][-1]["end"]):
        clock.now = payload["reports"][-1]["end"] + 1
        await post(memory, tokens[token], payload)
        await post(feeder, tokens[token], payload)
    clock.now = NOW + 1
    await feeder_app[PUBLISHER].flush()
    return memory, stored, clock


def without(answer: dict, *keys: str) -> dict:
    out = copy.deepcopy(answer)
    for key in keys:
        out.pop(key, None)
    return out


async def test_storage_view_answers_as_the_memory_view(both):
    memory, stored, _ = both
    mem, sto = await get(memory, "/api/v1/fleet"), await get(stored, "/api/v1/fleet")
    # "since" differs by design: the start of the memory view, the start of the range of the store's
    # (its minute blocks: the start rounded up to the minute).
    assert sto["since"] == range_start(NOW + 1 - 86400) > NOW + 1 - 86400 - 60
    assert without(sto, "since") == without(mem, "since")
    assert sto["agents"] == {"total": 3, "stale": 1}
    assert sto["totals"]["states"] == {"busy": 1, "allocated_idle": 2, "free": 1, "unavailable": 4}

    for state in ("all", "free", "allocated_idle", "idle", "unavailable"):
        mem_d = await get(memory, "/api/v1/devices", state=state, limit="1000")
        sto_d = await get(stored, "/api/v1/devices", state=state, limit="1000")
        assert sto_d == mem_d, state
    gone = await get(stored, "/api/v1/devices", state="unavailable", agent="rack2-a")
    assert [(d["device_id"], d["reason"]) for d in gone["devices"]] == [("GPU-1", "no longer reported")]

    for by in ("user", "namespace", "pod", "job", "container"):
        for state in ("allocated_idle", "all"):
            mem_h = await get(memory, "/api/v1/holders", by=by, state=state)
            sto_h = await get(stored, "/api/v1/holders", by=by, state=state)
            assert without(sto_h, "since") == without(mem_h, "since"), (by, state)

    # The agents as the collector that received them published them: arrival times and instances too.
    assert (await get(stored, "/api/v1/agents")) == (await get(memory, "/api/v1/agents"))


async def test_totals_over_a_range_are_the_stores_sums(both):
    _, stored, _ = both
    # The last minute holds the windows ending at NOW (those ending at NOW - 60 are before NOW + 1 - 60).
    recent = await get(stored, "/api/v1/fleet", since="1m")
    assert recent["since"] == range_start(NOW + 1 - 60)
    # rack2-a: GPU-0 (allocated idle), MIG-a (busy), MIG-b (free); node-1: GPU-0 (unavailable),
    # GPU-1 (allocated idle); 60 s each, MIG instances at half a GPU.
    assert recent["totals"]["device_hours"] == {
        "busy": round(60 / 3600, 6),
        "allocated_idle": round(120 / 3600, 6),
        "free": round(60 / 3600, 6),
        "unavailable": round(60 / 3600, 6),
    }
    assert recent["totals"]["gpu_hours"]["busy"] == round(30 / 3600, 6)
    day = await get(stored, "/api/v1/fleet")
    assert day["totals"]["device_hours"]["free"] == round((60 * 3 + 60 * 2 + 60) / 3600, 6)
    bad = await stored.get("/api/v1/fleet", params={"since": "yesterday"}, headers=auth(READ_TOKEN))
    assert bad.status == 400
    assert "since" in (await bad.json())["detail"]


async def test_memory_view_refuses_a_range(both):
    memory, _, _ = both
    resp = await memory.get("/api/v1/fleet", params={"since": "1h"}, headers=auth(READ_TOKEN))
    assert resp.status == 400
    assert 'live_view = "storage"' in (await resp.json())["detail"]


async def test_a_wall_of_requests_costs_one_store_query(aiohttp_client, influxd, both):
    _, _, clock = both
    app = create_app(
        make_config(storage(influxd, "capmon_lv"), live_view="storage", live_view_cache_s=2.0), clock=clock
    )
    client = await aiohttp_client(app)
    store = app[LIVE].store
    before = store.requests
    answers = await asyncio.gather(*(get(client, "/api/v1/fleet") for _ in range(20)))
    assert store.requests - before == 1  # single flight: 20 concurrent answers, one set of queries
    assert all(a == answers[0] for a in answers)
    await get(client, "/api/v1/fleet")
    assert store.requests - before == 1  # cached
    clock.advance(2.5)
    await get(client, "/api/v1/fleet")
    assert store.requests - before == 2  # expired: asked again


async def test_fleet_gauges_come_from_the_store(both):
    _, stored, _ = both
    resp = await stored.get("/metrics", headers=auth(READ_TOKEN))
    text = await resp.text()
    assert "capmon_collector_live_devices 8" in text
    assert "capmon_collector_agents 3" in text
    assert "capmon_collector_stale_agents 1" in text


async def test_storage_view_answers_503_while_the_store_is_down(aiohttp_client):
    down = StorageConfig(kind="influxdb_v1", url=f"http://127.0.0.1:{free_port()}", db="capmon")
    client = await aiohttp_client(create_app(make_config(down, live_view="storage")))  # starts anyway
    resp = await client.get("/api/v1/fleet", headers=auth(READ_TOKEN))
    assert resp.status == 503
    assert resp.headers["Retry-After"]
    assert (await resp.json())["error"] == "storage unavailable"
    metrics = await client.get("/metrics", headers=auth(READ_TOKEN))  # its own metrics still answer
    assert metrics.status == 200
    assert "capmon_collector_live_devices 0" in await metrics.text()


def test_storage_view_needs_a_store_it_can_query():
    with pytest.raises(ConfigError, match=r"\[collector\] live_view: .*'none' cannot serve"):
        collector_config.parse('[collector]\nlive_view = "storage"\n')
    with pytest.raises(ConfigError, match=r"\[collector\] reuse_port: needs live_view = \"storage\""):
        collector_config.parse("[collector]\nreuse_port = true\n")


async def test_victoria_metrics_is_a_clear_startup_error(aiohttp_client, victoria_metrics):
    cfg = make_config(
        StorageConfig(kind="influxdb_v2", url=victoria_metrics.url, org="o", bucket="capmon", token="t"),
        live_view="storage",
    )
    with pytest.raises(LiveViewUnsupported, match="VictoriaMetrics does not"):
        await aiohttp_client(create_app(cfg))


def record_statements(app) -> list[list[str]]:
    """The statements of each request the storage view sends its store, in order."""
    store = app[LIVE].store
    sent: list[list[str]] = []
    raw = store.raw

    async def recording(statements: list[str]):
        sent.append(list(statements))
        return await raw(statements)

    store.raw = recording
    return sent


def per_series(statements: list[str]) -> list[str]:
    return [s for s in statements if "GROUP BY *" in s]


async def test_the_fleet_answer_reads_what_collectors_published_not_the_devices(
    aiohttp_client, influxd, both
):
    """influxd 1.x pays per series touched (20 s for the latest window of 100k devices): the fleet and
    agents answers read one published point per collector process and the range totals' blocks."""
    _, _, clock = both
    app = create_app(
        make_config(storage(influxd, "capmon_lv"), live_view="storage", live_view_cache_s=0.0), clock=clock
    )
    client = await aiohttp_client(app)
    sent = record_statements(app)
    await get(client, "/api/v1/fleet")
    await get(client, "/api/v1/agents")
    await client.get("/metrics", headers=auth(READ_TOKEN))
    read = [s.split(" FROM ")[1].split()[0] for statements in sent for s in statements]
    assert set(read) == {"capmon_live", "capmon_totals"}, read
    # A range over whole hours reads the hour blocks, then ten minutes, then the minutes at its ends.
    await get(client, "/api/v1/fleet", since="7h")
    read = [s.split("res = ")[1].split()[0] for s in sent[-1][1:]]
    assert read[0] == read[-1] == "'1m'" and {"'10m'", "'1h'"} <= set(read) and len(read) <= 5


async def test_device_answers_read_recent_points_not_one_group_per_device(aiohttp_client, influxd, both):
    """influxd 1.x pays per series for a GROUP BY (2 s at 10k devices): a devices answer reads the
    recent raw points; the per-series read of the older tier is reused for half of RECENT_S, then
    read again — and the answers stay the memory view's as agents fall out of the recent tier."""
    from capmon.collector.liveview import RECENT_S

    memory, _, clock = both
    app = create_app(
        make_config(storage(influxd, "capmon_lv"), live_view="storage", live_view_cache_s=0.0), clock=clock
    )
    client = await aiohttp_client(app)
    sent = record_statements(app)
    first = await get(client, "/api/v1/devices", state="all")
    assert len(sent) == 1 and len(per_series(sent[0])) == 3  # the first answer reads the older tier too
    clock.advance(RECENT_S / 2 - 1)
    later = await get(client, "/api/v1/devices", state="all")
    assert [d["device_id"] for d in later["devices"]] == [d["device_id"] for d in first["devices"]]
    assert len(sent) == 2 and per_series(sent[1]) == []
    clock.advance(2)
    await get(client, "/api/v1/devices", state="all")
    assert len(per_series(sent[2])) == 3  # reused for half the recent horizon, then read again
    # Past the recent horizon every agent is only in the older tier: still the memory view's answer.
    clock.advance(RECENT_S)
    mem, sto = await get(memory, "/api/v1/fleet"), await get(client, "/api/v1/fleet")
    assert without(sto, "since") == without(mem, "since")
    assert sto["agents"] == {"total": 3, "stale": 3}
    assert sto["totals"]["states"] == {"busy": 0, "allocated_idle": 0, "free": 0, "unavailable": 8}
    for state in ("all", "unavailable"):
        assert await get(client, "/api/v1/devices", state=state, limit="1000") == await get(
            memory, "/api/v1/devices", state=state, limit="1000"
        )
