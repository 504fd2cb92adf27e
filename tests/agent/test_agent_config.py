"""Configuration: unknown keys are named with their file; every sample parses and maps onto its dataclass;
what the collector would refuse for every window (the wire protocol's limits) is a startup error."""

from __future__ import annotations

import json
import re
from typing import Annotated

import msgspec
import pytest

from capmon.agent import wire
from capmon.agent.config import ConfigError, load_config, sample_config
from capmon.agent.probe import config_from_mapping
from capmon.agent.registry import ProbeRegistry


def write(tmp_path, text: str):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_unknown_key_names_the_key_the_file_and_the_known_keys(tmp_path):
    path = write(tmp_path, "[agent]\nwindow_s = 30\nwindwo = 5\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    assert str(exc.value) == (
        f"{path}: [agent]: unknown key 'agent.windwo' "
        "(known: host, id, labels, log_level, output, shutdown_timeout_s, window_s); did you mean 'window_s'?"
    )


def test_unknown_section_and_wrong_type_are_errors(tmp_path):
    path = write(tmp_path, "[agnet]\n")
    with pytest.raises(
        ConfigError,
        match=r"unknown section \[agnet\] \(known: agent, allocations, classifier, exporter, holders, probes",
    ):
        load_config(path, env={})
    path = write(tmp_path, '[classifier]\nbusy_util_pct = "ten"\n')
    with pytest.raises(
        ConfigError, match=re.escape(f"{path}: [classifier] busy_util_pct: must be a number, got 'ten'")
    ):
        load_config(path, env={})


def test_environment_overrides_probes_and_token(tmp_path):
    path = write(
        tmp_path,
        '[probes]\ndisable = ["ascend"]\n[transport]\nurl = "http://127.0.0.1:8900/api/v1/reports"\n',
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
    path = write(tmp_path, text)
    config = load_config(path, env={})
    registry = ProbeRegistry()
    assert set(config.probes.options) == {"host", "nvml", "ascend", "mock"}
    for name, options in config.probes.options.items():
        config_from_mapping(registry.types[name].Config, options, f"sample [probes.{name}]")
    # [spool] and [transport] are decoded by load_config itself, once.
    assert config.spool.path and config.transport.url == ""


def test_the_sample_says_what_the_code_does():
    """Every option the sample shows is at its default, and no text in it is doubled."""
    text = sample_config()
    assert "))" not in text and "((" not in text
    defaults = load_config(None, env={})
    from capmon.agent.configfile import parse_toml

    shown = parse_toml(text, "sample")
    for name in ("agent", "classifier", "spool", "transport"):
        section = getattr(defaults, name)
        for key, value in shown[name].items():
            assert getattr(section, key) == (tuple(value) if isinstance(value, list) else value), (
                f"{name}.{key}"
            )
    # The spool's size is told as agent/spool.py tells it: 256 MiB of 2.6-3.3 kB windows (8 GPUs), one
    # a minute, is 56-72 days.
    days = [defaults.spool.max_bytes / size * 60 / 86400 for size in (3300, 2600)]
    assert 50 < days[0] < days[1] < 75 and "about two months of 60 s windows" in text and "weeks" not in text


def test_the_printed_sample_configuration_runs_no_mock_devices(tmp_path, capsys):
    from capmon.agent.cli import main

    path = write(
        tmp_path, sample_config()
    )  # what `capmon agent config | sudo tee /etc/capmon/agent.toml` gives
    assert main(["agent", "probes", "--json", "--config", str(path)]) == 0
    statuses = {p["name"]: p["status"] for p in json.loads(capsys.readouterr().out)}
    assert statuses["mock"] == "disabled"


@pytest.mark.parametrize(
    "labels,message",
    [
        ('{ Site = "ams1" }', "labels.Site: a label key is lower-case"),
        ('{ "rack-id" = "7" }', "labels.rack-id: a label key is lower-case"),
        ('{ "zz\\n" = "7" }', "labels.zz\n: a label key is lower-case"),
        ("{ site = 7 }", "labels.site: must be a string, got 7"),
        ('"ams1"', "labels: must be a table, got 'ams1'"),
    ],
)
def test_a_label_the_collector_would_refuse_is_a_startup_error(tmp_path, labels, message):
    path = write(tmp_path, f"[agent]\nlabels = {labels}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: [agent] {message}")):
        load_config(path, env={})


def test_a_label_value_longer_than_the_wire_allows_is_one_line_at_startup(tmp_path, capsys):
    """Issue 11 item 7: the agent took 256 characters, the collector refused over 128 with a 400 the
    transport retried forever. Now the agent refuses to start, in the words of every config error."""
    from capmon.agent.cli import main

    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nlabels = {{ site = "{"a" * 256}" }}\n')
    assert main(["agent", "probes", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"capmon: configuration error: {path}: [agent] labels.site: at most 128 characters "
        "(the collector refuses longer)\n"
    )


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_the_agent_accepts_exactly_the_identities_the_wire_accepts(tmp_path, extra):
    """The bounds are the wire's own: one character either side of each limit, both sides agree."""
    cases = {
        "labels": {"site": "a" * (wire.MAX_LABEL_VALUE_LEN + extra)},
        "id": "i" * (wire.MAX_ID_LEN + extra),
        "host": "h" * (wire.MAX_NAME_LEN + extra),
        "count": {f"k{i}": "v" for i in range(wire.MAX_LABELS + extra)},
    }
    for what, value in cases.items():
        identity = {"id": "a", "host": "h", "labels": {}}
        identity["labels" if what == "count" else what] = value
        try:
            msgspec.convert(identity, wire.AgentIdentity)
            wire_accepts = True
        except msgspec.ValidationError:
            wire_accepts = False
        table = {k: v for k, v in identity.items()}
        body = "\n".join(
            f"{k} = {json.dumps(v)}"
            if not isinstance(v, dict)
            else f"{k} = {{ {', '.join(f'{a} = {json.dumps(b)}' for a, b in v.items())} }}"
            for k, v in table.items()
        )
        path = write(tmp_path, f"[agent]\n{body}\n")
        try:
            load_config(path, env={})
            agent_accepts = True
        except ConfigError as exc:
            agent_accepts = False
            assert "(the collector refuses" in str(exc)
        assert agent_accepts == wire_accepts, (what, extra)


def test_a_bound_added_to_the_wire_later_is_refused_at_startup_too(tmp_path, monkeypatch):
    class Tighter(msgspec.Struct, kw_only=True):
        id: Annotated[str, msgspec.Meta(max_length=3)]
        host: str
        labels: dict[str, str] = {}

    monkeypatch.setattr(wire, "AgentIdentity", Tighter)
    path = write(tmp_path, '[agent]\nid = "abcd"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: [agent] id: Expected `str` of length <= 3")):
        load_config(path, env={})


def test_a_misspelt_transport_or_spool_key_is_a_startup_error(tmp_path):
    path = write(tmp_path, '[transport]\nURL = "https://capmon.example.net/api/v1/reports"\n')
    with pytest.raises(ConfigError, match=rf"{path}: \[transport\]: unknown key 'transport.URL' \(known: "):
        load_config(path, env={})
    path = write(tmp_path, "[spool]\nmax_byte = 5\n")
    with pytest.raises(ConfigError, match=rf"{path}: \[spool\]: unknown key 'spool.max_byte' \(known: "):
        load_config(path, env={})
    path = write(tmp_path, "[probes]\nenabel = []\n")
    with pytest.raises(
        ConfigError, match=r"\[probes\]: unknown key 'probes.enabel' \(known: disable, enable"
    ):
        load_config(path, env={})


def test_a_token_given_with_the_wrong_type_is_not_echoed(tmp_path):
    path = write(tmp_path, "[transport]\ntoken = 123456789\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    assert str(exc.value) == f"{path}: [transport] token: must be a string, got an integer"


def test_a_misspelt_probe_name_is_a_startup_error():
    with pytest.raises(ValueError, match="unknown probe 'nvidia'"):
        ProbeRegistry().activate(disable=["nvidia"], where="agent.toml")


@pytest.mark.parametrize(
    "text,message",
    [
        ("[probes.nvml]\nfatal_xids = 79\n", r"\[probes.nvml\] fatal_xids: must be a list, got 79"),
        (
            '[classifier]\nmemory_baseline_mib = { "910B3" = "3400" }\n',
            r"\[classifier\] memory_baseline_mib.910B3: must be a number, got '3400'",
        ),
        (
            "[classifier]\nmemory_baseline_pct = { ascend = -1 }\n",
            r"\[classifier\] memory_baseline_pct.ascend: must be ≥ 0",
        ),
        ("[agent]\nwindow_s = 0\n", r"\[agent\] window_s: must be 1..86400, got 0"),
        ("[agent]\nwindow_s = 86401\n", r"\[agent\] window_s: must be 1..86400, got 86401"),
        ('[agent]\nlog_level = "loud"\n', r"\[agent\] log_level: must be one of 'debug', 'info'"),
        ("[spool]\nmax_age_s = nan\n", r"\[spool\] max_age_s: must be a finite number, got nan"),
    ],
)
def test_a_value_of_the_wrong_shape_is_a_startup_error(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises((ConfigError, ValueError), match=message):
        config = load_config(path, env={})
        ProbeRegistry().activate(options=config.probes.options, where=str(path))
