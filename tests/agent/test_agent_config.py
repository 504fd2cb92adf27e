"""Configuration: unknown keys are named with their file; every sample parses and maps onto its dataclass."""

from __future__ import annotations

import re

import pytest

from capmon.agent.config import ConfigError, load_config, sample_config
from capmon.agent.probe import config_from_mapping
from capmon.agent.registry import ProbeRegistry


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("[agent]\nwindow_s = 30\nwindwo = 5\n")
    with pytest.raises(ConfigError, match=rf"{path}: \[agent\]: unknown key 'windwo'"):
        load_config(path)


def test_unknown_section_and_wrong_type_are_errors(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("[agnet]\n")
    with pytest.raises(ConfigError, match=r"unknown section \[agnet\]"):
        load_config(path)
    path.write_text('[classifier]\nbusy_util_pct = "ten"\n')
    with pytest.raises(ConfigError, match="busy_util_pct must be float"):
        load_config(path)


def test_environment_overrides_probes_and_token(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(
        '[probes]\ndisable = ["ascend"]\n[transport]\nurl = "http://127.0.0.1:8900/api/v1/reports"\n'
    )
    config = load_config(
        path,
        env={"CAPMON_PROBES_DISABLE": "nvml", "CAPMON_PROBES_ENABLE": "mock", "CAPMON_AGENT_TOKEN": "s3cret"},
    )
    assert config.probes.disable == ("ascend", "nvml")
    assert config.probes.enable == ("mock",)
    assert config.transport.token == "s3cret"


def test_the_combined_sample_configuration_parses_and_maps_onto_every_dataclass(tmp_path):
    text = sample_config()
    for probe in ("host", "nvml", "ascend", "mock"):
        assert f"[probes.{probe}]" in text
    path = tmp_path / "sample.toml"
    path.write_text(text)
    config = load_config(path, env={})
    registry = ProbeRegistry()
    assert set(config.probes.options) == {"host", "nvml", "ascend", "mock"}
    for name, options in config.probes.options.items():
        config_from_mapping(registry.types[name].Config, options, f"sample [probes.{name}]")
    # [spool] and [transport] are decoded by load_config itself, once.
    assert config.spool.path and config.transport.url == ""


def test_the_printed_sample_configuration_runs_no_mock_devices(tmp_path, capsys):
    from capmon.agent.cli import main

    path = tmp_path / "agent.toml"
    path.write_text(sample_config())  # what `capmon agent config | sudo tee /etc/capmon/agent.toml` gives
    assert main(["agent", "probes", "--json", "--config", str(path)]) == 0
    import json

    statuses = {p["name"]: p["status"] for p in json.loads(capsys.readouterr().out)}
    assert statuses["mock"] == "disabled"


@pytest.mark.parametrize(
    "labels,message",
    [
        ('{ Site = "ams1" }', "labels.Site: a label key is lower-case"),
        ('{ "rack-id" = "7" }', "labels.rack-id: a label key is lower-case"),
        ("{ site = 7 }", "labels.site must be a string"),
        ('"ams1"', "labels must be a table"),
    ],
)
def test_a_label_the_collector_would_refuse_is_a_startup_error(tmp_path, labels, message):
    path = tmp_path / "agent.toml"
    path.write_text(f"[agent]\nlabels = {labels}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: [agent] {message}")):
        load_config(path, env={})


def test_a_misspelt_transport_or_spool_key_is_a_startup_error(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[transport]\nURL = "https://capmon.example.net/api/v1/reports"\n')
    with pytest.raises(ConfigError, match=rf"{path}: \[transport\]: unknown key 'URL'"):
        load_config(path, env={})
    path.write_text("[spool]\nmax_byte = 5\n")
    with pytest.raises(ConfigError, match=rf"{path}: \[spool\]: unknown key 'max_byte'"):
        load_config(path, env={})


def test_a_misspelt_probe_name_is_a_startup_error():
    with pytest.raises(ValueError, match="unknown probe 'nvidia'"):
        ProbeRegistry().activate(disable=["nvidia"], where="agent.toml")


@pytest.mark.parametrize(
    "text,message",
    [
        ("[probes.nvml]\nfatal_xids = 79\n", r"\[probes.nvml\]: fatal_xids must be a list, got 79"),
        ('[classifier]\nmemory_baseline_mib = { "910B3" = "3400" }\n', "memory_baseline_mib must map"),
    ],
)
def test_a_value_of_the_wrong_shape_is_a_startup_error(tmp_path, text, message):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises((ConfigError, ValueError), match=message):
        config = load_config(path, env={})
        ProbeRegistry().activate(options=config.probes.options, where=str(path))
