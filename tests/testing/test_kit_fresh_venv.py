"""Done-when of issue 18: a throwaway probe plugin, with its own pyproject.toml and a short test file
using only capmon.testing, passes under pytest in a fresh venv where capmon is pip-installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "capmon-probe-acme"
version = "0.0.1"
dependencies = ["capmon[testing]"]

[project.entry-points."capmon.probes"]
acme = "capmon_probe_acme"

[tool.pytest.ini_options]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
"""

PLUGIN = """
from capmon.agent import DeviceSample, Probe, ProbeUnavailable, hookimpl


class AcmeProbe(Probe):
    name = "acme"
    vendor = "acme"

    def __init__(self, config=None, device=None):
        super().__init__(config)
        self.device = device

    def setup(self):
        if self.device is None:
            raise ProbeUnavailable("no acme device found")

    def sample(self):
        return [DeviceSample("ACME-0", "acme", "Acme X1", 0, util_pct=self.device["util"], processes=0)]


@hookimpl
def capmon_probe_types():
    return [AcmeProbe]
"""

# The test a plugin author writes: only capmon.testing and the plugin.
USER_TEST = """
from capmon.testing import ProbeContract
from capmon_probe_acme import AcmeProbe


class TestAcmeProbe(ProbeContract):
    def make_probe(self):
        return AcmeProbe(device={"util": 0.0})

    def make_absent_probe(self):
        return AcmeProbe()


async def test_an_idle_acme_is_free_and_a_busy_one_busy(capmon_agent):
    device = {"util": 0.0}
    probe = AcmeProbe(device=device)
    probe.setup()
    agent = capmon_agent(probes=[probe])
    await agent.run_until_window()
    assert agent.states() == {"ACME-0": "free"}
    device["util"] = 99.0
    await agent.run_until_window()
    assert agent.states() == {"ACME-0": "busy"}
"""


def run(*argv: str | Path, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, argv))}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.mark.slow
def test_a_throwaway_plugin_passes_its_kit_tests_in_a_fresh_venv(tmp_path):
    # capmon from this checkout (what is committed and what is not yet), built outside the shared tree.
    files = run("git", "ls-files", "-co", "--exclude-standard", cwd=REPO).stdout.split()
    source = tmp_path / "capmon-src"
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    plugin = tmp_path / "capmon-probe-acme"
    (plugin / "capmon_probe_acme").mkdir(parents=True)
    (plugin / "pyproject.toml").write_text(PYPROJECT)
    (plugin / "capmon_probe_acme" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (plugin / "tests").mkdir()
    (plugin / "tests" / "test_acme.py").write_text(USER_TEST)
    assert len(USER_TEST.strip().splitlines()) <= 25

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    # The dependencies come from this environment's site-packages (a plain path, so its editable
    # capmon is not active there); capmon and the plugin are pip-installed into the fresh venv (pip
    # builds each with setuptools from its cache or the registry, as `make venv` does).
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).stdout.strip()
    )
    (site / "capmon-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHON"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    run(python, "-m", "pip", "install", "-q", "--no-deps", source, cwd=tmp_path, env=env)
    run(python, "-m", "pip", "install", "-q", "--no-deps", plugin, cwd=tmp_path, env=env)

    where = run(
        python, "-c", "import capmon.testing; print(capmon.testing.__file__)", cwd=tmp_path, env=env
    ).stdout
    assert where.startswith(str(venv)), f"capmon.testing imported from {where}, not the fresh venv"
    result = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=plugin, env=env)
    # The contract's seven checks (the unknown-fields one skipped: the plugin names none) and its own test.
    assert "8 passed, 1 skipped" in result.stdout, result.stdout
