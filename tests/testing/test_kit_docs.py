"""The README's section on capmon.testing runs as printed, and its plugin example passes the contract."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "## Testing with mock devices"


def section(text: str, heading: str) -> str | None:
    if heading not in text:
        return None
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def run_pytest(directory: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
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
            "-c",
            os.devnull,
            "--rootdir",
            str(directory),
            "-o",
            "asyncio_mode=auto",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            str(directory),
        ],
        capture_output=True,
        text=True,
        cwd=directory,
        env=env,
        timeout=120,
    )


def run_examples(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Each ```python block of the section, written to the file its first line names, run by pytest."""
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the section has no python example"
    for code in blocks:
        name = re.match(r"# (\S+\.py)\n", code)
        assert name, f"an example's first line names its file (# test_x.py): {code[:60]!r}"
        (tmp_path / name.group(1)).write_text(code)
    return run_pytest(tmp_path)


def test_the_testing_section_examples_run_as_printed(tmp_path):
    text = section(README.read_text(), HEADING)
    if text is None:
        pytest.skip(f"README.md has no {HEADING!r} section yet (the lead merges it from issue 18's report)")
    result = run_examples(text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " failed" not in result.stdout and "passed" in result.stdout


def test_the_readme_plugin_example_passes_the_probe_contract(tmp_path):
    guide = section(README.read_text(), "## Writing a probe plugin")
    assert guide is not None
    (tmp_path / "my_capmon_probe.py").write_text(re.search(r"```python\n(.*?)```", guide, re.S).group(1))
    # Its boundary is the acme-smi binary: present when `shutil.which` finds it, absent here.
    (tmp_path / "test_contract.py").write_text(
        "from unittest import mock\n"
        "from capmon.testing import ProbeContract\n"
        "from my_capmon_probe import AcmeProbe\n\n\n"
        "class Present(AcmeProbe):\n"
        "    def setup(self):\n"
        "        with mock.patch('shutil.which', lambda name: '/usr/bin/' + name):\n"
        "            super().setup()\n\n\n"
        "class TestReadmeProbe(ProbeContract):\n"
        "    def make_probe(self):\n"
        "        return Present()\n\n"
        "    def make_absent_probe(self):\n"
        "        return AcmeProbe()\n"
    )
    result = run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 passed, 1 skipped" in result.stdout, result.stdout
