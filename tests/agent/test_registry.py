"""Plugins: third-party probes through entry points, broken plugins reported, probes disabled by name."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap

import pytest

from capmon.agent.registry import ProbeRegistry

THIRD_PARTY = textwrap.dedent(
    """
    from capmon.agent import DeviceSample, Probe, ProbeUnavailable, hookimpl

    class AcmeProbe(Probe):
        name = "acme"
        vendor = "acme"
        def sample(self):
            return [DeviceSample("ACME-0", "acme", model="Acme X1", util_pct=3.0, processes=0)]

    class AbsentProbe(Probe):
        name = "absent"
        def setup(self):
            raise ProbeUnavailable("acme-smi not on PATH")

    @hookimpl
    def capmon_probe_types():
        return [AcmeProbe, AbsentProbe]
    """
)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "acme_capmon.py").write_text(THIRD_PARTY)
    (tmp_path / "broken_capmon.py").write_text("import not_a_module_that_exists\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("acme_capmon", "broken_capmon"):
        sys.modules.pop(name, None)


def eps(**values):
    return [importlib.metadata.EntryPoint(name=n, value=v, group="capmon.probes") for n, v in values.items()]


def test_third_party_probe_from_an_entry_point_is_used(plugin_dir):
    registry = ProbeRegistry(eps(acme="acme_capmon", mock="capmon.plugins.mock"))
    statuses = {s.name: s for s in registry.activate()}
    assert statuses["acme"].status == "active"
    [sample] = statuses["acme"].probe.sample()
    assert sample.device_id == "ACME-0"
    assert statuses["absent"].status == "skipped" and statuses["absent"].reason == "acme-smi not on PATH"
    assert statuses["mock"].status == "disabled"  # the mock runs only when asked for


def test_a_plugin_that_fails_to_import_is_reported_not_fatal(plugin_dir):
    registry = ProbeRegistry(eps(broken="broken_capmon", acme="acme_capmon"))
    statuses = {s.name: s for s in registry.activate()}
    assert statuses["broken"].status == "failed"
    assert (
        "ModuleNotFoundError" in statuses["broken"].reason
        and "not_a_module_that_exists" in statuses["broken"].reason
    )
    assert statuses["acme"].status == "active"


def test_any_probe_can_be_disabled_by_name(plugin_dir):
    registry = ProbeRegistry(eps(acme="acme_capmon", mock="capmon.plugins.mock"))
    statuses = {s.name: s for s in registry.activate(enable=["mock"], disable=["acme"])}
    assert statuses["acme"].status == "disabled" and statuses["acme"].probe is None
    assert statuses["mock"].status == "active"


def test_unknown_probe_or_option_is_a_startup_error(plugin_dir):
    registry = ProbeRegistry(eps(mock="capmon.plugins.mock"))
    with pytest.raises(ValueError, match="unknown probe 'mokc'"):
        registry.activate(enable=["mokc"], where="agent.toml")
    with pytest.raises(ValueError, match=r"agent.toml: \[probes.mock\]: unknown key 'probes.mock.devcies' \(known: "):
        registry.activate(enable=["mock"], options={"mock": {"devcies": 3}}, where="agent.toml")


def test_builtins_come_through_the_entry_point_group():
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="capmon.probes")}
    assert names == {
        "host": "capmon.plugins.host",
        "mock": "capmon.plugins.mock",
        "nvml": "capmon.plugins.nvml",
        "ascend": "capmon.plugins.ascend",
    }


def test_misspelled_hook_is_caught(tmp_path, monkeypatch):
    (tmp_path / "typo_capmon.py").write_text(
        "from capmon.agent import hookimpl\n@hookimpl\ndef capmon_probe_type():\n    return []\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # check_pending() turns the typo into a load-time error instead of a silently ignored plugin.
    with pytest.raises(Exception, match="capmon_probe_type"):
        ProbeRegistry(eps(typo="typo_capmon"))
    sys.modules.pop("typo_capmon", None)
