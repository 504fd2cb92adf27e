#!/usr/bin/env python3
"""Writes the capmon Grafana dashboards: fleet, host and agents in InfluxQL (`capmon-fleet.json`,
`capmon-host.json`, `capmon-agents.json`), fleet and host in PromQL (`capmon-fleet-prometheus.json`,
`capmon-host-prometheus.json`).

The JSON files are committed and are what Grafana loads; this script is how they are made, so that
every panel gets the same datasource reference, filters, units and thresholds. Edit here, run
`python dashboards/generate.py`, commit both (tests/dashboards checks they agree). Standard library only.

One source of panels, two query languages: each panel is defined once, with its InfluxQL and its
PromQL side by side (`target(influxql, promql=...)`, `Per(influxql=..., promql=...)` for anything
else that differs, such as a table's column names); rendering picks one language. A panel without a
PromQL query (the data is not in Prometheus) is left out of the PromQL variant.

InfluxQL runs on InfluxDB 1.x, 2.x through a DBRP mapping and 3.x, over the schema in
collector/README.md. PromQL reads the collector's remote-write series (collector/remote_write.py:
one sample per series per window at the window's end). "Now" means the end of the dashboard's time
range: the latest window of each device in the `now_window` before it (default 3m: the collector's
staleness rule, 3 windows of 60 s; at least 3 × the agents' window_s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
INFLUXQL, PROMQL = "influxql", "promql"
SCHEMA_VERSION = 39


@dataclass(frozen=True)
class Per:
    """A part of a dashboard that differs between the query languages, picked when it is rendered.
    `OMIT` in a list or dict leaves the item out; a panel left without targets is left out."""

    influxql: Any
    promql: Any


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


OMIT = _Omit()

DS = Per({"type": "influxdb", "uid": "${datasource}"}, {"type": "prometheus", "uid": "${datasource}"})

# Tag filters; `.*` (the custom "All" value) also matches a point without that tag.
FLEET_FILTER = (
    'AND "site" =~ /^$site$/ AND "cluster" =~ /^$cluster$/ AND "pool" =~ /^$pool$/ '
    'AND "model" =~ /^$model$/ AND "host" =~ /^$host$/'
)
# The same as PromQL label matchers: Grafana's Prometheus data source regex-escapes multi-value and
# "All"-able variables (`\\.`), inserts the custom all value `.*` as it is (which matches an absent label).
FLEET_MATCH = 'site=~"$site", cluster=~"$cluster", pool=~"$pool", model=~"$model", host=~"$host"'
# The end of the range: each device's latest window must lie in the `now_window` before it.
NOW = "time > ${__to}ms - $now_window AND time <= ${__to}ms"
NOW_WINDOW_DEFAULT = "3m"
NOW_WINDOW_CHOICES = ("3m", "5m", "10m", "15m", "30m", "1h")
# GPU-equivalents: the collector writes idle_gpu_s, allocated_idle_gpu_s and window_gpu_s as the state
# seconds × the device's gpu_fraction (a MIG instance its share of the GPU, a whole device 1), so a
# GPU split into 7 instances counts once, not 7 times. Device counts by state stay device counts.
GPU_EQ = "GPU-equivalents (a MIG instance counts as its share of the GPU)"
IDLE_SHARE = '100 * SUM("idle_gpu_s") / SUM("window_gpu_s")'
STATE_CODES = {"busy": 0, "allocated_idle": 1, "free": 2, "unavailable": 3}
STATE_COLORS = {"busy": "blue", "allocated_idle": "orange", "free": "green", "unavailable": "red"}
STATE_TEXT = {
    "busy": "busy",
    "allocated_idle": "allocated idle",
    "free": "free",
    "unavailable": "unavailable",
}


# -- PromQL over the collector's remote-write series ---------------------------------------------


def sel(metric: str, *matchers: str, base: str = FLEET_MATCH) -> str:
    """`metric{matchers…, the dashboard's filters}`."""
    return metric + "{" + ", ".join((*matchers, base) if base else matchers) + "}"


# A range selector is closed at both ends in Prometheus 2.x ([t - 1m, t] holds the windows ending
# at t - 1m and at t), left-open from 3.0: one interval, shifted by a millisecond, holds the windows
# ending in (t - interval, t] in both, so no window counts in two intervals.
INTERVAL = "[$__interval] offset -1ms"


def over_range(metric: str, *matchers: str, span: str = "$__range", base: str = FLEET_MATCH) -> str:
    """The sum of a per-window gauge's samples over `span` (`$__range`: the dashboard's range, its
    ends included as InfluxQL's $timeFilter does; INTERVAL: one interval), per series."""
    window = INTERVAL if span == INTERVAL else f"[{span}]"
    return f"sum_over_time({sel(metric, *matchers, base=base)}{window})"


def latest(metric: str, *matchers: str, base: str = FLEET_MATCH) -> str:
    """Each series' sample of its latest window in the now window."""
    return f"last_over_time({sel(metric, *matchers, base=base)}[$now_window])"


def state_now(states: str = "", base: str = FLEET_MATCH) -> str:
    """1 per device, labelled with the state of its latest window (`states`: a regex of states)."""
    matchers = (f'state=~"{states}"',) if states else ()
    return f"({latest('capmon_device_state', *matchers, base=base)} == 1)"


def with_state(expr: str, states: str = "", base: str = FLEET_MATCH) -> str:
    """`expr` per device, for devices in `states` now, with their `state` label (× 1)."""
    return f"{expr} * on(host, device) group_left(state) {state_now(states, base)}"


def idle_share_prom(by: str = "", span: str = "$__range", base: str = FLEET_MATCH) -> str:
    b = f" by ({by})" if by else ""
    idle = over_range("capmon_device_window_idle_gpu_seconds", span=span, base=base)
    total = over_range("capmon_device_window_gpu_seconds", span=span, base=base)
    return f"100 * sum{b} ({idle}) / sum{b} ({total})"


IDLE_GPU_S = "capmon_device_window_idle_gpu_seconds"
ALLOCATED_IDLE_GPU_S = "capmon_device_window_allocated_idle_gpu_seconds"
IDLE_VALUE = "capmon_device_window_idle_value"
SPIN_S = "capmon_device_window_spin_seconds"
POWER_W = "capmon_device_power_watts"
IDLE_ENERGY_J = "capmon_device_window_idle_energy_joules"
IDLE_ENERGY_COST = "capmon_device_window_idle_energy_cost"
IDLE_KWH, IDLE_COST = "idle kWh", "idle energy cost ($currency)"


def hours_of(metric: str, by: str = "", base: str = FLEET_MATCH) -> str:
    """A per-window seconds gauge summed over the range, in hours (per `by` labels)."""
    agg = f"sum by ({by})" if by else "sum"
    return f"{agg} ({over_range(metric, base=base)}) / 3600"


IDLE_NOW = "free|allocated_idle"
UNAVAILABLE = 'state="unavailable"'


def unnamed(expr: str) -> str:
    """`expr` without its metric name (`last_over_time` keeps it): Grafana would show `__name__` as
    a table column, and frames with different names do not merge into one row."""
    return f"{expr} * 1"


# capmon_holder_state_code of the holder series' latest window: 1 = allocated idle. A value × it
# keeps the holders allocated idle now (and drops the metric name).
HELD_IDLE_NOW = f"({latest('capmon_holder_state_code')} == 1)"
# A holder's series are told apart by these labels (the remote write's capmon_holder tags; `slot`
# numbers holders with the same ones); capmon_holder_info (value 1) carries its names as labels too.
HOLDER_IDS = "host, device, user, namespace, runtime, slot"
# One window per step: a holder's numbers are joined to the names of the same window, so a device
# that changed jobs in the range counts each window under its own job. 1m: the shortest window_s
# the dashboards expect (the data source's timeInterval).
WINDOW_STEP = "1m"


def holder_names_per_window(expr: str, names: str, *matchers: str) -> str:
    """`expr` (per holder, per window at the step) with the holder's `names` labels of that window."""
    info = f"last_over_time({sel('capmon_holder_info', *matchers)}[{WINDOW_STEP}] offset -1ms)"
    return f"{expr} * on({HOLDER_IDS}) group_left({names}) {info}"


def holder_names_now(names: str, base: str = FLEET_MATCH) -> str:
    """1 per holder, labelled with the names of its latest window in the now window. A slot whose
    holder changed (bob's next job on the same GPU) has two info series in the now window: the
    newest is the one (a join with both would be refused as many-to-many)."""
    newest = f"last_over_time(timestamp({sel('capmon_holder_info', base=base)})[$now_window:{WINDOW_STEP}])"
    return f"group_left({names}) (0 * topk by ({HOLDER_IDS}) (1, {newest}) + 1)"


def with_holder_names(expr: str, names: str, base: str = FLEET_MATCH) -> str:
    return f"{expr} * on({HOLDER_IDS}) {holder_names_now(names, base)}"


# Labels every device series has that the InfluxQL tables do not group by: hidden in PromQL tables.
DEVICE_LABELS_HIDDEN = ("agent", "vendor", "parent", "site", "cluster", "pool")


# -- building blocks -------------------------------------------------------------------------------


def thresholds(*steps: tuple[float | None, str]) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


GREEN = thresholds((None, "green"))


def target(
    query: str | None,
    ref: str = "A",
    fmt: str = "time_series",
    alias: str | None = None,
    promql: str | None = None,
    legend: str | None = None,
) -> Per:
    """One query in both languages; `None` for a language leaves the target out of that variant."""
    t: dict[str, Any] | _Omit = OMIT
    if query is not None:
        t = {"datasource": DS, "refId": ref, "rawQuery": True, "query": query, "resultFormat": fmt}
        if alias:
            t["alias"] = alias
    p: dict[str, Any] | _Omit = OMIT
    if promql is not None:
        p = {"datasource": DS, "refId": ref, "editorMode": "code", "expr": promql, "format": fmt}
        if legend:
            p["legendFormat"] = legend
    return Per(t, p)


def prom_target(promql: str, ref: str = "A", fmt: str = "time_series", legend: str | None = None) -> Per:
    """A target only the PromQL variant has (InfluxQL answers it within another target)."""
    return target(None, ref, fmt, promql=promql, legend=legend)


def resolve(value: Any, lang: str) -> Any:
    """`value` in one language: every `Per` replaced by its side, `OMIT` items left out."""
    if isinstance(value, Per):
        return resolve(getattr(value, lang), lang)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            r = resolve(v, lang)
            if r is not OMIT:
                out[k] = r
        return out
    if isinstance(value, list):
        return [r for r in (resolve(v, lang) for v in value) if r is not OMIT]
    if isinstance(value, Layout):
        return value.place(lang)
    return value


class Layout:
    """Places panels left to right on Grafana's 24-column grid, once per language (a panel one
    language lacks leaves no hole)."""

    def __init__(self) -> None:
        self.items: list[tuple[dict | None, str | int, int]] = []

    def add(self, panel: dict, w: int, h: int) -> None:
        self.items.append((panel, w, h))

    def row(self, title: str) -> None:
        self.items.append((None, title, 1))

    def place(self, lang: str) -> list[dict]:
        x = y = row_h = 0
        next_id = 1
        panels: list[dict] = []
        for panel, w, h in self.items:
            if panel is None:
                if x:
                    x, y, row_h = 0, y + row_h, 0
                panels.append(
                    {
                        "type": "row",
                        "title": w,
                        "id": next_id,
                        "collapsed": False,
                        "panels": [],
                        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                    }
                )
                next_id += 1
                y += 1
                continue
            placed = resolve(panel, lang)
            if not placed["targets"]:
                continue
            assert isinstance(w, int)
            if x + w > 24:
                x, y, row_h = 0, y + row_h, 0
            placed["id"] = next_id
            placed["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
            next_id += 1
            x += w
            row_h = max(row_h, h)
            panels.append(placed)
        return panels


RANGE_PANELS = ("timeseries", "state-timeline")


def panel(
    kind: str,
    title: str,
    description: str,
    targets: list[Per],
    unit: str,
    steps: dict = GREEN,
    options: dict | None = None,
    overrides: list[dict] | Per | None = None,
    **defaults: Any,
) -> dict:
    # PromQL: a time series panel asks for a range query, every other panel for the value at the
    # end of the range (an instant query).
    instant = kind not in RANGE_PANELS
    for t in targets:
        if isinstance(t.promql, dict):
            t.promql.update({"instant": instant, "range": not instant})
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets,
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": steps, **defaults},
            "overrides": overrides or [],
        },
        "options": options or {},
    }


def stat(
    title: str,
    description: str,
    query: str,
    unit: str,
    steps: dict = GREEN,
    promql: str | None = None,
    **kw: Any,
) -> dict:
    return panel(
        "stat",
        title,
        description,
        [target(query, promql=promql)],
        unit,
        steps,
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "value",
        },
        noValue="0",
        **kw,
    )


def timeseries(
    title: str, description: str, targets: list[Per], unit: str, steps: dict = GREEN, **kw: Any
) -> dict:
    p = panel(
        "timeseries",
        title,
        description,
        targets,
        unit,
        steps,
        options={"legend": {"displayMode": "table", "placement": "right", "calcs": ["mean", "max"]}},
        custom={"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "spanNulls": False},
        **kw,
    )
    p["interval"] = "1m"  # one point per report window at most
    return p


def table(
    title: str,
    description: str,
    targets: list[Per],
    unit: str,
    overrides: list[dict] | Per,
    sort_by: str | None = None,
    steps: dict = GREEN,
    transformations: list[dict] | Per | None = None,
) -> dict:
    p = panel(
        "table",
        title,
        description,
        targets,
        unit,
        steps,
        options={
            "showHeader": True,
            **({"sortBy": [{"displayName": sort_by, "desc": True}]} if sort_by else {}),
        },
        overrides=overrides,
    )
    p["transformations"] = transformations or []
    return p


def prom_columns(
    names: dict[str, str], hide: tuple[str, ...] = (), labels: dict[str, str] | None = None
) -> list[dict]:
    """A PromQL table's transformations: Grafana names each instant query's value `Value #<refId>`;
    merge the queries' frames into rows (by their labels) and name the columns (`labels`: label
    columns renamed, e.g. slurm_job_id → job)."""
    exclude = {"Time": True, **dict.fromkeys(hide, True)}
    rename = {**(labels or {}), **{f"Value #{r}": n for r, n in names.items()}}
    if "A" in names:
        rename["Value"] = names["A"]  # what Grafana calls it when only one query answered
    return [
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": exclude,
                "renameByName": rename,
            },
        },
    ]


def unit_override(field: str, unit: str, **more: Any) -> dict:
    props = [{"id": "unit", "value": unit}] + [{"id": k, "value": v} for k, v in more.items()]
    return {"matcher": {"id": "byName", "options": field}, "properties": props}


def state_mappings() -> list[dict]:
    options = {
        s: {"text": STATE_TEXT[s], "color": STATE_COLORS[s], "index": i} for i, s in enumerate(STATE_CODES)
    }
    by_code = {
        str(code): {"text": STATE_TEXT[s], "color": STATE_COLORS[s], "index": 4 + code}
        for s, code in STATE_CODES.items()
    }
    return [{"type": "value", "options": {**options, **by_code}}]


# -- template variables ----------------------------------------------------------------------------


def datasource_var() -> dict:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": Per("influxdb", "prometheus"),
        "current": Per(
            {"text": "capmon InfluxDB", "value": "capmon-influxdb"},
            {"text": "capmon Prometheus", "value": "capmon-prometheus"},
        ),
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "options": [],
    }


def tag_var(
    name: str,
    measurement: str,
    where: str = "",
    multi: bool = True,
    label: str = "",
    series: str = "capmon_device_state",
    match: str = "",
) -> dict:
    """A `SHOW TAG VALUES` variable (PromQL: `label_values(series{match}, name)`). InfluxQL queries use
    it only as `"tag" =~ /^$name$/`, the single-value one too: Grafana's InfluxDB data source
    regex-escapes values in raw queries (all of them in 9.x–10.x, a non-numeric single value in a
    query with any regex in 11.x), which breaks `"host" = '$host'` for a host like
    `gpu01.fra1.example.com` and is harmless inside a regex. PromQL queries use a multi-value one as
    `name=~"$name"` (Grafana's Prometheus data source regex-escapes those) and a single-value one as
    `name="$name"` (there it escapes only backslashes and quotes)."""
    influxql = f'SHOW TAG VALUES FROM "{measurement}" WITH KEY = "{name}"' + (
        f" WHERE {where}" if where else ""
    )
    promql = f"label_values({series}{{{match}}}, {name})" if match else f"label_values({series}, {name})"
    query = Per(influxql, promql)
    var: dict[str, Any] = {
        "name": name,
        "label": label or name,
        "type": "query",
        "datasource": DS,
        "query": query,
        "definition": query,
        "refresh": 2,  # on time range change: new hosts appear without a reload
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "hide": 0,
        "regex": "",
        "options": [],
    }
    if multi:
        # `.*` rather than the list of every value: short queries, and it matches points without the tag.
        var["allValue"] = ".*"
        var["current"] = {"text": ["All"], "value": ["$__all"]}
    else:
        var["current"] = {}
    return var


def currency_var() -> dict:
    return {
        "name": "currency",
        "label": "Currency",
        "description": (
            "The currency of the collector's [pricing] (the stored idle_value is in it). A constant: "
            "edit it in the dashboard settings to match your collector."
        ),
        "type": "constant",
        "query": "USD",
        "current": {"text": "USD", "value": "USD"},
        "options": [{"text": "USD", "value": "USD", "selected": True}],
        "hide": 2,
    }


def now_window_var() -> dict:
    """How far back from the end of the range "now" panels look for each device's latest window."""
    options = [{"text": v, "value": v, "selected": v == NOW_WINDOW_DEFAULT} for v in NOW_WINDOW_CHOICES]
    return {
        "name": "now_window",
        "label": "Now window",
        "description": (
            "\"Now\" panels count each device's (agent's) latest report in this span before the end of the "
            "range. Set it to at least 3 × the agents' window_s, as the collector's stale rule: 3m for "
            "60 s windows; shorter, devices of slower agents vanish from the now panels."
        ),
        "type": "custom",
        "query": ",".join(NOW_WINDOW_CHOICES),
        "current": {"text": NOW_WINDOW_DEFAULT, "value": NOW_WINDOW_DEFAULT},
        "options": options,
        "multi": False,
        "includeAll": False,
        "allowCustomValue": True,
        "hide": 0,
    }


def dashboard(
    uid: str, title: str, description: str, layout: Layout, variables: list[dict], **kw: Any
) -> dict:
    """One dashboard in both languages: the PromQL one's uid ends in `-prometheus`, and each set links
    to its own (by tag), so that a site with one store sees only its dashboards."""
    tags = Per(["capmon"], ["capmon-prometheus"])
    return {
        "uid": Per(uid, f"{uid}-prometheus"),
        "title": Per(title, f"{title} (Prometheus)"),
        "description": description,
        "tags": tags,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "refresh": "1m",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": tags,
                "asDropdown": True,
                "title": "capmon",
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "templating": {"list": variables},
        "panels": layout,
        **kw,
    }


# -- Fleet idle capacity ---------------------------------------------------------------------------


def count_now(code: int, by: str = "") -> str:
    group = f"host, device{', ' + by if by else ''}"
    outer = f" GROUP BY {by}" if by else ""
    return (
        f'SELECT COUNT("code") FROM (SELECT LAST("state_code") AS "code" FROM "capmon_device" '
        f'WHERE {NOW} {FLEET_FILTER} GROUP BY {group}) WHERE "code" = {code}{outer}'
    )


def fleet() -> dict:
    lay = Layout()
    lay.row("Now (at the end of the time range)")
    for state, steps, what in (
        (
            "free",
            thresholds((None, "text"), (1, "green")),
            "below the busy threshold and nothing holds them: rentable or schedulable now",
        ),
        (
            "allocated_idle",
            thresholds((None, "green"), (1, "orange")),
            "a process holds them but they compute nothing: reserved but wasted",
        ),
        ("busy", thresholds((None, "text"), (1, "blue")), "at or above the busy threshold"),
        ("unavailable", thresholds((None, "green"), (1, "red")), "unreadable, unhealthy or lost"),
    ):
        lay.add(
            stat(
                f"Devices {STATE_TEXT[state]}",
                f"Devices whose latest report window (in the now window, $now_window, before the end of the range) ended "
                f"{STATE_TEXT[state]}: {what}. Devices of agents silent for longer are not counted: see the Agents dashboard.",
                count_now(STATE_CODES[state]),
                "none",
                steps,
                promql=f"count ({state_now(state)})",
                decimals=0,
            ),
            4,
            4,
        )
    lay.add(
        stat(
            "Idle share of GPU-time",
            f"Idle (allocated idle + free) time over all reported time in the range, in {GPU_EQ}: "
            "100 × SUM(idle_gpu_s) / SUM(window_gpu_s).",
            f'SELECT {IDLE_SHARE} FROM "capmon_device" WHERE $timeFilter {FLEET_FILTER}',
            "percent",
            thresholds((None, "green"), (20, "yellow"), (50, "red")),
            promql=idle_share_prom(),
            decimals=1,
            min=0,
            max=100,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Idle GPU-hours",
            f"Hours spent idle (allocated idle + free) in the range, in {GPU_EQ}: SUM(idle_gpu_s) / 3600.",
            f'SELECT SUM("idle_gpu_s") / 3600 FROM "capmon_device" WHERE $timeFilter {FLEET_FILTER}',
            "h",
            thresholds((None, "green"), (100, "yellow"), (1000, "red")),
            promql=hours_of(IDLE_GPU_S),
            decimals=1,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Idle value ($currency)",
            "SUM(idle_value): each device's idle hours × its price, written by the collector from its "
            "[pricing] (the prices /api/v1/fleet uses): a MIG instance is priced as its share of the GPU "
            "unless its profile has a price. Models without a price count 0.",
            f'SELECT SUM("idle_value") FROM "capmon_device" WHERE $timeFilter {FLEET_FILTER}',
            "short",
            thresholds((None, "green"), (1000, "yellow"), (10000, "red")),
            promql=f"sum ({over_range(IDLE_VALUE)})",
            decimals=0,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Allocated-idle GPU-hours",
            f"Hours held by a process that computed nothing, in {GPU_EQ}: the most actionable waste.",
            f'SELECT SUM("allocated_idle_gpu_s") / 3600 FROM "capmon_device" WHERE $timeFilter {FLEET_FILTER}',
            "h",
            thresholds((None, "green"), (10, "orange")),
            promql=hours_of(ALLOCATED_IDLE_GPU_S),
            decimals=1,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Unavailable GPU-hours",
            f"Hours the probes could not read or reported unhealthy, in {GPU_EQ}.",
            'SELECT SUM("u") / 3600 FROM (SELECT "unavailable_s" * "gpu_fraction" AS "u" FROM "capmon_device" '
            f"WHERE $timeFilter {FLEET_FILTER})",
            "h",
            thresholds((None, "green"), (1, "red")),
            # The state seconds are device seconds: × the device's share of a GPU.
            promql=(
                f"sum ({over_range('capmon_device_window_state_seconds', UNAVAILABLE)} "
                f"* ignoring(state) last_over_time({sel('capmon_device_gpu_fraction')}[$__range])) / 3600"
            ),
            decimals=1,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Busy but doing nothing (spin)",
            "Device-hours counted busy by utilisation (at or above the agents' spin_util_pct, 90 %) while "
            "SM activity stayed below spin_sm_pct (5 %): an NCCL hang or a spin-wait, a job to look at. "
            "SUM(spin_s) / 3600; only where the probe reports SM activity (NVML GPM).",
            f'SELECT SUM("spin_s") / 3600 FROM "capmon_device" WHERE $timeFilter {FLEET_FILTER}',
            "h",
            thresholds((None, "green"), (0.5, "orange")),
            promql=hours_of(SPIN_S),
            decimals=1,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Idle power now",
            "Board power of the devices idle now (allocated idle or free in their latest window in the now "
            "window, $now_window): the sum of each one's mean power over that window, what the fleet burns "
            "doing nothing. Devices whose probe reports no power are not counted.",
            'SELECT SUM("p") AS "idle power" FROM (SELECT LAST("power_mean_w") AS "p", LAST("state_code") AS "s" '
            f'FROM "capmon_device" WHERE {NOW} {FLEET_FILTER} GROUP BY "host", "device") '
            f'WHERE "s" = {STATE_CODES["allocated_idle"]} OR "s" = {STATE_CODES["free"]}',
            "watt",
            thresholds((None, "green"), (1000, "yellow"), (10000, "red")),
            promql=f"sum ({with_state(latest(POWER_W), IDLE_NOW)})",
            decimals=0,
        ),
        4,
        4,
    )
    lay.add(
        panel(
            "stat",
            "Idle energy cost over the range",
            "Energy the devices spent idle (allocated idle + free) in the range, SUM(idle_energy_j) / 3.6e6 "
            "in kWh (the agents' power × time, or the energy counter where the probe has one), and its cost: "
            "SUM(idle_energy_cost), the kWh × [pricing] energy_price_per_kwh × pue, written by the collector "
            "(no cost where energy is not priced). The devices' own energy, not the host's.",
            [
                target(
                    f'SELECT SUM("idle_energy_j") / 3600000 AS "{IDLE_KWH}", SUM("idle_energy_cost") AS '
                    f'"{IDLE_COST}" FROM "capmon_device" WHERE $timeFilter {FLEET_FILTER}',
                    promql=f"sum ({over_range(IDLE_ENERGY_J)}) / 3600000",
                    legend=IDLE_KWH,
                ),
                prom_target(f"sum ({over_range(IDLE_ENERGY_COST)})", "B", legend=IDLE_COST),
            ],
            "kwatth",
            options={
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "value",
                "graphMode": "none",
                "textMode": "value_and_name",
            },
            # By regex: the name holds the currency's value, not "$currency".
            overrides=[
                {
                    "matcher": {"id": "byRegexp", "options": "idle energy cost.*"},
                    "properties": [{"id": "unit", "value": "short"}, {"id": "decimals", "value": 2}],
                }
            ],
            decimals=1,
        ),
        4,
        4,
    )

    lay.row("Breakdowns (over the time range)")
    hour_cols = [
        unit_override("idle GPU-hours", "h", decimals=1),
        {
            "matcher": {"id": "byRegexp", "options": "idle value.*"},
            "properties": [{"id": "unit", "value": "short"}, {"id": "decimals", "value": 0}],
        },
        unit_override("idle share", "percent", decimals=1),
        unit_override("allocated-idle GPU-hours", "h", decimals=1),
    ]

    def breakdown_query(group: str) -> str:
        return (
            f'SELECT SUM("idle_gpu_s") / 3600 AS "idle GPU-hours", SUM("idle_value") AS "idle value ($currency)", '
            f'{IDLE_SHARE} AS "idle share", SUM("allocated_idle_gpu_s") / 3600 AS "allocated-idle GPU-hours" '
            f'FROM "capmon_device" WHERE $timeFilter {FLEET_FILTER} GROUP BY {group}'
        )

    merge = [{"id": "merge", "options": {}}, {"id": "organize", "options": {"excludeByName": {"Time": True}}}]

    def breakdown(group: str, by: str) -> list[Per]:
        return [
            target(breakdown_query(group), fmt="table", promql=hours_of(IDLE_GPU_S, by)),
            prom_target(f"sum by ({by}) ({over_range(IDLE_VALUE)})", "B", "table"),
            prom_target(idle_share_prom(by), "C", "table"),
            prom_target(hours_of(ALLOCATED_IDLE_GPU_S, by), "D", "table"),
        ]

    # PromQL's columns have literal names: transformations do not interpolate $currency.
    breakdown_columns = Per(
        merge,
        prom_columns(
            {"A": "idle GPU-hours", "B": "idle value", "C": "idle share", "D": "allocated-idle GPU-hours"}
        ),
    )
    lay.add(
        table(
            "Idle capacity by model",
            f"Idle GPU-hours, their value (the collector's per-model [pricing]) and the idle share per model, in {GPU_EQ}.",
            breakdown('"model"', "model"),
            "h",
            hour_cols,
            sort_by="idle GPU-hours",
            transformations=breakdown_columns,
        ),
        12,
        7,
    )
    lay.add(
        table(
            "Idle capacity by site / cluster / pool",
            f"The same per site, cluster and pool (the agents' labels), in {GPU_EQ}.",
            breakdown('"site", "cluster", "pool"', "site, cluster, pool"),
            "h",
            hour_cols,
            sort_by="idle GPU-hours",
            transformations=breakdown_columns,
        ),
        12,
        7,
    )
    count_cols = [unit_override(STATE_TEXT[s], "none", decimals=0) for s in STATE_CODES]

    def counts_by(by: str, labels: str) -> list[Per]:
        return [
            target(
                count_now(code, by).replace(
                    'SELECT COUNT("code")', f'SELECT COUNT("code") AS "{STATE_TEXT[s]}"'
                ),
                ref,
                "table",
                promql=f"count by ({labels}) {state_now(s)}",
            )
            for (s, code), ref in zip(STATE_CODES.items(), "ABCD", strict=True)
        ]

    counts_columns = Per(merge, prom_columns(dict(zip("ABCD", STATE_TEXT.values(), strict=True))))

    lay.add(
        table(
            "Devices now by model",
            "Devices per state at the end of the range, per model.",
            counts_by('"model"', "model"),
            "none",
            count_cols,
            sort_by="free",
            transformations=counts_columns,
        ),
        12,
        6,
    )
    lay.add(
        table(
            "Devices now by site / cluster / pool",
            "Devices per state at the end of the range, per site, cluster and pool.",
            counts_by('"site", "cluster", "pool"', "site, cluster, pool"),
            "none",
            count_cols,
            sort_by="free",
            transformations=counts_columns,
        ),
        12,
        6,
    )

    lay.row("Idle devices")
    lay.add(
        table(
            "Longest-idle devices",
            "Devices idle (allocated idle or free) at the end of the range, longest streak first. A busy "
            "blip shorter than the agent's busy_grace_s does not end a streak; a streak spans free and "
            "allocated idle, 'in this state for' is the time in the current one (a device free for days "
            "that a job took an hour ago is allocated idle for an hour). GPU share: 1 for a whole device, "
            "a MIG instance's share of its GPU.",
            [
                target(
                    'SELECT "idle for", "in this state for", "idle since" * 1000 AS "idle since", "state", "GPU share", '
                    '"reason" FROM (SELECT LAST("state_code") AS "code", "idle_for_s" AS "idle for", '
                    '"in_state_s" AS "in this state for", "idle_since" AS "idle since", "state", '
                    '"gpu_fraction" AS "GPU share", "reason" FROM "capmon_device" '
                    f'WHERE {NOW} {FLEET_FILTER} GROUP BY "host", "device", "model") WHERE "code" = 1 OR "code" = 2 '
                    'GROUP BY "host", "device", "model"',
                    fmt="table",
                    promql=with_state(latest("capmon_device_idle_for_seconds"), IDLE_NOW),
                ),
                prom_target(with_state(latest("capmon_device_in_state_seconds"), IDLE_NOW), "B", "table"),
                prom_target(
                    with_state(f"1000 * {latest('capmon_device_idle_since_seconds')}", IDLE_NOW), "C", "table"
                ),
                prom_target(with_state(latest("capmon_device_gpu_fraction"), IDLE_NOW), "D", "table"),
            ],
            "s",
            [
                unit_override("idle for", "dtdurations"),
                unit_override("in this state for", "dtdurations"),
                unit_override("idle since", "dateTimeAsIso"),
                unit_override("GPU share", "percentunit", decimals=0),
                unit_override("Time", "dateTimeAsIso", displayName="last report"),
                {
                    "matcher": {"id": "byName", "options": "state"},
                    "properties": [
                        {"id": "mappings", "value": state_mappings()},
                        {"id": "custom.cellOptions", "value": {"type": "color-background"}},
                    ],
                },
            ],
            sort_by="idle for",
            steps=thresholds((None, "green"), (3600, "yellow"), (86400, "red")),
            transformations=Per(
                [{"id": "merge", "options": {}}],
                prom_columns(
                    {"A": "idle for", "B": "in this state for", "C": "idle since", "D": "GPU share"},
                    hide=DEVICE_LABELS_HIDDEN,
                ),
            ),
        ),
        24,
        9,
    )
    lay.add(
        timeseries(
            "Idle share over time",
            f"Idle time over all reported time per interval, in {GPU_EQ}.",
            [
                target(
                    f'SELECT {IDLE_SHARE} AS "idle share" FROM "capmon_device" WHERE $timeFilter {FLEET_FILTER} GROUP BY time($__interval) fill(null)',
                    promql=idle_share_prom(span=INTERVAL),
                    legend="idle share",
                )
            ],
            "percent",
            thresholds((None, "green"), (20, "yellow"), (50, "red")),
            min=0,
            max=100,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Idle GPUs by model (average per interval)",
            f"Idle GPU-seconds per interval divided by the interval: how many GPUs stood idle on average, in {GPU_EQ}.",
            [
                target(
                    f'SELECT SUM("idle_gpu_s") / ($__interval_ms / 1000) FROM "capmon_device" WHERE $timeFilter {FLEET_FILTER} '
                    'GROUP BY time($__interval), "model" fill(null)',
                    alias="$tag_model",
                    promql=f"sum by (model) ({over_range(IDLE_GPU_S, span=INTERVAL)}) / ($__interval_ms / 1000)",
                    legend="{{model}}",
                )
            ],
            "none",
            decimals=1,
            min=0,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Idle GPU-hours by site (per interval)",
            f"Where idle time accumulates: idle GPU-hours per interval and site, in {GPU_EQ}.",
            [
                target(
                    f'SELECT SUM("idle_gpu_s") / 3600 FROM "capmon_device" WHERE $timeFilter {FLEET_FILTER} '
                    'GROUP BY time($__interval), "site" fill(null)',
                    alias="$tag_site",
                    promql=f"sum by (site) ({over_range(IDLE_GPU_S, span=INTERVAL)}) / 3600",
                    legend="{{site}}",
                )
            ],
            "h",
            decimals=2,
            min=0,
        ),
        24,
        8,
    )
    holder_panels(lay)
    variables = [
        datasource_var(),
        tag_var("site", "capmon_device"),
        tag_var("cluster", "capmon_device", '"site" =~ /^$site$/', match='site=~"$site"'),
        tag_var(
            "pool",
            "capmon_device",
            '"site" =~ /^$site$/ AND "cluster" =~ /^$cluster$/',
            match='site=~"$site", cluster=~"$cluster"',
        ),
        tag_var(
            "model",
            "capmon_device",
            '"site" =~ /^$site$/ AND "cluster" =~ /^$cluster$/ AND "pool" =~ /^$pool$/',
            match='site=~"$site", cluster=~"$cluster", pool=~"$pool"',
        ),
        tag_var(
            "host",
            "capmon_device",
            '"site" =~ /^$site$/ AND "cluster" =~ /^$cluster$/ AND "pool" =~ /^$pool$/ AND "model" =~ /^$model$/',
            match='site=~"$site", cluster=~"$cluster", pool=~"$pool", model=~"$model"',
        ),
        now_window_var(),
        currency_var(),
    ]
    return dashboard(
        "capmon-fleet",
        "capmon — Fleet idle capacity",
        "Which accelerators are idle, where, since when, and what that idle time is worth.",
        lay,
        variables,
    )


# -- Who holds the idle devices (capmon_holder) -----------------------------------------------------

# capmon_holder: one point per device per holder per window. Tags: the agent's, vendor, model, device,
# user, namespace, runtime, slot (numbers holders with the same tags); pod, job, container, pid and
# command are fields. allocated_idle_s, allocated_idle_gpu_s and idle_value are the holder's share of
# the device's (split evenly over its listed holders), so a SUM by user adds up to the devices'.
HOLDER_SERIES = '"user", "namespace", "runtime", "host", "device", "model", "slot"'
SHARE_NOTE = (
    "A device held by several processes counts each its share (split evenly); devices whose agent "
    "cannot tell who holds them are not here."
)
HOLDER_COLS = [
    unit_override("allocated-idle GPU-hours", "h", decimals=2),
    {
        "matcher": {"id": "byRegexp", "options": "allocated-idle value.*"},
        "properties": [{"id": "unit", "value": "short"}, {"id": "decimals", "value": 2}],
    },
]


def allocated_idle_by(tag: str) -> str:
    return (
        'SELECT SUM("allocated_idle_gpu_s") / 3600 AS "allocated-idle GPU-hours", '
        'SUM("idle_value") AS "allocated-idle value ($currency)" FROM "capmon_holder" '
        f'WHERE $timeFilter {FLEET_FILTER} GROUP BY "{tag}"'
    )


def holder_panels(lay: Layout) -> None:
    lay.row("Who holds them (over the time range; reclaim candidates now)")
    merge = [{"id": "merge", "options": {}}, {"id": "organize", "options": {"excludeByName": {"Time": True}}}]
    for title, tag, what in (
        (
            "Allocated idle by user",
            "user",
            "the holding process's user (or uid, as the agent's [holders] users says)",
        ),
        (
            "Allocated idle by namespace",
            "namespace",
            "the Kubernetes namespace of the holding pod (empty: not a pod)",
        ),
    ):
        lay.add(
            table(
                title,
                f"Allocated-idle GPU-hours and their value per {tag}: {what}. In {GPU_EQ}. {SHARE_NOTE}",
                [
                    target(
                        allocated_idle_by(tag),
                        fmt="table",
                        promql=hours_of("capmon_holder_allocated_idle_gpu_seconds", tag),
                    ),
                    prom_target(f"sum by ({tag}) ({over_range('capmon_holder_idle_value')})", "B", "table"),
                ],
                "h",
                HOLDER_COLS,
                sort_by="allocated-idle GPU-hours",
                transformations=Per(
                    merge, prom_columns({"A": "allocated-idle GPU-hours", "B": "allocated-idle value"})
                ),
            ),
            8,
            8,
        )

    # The job is a field (unbounded), and InfluxQL groups by tags only: each holder series with a job
    # is summed in InfluxDB, the series of one job are added up by Grafana's groupBy transformation.
    # Its field names are literal (no $currency: transformations and sortBy do not interpolate variables).
    # PromQL: the job is a label of capmon_holder_info, joined window by window (WINDOW_STEP).
    def by_job(metric: str) -> str:
        per_window = holder_names_per_window(
            f"sum_over_time({sel(metric)}[{WINDOW_STEP}] offset -1ms)", "slurm_job_id", 'slurm_job_id!=""'
        )
        return f"sum by (slurm_job_id, user) (sum_over_time(({per_window})[$__range:{WINDOW_STEP}]))"

    JOB_NOTE = (
        f"Allocated-idle GPU-hours and their value ($currency) per Slurm job, in {GPU_EQ}. {SHARE_NOTE}"
    )
    lay.add(
        table(
            "Allocated idle by job",
            Per(
                f"{JOB_NOTE} Each device of a job counts under the job it was last held by in the range.",
                f"{JOB_NOTE} Each window of a device counts under the job that held it then.",
            ),
            [
                target(
                    'SELECT SUM("allocated_idle_gpu_s") / 3600 AS "allocated-idle GPU-hours", '
                    'SUM("idle_value") AS "allocated-idle value", LAST("slurm_job_id") AS "job" '
                    f'FROM "capmon_holder" WHERE $timeFilter AND "slurm_job_id" =~ /./ {FLEET_FILTER} '
                    f"GROUP BY {HOLDER_SERIES}",
                    fmt="table",
                    promql=f"{by_job('capmon_holder_allocated_idle_gpu_seconds')} / 3600",
                ),
                prom_target(by_job("capmon_holder_idle_value"), "B", "table"),
            ],
            "h",
            HOLDER_COLS,
            sort_by=Per("allocated-idle value (sum)", "allocated-idle value"),
            transformations=Per(
                [
                    {"id": "merge", "options": {}},
                    {
                        "id": "groupBy",
                        "options": {
                            "fields": {
                                "job": {"aggregations": [], "operation": "groupby"},
                                "user": {"aggregations": [], "operation": "groupby"},
                                "allocated-idle GPU-hours": {
                                    "aggregations": ["sum"],
                                    "operation": "aggregate",
                                },
                                "allocated-idle value": {
                                    "aggregations": ["sum"],
                                    "operation": "aggregate",
                                },
                            }
                        },
                    },
                ],
                prom_columns(
                    {"A": "allocated-idle GPU-hours", "B": "allocated-idle value"},
                    labels={"slurm_job_id": "job"},
                ),
            ),
        ),
        8,
        8,
    )

    def reclaim(expr: str) -> str:
        return with_holder_names(expr, "pod, slurm_job_id, command")

    lay.add(
        table(
            "Reclaim candidates",
            "Devices allocated idle at the end of the range, and who holds them: the holder (user, "
            "namespace, pod, job, process), the device, how long it has been allocated idle (the time in "
            "this state, which the list is ranked by: a GPU free for days that a job took an hour ago is "
            "an hour), its idle streak, and what the device is worth per hour idle (the collector's "
            f"[pricing]; a MIG instance its share of the GPU). {SHARE_NOTE}",
            [
                target(
                    'SELECT "allocated idle for", "idle for", "idle_value" * 3600 / "allocated_idle_s" AS '
                    '"value ($currency/h)", "pod", "job", "command", "pid", "GPU share" FROM (SELECT '
                    'LAST("state_code") AS "code", "in_state_s" AS "allocated idle for", "idle_for_s" AS "idle for", '
                    '"idle_value", "allocated_idle_s", "pod", "slurm_job_id" AS "job", "command", "pid", '
                    f'"gpu_fraction" AS "GPU share" FROM "capmon_holder" WHERE {NOW} {FLEET_FILTER} '
                    f'GROUP BY {HOLDER_SERIES}) WHERE "code" = 1 GROUP BY {HOLDER_SERIES}',
                    fmt="table",
                    promql=reclaim(f"{latest('capmon_holder_in_state_seconds')} * {HELD_IDLE_NOW}"),
                ),
                prom_target(
                    reclaim(f"{latest('capmon_holder_idle_for_seconds')} * {HELD_IDLE_NOW}"), "B", "table"
                ),
                prom_target(
                    reclaim(
                        f"{latest('capmon_holder_idle_value')} * 3600 / "
                        f"{latest('capmon_holder_allocated_idle_seconds')} * {HELD_IDLE_NOW}"
                    ),
                    "C",
                    "table",
                ),
                prom_target(
                    reclaim(f"{latest('capmon_holder_gpu_fraction')} * {HELD_IDLE_NOW}"), "D", "table"
                ),
            ],
            "s",
            [
                unit_override("allocated idle for", "dtdurations"),
                unit_override("idle for", "dtdurations"),
                unit_override("GPU share", "percentunit", decimals=0),
                {
                    "matcher": {"id": "byRegexp", "options": "value .*"},
                    "properties": [{"id": "unit", "value": "short"}, {"id": "decimals", "value": 2}],
                },
                unit_override("Time", "dateTimeAsIso", displayName="last report"),
            ],
            sort_by="allocated idle for",
            steps=thresholds((None, "green"), (3600, "yellow"), (86400, "red")),
            transformations=Per(
                [
                    {"id": "merge", "options": {}},
                    {"id": "organize", "options": {"excludeByName": {"slot": True, "runtime": True}}},
                ],
                prom_columns(
                    {"A": "allocated idle for", "B": "idle for", "C": "value per hour", "D": "GPU share"},
                    hide=(*DEVICE_LABELS_HIDDEN, "slot", "runtime"),
                    labels={"slurm_job_id": "job"},
                ),
            ),
        ),
        24,
        9,
    )


# -- Host detail -----------------------------------------------------------------------------------

# Variables only ever inside `=~ /^…$/`: Grafana regex-escapes even a single value (see tag_var).
HOST_FILTER = 'AND "host" =~ /^$host$/ AND "device" =~ /^$device$/'
# PromQL: the single-value host as an exact match (Grafana escapes only backslashes and quotes there).
HOST_MATCH = 'host="$host", device=~"$device"'
HOST_HIDDEN = (*DEVICE_LABELS_HIDDEN, "host")


def holder_now(metric: str) -> str:
    """Each holder's latest window's value, with its names (pod, container, job, process name)."""
    return with_holder_names(
        unnamed(latest(metric, base=HOST_MATCH)), "pod, container, slurm_job_id, command", base=HOST_MATCH
    )


def per_interval(fn: str, metric: str, scale: str = "") -> str:
    """`fn` of each device's samples in each interval (× `scale`)."""
    return f"{scale}{fn}({sel(metric, base=HOST_MATCH)}{INTERVAL})"


def device_now(metric: str, scale: str = "") -> str:
    """Each device's latest window's value (× `scale`), with its state now as a label."""
    return with_state(f"{scale}{latest(metric, base=HOST_MATCH)}", base=HOST_MATCH)


def state_code_per_interval() -> str:
    """The one-hot state as its code (busy 0 … unavailable 3) per device, at the end of each interval."""
    parts = []
    for state, code in STATE_CODES.items():
        matcher = f'state="{state}"'
        parts.append(
            f"last_over_time({sel('capmon_device_state', matcher, base=HOST_MATCH)}{INTERVAL}) * {code}"
        )
    return "sum by (device) (" + " or ".join(parts) + ")"


def per_device(
    title: str, description: str, select: str, unit: str, steps: dict = GREEN, promql: str = "", **kw: Any
) -> dict:
    return timeseries(
        title,
        description,
        [
            target(
                f'SELECT {select} FROM "capmon_device" WHERE $timeFilter {HOST_FILTER} '
                'GROUP BY time($__interval), "device" fill(null)',
                alias="$tag_device",
                promql=promql,
                legend="{{device}}",
            )
        ],
        unit,
        steps,
        **kw,
    )


def host() -> dict:
    lay = Layout()
    state_timeline = panel(
        "state-timeline",
        "Device state",
        "Each device's state at the end of every interval (busy, allocated idle, free, unavailable).",
        [
            target(
                f'SELECT LAST("state") FROM "capmon_device" WHERE $timeFilter {HOST_FILTER} '
                'GROUP BY time($__interval), "device" fill(null)',
                alias="$tag_device",
                # The one-hot state as its code (the value mappings name codes too).
                promql=state_code_per_interval(),
                legend="{{device}}",
            )
        ],
        "none",
        options={"showValue": "never", "mergeValues": True, "rowHeight": 0.8, "legend": {"showLegend": True}},
        mappings=state_mappings(),
        color={"mode": "thresholds"},
    )
    state_timeline["interval"] = "1m"
    lay.add(state_timeline, 24, 9)
    lay.add(
        table(
            "Devices now",
            "Each device's latest window in the now window ($now_window) before the end of the range: its "
            "state, for how long (in this state; idle for: the idle streak, which spans free and allocated "
            "idle), why (reason), its GPU share (a MIG instance's share of its GPU) and the seconds of the "
            "window it spun (busy by utilisation, SM activity near 0).",
            [
                target(
                    'SELECT LAST("state_code") AS "code", "state", "in_state_s" AS "in this state for", "idle_for_s" AS "idle for", '
                    '"reason", "gpu_fraction" AS "GPU share", "util_mean_pct" AS "utilisation", "spin_s" AS "spin", '
                    '"memory_used_bytes" AS "memory used", "power_mean_w" AS "power", "temp_max_c" AS "temperature", '
                    f'"processes", "error" FROM "capmon_device" WHERE {NOW} {HOST_FILTER} GROUP BY "device", "model"',
                    fmt="table",
                    promql=device_now("capmon_device_in_state_seconds"),
                ),
                *(
                    prom_target(device_now(metric, scale), ref, "table")
                    for ref, metric, scale in (
                        ("B", "capmon_device_idle_for_seconds", ""),
                        ("C", "capmon_device_gpu_fraction", ""),
                        ("D", "capmon_device_utilization_ratio", "100 * "),
                        ("E", SPIN_S, ""),
                        ("F", "capmon_device_memory_used_bytes", ""),
                        ("G", "capmon_device_power_watts", ""),
                        ("H", "capmon_device_temperature_max_celsius", ""),
                        ("I", "capmon_device_processes", ""),
                    )
                ),
            ],
            "none",
            [
                unit_override("in this state for", "dtdurations"),
                unit_override("idle for", "dtdurations"),
                unit_override("GPU share", "percentunit", decimals=0),
                unit_override("spin", "s"),
                unit_override("utilisation", "percent"),
                unit_override("memory used", "bytes"),
                unit_override("power", "watt"),
                unit_override("temperature", "celsius"),
                unit_override("Time", "dateTimeFromNow", displayName="last report"),
                {
                    "matcher": {"id": "byName", "options": "state"},
                    "properties": [
                        {"id": "mappings", "value": state_mappings()},
                        {"id": "custom.cellOptions", "value": {"type": "color-background"}},
                    ],
                },
            ],
            transformations=Per(
                [
                    {"id": "merge", "options": {}},
                    {"id": "organize", "options": {"excludeByName": {"code": True}}},
                ],
                prom_columns(
                    {
                        "A": "in this state for",
                        "B": "idle for",
                        "C": "GPU share",
                        "D": "utilisation",
                        "E": "spin",
                        "F": "memory used",
                        "G": "power",
                        "H": "temperature",
                        "I": "processes",
                    },
                    hide=HOST_HIDDEN,
                ),
            ),
        ),
        24,
        8,
    )
    lay.add(
        table(
            "Holders now",
            "Who holds each device, from each device's latest window in the now window ($now_window): the "
            "process (pid, user, name — never its command line), its container, pod or Slurm job, the "
            "device memory it used (peak in the window) and how many seconds of that window it held the "
            "device. Devices whose agent cannot tell who holds them are not listed.",
            [
                target(
                    'SELECT LAST("state") AS "state", "pid", "command", "container_id" AS "container id", "pod", '
                    '"container", "slurm_job_id" AS "job", "partition", "memory_bytes" AS "memory", '
                    f'"held_s" AS "held" FROM "capmon_holder" WHERE {NOW} {HOST_FILTER} '
                    'GROUP BY "device", "user", "namespace", "runtime", "slot"',
                    fmt="table",
                    promql=holder_now("capmon_holder_state_code"),
                ),
                prom_target(holder_now("capmon_holder_memory_bytes"), "B", "table"),
                prom_target(holder_now("capmon_holder_held_seconds"), "C", "table"),
            ],
            "none",
            [
                unit_override("memory", "bytes"),
                unit_override("held", "s"),
                unit_override("Time", "dateTimeFromNow", displayName="last report"),
                {
                    "matcher": {"id": "byName", "options": "state"},
                    "properties": [
                        {"id": "mappings", "value": state_mappings()},
                        {"id": "custom.cellOptions", "value": {"type": "color-background"}},
                    ],
                },
            ],
            transformations=Per(
                [
                    {"id": "merge", "options": {}},
                    {"id": "organize", "options": {"excludeByName": {"slot": True}}},
                ],
                prom_columns(
                    {"A": "state", "B": "memory", "C": "held"},
                    hide=(*HOST_HIDDEN, "model", "slot"),
                    labels={"slurm_job_id": "job"},
                ),
            ),
        ),
        24,
        8,
    )
    lay.add(
        panel(
            "bargauge",
            "Idle share per device",
            "Idle seconds over reported seconds in the range, per device.",
            [
                target(
                    f'SELECT {IDLE_SHARE} FROM "capmon_device" WHERE $timeFilter {HOST_FILTER} GROUP BY "device"',
                    alias="$tag_device",
                    promql=idle_share_prom("device", base=HOST_MATCH),
                    legend="{{device}}",
                )
            ],
            "percent",
            thresholds((None, "green"), (20, "yellow"), (50, "red")),
            options={
                "orientation": "horizontal",
                "displayMode": "gradient",
                "reduceOptions": {"calcs": ["lastNotNull"]},
            },
            min=0,
            max=100,
        ),
        12,
        8,
    )
    lay.add(
        per_device(
            "Utilisation",
            "Mean compute utilisation per window (NVML GPU utilisation / GPM SM activity, Ascend AI Core).",
            'MEAN("util_mean_pct")',
            "percent",
            thresholds((None, "green"), (10, "blue")),
            promql=per_interval("avg_over_time", "capmon_device_utilization_ratio", "100 * "),
            min=0,
            max=100,
        ),
        12,
        8,
    )
    lay.add(
        per_device(
            "Busy but doing nothing (spin)",
            "Share of each interval a device was counted busy by utilisation (≥ spin_util_pct) while SM "
            "activity stayed below spin_sm_pct: an NCCL hang or a spin-wait.",
            'SUM("spin_s") * 100 / ($__interval_ms / 1000)',
            "percent",
            thresholds((None, "green"), (1, "orange")),
            promql=f"{per_interval('sum_over_time', SPIN_S, '100 * ')} / ($__interval_ms / 1000)",
            min=0,
            max=100,
        ),
        12,
        8,
    )
    lay.add(
        per_device(
            "Memory used",
            "Device memory in use at the end of each window.",
            'MEAN("memory_used_bytes")',
            "bytes",
            thresholds((None, "green"), (68719476736, "orange")),
            promql=per_interval("avg_over_time", "capmon_device_memory_used_bytes"),
            min=0,
        ),
        12,
        8,
    )
    lay.add(
        per_device(
            "Power",
            "Mean board power per window.",
            'MEAN("power_mean_w")',
            "watt",
            thresholds((None, "green"), (600, "orange")),
            promql=per_interval("avg_over_time", "capmon_device_power_watts"),
            min=0,
        ),
        12,
        8,
    )
    lay.add(
        per_device(
            "Temperature",
            "Highest temperature per window.",
            'MAX("temp_max_c")',
            "celsius",
            thresholds((None, "green"), (80, "orange"), (90, "red")),
            promql=per_interval("max_over_time", "capmon_device_temperature_max_celsius"),
        ),
        12,
        8,
    )
    lay.add(
        per_device(
            "Processes",
            "Most processes holding each device in a window (absent where the probe cannot tell).",
            'MAX("processes")',
            "none",
            promql=per_interval("max_over_time", "capmon_device_processes"),
            decimals=0,
            min=0,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Host CPU",
            "The host's CPU utilisation (mean and max per window), from the host probe.",
            [
                target(
                    'SELECT MEAN("cpu_mean_pct") AS "cpu mean", MAX("cpu_max_pct") AS "cpu max" FROM "capmon_host" '
                    'WHERE $timeFilter AND "host" =~ /^$host$/ GROUP BY time($__interval) fill(null)',
                    promql='100 * avg_over_time(capmon_host_cpu_mean_ratio{host="$host"}[$__interval] offset -1ms)',
                    legend="cpu mean",
                ),
                prom_target(
                    '100 * max_over_time(capmon_host_cpu_max_ratio{host="$host"}[$__interval] offset -1ms)',
                    "B",
                    legend="cpu max",
                ),
            ],
            "percent",
            thresholds((None, "green"), (90, "orange")),
            min=0,
            max=100,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Host memory",
            "The host's memory in use and installed.",
            [
                target(
                    'SELECT MEAN("memory_used_bytes") AS "used", MAX("memory_total_bytes") AS "total" FROM "capmon_host" '
                    'WHERE $timeFilter AND "host" =~ /^$host$/ GROUP BY time($__interval) fill(null)',
                    promql='avg_over_time(capmon_host_memory_used_bytes{host="$host"}[$__interval] offset -1ms)',
                    legend="used",
                ),
                prom_target(
                    'max_over_time(capmon_host_memory_total_bytes{host="$host"}[$__interval] offset -1ms)',
                    "B",
                    legend="total",
                ),
            ],
            "bytes",
            min=0,
        ),
        12,
        8,
    )
    variables = [
        datasource_var(),
        tag_var("site", "capmon_device"),
        tag_var("cluster", "capmon_device", '"site" =~ /^$site$/', match='site=~"$site"'),
        tag_var(
            "host",
            "capmon_device",
            '"site" =~ /^$site$/ AND "cluster" =~ /^$cluster$/',
            multi=False,
            match='site=~"$site", cluster=~"$cluster"',
        ),
        tag_var("device", "capmon_device", '"host" =~ /^$host$/', match='host="$host"'),
        now_window_var(),
    ]
    return dashboard(
        "capmon-host",
        "capmon — Host detail",
        "One host's devices: state over time and why, who holds them, utilisation, spin, memory, power, temperature, processes.",
        lay,
        variables,
    )


# -- Agents ----------------------------------------------------------------------------------------

AGENT_FILTER = 'AND "site" =~ /^$site$/ AND "cluster" =~ /^$cluster$/ AND "agent" =~ /^$agent$/'
SELF = "\"probe\" = ''"  # the agent's own point; probe points carry a probe tag
PROBES = '"probe" =~ /.+/'


def increase(field: str, where: str, group: str) -> str:
    """The counter's increase over the range, reset-safe (an agent restart starts its counters at 0)."""
    return (
        f'SELECT SUM("d") FROM (SELECT NON_NEGATIVE_DIFFERENCE("{field}") AS "d" FROM "capmon_agent" '
        f"WHERE $timeFilter AND {where} {AGENT_FILTER} GROUP BY {group})"
    )


def agents() -> dict:
    lay = Layout()
    lay.add(
        stat(
            "Agents reporting now",
            "Agents with a report in the now window ($now_window) before the end of the range.",
            f'SELECT COUNT("seq") FROM (SELECT LAST("seq") AS "seq" FROM "capmon_agent" WHERE {NOW} AND {SELF} {AGENT_FILTER} GROUP BY "agent")',
            "none",
            decimals=0,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Agents seen in the range",
            "Agents with any report in the range; more than 'reporting now' means some went silent.",
            f'SELECT COUNT("seq") FROM (SELECT LAST("seq") AS "seq" FROM "capmon_agent" WHERE $timeFilter AND {SELF} {AGENT_FILTER} GROUP BY "agent")',
            "none",
            decimals=0,
        ),
        4,
        4,
    )
    for title, field, description, steps in (
        (
            "Dropped reports",
            "dropped_reports",
            "Reports the agents' spools dropped in the range (full or too old): lost windows.",
            thresholds((None, "green"), (1, "red")),
        ),
        (
            "Lost windows",
            "lost_windows",
            "Windows the agents could not keep (the spool unwritable: a full or failing disk) in the range.",
            thresholds((None, "green"), (1, "red")),
        ),
        (
            "Dead-lettered reports",
            "dead_letter_reports",
            "Reports the collector refused as invalid (400) in the range, kept in dead-letter.jsonl.",
            thresholds((None, "green"), (1, "red")),
        ),
        (
            "Probe errors",
            "errors",
            "Probe sample() calls that raised or returned garbage in the range.",
            thresholds((None, "green"), (1, "orange")),
        ),
        (
            "Probe timeouts",
            "timeouts",
            "Probe sample() calls that ran past their timeout in the range.",
            thresholds((None, "green"), (1, "orange")),
        ),
    ):
        probe = field in ("errors", "timeouts")
        lay.add(
            stat(
                title,
                description,
                increase(field, PROBES if probe else SELF, '"agent", "probe"' if probe else '"agent"'),
                "none",
                steps,
                decimals=0,
            ),
            4,
            4,
        )
    lay.add(
        table(
            "Last report per agent",
            "When each agent last reported (its age is the report's lateness), its sequence number, version, uptime, "
            "spool, and what it lost: reports dropped at the spool's bound, windows it could not write, dead letters.",
            [
                target(
                    'SELECT LAST("seq") AS "seq", "version", "uptime_s" AS "uptime", "devices", "spool_reports" AS "spooled reports", '
                    '"dropped_reports" AS "dropped (total)", "lost_windows" AS "lost windows (total)", '
                    f'"dead_letter_reports" AS "dead-lettered (total)" FROM "capmon_agent" '
                    f'WHERE $timeFilter AND {SELF} {AGENT_FILTER} GROUP BY "agent", "host", "site", "cluster"',
                    fmt="table",
                )
            ],
            "none",
            [
                unit_override("Time", "dateTimeFromNow", displayName="last report"),
                unit_override("uptime", "dtdurations"),
            ],
            steps=thresholds((None, "green"), (1, "red")),
            transformations=[{"id": "merge", "options": {}}],
        ),
        24,
        8,
    )
    lay.add(
        timeseries(
            "Spool depth",
            "Reports waiting in each agent's spool (the collector unreachable or refusing).",
            [
                target(
                    f'SELECT MAX("spool_reports") FROM "capmon_agent" WHERE $timeFilter AND {SELF} {AGENT_FILTER} '
                    'GROUP BY time($__interval), "agent" fill(null)',
                    alias="$tag_agent",
                )
            ],
            "none",
            thresholds((None, "green"), (5, "orange"), (100, "red")),
            decimals=0,
            min=0,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Spool size",
            "Bytes held in each agent's spool.",
            [
                target(
                    f'SELECT MAX("spool_bytes") FROM "capmon_agent" WHERE $timeFilter AND {SELF} {AGENT_FILTER} '
                    'GROUP BY time($__interval), "agent" fill(null)',
                    alias="$tag_agent",
                )
            ],
            "bytes",
            thresholds((None, "green"), (16777216, "orange")),
            min=0,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Dropped reports, lost windows and dead letters",
            "New drops, lost windows and dead letters per interval and agent.",
            [
                target(
                    'SELECT NON_NEGATIVE_DIFFERENCE(MAX("dropped_reports")) AS "dropped", '
                    'NON_NEGATIVE_DIFFERENCE(MAX("lost_windows")) AS "lost", '
                    'NON_NEGATIVE_DIFFERENCE(MAX("dead_letter_reports")) AS "dead-lettered" FROM "capmon_agent" '
                    f'WHERE $timeFilter AND {SELF} {AGENT_FILTER} GROUP BY time($__interval), "agent" fill(null)',
                    alias="$tag_agent $col",
                )
            ],
            "none",
            thresholds((None, "green"), (1, "red")),
            decimals=0,
            min=0,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Probe errors and timeouts",
            "New probe errors and timeouts per interval, per agent and probe.",
            [
                target(
                    'SELECT NON_NEGATIVE_DIFFERENCE(MAX("errors")) AS "errors", '
                    'NON_NEGATIVE_DIFFERENCE(MAX("timeouts")) AS "timeouts" FROM "capmon_agent" '
                    f'WHERE $timeFilter AND {PROBES} {AGENT_FILTER} GROUP BY time($__interval), "agent", "probe" fill(null)',
                    alias="$tag_agent $tag_probe $col",
                )
            ],
            "none",
            thresholds((None, "green"), (1, "orange")),
            decimals=0,
            min=0,
        ),
        12,
        8,
    )
    lay.add(
        table(
            "Probes",
            "Each agent's probes at their latest report: status, cumulative samples, errors and timeouts, and why.",
            [
                target(
                    'SELECT LAST("status") AS "status", "samples", "errors", "timeouts", "last_duration_s" AS "last duration", '
                    f'"reason" FROM "capmon_agent" WHERE $timeFilter AND {PROBES} {AGENT_FILTER} GROUP BY "agent", "probe"',
                    fmt="table",
                )
            ],
            "none",
            [
                unit_override("last duration", "s"),
                unit_override("Time", "dateTimeFromNow", displayName="last report"),
            ],
            sort_by="errors",
            steps=thresholds((None, "green"), (1, "orange")),
            transformations=[{"id": "merge", "options": {}}],
        ),
        12,
        8,
    )
    variables = [
        datasource_var(),
        tag_var("site", "capmon_agent"),
        tag_var("cluster", "capmon_agent", '"site" =~ /^$site$/'),
        tag_var("agent", "capmon_agent", '"site" =~ /^$site$/ AND "cluster" =~ /^$cluster$/'),
        now_window_var(),
    ]
    return dashboard(
        "capmon-agents",
        "capmon — Agents",
        "Are the agents reporting? Last report, spool backlog, dropped reports, lost windows, dead letters, probe errors and timeouts.",
        lay,
        variables,
    )


DASHBOARDS = {
    "capmon-fleet.json": (fleet, INFLUXQL),
    "capmon-host.json": (host, INFLUXQL),
    "capmon-agents.json": (agents, INFLUXQL),
    "capmon-fleet-prometheus.json": (fleet, PROMQL),
    "capmon-host-prometheus.json": (host, PROMQL),
}


def render(spec: tuple[Any, str]) -> str:
    build, lang = spec
    return json.dumps(resolve(build(), lang), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    for name, spec in DASHBOARDS.items():
        (HERE / name).write_text(render(spec), encoding="utf-8")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
