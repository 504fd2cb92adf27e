"""Configuration: unknown keys are named with their file; every sample parses and maps onto its dataclass."""

from __future__ import annotations

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
    assert config.transport["token"] == "s3cret"


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
    if config.transport or config.spool:
        from capmon.agent.daemon import identity_of
        from capmon.agent.delivery import SpoolingSink

        SpoolingSink.from_config(identity_of(config), config.spool, config.transport, where=str(path))
