"""Configuration: the sample parses, unknown keys name themselves and the file, secrets come from the env."""

from __future__ import annotations

import argparse
import re

import pytest

from capmon.collector.cli import register_collector, sample_config
from capmon.collector.config import ConfigError, hash_token, load, parse


def test_sample_parses_with_documented_defaults():
    config = parse(sample_config(), "sample.toml", env={})
    assert config.collector.port == 8900 and config.storage.kind == "none"
    assert config.collector.label_keys == ("site", "cluster", "pool")
    # The sample ships no working token: the example entries are commented out.
    assert config.auth.agent_tokens == () and config.auth.read_tokens == ()


@pytest.mark.parametrize(
    ("entry", "where", "plain"),
    [
        ('{ name = "example-rack"', "[auth] agent_tokens[0]", "example-agent-token"),
        ('{ name = "grafana"', "[auth] read_tokens[0]", "example-read-token"),
    ],
)
def test_the_samples_example_tokens_are_refused_when_uncommented(entry, where, plain):
    """Everyone knows the sample's example tokens: a config using their digests must not start."""
    text = sample_config()
    assert f"# {entry}" in text
    with pytest.raises(ConfigError) as exc:
        parse(text.replace(f"# {entry}", entry), "collector.toml", env={})
    message = str(exc.value)
    assert "collector.toml" in message and f"{where}.sha256" in message and plain in message
    assert "capmon collector hash-token --generate" in message


def test_example_token_refused_from_the_environment_too():
    with pytest.raises(
        ConfigError,
        match=r"\[auth\] read_tokens\[0\]\.env: \(\$RT\) is the sample's example token 'example-read-token'",
    ):
        parse("[auth]\nread_tokens = [{env = 'RT'}]\n", "c.toml", env={"RT": "example-read-token"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[collector]\nprot = 1\n",
            "collector.toml: [collector]: unknown key 'collector.prot' (known: body_read_timeout_s, drain_timeout_s,",
        ),
        (
            "[colector]\n",
            "collector.toml: unknown section [colector] (known: auth, collector, pricing, storage)",
        ),
        (
            "[storage]\nkind = 'influx'\n",
            "collector.toml: [storage] kind: must be one of 'none', 'influxdb_v2', 'influxdb_v1', 'prometheus_remote_write', got 'influx'",
        ),
        ("[collector]\nport = 'x'\n", "collector.toml: [collector] port: must be an integer, got 'x'"),
        ("[collector]\nport = 65536\n", "collector.toml: [collector] port: must be 0..65535, got 65536"),
        (
            "[collector]\nlabel_keys = ['host']\n",
            "[collector] label_keys[0]: 'host' is a tag the collector writes itself",
        ),
        # `$` would match before a final newline: the wire's KEY_PATTERN ends in \Z.
        ('[collector]\nlabel_keys = ["zz\\n"]\n', "[collector] label_keys[0]: 'zz\\n' is not a label key"),
        (
            "[auth]\nagent_tokens = [{sha256 = 'abc', agents = ['a']}]\n",
            "[auth] agent_tokens[0].sha256: must be 64 lowercase hex",
        ),
        (
            "[auth]\nagent_tokens = [{env = 'NOPE_UNSET', agents = ['a']}]\n",
            "[auth] agent_tokens[0].env: names $NOPE_UNSET, which is not set",
        ),
        (
            "[auth]\nagent_tokens = [{env = 'T', agents = []}]\n",
            "[auth] agent_tokens[0].agents: must name the agent ids",
        ),
        (
            "[auth]\nagent_tokens = [{env = 'T', agents = ['a'], colour = 1}]\n",
            "[auth] agent_tokens[0]: unknown key 'auth.agent_tokens[0].colour' (known: agents, env, name, sha256)",
        ),
        (
            "[storage]\nkind = 'influxdb_v2'\n",
            "[storage]: storage.kind influxdb_v2 needs storage.org and a token",
        ),
        ("not toml = = 1", "collector.toml"),
    ],
)
def test_bad_config_names_key_and_file(text, message):
    with pytest.raises(ConfigError) as exc:
        parse(text, "collector.toml", env={"T": "tok"})
    assert message in str(exc.value) and str(exc.value).startswith("collector.toml: ")


def test_secrets_from_env_and_kept_out_of_repr(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[storage]\nkind = 'influxdb_v2'\norg = 'o'\n[auth]\nread_tokens = [{env = 'RT'}]\n")
    assert (
        load(path, env={"CAPMON_INFLUX_TOKEN": "influx-secret", "RT": "r"}).storage.token == "influx-secret"
    )
    config = load(path, env={"CAPMON_INFLUX_TOKEN": "influx-secret", "RT": "read-secret"})
    assert config.storage.token == "influx-secret"
    assert "influx-secret" not in repr(config)
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load(tmp_path / "missing.toml")


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="capmon")
    register_collector(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


def test_cli_config_prints_the_sample(capsys):
    args = cli("collector", "config")
    assert args.func(args) == 0
    assert capsys.readouterr().out == sample_config()


def test_cli_hash_token(capsys):
    args = cli("collector", "hash-token", "example-read-token")
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == hash_token("example-read-token")
    args = cli("collector", "hash-token", "--generate")
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    token, digest = (line.split()[-1] for line in lines[:2])
    assert hash_token(token) == digest


def test_hash_token_generate_prints_the_auth_lines_to_paste(capsys):
    """Review: --generate printed the token and sha256 but not the TOML that uses them."""
    from capmon.collector.auth import TokenStore

    args = cli("collector", "hash-token", "--generate")
    assert args.func(args) == 0
    out = capsys.readouterr().out
    token = out.splitlines()[0].split()[-1]
    [agent_line] = [line for line in out.splitlines() if line.startswith("agent_tokens = ")]
    [read_line] = [line for line in out.splitlines() if line.startswith("read_tokens = ")]
    assert "replace every <…> placeholder" in out and token not in agent_line + read_line
    edited = re.sub(r"<agent id or pattern[^>]*>", "rack7-*", agent_line).replace("<name for logs>", "rack7")
    config = parse(f"[auth]\n{edited}\n", "collector.toml", env={})
    principal = TokenStore(config.auth, env={}).authenticate(f"Bearer {token}")
    assert principal is not None and principal.role == "agent" and principal.name == "rack7"
    assert principal.may_write_as("rack7-node-1") and not principal.may_write_as("rack8-node-1")
    config = parse(f"[auth]\n{read_line.replace('<name for logs>', 'grafana')}\n", "c.toml", env={})
    principal = TokenStore(config.auth, env={}).authenticate(f"Bearer {token}")
    assert principal is not None and principal.role == "read"


def test_cli_run_refuses_a_bad_config(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[collector]\nbogus = 1\n")
    args = cli("collector", "run", "--config", str(path))
    assert args.func(args) == 2
    assert "unknown key 'collector.bogus'" in capsys.readouterr().err


def test_influxdb_v2_without_influxdb_client_names_the_extra(monkeypatch):
    """Refused at config time with the install command, not a traceback once serving starts."""
    import sys

    for name in [m for m in sys.modules if m == "influxdb_client" or m.startswith("influxdb_client.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "influxdb_client", None)  # `import influxdb_client` now fails
    with pytest.raises(ConfigError) as exc:
        parse("[storage]\nkind = 'influxdb_v2'\norg = 'o'\ntoken = 't'\n", "collector.toml", env={})
    assert str(exc.value).startswith(
        "collector.toml: [storage]: storage.kind influxdb_v2 needs the influxdb-client"
    )
    # capmon is installed from a checkout, not from PyPI.
    assert "pip install '.[collector]' in a capmon checkout (README: Install)" in str(exc.value)
    assert "capmon[" not in sample_config()  # capmon is not on PyPI
    # Other kinds never need it.
    assert parse("[storage]\nkind = 'influxdb_v1'\n", "collector.toml", env={}).storage.kind == "influxdb_v1"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[collector]\nstale_windows = 0\n", "[collector] stale_windows: must be > 0, got 0"),
        ("[collector]\nstale_windows = nan\n", "[collector] stale_windows: must be a finite number, got nan"),
        ("[collector]\nforget_after_s = -1\n", "[collector] forget_after_s: must be > 0, got -1"),
        ("[collector]\nforget_after_s = nan\n", "[collector] forget_after_s: must be a finite number"),
        ("[collector]\nmax_future_s = 0\n", "[collector] max_future_s: must be > 0, got 0"),
        ("[collector]\ndrain_timeout_s = -1\n", "[collector] drain_timeout_s: must be ≥ 0, got -1"),
        ("[storage]\nflush_interval_s = -0.1\n", "[storage] flush_interval_s: must be ≥ 0, got -0.1"),
        ("[storage]\ntimeout_s = 0\n", "[storage] timeout_s: must be > 0, got 0"),
        ("[storage]\ntimeout_s = inf\n", "[storage] timeout_s: must be a finite number, got inf"),
        ("[storage]\nretry_after_s = 0\n", "[storage] retry_after_s: must be > 0, got 0"),
        ("[storage]\nmax_pending_lines = 0\n", "[storage] max_pending_lines: must be > 0, got 0"),
        ("[storage]\nbatch_size = 100001\n", "[storage] batch_size: must be 1..100000, got 100001"),
        ("[pricing]\ndefault = -1.0\n", "[pricing] default: must be ≥ 0, got -1"),
        ("[pricing.models]\nH100 = -2.5\n", "[pricing] models.H100: must be ≥ 0, got -2.5"),
        ("[pricing.models]\nH100 = nan\n", "[pricing] models.H100: must be a finite number, got nan"),
    ],
)
def test_out_of_range_numbers_name_key_and_file(text, key):
    with pytest.raises(ConfigError) as exc:
        parse(text, "collector.toml", env={})
    assert str(exc.value).startswith(f"collector.toml: {key}")


def test_zero_flush_interval_and_zero_prices_are_valid():
    config = parse(
        "[storage]\nflush_interval_s = 0\n[pricing]\ndefault = 0\n[pricing.models]\nA100 = 0\n",
        "c.toml",
        env={},
    )
    assert config.storage.flush_interval_s == 0 and config.pricing.models["A100"] == 0


# -- issue 11 item 7: limits the wire also sets are the wire's, or tighter -------------------------


def test_wire_limits_default_to_the_wires_own():
    from capmon.agent import wire

    c = parse("", "c.toml", env={}).collector
    assert (c.max_labels, c.max_label_value_len, c.max_window_s) == (
        wire.MAX_LABELS,
        wire.MAX_LABEL_VALUE_LEN,
        wire.MAX_WINDOW_S,
    )


@pytest.mark.parametrize(
    ("key", "looser", "tighter", "range_"),
    [
        ("max_labels", 17, 8, "1..16"),
        ("max_label_value_len", 256, 64, "1..128"),
        ("max_window_s", 172800, 3600, "at most 86400"),
    ],
)
def test_a_wire_limit_may_be_tighter_never_looser(key, looser, tighter, range_):
    assert getattr(parse(f"[collector]\n{key} = {tighter}\n", "c.toml", env={}).collector, key) == tighter
    with pytest.raises(ConfigError) as exc:
        parse(f"[collector]\n{key} = {looser}\n", "collector.toml", env={})
    assert str(exc.value) == (
        f"collector.toml: [collector] {key}: must be {range_} (the wire protocol's limit: tighter is fine, "
        f"looser cannot be honoured), got {looser}"
    )


# -- issue 11 item 22: one loader, one error style, exactly what is missing -------------------------


def test_influxdb_v2_names_exactly_what_is_missing():
    v2 = "[storage]\nkind = 'influxdb_v2'\n"
    with pytest.raises(ConfigError) as exc:
        parse(v2, "collector.toml", env={"CAPMON_INFLUX_TOKEN": "t"})
    assert str(exc.value) == "collector.toml: [storage]: storage.kind influxdb_v2 needs storage.org"
    with pytest.raises(ConfigError) as exc:
        parse(v2 + "org = 'o'\nbucket = ''\n", "collector.toml", env={"CAPMON_INFLUX_TOKEN": "t"})
    assert str(exc.value) == "collector.toml: [storage]: storage.kind influxdb_v2 needs storage.bucket"


def test_influxdb_v2_without_any_token_is_a_startup_error_naming_both_places():
    v2 = "[storage]\nkind = 'influxdb_v2'\norg = 'o'\n"
    with pytest.raises(ConfigError) as exc:
        parse(v2, "collector.toml", env={})
    assert str(exc.value) == (
        "collector.toml: [storage]: storage.kind influxdb_v2 needs a token (storage.token or $CAPMON_INFLUX_TOKEN)"
    )
    assert parse(v2 + "token = 'in-file'\n", "c.toml", env={}).storage.token == "in-file"
    assert parse(v2, "c.toml", env={"CAPMON_INFLUX_TOKEN": "from-env"}).storage.token == "from-env"


def test_the_ingest_limits_have_their_documented_defaults_and_are_checked():
    c = parse("", "c.toml", env={}).collector
    assert c.max_inflight_decoded_bytes == 256 * 1024 * 1024
    assert c.body_read_timeout_s == 30.0
    assert c.max_devices_per_agent == 10_000 and c.max_values_per_agent == 1_000
    assert c.refusal_log_interval_s == 60.0 and c.refusal_write_interval_s == 5.0
    for key in (
        "max_inflight_decoded_bytes",
        "body_read_timeout_s",
        "max_devices_per_agent",
        "max_values_per_agent",
        "refusal_log_interval_s",
        "refusal_write_interval_s",
    ):
        with pytest.raises(ConfigError, match=rf"^c\.toml: \[collector\] {key}: must be > 0, got 0$"):
            parse(f"[collector]\n{key} = 0\n", "c.toml", env={})
    with pytest.raises(
        ConfigError, match=r"\[collector\] max_inflight_decoded_bytes: must be at least max_decoded_bytes"
    ):
        parse("[collector]\nmax_decoded_bytes = 1000\nmax_inflight_decoded_bytes = 999\n", "c.toml", env={})


def test_the_sample_shows_every_option_at_its_default():
    """The sample is the documentation of every option: none missing, none restated differently."""
    import dataclasses

    from capmon.agent.configfile import parse_toml
    from capmon.collector.config import Config

    shown = parse_toml(sample_config(), "sample.toml")
    defaults = Config()
    for section in ("collector", "storage", "pricing"):
        options = {f.name for f in dataclasses.fields(getattr(defaults, section))}
        assert set(shown[section]) == options, section
        for key, value in shown[section].items():
            want = getattr(getattr(defaults, section), key)
            assert (tuple(value) if isinstance(value, list) else value) == want, f"{section}.{key}"
    assert "))" not in sample_config()


def test_both_roles_word_their_errors_alike(tmp_path):
    """One ConfigError, one form: `<file>: [section] key: reason`, unknown keys with the known ones."""
    from capmon.agent import config as agent_config
    from capmon.collector import config as collector_config

    assert collector_config.ConfigError is agent_config.ConfigError
    agent_file, collector_file = tmp_path / "agent.toml", tmp_path / "collector.toml"
    messages = {}
    for role, path, load_role, section, int_key in (
        ("agent", agent_file, lambda p: agent_config.load_config(p, env={}), "agent", "window_s"),
        ("collector", collector_file, lambda p: load(p, env={}), "collector", "port"),
    ):
        path.write_text(f"[{section}]\nbogus = 1\n")
        with pytest.raises(ConfigError) as unknown:
            load_role(path)
        path.write_text(f"[{section}]\n{int_key} = 'x'\n")
        with pytest.raises(ConfigError) as wrong:
            load_role(path)
        path.write_text(f"[{section}x]\n")
        with pytest.raises(ConfigError) as section_error:
            load_role(path)
        messages[role] = (str(unknown.value), str(wrong.value), str(section_error.value))
        assert re.fullmatch(
            rf"{re.escape(str(path))}: \[{section}\]: unknown key '{section}\.bogus' \(known: [a-z_, ]+\)",
            messages[role][0],
        )
        assert messages[role][1] == f"{path}: [{section}] {int_key}: must be an integer, got 'x'"
        assert re.fullmatch(
            rf"{re.escape(str(path))}: unknown section \[{section}x\] \(known: [a-z, ]+\); did you mean '{section}'\?",
            messages[role][2],
        )


@pytest.mark.parametrize(
    ("key", "why"),
    [
        # Tags of capmon_holder: a point would carry the key twice (influxd: "duplicate tags").
        ("user", "'user' is a tag the collector writes itself (on capmon_holder)"),
        ("namespace", "'namespace' is a tag the collector writes itself (on capmon_holder)"),
        ("runtime", "'runtime' is a tag the collector writes itself (on capmon_holder)"),
        ("slot", "'slot' is a tag the collector writes itself (on capmon_holder)"),
        ("probe", "'probe' is a tag the collector writes itself (on capmon_agent)"),
        ("time", "'time' is InfluxDB's timestamp column"),
        # Fields: a tag of the same name makes InfluxQL answer `state` and `state_1`.
        ("state", "'state' is a field the collector writes (on capmon_device, capmon_holder)"),
        ("reason", "'reason' is a field the collector writes (on capmon_agent, capmon_device)"),
        ("pid", "'pid' is a field the collector writes (on capmon_holder)"),
        ("pod", "'pod' is a field the collector writes (on capmon_holder)"),
        ("seq", "'seq' is a field the collector writes (on capmon_agent)"),
        ("load1", "'load1' is a field the collector writes (on capmon_host)"),
        # Parameters of the read APIs: a filter by such a label could never be asked for.
        ("limit", "'limit' is a parameter of /api/v1/devices and /api/v1/holders"),
        ("min_idle", "'min_idle' is a parameter of /api/v1/devices and /api/v1/holders"),
        ("by", "'by' is a parameter of /api/v1/devices and /api/v1/holders"),
        ("extra_team", "'extra_team' starts like the fields of agents' own extra and info keys"),
        ("info_x", "'info_x' starts like the fields of agents' own extra and info keys"),
    ],
)
def test_a_label_key_the_collector_writes_itself_is_refused_at_load(key, why):
    """Review: `label_keys = ["namespace"]` dead-lettered every window with a holder in a namespace."""
    with pytest.raises(ConfigError) as exc:
        parse(f"[collector]\nlabel_keys = ['site', '{key}']\n", "collector.toml", env={})
    assert str(exc.value).startswith(f"collector.toml: [collector] label_keys[1]: {why}")


def test_no_key_the_writer_writes_can_become_a_label_tag():
    """Every tag and field key of a full report (holders, host, agent, probes), read off the lines
    the collector writes, is refused as a label key; ordinary label keys are not."""
    import msgspec
    from collector_helpers import batch, device, report

    from capmon.agent.wire import Batch
    from capmon.collector.config import PricingConfig
    from capmon.collector.fleet import Pricing
    from capmon.collector.lineproto import batch_lines

    holder = {
        "pid": 7, "user": "u", "uid": 1, "command": "c", "runtime": "docker", "container_id": "i",
        "pod_uid": "p", "namespace": "n", "pod": "p", "container": "k", "slurm_job_id": "9",
        "partition": "g", "memory_bytes": 1, "held_s": 1.0, "since": 1_700_000_000,
    }  # fmt: skip
    dev = device(
        state="allocated_idle", model="H100", holders=[holder], idle_since=1_700_000_000, state_since=1_700_000_000,
        parent_id="GPU-P", error="e", reason="r", fraction=0.5, energy_j=1.0, idle_energy_j=1.0,
    )  # fmt: skip
    data = msgspec.convert(batch([report(devices=[dev])], labels={}), Batch)
    pricing = Pricing(PricingConfig(default=1.0, energy_price_per_kwh=0.2))
    lines = batch_lines(data, (), pricing.for_device, pricing.energy_cost)
    keys = set()
    for line in lines:
        head, fields, _ = line.split(" ")
        keys |= {pair.split("=")[0] for pair in head.split(",")[1:]}
        keys |= set(re.findall(r'(?:^|,)([a-z0-9_]+)=(?:"[^"]*"|[^,]*)', fields))
    assert {"user", "namespace", "runtime", "slot", "state", "reason", "pid", "idle_energy_cost"} <= keys
    for key in sorted(keys):
        with pytest.raises(ConfigError, match=rf"label_keys\[0\]: '{key}' is a"):
            parse(f"[collector]\nlabel_keys = ['{key}']\n", "c.toml", env={})
    ok = parse("[collector]\nlabel_keys = ['site', 'team', 'rack', 'gpu_pool']\n", "c.toml", env={})
    assert ok.collector.label_keys == ("site", "team", "rack", "gpu_pool")
