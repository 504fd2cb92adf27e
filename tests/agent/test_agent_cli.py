"""The `capmon agent …` commands as a person types them."""

from __future__ import annotations

import json

from capmon.agent.cli import main


def test_probes_says_why_nvml_and_ascend_are_skipped_here(capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no npu-smi, whatever this machine has
    assert main(["agent", "probes", "--json"]) == 0
    statuses = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert statuses["host"]["status"] == "active"
    assert statuses["ascend"] == {
        "name": "ascend",
        "status": "skipped",
        "reason": "npu-smi not on PATH",
        "plugin": "ascend",
    }
    assert statuses["mock"]["status"] == "disabled"
    if statuses["nvml"]["status"] != "active":  # a GPU machine would have it active
        assert statuses["nvml"]["status"] == "skipped" and "libnvidia-ml" in statuses["nvml"]["reason"]


def test_probe_json_gives_the_host_record_and_one_record_per_mock_device(capsys):
    assert main(["agent", "probe", "--json", "--mock"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["host"]["memory_total_bytes"] > 0
    devices = {d["device_id"]: d for d in out["devices"]}
    assert len(devices) == 8
    # The mock's default profiles: training, training, inference, notebook, idle ×3, flaky.
    assert devices["MOCK-000-00"]["state"] == "busy"
    assert devices["MOCK-000-03"]["state"] == "allocated_idle"
    assert devices["MOCK-000-04"]["state"] == "free"
    assert devices["MOCK-000-07"]["state"] in ("free", "unavailable")


def test_probe_table_shows_states(capsys):
    assert main(["agent", "probe", "--mock", "--disable", "host"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["DEVICE", "MODEL", "IDX", "STATE"]
    assert "ALLOCATED_IDLE" in out and "FREE" in out and "BUSY" in out


def test_config_prints_the_commented_sample(capsys):
    assert main(["agent", "config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# capmon agent configuration")
    assert "[probes.nvml]" in out and "[probes.ascend]" in out


def test_a_bad_config_file_is_one_clear_line(tmp_path, capsys):
    path = tmp_path / "agent.toml"
    path.write_text("[probes.mock]\ndevcies = 3\n")
    assert main(["agent", "probe", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == f"capmon: {path}: [probes.mock]: unknown key 'devcies' (known: count_processes, devices, "
        "hang_s, host_index, interval_s, models, profiles, raise_every, seed, timeout_s)"
    )
