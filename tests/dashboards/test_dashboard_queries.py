"""Every dashboard query, expanded as Grafana expands it, run against a real influxd that the real
agent → collector pipeline filled from a scripted mock fleet; the numbers are checked against the
script and against the collector's own fleet API.
"""

from __future__ import annotations

import math

import pytest
from dashboard_fleet import (
    A100,
    ASCEND,
    DURATION_S,
    ENERGY_PRICE_PER_KWH,
    FLEET,
    H100,
    HOLDERS,
    LOST_WINDOWS,
    MIG_HOST,
    PRICES,
    PROBE_ERRORS_EXPECTED,
    PROBE_TIMEOUTS_EXPECTED,
    PUE,
    SPIN_S,
    T0,
    WINDOW_S,
    default_selection,
    expand,
    expected_devices,
    expected_energy,
    fill,
    load_dashboards,
    panel_interval_ms,
    panel_targets,
    panels,
)

from capmon.agent import __version__
from capmon.plugins.mock.probe import MODELS

pytestmark = pytest.mark.integration

DB = "capmon"
FROM_S, TO_S = T0, T0 + DURATION_S
DASHBOARDS = load_dashboards()
EXPECTED = expected_devices()
IDLE = ("free", "allocated_idle")


@pytest.fixture(scope="module")
def filled(influxd):
    influxd.create_database(DB)
    return influxd, fill(influxd.url, DB)


def run(influxd, query: str) -> list[dict]:
    return influxd.rows(query, DB)


def panel_by_title(uid: str, title: str) -> dict:
    (p,) = [p for p in panels(DASHBOARDS[uid]) if p["title"] == title]
    return p


def panel_rows(influxd, uid: str, title: str, ref: str = "A", to_s: int = TO_S, **chosen) -> list[dict]:
    dashboard = DASHBOARDS[uid]
    p = panel_by_title(uid, title)
    (t,) = [t for t in p["targets"] if t["refId"] == ref]
    q = expand(
        t["query"],
        default_selection(dashboard, **chosen),
        FROM_S,
        to_s,
        panel_interval_ms(p, "1m", FROM_S, to_s),
    )
    return run(influxd, q)


def value(rows: list[dict], column: str | None = None) -> float:
    (row,) = rows
    if column is None:
        (column,) = [k for k in row if k not in ("time", "_measurement")]
    return row[column]


# -- every panel -----------------------------------------------------------------------------------

GPU_A = FLEET[0].host  # "gpu-a01.ams1.example.com": its dots are regex-escaped
HOST_CHOICE = {"capmon-host": {"host": GPU_A}}
ALL_TARGETS = panel_targets(DASHBOARDS)


@pytest.mark.parametrize(("uid", "title", "ref"), ALL_TARGETS)
def test_every_panel_query_runs_and_returns_data(filled, uid, title, ref):
    influxd, _ = filled
    rows = panel_rows(influxd, uid, title, ref, **HOST_CHOICE.get(uid, {}))
    values = [v for r in rows for k, v in r.items() if k not in ("time", "_measurement") and v is not None]
    assert values, f"{uid} / {title} / {ref} returned no data"


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_every_variable_query_lists_values(filled, uid):
    influxd, _ = filled
    dashboard = DASHBOARDS[uid]
    chosen = HOST_CHOICE.get(uid, {})
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        q = expand(var["query"], default_selection(dashboard, **chosen), FROM_S, TO_S, 60_000)
        assert run(influxd, q), f"{uid}: variable {var['name']} lists nothing: {q}"


def test_variables_cascade_with_multi_value_regex(filled):
    influxd, _ = filled
    fleet = DASHBOARDS["capmon-fleet"]
    (host_var,) = [v for v in fleet["templating"]["list"] if v["name"] == "host"]
    sel = default_selection(fleet, site=["ams1"], cluster=["c1", "c2"])
    q = expand(host_var["query"], sel, FROM_S, TO_S, 60_000)
    assert "/^(c1|c2)$/" in q and "/^ams1$/" in q
    assert sorted(r["value"] for r in run(influxd, q)) == [GPU_A, "gpu-b01"]
    q = expand(host_var["query"], default_selection(fleet, site="fra2"), FROM_S, TO_S, 60_000)
    assert [r["value"] for r in run(influxd, q)] == ["npu-c01"]


NOW_TARGETS = [
    pytest.param(uid, p["title"], t["refId"], id=f"{uid}:{p['title']}:{t['refId']}")
    for uid, d in DASHBOARDS.items()
    for p in panels(d)
    for t in p["targets"]
    if "$now_window" in t["query"]
]


@pytest.mark.parametrize(("uid", "title", "ref"), NOW_TARGETS)
def test_now_panels_follow_the_now_window(filled, uid, title, ref):
    """Looked at 5 minutes after the last report (as if the agents reported every 100 s or more),
    the default 3m window sees nothing; a 10m window sees what 3m saw at the last report."""
    influxd, _ = filled
    chosen = HOST_CHOICE.get(uid, {})

    def data(rows):
        return [{k: v for k, v in r.items() if k != "time"} for r in rows]

    at_end = data(panel_rows(influxd, uid, title, ref, **chosen))
    assert at_end
    late = TO_S + 300
    stale = data(panel_rows(influxd, uid, title, ref, to_s=late, **chosen))
    assert not [v for r in stale for k, v in r.items() if k != "_measurement" and v], stale
    wider = data(panel_rows(influxd, uid, title, ref, to_s=late, now_window="10m", **chosen))
    assert wider == at_end


def test_each_fleet_variable_is_filtered_by_the_ones_before_it(filled):
    """site → cluster → pool → model → host: a choice narrows every list after it."""
    influxd, _ = filled
    fleet = DASHBOARDS["capmon-fleet"]
    variables = {v["name"]: v for v in fleet["templating"]["list"]}

    def listed(name, **chosen):
        q = expand(variables[name]["query"], default_selection(fleet, **chosen), FROM_S, TO_S, 60_000)
        return sorted(r["value"] for r in run(influxd, q))

    assert listed("model") == sorted({H100, A100, ASCEND})
    assert listed("model", pool=["training"]) == [H100]
    assert listed("model", pool=["inference", "research"]) == sorted([A100, ASCEND])
    assert listed("host", model=[A100]) == ["gpu-b01"]
    assert listed("host", pool=["training", "research"], model=[ASCEND]) == ["npu-c01"]
    order = [v["name"] for v in fleet["templating"]["list"] if v["type"] == "query"]
    assert order == ["site", "cluster", "pool", "model", "host"]
    for i, name in enumerate(order):
        for before in order[:i]:
            assert f'"{before}" =~ /^${before}$/' in variables[name]["query"], (name, before)


# -- Fleet idle capacity ---------------------------------------------------------------------------


def test_devices_now_by_state_match_script_and_collector(filled):
    influxd, fleet_api = filled
    for state, title in (
        ("free", "Devices free"),
        ("allocated_idle", "Devices allocated idle"),
        ("busy", "Devices busy"),
        ("unavailable", "Devices unavailable"),
    ):
        expected = sum(d.state_now == state for d in EXPECTED)
        assert value(panel_rows(influxd, "capmon-fleet", title)) == expected, title
        assert fleet_api["totals"]["states"][state] == expected, state
    assert sum(d.state_now == "free" for d in EXPECTED) == 10 + 4  # 4 of them MIG instances
    # A device count stays a count of devices: the 7 instances of one GPU are 7 devices.
    mig_now = [d.state_now for d in EXPECTED if d.host == MIG_HOST and d.fraction < 1]
    assert len(mig_now) == 7
    assert value(panel_rows(influxd, "capmon-fleet", "Devices free", host=[MIG_HOST])) == 4
    assert value(panel_rows(influxd, "capmon-fleet", "Devices allocated idle", host=[MIG_HOST])) == 2


def gpu_hours(devices, *states: str) -> float:
    return sum(d.gpu_seconds(*states) for d in devices) / 3600


def test_idle_gpu_hours_value_and_share(filled):
    influxd, fleet_api = filled
    # 24 whole devices idle 39 2/3 device-hours; 6 of the 7 MIG instances idle for 3 h: 18/7 GPU-hours.
    assert gpu_hours(EXPECTED, *IDLE) == pytest.approx(39 + 2 / 3 + 18 / 7)
    hours = value(panel_rows(influxd, "capmon-fleet", "Idle GPU-hours"))
    assert hours == pytest.approx(gpu_hours(EXPECTED, *IDLE))
    assert hours == pytest.approx(fleet_api["totals"]["idle_gpu_hours"], abs=1e-5)
    # Counted as devices the MIG host would show 18 idle hours for one GPU in 3 h.
    assert fleet_api["totals"]["idle_device_hours"] == pytest.approx(39 + 2 / 3 + 18, abs=1e-5)
    share = value(panel_rows(influxd, "capmon-fleet", "Idle share of GPU-time"))
    gpus = sum(d.fraction for d in EXPECTED)
    assert gpus == pytest.approx(24 + 1 + 1)
    assert share == pytest.approx(100 * gpu_hours(EXPECTED, *IDLE) * 3600 / (gpus * DURATION_S))
    alloc = value(panel_rows(influxd, "capmon-fleet", "Allocated-idle GPU-hours"))
    assert alloc == pytest.approx(gpu_hours(EXPECTED, "allocated_idle"))
    assert alloc == pytest.approx(fleet_api["totals"]["gpu_hours"]["allocated_idle"], abs=1e-5)
    unavailable = value(panel_rows(influxd, "capmon-fleet", "Unavailable GPU-hours"))
    assert unavailable == pytest.approx(gpu_hours(EXPECTED, "unavailable")) == pytest.approx(3)


def test_a_mig_instance_counts_as_its_share_of_the_gpu(filled):
    """gpu-d01: one H100 as 7 × 1g instances, 6 idle for the 3 h (one of them allocated for the last
    hour, one all along), one training: 1/7 GPU-hour per instance-hour, as /api/v1/fleet says."""
    influxd, fleet_api = filled
    mig = {"host": [MIG_HOST]}
    hours = value(panel_rows(influxd, "capmon-fleet", "Idle GPU-hours", **mig))
    assert hours == pytest.approx(6 * 3 / 7)
    alloc = value(panel_rows(influxd, "capmon-fleet", "Allocated-idle GPU-hours", **mig))
    assert alloc == pytest.approx((3 + 1) / 7)
    c4 = fleet_api["by_label"]["cluster"]["c4"]  # gpu-d01's cluster, no other host in it
    assert c4["idle_gpu_hours"] == pytest.approx(hours, abs=1e-5)
    assert c4["gpu_hours"]["allocated_idle"] == pytest.approx(alloc, abs=1e-5)
    assert c4["idle_device_hours"] == pytest.approx(18, abs=1e-5)  # what the dashboards no longer show
    value_ = value(panel_rows(influxd, "capmon-fleet", "Idle value ($currency)", **mig))
    assert value_ == pytest.approx(6 * 3 * PRICES["H100"] / 7)
    # The one whole H100 there is busy all along: the host's idle share is 6/7 of one GPU of two.
    share = value(panel_rows(influxd, "capmon-fleet", "Idle share of GPU-time", **mig))
    assert share == pytest.approx(100 * (6 / 7) / 2)
    rows = panel_rows(influxd, "capmon-fleet", "Idle GPUs by model (average per interval)", **mig)
    assert {round(r["sum"], 9) for r in rows if r["sum"] is not None} == {round(6 / 7, 9)}


ENERGY = expected_energy()
ENERGY_COLUMNS = ("idle kWh", "idle energy cost (USD)")


def test_idle_energy_replay_follows_the_mock_models():
    """The replayed expectation is the mock's idle power × idle time: a mock device idles at its
    model's idle watts plus up to 5 W of noise (a notebook's rare 2 % blips aside); a scripted one
    (gpu-d01) at 100 W."""
    for d in EXPECTED:
        idle_s = d.seconds["free"] + d.seconds["allocated_idle"]
        joules = ENERGY.idle_energy_j[(d.host, d.device)]
        if d.host == MIG_HOST:
            assert joules == pytest.approx(100 * idle_s), d.device
        elif idle_s:
            idle_w, max_w = MODELS[d.model][1:3]
            assert idle_w * idle_s <= joules <= (idle_w + 5 + 0.02 * (max_w - idle_w)) * idle_s, d.device
        else:
            assert joules == 0, d.device
    assert sorted(ENERGY.idle_power_now_w) == sorted(
        (d.host, d.device) for d in EXPECTED if d.state_now in IDLE
    )


def test_idle_power_now_and_idle_energy_cost(filled):
    influxd, fleet_api = filled
    kwh = ENERGY.kwh(EXPECTED)
    assert kwh == pytest.approx(4.8917, abs=1e-4)  # 69 idle device-hours at 55–100 W
    watts = ENERGY.watts_now(EXPECTED)
    assert watts == pytest.approx(1675.0)  # 20 devices idle now
    assert value(panel_rows(influxd, "capmon-fleet", "Idle power now")) == pytest.approx(watts)
    assert fleet_api["totals"]["idle_power_w"] == pytest.approx(watts)
    (row,) = panel_rows(influxd, "capmon-fleet", "Idle energy cost over the range")
    cost = kwh * ENERGY_PRICE_PER_KWH * PUE
    assert (row[ENERGY_COLUMNS[0]], row[ENERGY_COLUMNS[1]]) == pytest.approx((kwh, cost))
    assert fleet_api["totals"]["idle_energy_kwh"] == pytest.approx(kwh, abs=1e-5)
    assert fleet_api["totals"]["idle_energy_cost"] == pytest.approx(cost, abs=1e-5)
    # The filters narrow both: the MIG host's 6 idle instances, at 100 W for the 3 h.
    mig = [d for d in EXPECTED if d.host == MIG_HOST]
    assert value(panel_rows(influxd, "capmon-fleet", "Idle power now", host=[MIG_HOST])) == pytest.approx(600)
    (row,) = panel_rows(influxd, "capmon-fleet", "Idle energy cost over the range", host=[MIG_HOST])
    assert row[ENERGY_COLUMNS[0]] == pytest.approx(ENERGY.kwh(mig)) == pytest.approx(6 * 3 * 0.1)
    h100 = [d for d in EXPECTED if d.model == H100]
    (row,) = panel_rows(influxd, "capmon-fleet", "Idle energy cost over the range", model=[H100])
    assert row[ENERGY_COLUMNS[1]] == pytest.approx(ENERGY.kwh(h100) * ENERGY_PRICE_PER_KWH * PUE)


# Idle GPU-hours per model, counted by hand from FLEET's phase lists, at PRICES (dashboard_fleet):
#   H100   gpu-a01  idle 3 + notebook 3 + 2 + 1.5 + idle 3          = 12.5 h
#          gpu-d01  6 MIG instances (1/7 each) × 3 h                 = 18/7 h  → 15 1/14 h × 2.10 = 31.65
#   A100   gpu-b01  1 + notebook 3 + notebook 2.5 + idle 3           =  9.5 h  × 1.20 = 11.40
#   910B3  npu-c01  2.5 + 3 + 3 + notebook 3 + 3 + 3 + 1/6           = 17 2/3 h × 0.90 = 15.90
IDLE_HOURS = {H100: 12.5 + 18 / 7, A100: 9.5, ASCEND: 17 + 2 / 3}
IDLE_VALUE = {H100: 31.65, A100: 11.40, ASCEND: 15.90}
VALUE_COLUMN = "idle value (USD)"  # the alias "idle value ($currency)" with the default currency


def test_idle_value_is_priced_per_model(filled):
    influxd, fleet_api = filled
    for model, hours in IDLE_HOURS.items():
        assert gpu_hours([d for d in EXPECTED if d.model == model], *IDLE) == pytest.approx(hours), model
    total = value(panel_rows(influxd, "capmon-fleet", "Idle value ($currency)"))
    assert total == pytest.approx(58.95)
    by_model = {
        r["model"]: r[VALUE_COLUMN] for r in panel_rows(influxd, "capmon-fleet", "Idle capacity by model")
    }
    assert by_model == pytest.approx(IDLE_VALUE)
    # The collector's /api/v1/fleet prices the same way: its value per hour of the GPU-equivalents
    # idle now, per model, is that model's price; × its idle GPU-hours it gives the dashboard's value.
    for model, m in fleet_api["by_model"].items():
        price = m["idle_value_per_hour"] / m["idle_gpu_equivalents"]
        assert price == pytest.approx(IDLE_VALUE[model] / IDLE_HOURS[model]), model
        assert by_model[model] == pytest.approx(m["idle_gpu_hours"] * price, abs=1e-4), model
    rows = panel_rows(influxd, "capmon-fleet", "Idle capacity by site / cluster / pool")
    by_cluster = {r["cluster"]: r[VALUE_COLUMN] for r in rows}
    assert by_cluster == pytest.approx({"c1": 26.25, "c2": 11.40, "c3": 15.90, "c4": 5.40})
    h100 = panel_rows(influxd, "capmon-fleet", "Idle value ($currency)", model=[H100])
    assert value(h100) == pytest.approx(31.65)
    ams1 = panel_rows(influxd, "capmon-fleet", "Idle value ($currency)", site=["ams1"])
    assert value(ams1) == pytest.approx(26.25 + 11.40 + 5.40)


def test_breakdowns_by_model_and_labels(filled):
    influxd, fleet_api = filled
    rows = panel_rows(influxd, "capmon-fleet", "Idle capacity by model")
    got = {r["model"]: r["idle GPU-hours"] for r in rows}
    want: dict[str, float] = {}
    for d in EXPECTED:
        want[d.model] = want.get(d.model, 0) + d.gpu_seconds(*IDLE) / 3600
    assert got == pytest.approx(want)
    assert got == pytest.approx({m: v["idle_gpu_hours"] for m, v in fleet_api["by_model"].items()}, abs=1e-5)
    alloc = {r["model"]: r["allocated-idle GPU-hours"] for r in rows}
    assert alloc == pytest.approx(
        {m: v["gpu_hours"]["allocated_idle"] for m, v in fleet_api["by_model"].items()}, abs=1e-5
    )
    assert alloc[H100] == pytest.approx(3 + (3 + 1) / 7)

    rows = panel_rows(influxd, "capmon-fleet", "Idle capacity by site / cluster / pool")
    by_cluster = {r["cluster"]: r["idle GPU-hours"] for r in rows}
    api = fleet_api["by_label"]["cluster"]
    assert by_cluster == pytest.approx({c: v["idle_gpu_hours"] for c, v in api.items()}, abs=1e-5)
    share = {r["cluster"]: r["idle share"] for r in rows}
    assert share["c4"] == pytest.approx(100 * (6 / 7) / 2)

    counts = {}
    for ref, state in zip("ABCD", ("busy", "allocated_idle", "free", "unavailable"), strict=True):
        for r in panel_rows(influxd, "capmon-fleet", "Devices now by model", ref):
            counts[(r["model"], state)] = next(
                v for k, v in r.items() if k not in ("time", "model", "_measurement")
            )
    for model, m in fleet_api["by_model"].items():
        for state, n in m["states"].items():
            assert counts.get((model, state), 0) == n, (model, state)


def test_filters_narrow_with_grafana_regex_forms(filled):
    influxd, _ = filled

    def hours(devices):
        return gpu_hours(devices, *IDLE)

    got = value(panel_rows(influxd, "capmon-fleet", "Idle GPU-hours", site=["ams1"], cluster=["c1", "c2"]))
    assert got == pytest.approx(hours([d for d in EXPECTED if d.labels["cluster"] in ("c1", "c2")]))
    got = value(panel_rows(influxd, "capmon-fleet", "Idle GPU-hours", model=["NVIDIA H100 80GB HBM3"]))
    assert got == pytest.approx(hours([d for d in EXPECTED if d.model == "NVIDIA H100 80GB HBM3"]))
    got = value(panel_rows(influxd, "capmon-fleet", "Devices free", host=["npu-c01", "gpu-b01"]))
    assert got == sum(d.state_now == "free" and d.host in ("npu-c01", "gpu-b01") for d in EXPECTED)


def test_longest_idle_table_order(filled):
    influxd, fleet_api = filled
    p = panel_by_title("capmon-fleet", "Longest-idle devices")
    (sort,) = p["options"]["sortBy"]
    rows = panel_rows(influxd, "capmon-fleet", "Longest-idle devices")
    rows.sort(key=lambda r: r[sort["displayName"]], reverse=sort["desc"])  # what the table panel shows
    got = [(r["host"], r["device"], r["idle for"], r["idle since"] / 1000) for r in rows]
    idle = sorted((d for d in EXPECTED if d.idle_since is not None), key=lambda d: d.idle_since)
    assert len(got) == len(idle) == 14 + 6
    by_device = {(r["host"], r["device"]): r for r in rows}
    for d in idle:
        r = by_device[(d.host, d.device)]
        assert r["in this state for"] == TO_S - d.state_since, d.device
        assert r["GPU share"] == pytest.approx(d.fraction), d.device
        assert r["state"] == d.state_now
    # Free for 2 h, then a notebook took it: idle for 3 h, but allocated idle only for the last hour.
    taken = by_device[(MIG_HOST, "MIG-d01-0-4")]
    assert (taken["idle for"], taken["in this state for"]) == (3 * 3600, 3600)
    assert taken["reason"] == "1 process(es)"
    assert [g[2] for g in got] == [float(TO_S - d.idle_since) for d in idle]
    assert {(g[0], g[1], g[3]) for g in got} == {(d.host, d.device, d.idle_since) for d in idle}
    assert got[-4:] == [(d.host, d.device, float(TO_S - d.idle_since), d.idle_since) for d in idle[-4:]]
    api = fleet_api["_devices"]["devices"]
    # The collector measures idle_for from its own clock; its order and idle_since are the same.
    assert [d["idle_since"] for d in api] == [g[3] for g in got]


def idle_gpus_in_window(end: int) -> float:
    """GPU-equivalents idle through the window ending at `end`, from the phase lists."""
    return sum(d.fraction for d in EXPECTED if d.profile_at(end - T0) in ("idle", "notebook"))


def test_idle_share_over_time_follows_the_script(filled):
    influxd, _ = filled
    rows = [
        r for r in panel_rows(influxd, "capmon-fleet", "Idle share over time") if r["idle share"] is not None
    ]
    assert len(rows) == DURATION_S // WINDOW_S
    for r in rows:
        # $__interval is 1m: the bucket starting at t holds the points stamped t, the window ending at t.
        assert r["idle share"] == pytest.approx(100 * idle_gpus_in_window(r["time"]) / (24 + 2)), r["time"]
    rows = panel_rows(influxd, "capmon-fleet", "Idle GPUs by model (average per interval)")
    last = {r["model"]: r for r in rows if r["time"] == TO_S}
    assert sum(r["sum"] for r in last.values()) == pytest.approx(14 + 6 / 7)
    rows = panel_rows(influxd, "capmon-fleet", "Idle GPU-hours by site (per interval)")
    assert sum(r["sum"] for r in rows if r["sum"] is not None) == pytest.approx(gpu_hours(EXPECTED, *IDLE))


def test_spin_is_busy_doing_nothing(filled):
    """GPU-d01-1 hangs for 1.5 h at 100 % utilisation and 2 % SM activity: busy, and spin."""
    influxd, _ = filled
    assert value(panel_rows(influxd, "capmon-fleet", "Busy but doing nothing (spin)")) == pytest.approx(
        SPIN_S / 3600
    )
    assert value(panel_rows(influxd, "capmon-fleet", "Busy but doing nothing (spin)", host=[GPU_A])) == 0
    rows = panel_rows(influxd, "capmon-host", "Busy but doing nothing (spin)", host=MIG_HOST)
    spin = {r["time"]: r["sum"] for r in rows if r["device"] == "GPU-d01-1" and r["sum"] is not None}
    assert len(spin) == DURATION_S // WINDOW_S
    # "training:3600,spin:5400,training:1800"; the bucket starting at t holds the window ending at t.
    assert {t for t, v in spin.items() if v == 100} == set(
        range(T0 + 3600 + WINDOW_S, T0 + 9000 + 1, WINDOW_S)
    )
    assert {v for t, v in spin.items() if not T0 + 3600 < t <= T0 + 9000} == {0}
    others = {r["sum"] for r in rows if r["device"] != "GPU-d01-1" and r["sum"] is not None}
    assert others == {0}
    (now,) = panel_rows(influxd, "capmon-host", "Devices now", host=MIG_HOST, device=["GPU-d01-1"])
    assert (now["state"], now["spin"], now["in this state for"]) == ("busy", 0, DURATION_S)


# -- Host detail -----------------------------------------------------------------------------------


def test_host_state_timeline_follows_the_script(filled):
    influxd, _ = filled
    rows = panel_rows(influxd, "capmon-host", "Device state", host=GPU_A)
    dev5 = {r["time"]: r["last"] for r in rows if r["device"] == "MOCK-000-05" and r["last"] is not None}
    # "idle:5400,training:5400": free for 90 minutes, then busy.
    assert {s for t, s in dev5.items() if t <= T0 + 5400} == {"free"}
    assert {s for t, s in dev5.items() if t > T0 + 5400} == {"busy"}
    assert {r["last"] for r in rows if r["device"] == "MOCK-000-07" and r["last"]} == {"unavailable"}
    devices = {r["device"] for r in rows}
    assert devices == {f"MOCK-000-{i:02d}" for i in range(8)}
    now = panel_rows(influxd, "capmon-host", "Devices now", host=GPU_A, device=["MOCK-000-02", "MOCK-000-05"])
    assert {r["device"]: r["state"] for r in now} == {"MOCK-000-02": "free", "MOCK-000-05": "busy"}
    mig = {r["device"]: r for r in panel_rows(influxd, "capmon-host", "Devices now", host=MIG_HOST)}
    assert len(mig) == 8  # the 7 instances and the whole GPU; the split GPU itself is no capacity
    assert {d: round(r["GPU share"], 6) for d, r in mig.items()} == {
        d.device: round(d.fraction, 6) for d in EXPECTED if d.host == MIG_HOST
    }
    assert mig["MIG-d01-0-5"]["reason"] == "1 process(es)"
    assert (mig["MIG-d01-0-4"]["in this state for"], mig["MIG-d01-0-4"]["idle for"]) == (3600, 3 * 3600)
    assert mig["MIG-d01-0-0"]["reason"] is None and mig["MIG-d01-0-0"]["state"] == "free"
    util = panel_rows(influxd, "capmon-host", "Utilisation", host=GPU_A, device=["MOCK-000-00"])
    assert all(90 <= r["mean"] <= 100 for r in util if r["mean"] is not None)


# -- Agents ----------------------------------------------------------------------------------------


def test_agents_counters(filled):
    influxd, _ = filled
    assert value(panel_rows(influxd, "capmon-agents", "Agents reporting now")) == len(FLEET)
    assert value(panel_rows(influxd, "capmon-agents", "Agents seen in the range")) == len(FLEET)
    assert value(panel_rows(influxd, "capmon-agents", "Dropped reports")) == 2
    assert value(panel_rows(influxd, "capmon-agents", "Dead-lettered reports")) == 1
    assert value(panel_rows(influxd, "capmon-agents", "Lost windows")) == LOST_WINDOWS
    assert value(panel_rows(influxd, "capmon-agents", "Lost windows", agent=[GPU_A])) == 0
    lost = panel_rows(influxd, "capmon-agents", "Dropped reports, lost windows and dead letters")
    assert sum(r["lost"] or 0 for r in lost if r["agent"] == "npu-c01") == LOST_WINDOWS
    assert sum(r["dropped"] or 0 for r in lost if r["agent"] == "npu-c01") == 2
    assert value(panel_rows(influxd, "capmon-agents", "Probe errors")) == PROBE_ERRORS_EXPECTED
    assert value(panel_rows(influxd, "capmon-agents", "Probe timeouts")) == PROBE_TIMEOUTS_EXPECTED
    spool = panel_rows(influxd, "capmon-agents", "Spool depth")
    assert max(r["max"] or 0 for r in spool if r["agent"] == "npu-c01") == 30
    assert max(r["max"] or 0 for r in spool if r["agent"] != "npu-c01") == 0
    last = {r["agent"]: r for r in panel_rows(influxd, "capmon-agents", "Last report per agent")}
    assert set(last) == {h.host for h in FLEET}
    assert {r["time"] for r in last.values()} == {TO_S}
    assert last["npu-c01"]["seq"] == DURATION_S // WINDOW_S
    assert {a: r["lost windows (total)"] for a, r in last.items()} == {
        h.host: LOST_WINDOWS if h.host == "npu-c01" else 0 for h in FLEET
    }
    assert {r["version"] for r in last.values()} == {__version__}
    probes = {(r["agent"], r["probe"]): r for r in panel_rows(influxd, "capmon-agents", "Probes")}
    assert probes[("npu-c01", "flaky_driver")]["errors"] == PROBE_ERRORS_EXPECTED
    assert probes[("npu-c01", "slow_driver")]["timeouts"] == PROBE_TIMEOUTS_EXPECTED
    assert probes[(GPU_A, "mock")]["status"] == "active"
    only_c = panel_rows(influxd, "capmon-agents", "Probe errors", site=["fra2"])
    assert value(only_c) == PROBE_ERRORS_EXPECTED
    assert not math.isnan(value(panel_rows(influxd, "capmon-agents", "Probe errors", agent=[GPU_A])))


# -- Who holds them (capmon_holder) ----------------------------------------------------------------


def _price(model: str) -> float:
    return next(p for key, p in PRICES.items() if key in model)


def allocated_idle_by(key) -> dict[str | None, tuple[float, float]]:
    """Holder key → (allocated-idle GPU-hours, their value), from the script alone: each device's
    allocated-idle time split evenly over its holders."""
    devices = {(d.host, d.device): d for d in EXPECTED}
    out: dict[str | None, tuple[float, float]] = {}
    for (host, device), holders in HOLDERS.items():
        d = devices[(host, device)]
        hours = d.gpu_seconds("allocated_idle") / 3600 / len(holders)
        for h in holders:
            k = key(h)
            h0, v0 = out.get(k, (0.0, 0.0))
            out[k] = (h0 + hours, v0 + hours * _price(d.model))
    return out


def flat(pairs: dict) -> dict:
    """{key: (hours, value)} → {(key, 0): hours, (key, 1): value}: what pytest.approx compares."""
    return {(k, i): v for k, vs in pairs.items() for i, v in enumerate(vs)}


def test_allocated_idle_by_user_namespace_and_job(filled):
    influxd, fleet_api = filled
    by_user = allocated_idle_by(lambda h: h.user)
    # alice: an H100 notebook for 3 h and a 1/7 MIG notebook for 3 h; bob: a job holding two A100s
    # (3 h + 2.5 h idle); carol: one NPU, two processes; dave: 1/7 of an H100 for 1 h; erin and
    # frank: busy (frank's GPU spinning) — held, never allocated idle.
    assert flat(by_user) == pytest.approx(
        flat(
            {
                "alice": (3 + 3 / 7, 2.10 * (3 + 3 / 7)),
                "bob": (5.5, 1.20 * 5.5),
                "carol": (3, 0.90 * 3),
                "dave": (1 / 7, 2.10 / 7),
                "erin": (0, 0),
                "frank": (0, 0),
            }
        )
    )
    hours, value_ = "allocated-idle GPU-hours", "allocated-idle value (USD)"
    rows = panel_rows(influxd, "capmon-fleet", "Allocated idle by user")
    got = {r["user"]: (r[hours], r[value_] or 0) for r in rows}
    assert flat(got) == pytest.approx(flat(by_user))
    api = {h["holder"]: h for h in fleet_api["_holders"]["user"]["holders"]}
    assert {u: api[u]["allocated_idle_gpu_hours"] for u in by_user} == pytest.approx(
        {u: v[0] for u, v in by_user.items()}, abs=1e-5
    )
    # Every device allocated idle in the script has known holders: their shares add up to the
    # devices' allocated-idle time, and each device's value to the device's.
    assert {d.device for d in EXPECTED if d.seconds["allocated_idle"]} <= {dev for _, dev in HOLDERS}
    device_total = value(panel_rows(influxd, "capmon-fleet", "Allocated-idle GPU-hours"))
    assert sum(h for h, _ in got.values()) == pytest.approx(device_total)

    rows = panel_rows(influxd, "capmon-fleet", "Allocated idle by namespace")
    got = {r["namespace"]: (r[hours], r[value_] or 0) for r in rows}
    want = allocated_idle_by(lambda h: h.namespace or "")  # a holder outside a pod: no namespace tag
    assert flat(got) == pytest.approx(flat(want))
    assert got["research"] == pytest.approx((3 + 3 / 7, 2.10 * (3 + 3 / 7)))
    api = {h["holder"]: h for h in fleet_api["_holders"]["namespace"]["holders"]}
    assert api["research"]["allocated_idle_gpu_hours"] == pytest.approx(got["research"][0], abs=1e-5)
    assert api["inference"]["allocated_idle_gpu_hours"] == pytest.approx(got["inference"][0], abs=1e-5)

    # By job: InfluxDB sums each holder series, Grafana's groupBy transformation adds up a job's.
    p = panel_by_title("capmon-fleet", "Allocated idle by job")
    (group,) = [t for t in p["transformations"] if t["id"] == "groupBy"]
    fields = group["options"]["fields"]
    assert fields["job"]["operation"] == "groupby" and fields[hours]["aggregations"] == ["sum"]
    jobs: dict[str, tuple[float, float]] = {}
    assert set(fields) == {"job", "user", hours, "allocated-idle value"}  # literal names, no $currency
    for r in panel_rows(influxd, "capmon-fleet", "Allocated idle by job"):
        h0, v0 = jobs.get(r["job"], (0.0, 0.0))
        jobs[r["job"]] = (h0 + r[hours], v0 + (r["allocated-idle value"] or 0))
    want = {k: v for k, v in allocated_idle_by(lambda h: h.slurm_job_id).items() if k is not None}
    assert flat(jobs) == pytest.approx(flat(want))
    assert jobs["81234"] == pytest.approx((5.5, 6.6))  # bob's job, two A100s
    api = {h["holder"]: h for h in fleet_api["_holders"]["job"]["holders"]}
    assert {j: api[j]["allocated_idle_gpu_hours"] for j in jobs} == pytest.approx(
        {j: v[0] for j, v in jobs.items()}, abs=1e-5
    )


def test_reclaim_candidates(filled):
    influxd, fleet_api = filled
    p = panel_by_title("capmon-fleet", "Reclaim candidates")
    (sort,) = p["options"]["sortBy"]
    rows = panel_rows(influxd, "capmon-fleet", "Reclaim candidates")
    rows.sort(key=lambda r: r[sort["displayName"]], reverse=sort["desc"])
    devices = {(d.host, d.device): d for d in EXPECTED}
    want = {
        (h.user, h.pid): (host, device)
        for (host, device), holders in HOLDERS.items()
        for h in holders
        if devices[(host, device)].state_now == "allocated_idle"
    }
    assert {(r["user"], int(r["pid"])): (r["host"], r["device"]) for r in rows} == want
    assert len(rows) == 7  # erin and frank are busy: no candidates
    for r in rows:
        d = devices[(r["host"], r["device"])]
        assert r["allocated idle for"] == TO_S - d.state_since, r["device"]
        assert r["idle for"] == TO_S - d.idle_since, r["device"]
        assert r["model"] == d.model and r["GPU share"] == pytest.approx(d.fraction)
        assert r["value (USD/h)"] == pytest.approx(_price(d.model) * d.fraction), r["device"]
    # Ranked by the time allocated idle: dave's MIG slice, free for 2 h and taken 1 h ago, comes
    # last, though it has been idle for 3 h; bob's second GPU (allocated idle for 2.5 h) before it.
    assert [(r["user"], r["device"]) for r in rows[-2:]] == [("bob", "MOCK-001-04"), ("dave", "MIG-d01-0-4")]
    dave = rows[-1]
    assert (dave["allocated idle for"], dave["idle for"]) == (3600, 3 * 3600)
    assert dave["value (USD/h)"] == pytest.approx(0.30)
    bob = {r["device"]: r for r in rows if r["user"] == "bob"}
    assert {r["job"] for r in bob.values()} == {"81234"}
    carol = [r for r in rows if r["user"] == "carol"]
    assert {(r["pod"], r["command"], r["namespace"]) for r in carol} == {
        ("llm-serve-7f9", "vllm", "inference"),
        ("llm-serve-7f9", "vllm-worker", "inference"),
    }
    # The collector's reclaim list names the same holders for the devices allocated idle now.
    api = fleet_api["_holders"]["user"]["holders"]
    held_now = {
        (h["holder"], d["device_id"]) for h in api for d in h["held"] if d["state"] == "allocated_idle"
    }
    assert held_now == {(r["user"], r["device"]) for r in rows}


def test_host_lists_holders_per_device(filled):
    influxd, _ = filled
    rows = panel_rows(influxd, "capmon-host", "Holders now", host=MIG_HOST)
    got = {(r["device"], r["user"], int(r["pid"])): r for r in rows}
    assert set(got) == {
        (device, h.user, h.pid) for (host, device), hs in HOLDERS.items() if host == MIG_HOST for h in hs
    }
    frank = got[("GPU-d01-1", "frank", 5150)]
    assert (frank["state"], frank["job"], frank["partition"], frank["command"]) == (
        "busy",
        "90002",
        "gpu",
        "torchrun",
    )
    assert frank["memory"] == 64 * 1024**3 and frank["held"] == WINDOW_S
    dave = got[("MIG-d01-0-4", "dave", 31337)]
    assert (dave["runtime"], dave["container id"], dave["state"]) == (
        "docker",
        "4f3c2b1a0e9d8c7b6a5f",
        "allocated_idle",
    )
    alice = got[("MIG-d01-0-5", "alice", 4343)]
    assert (alice["namespace"], alice["pod"], alice["container"]) == ("research", "nb-alice-1", "jupyter")
    # The free instances have nobody; the host's other devices are not listed where nobody is known.
    assert not {r["device"] for r in rows} & {f"MIG-d01-0-{k}" for k in range(4)}
    npu = panel_rows(influxd, "capmon-host", "Holders now", host="npu-c01")
    assert sorted(int(r["pid"]) for r in npu) == [100, 101]
    assert {r["held"] for r in npu} == {WINDOW_S}
