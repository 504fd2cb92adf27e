"""A first `capmon agent …` on a host like most: no Slurm controller, no token yet, a typo in the file.
The real CLI in a subprocess: what it prints is what a new user reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

# What scontrol 22.05 prints on a host with the Slurm client installed but no slurm.conf and no
# DNS SRV record for a controller.
NO_CONTROLLER = (
    "scontrol: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host\n"
    "scontrol: error: fetch_config: DNS SRV lookup failed\n"
    "scontrol: error: _establish_config_source: failed to fetch config\n"
    "scontrol: fatal: Could not establish a configuration source\n"
)
SKIP_LINE = (
    "no Slurm controller configured on this host (scontrol: Could not establish a configuration source)"
)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a host with Slurm's client tools but no controller, and no agent token."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("scontrol", "squeue"):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\ncat >&2 <<'EOF'\n{NO_CONTROLLER}EOF\nexit 1\n")
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPMON_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def capmon(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "capmon.agent.cli", *argv], capture_output=True, text=True, timeout=60, env=env
    )


def test_probes_says_no_slurm_controller_not_the_dns_lookups_error(env):
    proc = capmon("agent", "probes", "--mock", env=env)
    assert proc.returncode == 0, proc.stderr
    slurm = [line for line in proc.stdout.splitlines() if line.startswith("slurm ")]
    assert len(slurm) == 1 and slurm[0].split()[1] == "skipped"
    assert slurm[0].endswith(SKIP_LINE)
    assert "res_nsearch" not in proc.stdout


def test_agent_run_logs_its_allocation_sources_and_warns_once_without_a_token(env, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nwindow_s = 60\n[spool]\npath = "{tmp_path / "spool"}"\n'
        '[transport]\nurl = "http://127.0.0.1:9/api/v1/reports"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "capmon.agent.cli", "agent", "run", "--mock", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(60, proc.kill)  # never hang the suite; nothing is timed
    watchdog.start()
    try:
        lines = []
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if " running as " in line:
                break
        proc.send_signal(signal.SIGTERM)
        lines += proc.communicate()[1].splitlines()
    finally:
        watchdog.cancel()
    text = "\n".join(lines)
    assert proc.returncode == 0, text
    assert f"INFO capmon: allocation source slurm: skipped: {SKIP_LINE}" in text
    assert "allocation source kubernetes: skipped" in text
    no_token = [line for line in lines if "no token for the collector" in line]
    assert len(no_token) == 1 and " WARNING " in no_token[0], text
    assert "$CAPMON_AGENT_TOKEN" in no_token[0]


def test_an_unknown_probe_is_a_configuration_error_with_the_closest_name(env, tmp_path):
    config = tmp_path / "x.toml"
    config.write_text('[probes]\nenable = ["mokc"]\n')
    proc = capmon("agent", "probes", "--config", str(config), env=env)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"capmon: configuration error: {config}: unknown probe 'mokc'; did you mean 'mock'? "
        "(known: ascend, host, mock, nvml)\n"
    )
