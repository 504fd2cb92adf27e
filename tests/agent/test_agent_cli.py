"""The `capmon agent …` commands as a person types them."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from capmon.agent.cli import _log_probe_statuses, main
from capmon.agent.registry import ProbeRegistry
from capmon.agent.spool import Spool, SpoolConfig


def test_probes_says_why_nvml_and_ascend_are_skipped_here(capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no npu-smi, whatever this machine has
    assert main(["agent", "probes", "--json"]) == 0
    statuses = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert statuses["host"]["status"] == "active"
    assert statuses["ascend"] == {
        "name": "ascend",
        "kind": "probe",
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
        == f"capmon: configuration error: {path}: [probes.mock]: unknown key 'probes.mock.devcies' "
        "(known: count_processes, devices, "
        "hang_s, host_index, interval_s, models, profiles, raise_every, seed, timeout_s); did you mean 'devices'?"
    )


# -- capmon agent run as a person (or systemd) runs it: real processes, real signals -------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_toml(tmp_path: Path, url: str, spool: Path | None = None, window_s: int = 60) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nid = "cli-test"\nwindow_s = {window_s}\n'
        f'[transport]\nurl = "{url}"\n'
        f'[spool]\npath = "{spool or tmp_path / "spool"}"\n'
        '[probes]\nenable = ["mock"]\n'
    )
    return path


def _start_agent(config: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PATH": "/nonexistent"}  # no npu-smi, whatever this machine has
    return subprocess.Popen(
        [sys.executable, "-m", "capmon.agent.cli", "agent", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _read_until(proc: subprocess.Popen[str], needle: str, seen: list[str]) -> str:
    """Read stderr lines until one contains `needle` (the process's own progress, not a timer)."""
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} never logged; stderr:\n{''.join(seen)}")


def test_sigterm_logs_stopping_at_once_and_exits_soon_with_the_collector_unreachable(tmp_path):
    proc = _start_agent(_agent_toml(tmp_path, f"http://127.0.0.1:{_free_port()}/api/v1/reports"))
    seen: list[str] = []
    try:
        _read_until(proc, "running as cli-test", seen)
        proc.send_signal(signal.SIGTERM)
        line = _read_until(proc, "stopping", seen)
        assert " INFO " in line
        rest = proc.communicate(timeout=15)[1]  # the default shutdown_timeout_s is 20 s
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, "".join(seen) + rest
    log = "".join(seen) + rest
    assert "capmon agent stopped" in log
    # A probe whose hardware is absent is normal here: INFO, and its reason is not double-bracketed.
    assert "INFO capmon: probe ascend: skipped: npu-smi not on PATH" in log
    assert "WARNING capmon: probe ascend" not in log and "WARNING capmon: probe nvml" not in log
    assert "))" not in log
    assert "Traceback" not in log


def test_a_second_sigint_exits_at_once_while_delivery_hangs(tmp_path):
    with socket.socket() as blackhole:  # accepts connections, never answers: a POST hangs
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        blackhole.settimeout(30)
        url = f"http://127.0.0.1:{blackhole.getsockname()[1]}/api/v1/reports"
        proc = _start_agent(_agent_toml(tmp_path, url, window_s=1))
        seen: list[str] = []
        try:
            conn, _ = blackhole.accept()  # the agent is delivering a window now
            proc.send_signal(signal.SIGINT)
            _read_until(proc, "stopping", seen)
            proc.send_signal(signal.SIGINT)
            rest = proc.communicate(timeout=10)[1]
            conn.close()
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(seen) + rest
    assert rest.splitlines()[-1] == (
        "capmon agent: second SIGINT: exiting now; unsent windows stay in the spool"
    )


def test_a_spool_that_cannot_be_created_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "not-a-dir").write_text("")
    spool = tmp_path / "not-a-dir" / "spool"
    proc = _start_agent(_agent_toml(tmp_path, "http://127.0.0.1:9/api/v1/reports", spool=spool))
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    [line] = [ln for ln in err.splitlines() if not ln.startswith("20")]  # log lines start with a date
    assert line.startswith("capmon agent: cannot run: ") and str(spool) in line
    assert "Not a directory" in line
    assert "Traceback" not in err


def test_a_spool_held_by_another_agent_is_one_line_and_exit_1(tmp_path):
    spool = tmp_path / "spool"
    with Spool.open(SpoolConfig(path=str(spool))):
        proc = _start_agent(_agent_toml(tmp_path, "http://127.0.0.1:9/api/v1/reports", spool=spool))
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    [line] = [ln for ln in err.splitlines() if not ln.startswith("20")]
    assert line.startswith("capmon agent: cannot run: ") and str(spool) in line
    assert "Traceback" not in err


def test_a_missing_probe_the_config_asked_for_is_a_warning(caplog, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    statuses = ProbeRegistry().activate(enable=["ascend"])
    with caplog.at_level(logging.INFO, logger="capmon"):
        _log_probe_statuses(statuses, enabled=["ascend"])
        _log_probe_statuses(statuses, enabled=[])
    ascend = [r for r in caplog.records if r.getMessage().startswith("probe ascend:")]
    assert [r.levelname for r in ascend] == ["WARNING", "INFO"]
    assert ascend[0].getMessage() == "probe ascend: skipped: npu-smi not on PATH"
    for s in statuses:
        if s.probe is not None:
            s.probe.close()


def test_no_probe_reason_has_doubled_parentheses(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    statuses = ProbeRegistry().activate()
    for s in statuses:
        assert s.reason.count("(") == s.reason.count(")") and "))" not in s.reason, s
        if s.probe is not None:
            s.probe.close()
    assert {s.name: s.reason for s in statuses}["mock"] == "runs only when named in probes.enable"
