"""Every PromQL panel query, expanded as Grafana's Prometheus data source expands it, run against a
real Prometheus that the real agent → collector pipeline filled by remote write from the same
scripted fleet as the InfluxQL dashboards; the numbers are checked against the script and the
collector's /api/v1/fleet, as in test_dashboard_queries.py.

Tables are read as Grafana builds them from instant queries in table format: one frame per query,
the labels as columns and the value as `Value #<refId>` ("Value" when one query answered), merged
into rows by their labels, then the panel's `organize` renames and hides columns.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request

import pytest
from dashboard_fleet import (
    A100,
    ASCEND,
    DURATION_S,
    ENERGY_PRICE_PER_KWH,
    FLEET,
    H100,
    HOLDERS,
    MIG_HOST,
    PRICES,
    PUE,
    SPIN_S,
    T0,
    WINDOW_S,
    Selection,
    default_selection,
    expand_promql,
    expected_devices,
    load_dashboards,
    panel_interval_ms,
    panel_targets,
    panels,
    run_pipeline,
)
from test_dashboard_queries import (
    ENERGY,
    ENERGY_COLUMNS,
    IDLE_HOURS,
    IDLE_VALUE,
    allocated_idle_by,
    flat,
    gpu_hours,
)

from capmon.collector.config import StorageConfig

pytestmark = pytest.mark.integration

FROM_S, TO_S = T0, T0 + DURATION_S
BOARDS = load_dashboards("promql")
FLEET_UID, HOST_UID = "capmon-fleet-prometheus", "capmon-host-prometheus"
EXPECTED = expected_devices()
IDLE = ("free", "allocated_idle")
GPU_A = FLEET[0].host  # dotted: regex-escaped in a multi-value variable
HOST_CHOICE = {HOST_UID: {"host": GPU_A}}
# The PromQL variants leave out panels whose data Prometheus does not hold: none now (a holder's
# pod, job and process name reach it as capmon_holder_info's labels).
INFLUXQL_ONLY: set[str] = set()


@pytest.fixture(scope="module")
def filled(prometheus):
    storage = StorageConfig(
        kind="prometheus_remote_write", url=prometheus.remote_write_url, flush_interval_s=0.0
    )
    # 10 windows per post, in rounds over the agents: time order, as a live fleet writes.
    fleet_api = asyncio.run(run_pipeline("", "", storage=storage, per_post=10))
    return prometheus, fleet_api


def _get(prom, path: str, **params) -> object:
    url = f"{prom.url}{path}?{urllib.parse.urlencode(params, doseq=True)}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        data = json.loads(resp.read())
    assert data["status"] == "success", data
    return data["data"]


def panel_by_title(uid: str, title: str) -> dict:
    (p,) = [p for p in panels(BOARDS[uid]) if p["title"] == title]
    return p


def run_target(prom, uid: str, p: dict, t: dict, to_s: int = TO_S, **chosen) -> list[dict]:
    """One target as Grafana runs it: instant at the end of the range, or a range query with the
    panel's interval as step (a 1m-aligned range needs no alignment)."""
    interval = panel_interval_ms(p, "1m", FROM_S, to_s)
    expr = expand_promql(t["expr"], default_selection(BOARDS[uid], **chosen), FROM_S, to_s, interval)
    if t["instant"]:
        return _get(prom, "/api/v1/query", query=expr, time=to_s)["result"]
    step = interval // 1000
    return _get(prom, "/api/v1/query_range", query=expr, start=FROM_S, end=to_s, step=step)["result"]


def results(prom, uid: str, title: str, ref: str = "A", to_s: int = TO_S, **chosen) -> list[dict]:
    p = panel_by_title(uid, title)
    (t,) = [t for t in p["targets"] if t["refId"] == ref]
    return run_target(prom, uid, p, t, to_s, **chosen)


def value(rows: list[dict]) -> float:
    (row,) = rows
    return float(row["value"][1])


def by(rows: list[dict], *labels: str) -> dict:
    """An instant result keyed by labels (one label: its value; several: a tuple)."""
    out = {}
    for r in rows:
        key = tuple(r["metric"].get(name, "") for name in labels)
        out[key[0] if len(labels) == 1 else key] = float(r["value"][1])
    return out


def table(prom, uid: str, title: str, to_s: int = TO_S, **chosen) -> list[dict]:
    """The rows a table panel shows, built as Grafana builds them (see the module docstring)."""
    p = panel_by_title(uid, title)
    frames = {t["refId"]: run_target(prom, uid, p, t, to_s, **chosen) for t in p["targets"]}
    answered = [ref for ref, rows in frames.items() if rows]
    # A frame's columns are the labels of all its series: the frames must have the same ones to merge.
    columns = {frozenset(k for r in rows for k in r["metric"]) for rows in frames.values() if rows}
    assert len(columns) <= 1, f"{title}: the queries' labels differ, merge cannot join them: {columns}"
    labels = sorted(next(iter(columns), ()))
    merged: dict[tuple, dict] = {}
    for ref, rows in frames.items():
        column = f"Value #{ref}" if len(answered) > 1 else "Value"
        for r in rows:
            cells = {k: r["metric"].get(k, "") for k in labels}  # a series without a label: empty
            merged.setdefault(tuple(cells.values()), cells)[column] = float(r["value"][1])
    (organize,) = [t for t in p["transformations"] if t["id"] == "organize"]
    rename, hide = organize["options"]["renameByName"], organize["options"]["excludeByName"]
    return [{rename.get(k, k): v for k, v in row.items() if not hide.get(k)} for row in merged.values()]


# -- every panel -----------------------------------------------------------------------------------

ALL_TARGETS = panel_targets(BOARDS)


@pytest.mark.parametrize(("uid", "title", "ref"), ALL_TARGETS)
def test_every_panel_query_runs_and_returns_data(filled, uid, title, ref):
    prom, _ = filled
    rows = results(prom, uid, title, ref, **HOST_CHOICE.get(uid, {}))
    assert rows, f"{uid} / {title} / {ref} returned no data"
    # Table columns come from labels: no query may keep a metric name (its frame would not merge).
    assert not [r for r in rows if "__name__" in r["metric"]], rows[0]


def test_promql_variants_have_the_influxql_panels():
    """One source of panels: the same titles, in the same order, but for what Prometheus lacks."""
    influx = load_dashboards()
    for uid, board in BOARDS.items():
        want = [p["title"] for p in panels(influx[uid.removesuffix("-prometheus")])]
        assert [p["title"] for p in panels(board)] == [t for t in want if t not in INFLUXQL_ONLY], uid


def label_values(prom, var: dict, selection: dict[str, Selection]) -> list[str]:
    """`label_values(series{match}, label)` as Grafana asks: /api/v1/label/<label>/values?match[]=…"""
    query = expand_promql(var["query"], selection, FROM_S, TO_S, 60_000)
    inner = query.removeprefix("label_values(").removesuffix(")")
    series, _, label = inner.rpartition(",")
    return _get(
        prom, f"/api/v1/label/{label.strip()}/values", **{"match[]": series, "start": FROM_S, "end": TO_S}
    )


@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_every_variable_query_lists_values(filled, uid):
    prom, _ = filled
    board = BOARDS[uid]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            assert var["query"].startswith("label_values("), var["name"]
            assert label_values(prom, var, default_selection(board, **HOST_CHOICE.get(uid, {}))), var["name"]


def test_variables_cascade_with_multi_value_regex(filled):
    prom, _ = filled
    board = BOARDS[FLEET_UID]
    variables = {v["name"]: v for v in board["templating"]["list"]}

    def listed(name, **chosen):
        return sorted(label_values(prom, variables[name], default_selection(board, **chosen)))

    assert listed("host", site=["ams1"], cluster=["c1", "c2"]) == [GPU_A, "gpu-b01"]
    assert listed("host", site="fra2") == ["npu-c01"]
    assert listed("model") == sorted({H100, A100, ASCEND})
    assert listed("model", pool=["inference", "research"]) == sorted([A100, ASCEND])
    # A dotted host chosen among several is regex-escaped, and matches itself only.
    assert value(results(prom, FLEET_UID, "Devices free", host=[GPU_A, "gpu-b01"])) == sum(
        d.state_now == "free" and d.host in (GPU_A, "gpu-b01") for d in EXPECTED
    )
    device_var = {v["name"]: v for v in BOARDS[HOST_UID]["templating"]["list"]}["device"]
    sel = default_selection(BOARDS[HOST_UID], host=GPU_A)
    assert label_values(prom, device_var, sel) == [f"MOCK-000-{i:02d}" for i in range(8)]


NOW_TARGETS = [
    pytest.param(uid, p["title"], t["refId"], id=f"{uid}:{p['title']}:{t['refId']}")
    for uid, d in BOARDS.items()
    for p in panels(d)
    for t in p["targets"]
    if "$now_window" in t["expr"]
]


@pytest.mark.parametrize(("uid", "title", "ref"), NOW_TARGETS)
def test_now_panels_follow_the_now_window(filled, uid, title, ref):
    """5 minutes after the last window the default 3m sees nothing; 10m sees what 3m saw at the end."""
    prom, _ = filled
    chosen = HOST_CHOICE.get(uid, {})

    def data(rows):
        return sorted((json.dumps(r["metric"], sort_keys=True), r["value"][1]) for r in rows)

    at_end = data(results(prom, uid, title, ref, **chosen))
    assert at_end
    assert results(prom, uid, title, ref, to_s=TO_S + 300, **chosen) == []
    assert data(results(prom, uid, title, ref, to_s=TO_S + 300, now_window="10m", **chosen)) == at_end


# -- Fleet idle capacity ---------------------------------------------------------------------------


def test_devices_now_by_state_match_script_and_collector(filled):
    prom, fleet_api = filled
    for state, title in (
        ("free", "Devices free"),
        ("allocated_idle", "Devices allocated idle"),
        ("busy", "Devices busy"),
        ("unavailable", "Devices unavailable"),
    ):
        expected = sum(d.state_now == state for d in EXPECTED)
        assert value(results(prom, FLEET_UID, title)) == expected == fleet_api["totals"]["states"][state]
    assert value(results(prom, FLEET_UID, "Devices free", host=[MIG_HOST])) == 4
    assert value(results(prom, FLEET_UID, "Devices allocated idle", host=[MIG_HOST])) == 2


def test_idle_gpu_hours_value_and_share(filled):
    prom, fleet_api = filled
    hours = value(results(prom, FLEET_UID, "Idle GPU-hours"))
    assert hours == pytest.approx(gpu_hours(EXPECTED, *IDLE)) == pytest.approx(39 + 2 / 3 + 18 / 7)
    assert hours == pytest.approx(fleet_api["totals"]["idle_gpu_hours"], abs=1e-5)
    share = value(results(prom, FLEET_UID, "Idle share of GPU-time"))
    assert share == pytest.approx(100 * gpu_hours(EXPECTED, *IDLE) * 3600 / ((24 + 2) * DURATION_S))
    alloc = value(results(prom, FLEET_UID, "Allocated-idle GPU-hours"))
    assert alloc == pytest.approx(gpu_hours(EXPECTED, "allocated_idle"))
    assert alloc == pytest.approx(fleet_api["totals"]["gpu_hours"]["allocated_idle"], abs=1e-5)
    unavailable = value(results(prom, FLEET_UID, "Unavailable GPU-hours"))
    assert unavailable == pytest.approx(gpu_hours(EXPECTED, "unavailable")) == pytest.approx(3)
    assert value(results(prom, FLEET_UID, "Idle value ($currency)")) == pytest.approx(58.95)


def test_idle_power_now_and_idle_energy_cost(filled):
    """The same numbers as the InfluxQL panels: the replayed script and /api/v1/fleet."""
    prom, fleet_api = filled
    watts, kwh = ENERGY.watts_now(EXPECTED), ENERGY.kwh(EXPECTED)
    cost = kwh * ENERGY_PRICE_PER_KWH * PUE
    assert value(results(prom, FLEET_UID, "Idle power now")) == pytest.approx(watts)
    assert fleet_api["totals"]["idle_power_w"] == pytest.approx(watts)
    title = "Idle energy cost over the range"
    p = panel_by_title(FLEET_UID, title)
    assert [t["legendFormat"] for t in p["targets"]] == ["idle kWh", "idle energy cost ($currency)"]
    assert ENERGY_COLUMNS[1] == "idle energy cost (USD)"  # the InfluxQL alias, with the default currency
    assert value(results(prom, FLEET_UID, title, "A")) == pytest.approx(kwh)
    assert value(results(prom, FLEET_UID, title, "B")) == pytest.approx(cost)
    assert fleet_api["totals"]["idle_energy_kwh"] == pytest.approx(kwh, abs=1e-5)
    mig = [d for d in EXPECTED if d.host == MIG_HOST]
    assert value(results(prom, FLEET_UID, "Idle power now", host=[MIG_HOST])) == pytest.approx(600)
    assert value(results(prom, FLEET_UID, title, "A", host=[MIG_HOST])) == pytest.approx(ENERGY.kwh(mig))
    h100 = [d for d in EXPECTED if d.model == H100]
    h100_cost = ENERGY.kwh(h100) * ENERGY_PRICE_PER_KWH * PUE
    assert value(results(prom, FLEET_UID, title, "B", model=[H100])) == pytest.approx(h100_cost)


def test_a_mig_instance_counts_as_its_share_of_the_gpu(filled):
    prom, fleet_api = filled
    mig = {"host": [MIG_HOST]}
    hours = value(results(prom, FLEET_UID, "Idle GPU-hours", **mig))
    assert hours == pytest.approx(6 * 3 / 7)
    assert hours == pytest.approx(fleet_api["by_label"]["cluster"]["c4"]["idle_gpu_hours"], abs=1e-5)
    assert value(results(prom, FLEET_UID, "Allocated-idle GPU-hours", **mig)) == pytest.approx((3 + 1) / 7)
    assert value(results(prom, FLEET_UID, "Idle value ($currency)", **mig)) == pytest.approx(6 * 3 * 2.10 / 7)
    assert value(results(prom, FLEET_UID, "Idle share of GPU-time", **mig)) == pytest.approx(
        100 * (6 / 7) / 2
    )
    rows = results(prom, FLEET_UID, "Idle GPUs by model (average per interval)", **mig)
    assert {round(float(v), 9) for r in rows for _, v in r["values"]} == {round(6 / 7, 9)}


def test_breakdowns_by_model_and_labels(filled):
    prom, fleet_api = filled
    rows = {r["model"]: r for r in table(prom, FLEET_UID, "Idle capacity by model")}
    assert {m: r["idle GPU-hours"] for m, r in rows.items()} == pytest.approx(IDLE_HOURS)
    assert {m: r["idle GPU-hours"] for m, r in rows.items()} == pytest.approx(
        {m: v["idle_gpu_hours"] for m, v in fleet_api["by_model"].items()}, abs=1e-5
    )
    assert {m: r["idle value"] for m, r in rows.items()} == pytest.approx(IDLE_VALUE)
    assert {m: r["allocated-idle GPU-hours"] for m, r in rows.items()} == pytest.approx(
        {m: v["gpu_hours"]["allocated_idle"] for m, v in fleet_api["by_model"].items()}, abs=1e-5
    )
    rows = {r["cluster"]: r for r in table(prom, FLEET_UID, "Idle capacity by site / cluster / pool")}
    assert {c: r["idle GPU-hours"] for c, r in rows.items()} == pytest.approx(
        {c: v["idle_gpu_hours"] for c, v in fleet_api["by_label"]["cluster"].items()}, abs=1e-5
    )
    assert {c: r["idle value"] for c, r in rows.items()} == pytest.approx(
        {"c1": 26.25, "c2": 11.40, "c3": 15.90, "c4": 5.40}
    )
    assert rows["c4"]["idle share"] == pytest.approx(100 * (6 / 7) / 2)
    counts = {r["model"]: r for r in table(prom, FLEET_UID, "Devices now by model")}
    for model, m in fleet_api["by_model"].items():
        for state, n in m["states"].items():
            assert counts[model].get(state.replace("_", " "), 0) == n, (model, state)
    by_site = table(prom, FLEET_UID, "Devices now by site / cluster / pool")
    assert sum(r.get("free", 0) for r in by_site) == fleet_api["totals"]["states"]["free"]


def test_filters_narrow_with_grafana_regex_forms(filled):
    prom, _ = filled
    got = value(results(prom, FLEET_UID, "Idle GPU-hours", site=["ams1"], cluster=["c1", "c2"]))
    assert got == pytest.approx(
        gpu_hours([d for d in EXPECTED if d.labels["cluster"] in ("c1", "c2")], *IDLE)
    )
    got = value(results(prom, FLEET_UID, "Idle GPU-hours", model=[H100]))  # spaces in the value
    assert got == pytest.approx(IDLE_HOURS[H100])


def test_longest_idle_table_order(filled):
    prom, fleet_api = filled
    p = panel_by_title(FLEET_UID, "Longest-idle devices")
    (sort,) = p["options"]["sortBy"]
    rows = table(prom, FLEET_UID, "Longest-idle devices")
    rows.sort(key=lambda r: r[sort["displayName"]], reverse=sort["desc"])
    idle = sorted((d for d in EXPECTED if d.idle_since is not None), key=lambda d: d.idle_since)
    assert len(rows) == len(idle) == 14 + 6
    assert [r["idle for"] for r in rows] == [float(TO_S - d.idle_since) for d in idle]
    by_device = {(r["host"], r["device"]): r for r in rows}
    for d in idle:
        r = by_device[(d.host, d.device)]
        assert r["in this state for"] == TO_S - d.state_since, d.device
        assert r["idle since"] == d.idle_since * 1000, d.device
        assert r["GPU share"] == pytest.approx(d.fraction) and r["state"] == d.state_now, d.device
    taken = by_device[(MIG_HOST, "MIG-d01-0-4")]
    assert (taken["idle for"], taken["in this state for"]) == (3 * 3600, 3600)
    assert [d["idle_since"] * 1000 for d in fleet_api["_devices"]["devices"]] == [
        r["idle since"] for r in rows
    ]
    assert not {"agent", "vendor", "site", "Time"} & set(rows[0])


def idle_gpus_in_window(end: int) -> float:
    return sum(d.fraction for d in EXPECTED if d.profile_at(end - T0) in ("idle", "notebook"))


def test_idle_share_over_time_follows_the_script(filled):
    prom, _ = filled
    (series,) = results(prom, FLEET_UID, "Idle share over time")
    points = {int(t): float(v) for t, v in series["values"]}
    # One point per 1m step; the step at t holds the window ending at t (T0 itself has none).
    assert sorted(points) == list(range(T0 + WINDOW_S, TO_S + 1, WINDOW_S))
    for t, v in points.items():
        assert v == pytest.approx(100 * idle_gpus_in_window(t) / (24 + 2)), t
    last = {
        r["metric"]["model"]: float(r["values"][-1][1])
        for r in results(prom, FLEET_UID, "Idle GPUs by model (average per interval)")
    }
    assert sum(last.values()) == pytest.approx(14 + 6 / 7)
    total = sum(
        float(v)
        for r in results(prom, FLEET_UID, "Idle GPU-hours by site (per interval)")
        for _, v in r["values"]
    )
    assert total == pytest.approx(gpu_hours(EXPECTED, *IDLE))


def test_spin_is_busy_doing_nothing(filled):
    prom, _ = filled
    assert value(results(prom, FLEET_UID, "Busy but doing nothing (spin)")) == pytest.approx(SPIN_S / 3600)
    assert value(results(prom, FLEET_UID, "Busy but doing nothing (spin)", host=[GPU_A])) == 0
    rows = results(prom, HOST_UID, "Busy but doing nothing (spin)", host=MIG_HOST)
    spin = {int(t): float(v) for r in rows if r["metric"]["device"] == "GPU-d01-1" for t, v in r["values"]}
    assert len(spin) == DURATION_S // WINDOW_S
    assert {t for t, v in spin.items() if v == 100} == set(
        range(T0 + 3600 + WINDOW_S, T0 + 9000 + 1, WINDOW_S)
    )
    assert {v for t, v in spin.items() if not T0 + 3600 < t <= T0 + 9000} == {0}


# -- Host detail -----------------------------------------------------------------------------------

CODE = {"busy": 0, "allocated_idle": 1, "free": 2, "unavailable": 3}


def test_host_state_timeline_follows_the_script(filled):
    prom, _ = filled
    p = panel_by_title(HOST_UID, "Device state")
    # The codes are what the value mappings name.
    (mapping,) = p["fieldConfig"]["defaults"]["mappings"]
    assert {mapping["options"][str(c)]["text"] for c in CODE.values()} == {
        "busy",
        "allocated idle",
        "free",
        "unavailable",
    }
    rows = {r["metric"]["device"]: r["values"] for r in results(prom, HOST_UID, "Device state", host=GPU_A)}
    assert set(rows) == {f"MOCK-000-{i:02d}" for i in range(8)}
    dev5 = {int(t): float(v) for t, v in rows["MOCK-000-05"]}
    assert {v for t, v in dev5.items() if t <= T0 + 5400} == {CODE["free"]}
    assert {v for t, v in dev5.items() if t > T0 + 5400} == {CODE["busy"]}
    assert {float(v) for _, v in rows["MOCK-000-07"]} == {CODE["unavailable"]}
    for d in EXPECTED:
        if d.host == GPU_A:
            assert float(rows[d.device][-1][1]) == CODE[d.state_now], d.device


def test_host_devices_now(filled):
    prom, _ = filled
    now = {r["device"]: r for r in table(prom, HOST_UID, "Devices now", host=GPU_A)}
    assert {d: r["state"] for d, r in now.items()} == {
        d.device: d.state_now for d in EXPECTED if d.host == GPU_A
    }
    mig = {r["device"]: r for r in table(prom, HOST_UID, "Devices now", host=MIG_HOST)}
    assert len(mig) == 8
    assert {d: round(r["GPU share"], 6) for d, r in mig.items()} == {
        d.device: round(d.fraction, 6) for d in EXPECTED if d.host == MIG_HOST
    }
    assert (mig["MIG-d01-0-4"]["in this state for"], mig["MIG-d01-0-4"]["idle for"]) == (3600, 3 * 3600)
    spinning = mig["GPU-d01-1"]
    assert (spinning["state"], spinning["spin"], spinning["in this state for"]) == ("busy", 0, DURATION_S)
    assert "idle for" not in spinning  # not idle: no streak
    assert spinning["utilisation"] == pytest.approx(95) and spinning["processes"] == 1
    one = table(prom, HOST_UID, "Devices now", host=GPU_A, device=["MOCK-000-02", "MOCK-000-05"])
    assert {r["device"]: r["state"] for r in one} == {"MOCK-000-02": "free", "MOCK-000-05": "busy"}
    util = results(prom, HOST_UID, "Utilisation", host=GPU_A, device=["MOCK-000-00"])
    assert all(90 <= float(v) <= 100 for r in util for _, v in r["values"])


# -- Who holds them --------------------------------------------------------------------------------


def test_allocated_idle_by_user_and_namespace(filled):
    prom, fleet_api = filled
    hours, value_ = "allocated-idle GPU-hours", "allocated-idle value"
    got = {r["user"]: (r[hours], r.get(value_, 0)) for r in table(prom, FLEET_UID, "Allocated idle by user")}
    want = allocated_idle_by(lambda h: h.user)
    assert flat(got) == pytest.approx(flat(want))
    api = {h["holder"]: h for h in fleet_api["_holders"]["user"]["holders"]}
    assert {u: api[u]["allocated_idle_gpu_hours"] for u in want} == pytest.approx(
        {u: v[0] for u, v in want.items()}, abs=1e-5
    )
    got = {
        r["namespace"]: (r[hours], r.get(value_, 0))
        for r in table(prom, FLEET_UID, "Allocated idle by namespace")
    }
    assert flat(got) == pytest.approx(flat(allocated_idle_by(lambda h: h.namespace or "")))


def test_allocated_idle_by_job(filled):
    """The job is a label of capmon_holder_info, joined to the holder's numbers window by window."""
    prom, fleet_api = filled
    hours, value_ = "allocated-idle GPU-hours", "allocated-idle value"
    rows = table(prom, FLEET_UID, "Allocated idle by job")
    got = {r["job"]: (r[hours], r.get(value_, 0)) for r in rows}
    want = {k: v for k, v in allocated_idle_by(lambda h: h.slurm_job_id).items() if k is not None}
    assert flat(got) == pytest.approx(flat(want))
    assert got["81234"] == pytest.approx((5.5, 6.6))  # bob's job, two A100s
    # erin's and frank's jobs held busy GPUs: listed, with nothing allocated idle.
    assert {r["job"]: r["user"] for r in rows} == {"81234": "bob", "90001": "erin", "90002": "frank"}
    assert got["90001"] == got["90002"] == (0, 0)
    api = {h["holder"]: h for h in fleet_api["_holders"]["job"]["holders"]}
    assert {j: api[j]["allocated_idle_gpu_hours"] for j in got} == pytest.approx(
        {j: v[0] for j, v in got.items()}, abs=1e-5
    )

    # A narrower range counts only its windows, its ends included as in every range panel: in the
    # last hour both of bob's A100s were idle, 61 windows each (the one ending at the start too),
    # as the by-user panel counts bob over the same range.
    def last_hour(title: str, label: str) -> dict:
        p = panel_by_title(FLEET_UID, title)
        (t,) = [t for t in p["targets"] if t["refId"] == "A"]
        expr = expand_promql(t["expr"], default_selection(BOARDS[FLEET_UID]), TO_S - 3600, TO_S, 60_000)
        return by(_get(prom, "/api/v1/query", query=expr, time=TO_S)["result"], label)

    jobs = last_hour("Allocated idle by job", "slurm_job_id")
    assert jobs == pytest.approx({"81234": 2 * 61 / 60, "90001": 0, "90002": 0})
    assert jobs["81234"] == pytest.approx(last_hour("Allocated idle by user", "user")["bob"])


def test_reclaim_candidates(filled):
    prom, fleet_api = filled
    p = panel_by_title(FLEET_UID, "Reclaim candidates")
    (sort,) = p["options"]["sortBy"]
    rows = table(prom, FLEET_UID, "Reclaim candidates")
    rows.sort(key=lambda r: r[sort["displayName"]], reverse=sort["desc"])
    devices = {(d.host, d.device): d for d in EXPECTED}
    want = sorted(
        (h.user, host, device)
        for (host, device), holders in HOLDERS.items()
        for h in holders
        if devices[(host, device)].state_now == "allocated_idle"
    )
    assert sorted((r["user"], r["host"], r["device"]) for r in rows) == want and len(rows) == 7
    for r in rows:
        d = devices[(r["host"], r["device"])]
        assert r["allocated idle for"] == TO_S - d.state_since and r["idle for"] == TO_S - d.idle_since
        price = next(v for k, v in PRICES.items() if k in d.model)
        assert r["value per hour"] == pytest.approx(price * d.fraction) and r["GPU share"] == pytest.approx(
            d.fraction
        )
    assert [(r["user"], r["device"]) for r in rows[-2:]] == [("bob", "MOCK-001-04"), ("dave", "MIG-d01-0-4")]
    # Who, by name: the pod, the Slurm job and the process, from capmon_holder_info (never a pid).
    for r in rows:
        (h,) = {h for h in HOLDERS[(r["host"], r["device"])] if h.command == r.get("command")}
        assert (r["pod"], r["job"]) == (h.pod or "", h.slurm_job_id or ""), r
    assert {r["job"] for r in rows if r["user"] == "bob"} == {"81234"}
    carol = {(r["pod"], r["command"], r["namespace"]) for r in rows if r["user"] == "carol"}
    assert carol == {("llm-serve-7f9", "vllm", "inference"), ("llm-serve-7f9", "vllm-worker", "inference")}
    assert not {"pid", "slot", "runtime", "source", "container"} & {k for r in rows for k in r}
    api = fleet_api["_holders"]["user"]["holders"]
    held_now = {
        (h["holder"], d["device_id"]) for h in api for d in h["held"] if d["state"] == "allocated_idle"
    }
    assert held_now == {(r["user"], r["device"]) for r in rows}


def test_host_lists_holders_per_device(filled):
    prom, _ = filled
    rows = table(prom, HOST_UID, "Holders now", host=MIG_HOST)
    got = {(r["device"], r["user"]): r for r in rows}
    assert set(got) == {
        (device, h.user) for (host, device), hs in HOLDERS.items() if host == MIG_HOST for h in hs
    }
    frank = got[("GPU-d01-1", "frank")]
    assert (frank["state"], frank["memory"], frank["held"]) == (CODE["busy"], 64 * 1024**3, WINDOW_S)
    assert (frank["job"], frank["command"], frank["pod"]) == ("90002", "torchrun", "")
    assert (got[("MIG-d01-0-5", "alice")]["pod"], got[("MIG-d01-0-5", "alice")]["command"]) == (
        "nb-alice-1",
        "python3",
    )
    assert got[("MIG-d01-0-4", "dave")]["runtime"] == "docker"
    assert got[("MIG-d01-0-5", "alice")]["namespace"] == "research"
    npu = table(prom, HOST_UID, "Holders now", host="npu-c01")
    assert len(npu) == 2 and {r["held"] for r in npu} == {WINDOW_S}  # carol's two processes, two slots
    assert {(r["pod"], r["container"], r["command"]) for r in npu} == {
        ("llm-serve-7f9", "engine", "vllm"),
        ("llm-serve-7f9", "engine", "vllm-worker"),
    }
    assert not {"pid", "source"} & {k for r in npu for k in r}


# -- a holder that changes jobs --------------------------------------------------------------------


def test_a_gpu_that_changes_jobs_counts_each_window_under_its_job(filled):
    """bob's job 1 holds a GPU for 10 windows, his job 2 the next 10 (same user, device, slot): the
    by-job panel counts each window under its own job, and the reclaim list names the newest job
    while the old one's names are still in the now window (a plain join would find two)."""
    from capmon.agent import wire
    from capmon.collector.lineproto import batch_lines
    from capmon.collector.remote_write import RemoteWriteWriter

    prom, _ = filled
    e0 = TO_S + 86_400  # after the scripted fleet: its panels at TO_S see none of this
    reports = []
    for k in range(20):
        end = e0 + 60 * k
        job = "1" if k < 10 else "2"
        held = wire.HolderWindow(pid=7000 + k // 10, user="bob", command=f"train{job}", runtime="slurm",
                                 slurm_job_id=job, held_s=60.0)  # fmt: skip
        d = wire.DeviceWindow(
            device_id="GPU-churn", vendor="nvidia", model="churn model", state="allocated_idle",
            allocated_idle_s=60.0, idle_since=e0 - 60, state_since=e0 - 60, holders=[held],
        )  # fmt: skip
        reports.append(wire.Report(seq=k + 1, start=end - 60, end=end, devices=[d]))
    batch = wire.Batch(agent=wire.AgentIdentity(id="churn", host="churn-01"), reports=reports)
    writer = RemoteWriteWriter(StorageConfig(kind="prometheus_remote_write", url=prom.remote_write_url))

    async def write():
        await writer.start()
        try:
            await writer.write(batch_lines(batch, ("site", "cluster", "pool")))
        finally:
            await writer.close()

    asyncio.run(write())
    churn = {"host": ["churn-01"]}
    p = panel_by_title(FLEET_UID, "Allocated idle by job")
    (t,) = [t for t in p["targets"] if t["refId"] == "A"]
    last = e0 + 60 * 19
    expr = expand_promql(t["expr"], default_selection(BOARDS[FLEET_UID], **churn), e0 - 60, last, 60_000)
    got = by(_get(prom, "/api/v1/query", query=expr, time=last)["result"], "slurm_job_id")
    assert got == pytest.approx({"1": 10 / 60, "2": 10 / 60})
    # Two windows into job 2: job 1's last window is 2 minutes old, inside the 3m now window.
    rows = table(prom, FLEET_UID, "Reclaim candidates", to_s=e0 + 60 * 11, **churn)
    assert [(r["user"], r["job"], r["command"]) for r in rows] == [("bob", "2", "train2")]
    assert rows[0]["allocated idle for"] == 60 * 12
