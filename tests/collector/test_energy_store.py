"""Issue 16 item 5 (API and store): a scripted fleet with known power over known hours gives exact
idle kWh and cost in /api/v1/fleet, in InfluxDB (a real influxd) and in `capmon report`.

Two H100s free at 70 W and one busy at 300 W for 3 h of 60 s windows: 2 x 70 W x 3 h = 0.42 kWh
idle; at 0.20 per kWh with PUE 1.3 that is 0.1092.
"""

from __future__ import annotations

import csv
import io
import math
import time

import msgspec
import pytest
from collector_helpers import AGENT_TOKEN, JSON, READ_TOKEN, auth, batch, body, device, make_config, report

from capmon.agent.wire import Batch
from capmon.collector.app import create_app
from capmon.collector.config import PricingConfig, StorageConfig
from capmon.collector.fleet import Pricing
from capmon.collector.lineproto import batch_lines
from capmon.collector.report import main as report_main

pytestmark = pytest.mark.integration

HOURS = 3
WINDOWS = HOURS * 60
END = int(time.time()) // 60 * 60  # the last window ends within the minute: "now" for the store
START = END - WINDOWS * 60
PRICING = PricingConfig(models={"H100": 2.5}, energy_price_per_kwh=0.20, pue=1.3)
KWH, COST, IDLE_W = 0.42, 0.1092, 140.0
# The panel "idle power now / idle energy cost over the range" (InfluxQL; Grafana puts $timeFilter).
IDLE_POWER_NOW = (
    'SELECT SUM("p") AS "idle_power_w" FROM (SELECT LAST("power_mean_w") AS "p", LAST("state_code") AS "s" '
    'FROM "capmon_device" WHERE time > now() - 5m GROUP BY "host", "device") WHERE "s" = 1 OR "s" = 2'
)
IDLE_ENERGY = (
    'SELECT SUM("idle_energy_j") / 3600000 AS "idle_energy_kwh", SUM("idle_energy_cost") AS "idle_energy_cost" '
    'FROM "capmon_device" WHERE {range}'
)
RANGE = f"time > {START}s AND time <= {END}s"


def scripted_reports() -> list[dict]:
    def window(k: int) -> dict:
        free = {"power_mean_w": 70.0, "energy_j": 70.0 * 60, "idle_energy_j": 70.0 * 60}
        return report(
            seq=k + 1,
            end=START + 60 * (k + 1),
            devices=[
                device("GPU-0", "free", index=0, **free),
                device("GPU-1", "free", index=1, **free),
                device("GPU-2", "busy", index=2, power_mean_w=300.0, energy_j=300.0 * 60, idle_energy_j=0.0),
            ],
        )

    return [window(k) for k in range(WINDOWS)]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@pytest.fixture(scope="module")
def stores(influxd):
    """Two databases with the script: `capmon_energy` filled by the real collector, and
    `capmon_energy_priced` by the collector's own line protocol with the energy price."""
    influxd.create_database("capmon_energy")
    influxd.create_database("capmon_energy_priced")
    influxd.query("DROP SERIES FROM /.*/", "capmon_energy", method="POST")
    influxd.query("DROP SERIES FROM /.*/", "capmon_energy_priced", method="POST")
    p = Pricing(PRICING)
    lines = batch_lines(
        msgspec.convert(batch(scripted_reports()), Batch), ("site",), p.for_device, p.energy_cost
    )
    status, text = influxd.write("capmon_energy_priced", "\n".join(lines))
    assert status == 204, text
    return influxd


@pytest.fixture
async def api(aiohttp_client, stores):
    import dataclasses

    config = dataclasses.replace(
        make_config(
            StorageConfig(kind="influxdb_v1", url=stores.url, db="capmon_energy", flush_interval_s=0.0)
        ),
        pricing=PRICING,
    )
    clock = Clock(START - 1)
    client = await aiohttp_client(create_app(config, clock=clock))
    for r in scripted_reports():  # each window a second after it ends, as from a live agent
        clock.now = r["end"] + 1
        resp = await client.post(
            "/api/v1/reports", data=body(batch([r])), headers={**JSON, **auth(AGENT_TOKEN)}
        )
        assert resp.status == 200, await resp.text()
    return client


def one_row(influxd, q: str, db: str) -> dict:
    [row] = influxd.rows(q, db)
    return row


async def test_the_api_gives_the_scripts_idle_kwh_cost_and_power(api):
    resp = await api.get("/api/v1/fleet", headers=auth(READ_TOKEN))
    fleet = await resp.json()
    t = fleet["totals"]
    assert (t["idle_energy_kwh"], t["idle_energy_cost"], t["idle_power_w"]) == (KWH, COST, IDLE_W)
    [model] = fleet["by_model"].values()
    assert (model["idle_energy_kwh"], model["idle_energy_cost"]) == (KWH, COST)
    assert fleet["by_label"]["site"]["fra1"]["idle_energy_kwh"] == KWH
    resp = await api.get("/api/v1/devices", params={"state": "all"}, headers=auth(READ_TOKEN))
    devices = {d["device_id"]: d for d in (await resp.json())["devices"]}
    assert devices["GPU-0"]["idle_energy_kwh"] == KWH / 2 and devices["GPU-0"]["idle_power_w"] == 70.0
    assert devices["GPU-2"]["idle_energy_kwh"] == 0.0 and devices["GPU-2"]["idle_power_w"] == 0.0


async def test_the_store_filled_by_the_collector_sums_to_the_scripts_idle_kwh_and_cost(api, stores):
    row = one_row(stores, IDLE_ENERGY.format(range=RANGE), "capmon_energy")
    # The collector prices idle energy itself ([pricing] energy_price_per_kwh × pue).
    assert close(row["idle_energy_kwh"], KWH) and close(row["idle_energy_cost"], COST)
    assert stores.field_types("capmon_energy", "capmon_device")["idle_energy_j"] == "float"
    assert stores.field_types("capmon_energy", "capmon_device")["energy_j"] == "float"
    assert close(one_row(stores, IDLE_POWER_NOW, "capmon_energy")["idle_power_w"], IDLE_W)


def test_the_priced_store_and_the_panel_queries_give_the_scripts_cost(stores):
    row = one_row(stores, IDLE_ENERGY.format(range=RANGE), "capmon_energy_priced")
    assert close(row["idle_energy_kwh"], KWH) and close(row["idle_energy_cost"], COST)
    assert close(one_row(stores, IDLE_POWER_NOW, "capmon_energy_priced")["idle_power_w"], IDLE_W)


def test_capmon_report_gives_the_scripts_idle_kwh_and_cost(stores, tmp_path):
    out = tmp_path / "r.csv"
    argv = ["--since", str(START), "--until", str(END), "--format", "csv", "--out", str(out)]
    assert report_main([*argv, "--influx-url", stores.url, "--influx-db", "capmon_energy_priced"]) == 0
    rows = {
        (r["section"], r["key"], r["metric"]): float(r["value"])
        for r in csv.DictReader(io.StringIO(out.read_text()))
    }
    assert close(rows[("totals", "", "idle_energy_kwh")], KWH)
    assert close(rows[("totals", "", "idle_energy_cost")], COST)
