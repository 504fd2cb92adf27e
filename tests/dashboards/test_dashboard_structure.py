"""The dashboards' structure: what Grafana needs to load them and what keeps them true to the schema."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
from dashboard_fleet import (
    DASHBOARDS,
    dashboard_files,
    load_dashboards,
    panels,
    remote_write_series,
    storage_schema,
)

SCHEMA = storage_schema()
BOARDS = load_dashboards()  # InfluxQL
PROM_BOARDS = load_dashboards("promql")
UIDS = {"capmon-fleet", "capmon-host", "capmon-agents"}
PROM_UIDS = {"capmon-fleet-prometheus", "capmon-host-prometheus"}
RW_SERIES = remote_write_series()

_KEYWORDS = {
    "select", "from", "where", "and", "or", "group", "by", "as", "fill", "null", "time", "limit",
    "order", "desc", "asc", "show", "tag", "values", "with", "key", "not", "none", "previous", "linear",
}  # fmt: skip


def _strip_literals(query: str) -> str:
    query = re.sub(r"'(?:[^'\\]|\\.)*'", " ", query)  # string literals
    query = re.sub(r"[=!]~\s*/(?:[^/\\]|\\.)*/", " ", query)  # regex literals
    query = re.sub(r"\d+(?:\.\d+)?(?:ms|s|m|h|d|w)?\b", " ", query)  # numbers, durations
    return re.sub(r"\$\{?\w+\}?(?:ms|s|m|h)?", " ", query)  # template variables, macros, `${__to}ms`


def referenced(query: str) -> tuple[set[str], set[str]]:
    """(measurements, identifiers) of one InfluxQL query: every name that must be a field, tag or alias."""
    text = _strip_literals(query)
    measurements = set(re.findall(r'\bFROM\s+"?([A-Za-z_]\w*)"?', text, flags=re.IGNORECASE))
    aliases = set(re.findall(r'\bAS\s+"([^"]+)"', text, flags=re.IGNORECASE))
    aliases |= set(re.findall(r"\bAS\s+([A-Za-z_]\w*)", text, flags=re.IGNORECASE))
    names = set()
    for m in re.finditer(r'"([^"]+)"|([A-Za-z_]\w*)(\s*\()?', text):
        quoted, bare, call = m.group(1), m.group(2), m.group(3)
        name = quoted or bare
        if call or (bare and bare.lower() in _KEYWORDS):
            continue  # a function, or InfluxQL itself
        names.add(name)
    return measurements, names - measurements - aliases


def check_query(query: str) -> list[str]:
    """Problems with a query against the storage schema (empty when it only names what the collector writes)."""
    measurements, names = referenced(query)
    problems = [f"unknown measurement {m!r}" for m in sorted(measurements - set(SCHEMA.fields))]
    known = set()
    for m in measurements & set(SCHEMA.fields):
        known |= set(SCHEMA.fields[m]) | SCHEMA.tags[m]
    problems += [f"{n!r} is no field or tag of {sorted(measurements)}" for n in sorted(names - known)]
    return problems


def all_queries():
    for uid, board in BOARDS.items():
        for p in panels(board):
            for t in p.get("targets", []):
                yield pytest.param(t["query"], id=f"{uid}:{p['title']}:{t['refId']}")
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                yield pytest.param(var["query"], id=f"{uid}:${var['name']}")


def test_schema_comes_from_the_collector():
    assert set(SCHEMA.fields) == {"capmon_device", "capmon_host", "capmon_agent", "capmon_holder"}
    assert SCHEMA.fields["capmon_device"]["state"] == "string"
    assert {"idle_s", "idle_since", "idle_for_s", "state_code"} <= set(SCHEMA.fields["capmon_device"])
    assert {"site", "cluster", "pool", "host", "model", "device"} <= SCHEMA.tags["capmon_device"]
    assert "probe" in SCHEMA.tags["capmon_agent"]
    assert SCHEMA.fields["capmon_agent"]["version"] == "string"
    assert SCHEMA.fields["capmon_device"]["idle_value"] == "float"
    gpu_equivalents = {"gpu_fraction", "idle_gpu_s", "allocated_idle_gpu_s", "window_gpu_s"}
    assert gpu_equivalents | {"spin_s", "in_state_s", "reason"} <= set(SCHEMA.fields["capmon_device"])
    assert SCHEMA.fields["capmon_agent"]["lost_windows"] == "float"
    # Who holds a device: bounded identities are tags, the rest fields (a pid is a string, never summed).
    assert {"user", "namespace", "runtime", "device", "model", "host"} <= SCHEMA.tags["capmon_holder"]
    assert SCHEMA.fields["capmon_holder"]["pid"] == SCHEMA.fields["capmon_holder"]["slurm_job_id"] == "string"
    assert {"allocated_idle_gpu_s", "idle_value", "in_state_s", "pod", "command"} <= set(
        SCHEMA.fields["capmon_holder"]
    )


def test_the_schema_check_catches_a_misspelt_field():
    assert check_query('SELECT SUM("idle_s") FROM "capmon_device" WHERE $timeFilter') == []
    assert check_query('SELECT SUM("idel_s") FROM "capmon_device" WHERE $timeFilter') != []
    assert check_query('SELECT LAST(seq) FROM capmon_agent WHERE "agnet" =~ /^$agent$/') != []
    assert check_query("SELECT MEAN(util_mean_pct) FROM capmon_gpu") != []


@pytest.mark.parametrize("query", list(all_queries()))
def test_queries_name_only_what_the_collector_writes(query):
    assert check_query(query) == []


@pytest.mark.parametrize("query", list(all_queries()))
def test_variables_stand_only_inside_regex_literals(query):
    """Grafana regex-escapes variables in raw InfluxQL, single values too (grafana/grafana#80242): in
    `"host" = '$host'` a host `gpu01.fra1` becomes `'gpu01\\.fra1'` and matches nothing. Inside
    `=~ /^…$/` escaped and unescaped values both match; built-in macros are no tag values."""
    builtins = {"timeFilter", "__timeFilter", "__interval", "__interval_ms", "__from", "__to", "currency"}
    builtins.add("now_window")  # a duration (3m): escaping leaves it as it is
    outside = re.sub(r"[=!]~\s*/(?:[^/\\]|\\.)*/", " ", query)
    outside = re.sub(r'"[^"]*"', " ", outside)  # identifiers and aliases: "idle value ($currency)"
    used = set(re.findall(r"\$\{?(\w+)", outside)) - builtins
    assert not used, f"variables outside a regex literal: {sorted(used)}"
    literals = re.findall(r"'(?:[^'\\]|\\.)*'", query)
    assert not [lit for lit in literals if "$" in lit], "a variable inside a string literal"


def test_now_panels_use_the_now_window_variable():
    """No hard-coded "now" span: agents with window_s ≥ 60 s need a longer one (3 × window_s)."""
    now_queries = 0
    for uid, board in BOARDS.items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        for p in panels(board):
            for t in p["targets"]:
                if "${__to}" not in t["query"]:
                    continue
                now_queries += 1
                assert "${__to}ms - $now_window AND time <= ${__to}ms" in t["query"], f"{uid} / {p['title']}"
                assert "now_window" in variables, uid
        if "now_window" in variables:
            var = variables["now_window"]
            assert var["type"] in ("custom", "constant", "textbox") and not var.get("multi")
            assert var["current"]["value"] == "3m" and "3 × the agents' window_s" in var["description"]
    # fleet stats (4 states, idle power), the two by-state tables, longest-idle, reclaim candidates,
    # host devices and holders, agents
    assert now_queries == 5 + 2 * 4 + 1 + 1 + 2 + 1


def test_dashboards_are_what_generate_py_writes():
    spec = importlib.util.spec_from_file_location("capmon_dashboards_generate", DASHBOARDS / "generate.py")
    assert spec and spec.loader
    generate = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generate  # dataclasses look their module up there
    spec.loader.exec_module(generate)
    assert sorted(generate.DASHBOARDS) == sorted(p.name for p in dashboard_files())
    for name, build in generate.DASHBOARDS.items():
        assert (DASHBOARDS / name).read_text(encoding="utf-8") == generate.render(build), (
            f"{name} differs from what dashboards/generate.py writes: run it and commit both"
        )


def test_uids_stable_unique_and_no_import_placeholders():
    uids = [b["uid"] for b in load_dashboards("all").values()]
    assert len(uids) == len(set(uids)) == len(dashboard_files())
    assert set(uids) == UIDS | PROM_UIDS
    for path in dashboard_files():
        text = path.read_text(encoding="utf-8")
        assert "${DS_" not in text and "__inputs" not in text, path.name


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_dashboard_model(uid):
    board = BOARDS[uid]
    assert board["schemaVersion"] >= 39
    assert board["title"] and board["time"]["from"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "influxdb"
    wanted = {
        "capmon-fleet": {"site", "cluster", "model", "host"},
        "capmon-host": {"site", "cluster", "host"},
    }
    for name in wanted.get(uid, {"site"}):
        var = variables[name]
        assert var["type"] == "query" and var["query"].startswith("SHOW TAG VALUES"), name
        assert var["datasource"] == {"type": "influxdb", "uid": "${datasource}"}
    ids = [p["id"] for p in board["panels"]] + [c["id"] for p in board["panels"] for c in p.get("panels", [])]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_every_panel_has_datasource_title_unit_thresholds(uid):
    for p in panels(BOARDS[uid]):
        where = f"{uid} / {p.get('title')}"
        assert p.get("title"), where
        assert p["datasource"] == {"type": "influxdb", "uid": "${datasource}"}, where
        defaults = p["fieldConfig"]["defaults"]
        assert defaults.get("unit"), where
        steps = defaults["thresholds"]["steps"]
        assert steps and steps[0]["value"] is None, where
        assert p["targets"], where
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], where
            assert t["rawQuery"] is True and t["query"].lstrip().upper().startswith("SELECT"), where
        if p["type"] == "timeseries" or "$__interval" in str(p["targets"]):
            assert p.get("interval") == "1m", f"{where}: min interval must match the 60 s windows"


def _yaml_value(text: str, key: str) -> str:
    """The value of `key:` in a YAML file (the first occurrence; no YAML parser in the dev extras)."""
    m = re.search(rf"^\s*-?\s*{re.escape(key)}:\s*['\"]?([^'\"#\n]*?)['\"]?\s*(?:#.*)?$", text, re.MULTILINE)
    assert m, f"no {key}: in the file"
    return m.group(1)


def test_provisioning_points_at_the_dashboards_and_a_fixed_datasource_uid():
    ds = (DASHBOARDS / "provisioning/datasources/capmon.yaml").read_text()
    assert _yaml_value(ds, "type") == "influxdb"
    assert _yaml_value(ds, "version") == "InfluxQL"
    uid = _yaml_value(ds, "uid")
    assert uid == "capmon-influxdb"
    for board in BOARDS.values():
        (var,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
        assert var["current"]["value"] == uid
    prov = (DASHBOARDS / "provisioning/dashboards/capmon.yaml").read_text()
    assert _yaml_value(prov, "type") == "file"
    path = _yaml_value(prov, "path")
    compose = (DASHBOARDS / "docker-compose.yml").read_text()
    assert f"./capmon-fleet.json:{path}/capmon-fleet.json" in compose or f":{path}" in compose
    assert "DOCKER_INFLUXDB_INIT_MODE: setup" in compose
    assert "/etc/grafana/provisioning" in compose


def _compose_services(compose: str) -> dict[str, str]:
    """Each service's block of docker-compose.yml (the lines under `services:` indented below its name)."""
    body = compose.split("\nservices:\n", 1)[1].split("\nvolumes:\n", 1)[0]
    return dict(re.findall(r"^  ([\w-]+):\n((?:(?:    .*)?\n)*)", body + "\n", re.MULTILINE))


def test_demo_collector_installs_what_its_storage_needs():
    """kind = "influxdb_v2" imports influxdb-client, which only the [collector] extra installs."""
    from capmon.collector.config import load

    compose = (DASHBOARDS / "docker-compose.yml").read_text()
    services = _compose_services(compose)
    assert {"influxdb", "grafana", "collector", "sim-001"} <= set(services)
    env = dict(re.findall(r"^\s+(CAPMON_\w+_TOKEN): (\S+)$", compose, re.MULTILINE))
    collector = load(DASHBOARDS / "demo/collector.toml", env=env)
    assert collector.storage.kind == "influxdb_v2"
    assert "pip install --quiet '/tmp/capmon[collector]'" in services["collector"]
    assert "capmon collector run" in services["collector"]
    for name, block in services.items():
        if name.startswith("sim-"):
            assert "pip install --quiet /tmp/capmon &&" in block and "capmon agent run" in block, name


def test_demo_configs_load():
    from capmon.agent.config import load_config
    from capmon.collector.config import load

    compose = (DASHBOARDS / "docker-compose.yml").read_text()
    # The tokens the compose file sets: the collector refuses the sample's public example tokens.
    env = dict(re.findall(r"^\s+(CAPMON_\w+_TOKEN): (\S+)$", compose, re.MULTILINE))
    assert set(env) == {"CAPMON_AGENT_TOKEN", "CAPMON_READ_TOKEN", "CAPMON_INFLUX_TOKEN"}
    collector = load(DASHBOARDS / "demo/collector.toml", env=env)
    assert collector.storage.kind == "influxdb_v2" and collector.storage.bucket == "capmon"
    for path in sorted((DASHBOARDS / "demo").glob("sim-*.toml")):
        agent = load_config(path, env=env)
        assert agent.agent.id == path.stem and "mock" in agent.probes.enable
        assert agent.transport.url == "http://collector:8900/api/v1/reports"
        assert f"/src/dashboards/demo/{path.name}" in compose


# -- the PromQL variants ---------------------------------------------------------------------------

_PROM_FUNCS = {
    "sum", "count", "by", "on", "ignoring", "group_left", "and", "or", "offset", "label_values",
    "sum_over_time", "last_over_time", "avg_over_time", "max_over_time",
}  # fmt: skip


def prom_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) of one PromQL query as the generator writes them."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    metrics = set(re.findall(r"\b([a-z_][a-z0-9_]*)\{", text))
    metrics |= set(re.findall(r"label_values\(([a-z_][a-z0-9_]*)", text))
    labels = set(re.findall(r"([a-z_][a-z0-9_]*)\s*[=!]~?\s*\"", text))
    for group in re.findall(r"\b(?:by|on|ignoring|group_left)\s*\(([^)]*)\)", text):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    for m in re.finditer(r"label_values\([^,]*,\s*([a-z_]+)\)", text):
        labels.add(m.group(1))
    return metrics, labels


def prom_queries():
    for uid, board in PROM_BOARDS.items():
        for p in panels(board):
            for t in p["targets"]:
                yield pytest.param(t["expr"], id=f"{uid}:{p['title']}:{t['refId']}")
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                yield pytest.param(var["query"], id=f"{uid}:${var['name']}")


@pytest.mark.parametrize("expr", list(prom_queries()))
def test_promql_names_only_what_the_remote_write_sends(expr):
    metrics, labels = prom_names(expr)
    assert metrics, expr
    assert metrics <= set(RW_SERIES), sorted(metrics - set(RW_SERIES))
    known = set().union(*(RW_SERIES[m] for m in metrics))
    assert labels <= known, sorted(labels - known)


def test_the_promql_check_catches_a_misspelt_name():
    assert prom_names('sum by (model) (capmon_device_state{state="free", host=~"$host"})') == (
        {"capmon_device_state"},
        {"model", "state", "host"},
    )
    assert "capmon_device_idle_gpu_seconds" not in RW_SERIES  # the per-window gauge has `window_`


@pytest.mark.parametrize("uid", sorted(PROM_UIDS))
def test_promql_dashboard_model(uid):
    board = PROM_BOARDS[uid]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "capmon-prometheus"
    assert board["tags"] == ["capmon-prometheus"] and board["links"][0]["tags"] == ["capmon-prometheus"]
    ds = {"type": "prometheus", "uid": "${datasource}"}
    for p in panels(board):
        assert p["datasource"] == ds and p["targets"], p["title"]
        range_panel = p["type"] in ("timeseries", "state-timeline")
        for t in p["targets"]:
            assert t["datasource"] == ds and "query" not in t, p["title"]
            assert (t["instant"], t["range"]) == (not range_panel, range_panel), p["title"]
            # One window per interval: every per-interval selector is shifted into (t - interval, t].
            assert "[$__interval]" not in t["expr"].replace("[$__interval] offset -1ms", ""), p["title"]
        if p["type"] == "table":
            assert len(p["targets"]) > 1 or "Value" in str(p["transformations"]), p["title"]
    # A multi-value variable inside =~ (Grafana regex-escapes it), the single-value host inside =.
    text = json.dumps(board)
    if uid == "capmon-host-prometheus":
        assert 'host=\\"$host\\"' in text and 'host=~\\"$host\\"' not in text
    else:
        assert 'host=~\\"$host\\"' in text


def test_prometheus_provisioning_has_the_dashboards_datasource_uid():
    ds = (DASHBOARDS / "provisioning/datasources/capmon-prometheus.yaml").read_text()
    assert _yaml_value(ds, "type") == "prometheus"
    assert _yaml_value(ds, "uid") == "capmon-prometheus"
    assert _yaml_value(ds, "timeInterval") == "60s"
