"""Configuration: the sample parses, unknown keys name themselves and the file, secrets come from the env."""

from __future__ import annotations

import argparse

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
        ('{ name = "example-rack"', "auth.agent_tokens[0]", "example-agent-token"),
        ('{ name = "grafana"', "auth.read_tokens[0]", "example-read-token"),
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
    with pytest.raises(ConfigError, match=r"auth\.read_tokens\[0\].*example-read-token"):
        parse("[auth]\nread_tokens = [{env = 'RT'}]\n", "c.toml", env={"RT": "example-read-token"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[collector]\nprot = 1\n", "unknown key 'collector.prot'"),
        ("[colector]\n", "unknown key 'colector'"),
        ("[storage]\nkind = 'influx'\n", "storage.kind must be one of"),
        ("[collector]\nport = 'x'\n", "collector.port must be an integer"),
        ("[collector]\nlabel_keys = ['host']\n", "'host' is a tag the collector writes itself"),
        ("[auth]\nagent_tokens = [{sha256 = 'abc', agents = ['a']}]\n", "64 lowercase hex"),
        ("[auth]\nagent_tokens = [{env = 'NOPE_UNSET', agents = ['a']}]\n", "$NOPE_UNSET, which is not set"),
        ("[auth]\nagent_tokens = [{env = 'T', agents = []}]\n", "must name the agent ids"),
        (
            "[auth]\nagent_tokens = [{env = 'T', agents = ['a'], colour = 1}]\n",
            "unknown key 'auth.agent_tokens[0].colour'",
        ),
        ("[storage]\nkind = 'influxdb_v2'\n", "needs storage.org"),
        ("not toml = = 1", "collector.toml"),
    ],
)
def test_bad_config_names_key_and_file(text, message):
    with pytest.raises(ConfigError) as exc:
        parse(text, "collector.toml", env={"T": "tok"})
    assert message in str(exc.value) and "collector.toml" in str(exc.value)


def test_secrets_from_env_and_kept_out_of_repr(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[storage]\nkind = 'influxdb_v2'\norg = 'o'\n[auth]\nread_tokens = [{env = 'RT'}]\n")
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
    token, digest = (line.split()[-1] for line in capsys.readouterr().out.splitlines())
    assert hash_token(token) == digest


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
        parse("[storage]\nkind = 'influxdb_v2'\norg = 'o'\n", "collector.toml", env={})
    assert "collector.toml" in str(exc.value) and "storage.kind" in str(exc.value)
    assert "pip install 'capmon[collector]'" in str(exc.value)
    # Other kinds never need it.
    assert parse("[storage]\nkind = 'influxdb_v1'\n", "collector.toml", env={}).storage.kind == "influxdb_v1"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[collector]\nstale_windows = 0\n", "collector.stale_windows"),
        ("[collector]\nstale_windows = nan\n", "collector.stale_windows"),
        ("[collector]\nforget_after_s = -1\n", "collector.forget_after_s"),
        ("[collector]\nforget_after_s = nan\n", "collector.forget_after_s"),
        ("[storage]\nflush_interval_s = -0.1\n", "storage.flush_interval_s"),
        ("[storage]\ntimeout_s = 0\n", "storage.timeout_s"),
        ("[storage]\ntimeout_s = inf\n", "storage.timeout_s"),
        ("[storage]\nretry_after_s = 0\n", "storage.retry_after_s"),
        ("[storage]\nmax_pending_lines = 0\n", "storage.max_pending_lines"),
        ("[pricing]\ndefault = -1.0\n", "pricing.default"),
        ("[pricing.models]\nH100 = -2.5\n", "pricing.models.H100"),
        ("[pricing.models]\nH100 = nan\n", "pricing.models.H100"),
    ],
)
def test_out_of_range_numbers_name_key_and_file(text, key):
    with pytest.raises(ConfigError) as exc:
        parse(text, "collector.toml", env={})
    assert key in str(exc.value) and "collector.toml" in str(exc.value)


def test_zero_flush_interval_and_zero_prices_are_valid():
    config = parse(
        "[storage]\nflush_interval_s = 0\n[pricing]\ndefault = 0\n[pricing.models]\nA100 = 0\n",
        "c.toml",
        env={},
    )
    assert config.storage.flush_interval_s == 0 and config.pricing.models["A100"] == 0
