"""`-p capmon.testing` in a pytest of its own, under pytest-asyncio's strict and auto modes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

USER_TEST = """
import pytest

pytestmark = pytest.mark.asyncio  # strict mode needs it; auto mode does not mind it


async def test_mock_devices_through_the_agent_to_the_collector(capmon_agent, capmon_collector, mock_devices):
    collector = await capmon_collector()
    agent = capmon_agent(probes=[mock_devices(2, profiles=["training", "idle"])], collector=collector)
    await agent.run_until_window()
    assert agent.states() == {"MOCK-000-00": "busy", "MOCK-000-01": "free"}
    assert [d["device_id"] for d in (await collector.devices())["devices"]] == ["MOCK-000-01"]


def test_a_sync_test_gets_the_clock(capmon_clock):
    capmon_clock.advance(1.5)
    assert capmon_clock() % 60 == 1.5
"""


def run_pytest(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_user.py").write_text(
        USER_TEST.replace("pytestmark = pytest.mark.asyncio", "pytestmark = []")
        if "auto" in args
        else USER_TEST
    )
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # only what -p names
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "asyncio",
            "-p",
            "capmon.testing",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            os.devnull,
            *args,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_the_kit_works_in_both_pytest_asyncio_modes(tmp_path, mode):
    result = run_pytest(
        tmp_path, "-o", f"asyncio_mode={mode}", "-o", "asyncio_default_fixture_loop_scope=function"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_without_the_plugin_the_fixtures_are_missing(tmp_path):
    """The check above can fail: it is the plugin that brings the fixtures."""
    (tmp_path / "test_user.py").write_text(USER_TEST)
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "asyncio",
            "-p",
            "no:cacheprovider",
            "-c",
            os.devnull,
            "--rootdir",
            str(tmp_path),
            "-o",
            "asyncio_mode=strict",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode != 0 and "fixture 'capmon_clock' not found" in result.stdout


def test_installed_capmon_registers_the_plugin_and_no_turns_it_off(tmp_path):
    (tmp_path / "test_user.py").write_text("def test_clock(capmon_clock):\n    assert capmon_clock() > 0\n")
    base = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-c",
        os.devnull,
        "--rootdir",
        str(tmp_path),
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    on = subprocess.run(
        [*base, str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert on.returncode == 0, on.stdout + on.stderr
    # `-p capmon.testing` on top of the entry point loads it once, not twice.
    both = subprocess.run(
        [*base, "-p", "capmon.testing", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert both.returncode == 0, both.stdout + both.stderr
    off = subprocess.run(
        [*base, "-p", "no:capmon.testing", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert off.returncode != 0 and "fixture 'capmon_clock' not found" in off.stdout
