"""The README's commands work when pasted: the curl lines against `capmon demo`, the install lines."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from capmon.agent.configfile import parse_toml
from capmon.collector.demo import default_args, run_demo

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_readme_curl_lines_work_against_the_demo():
    block = README.split("## See it work in one command", 1)[1].split("## Install", 1)[0]
    lines = [ln for ln in re.findall(r"^curl .*$", block, re.M)]
    assert len(lines) == 5
    port = free_port()
    args = default_args(hosts=2, devices=4, window=1, port=port, seconds=30)
    demo = asyncio.create_task(run_demo(args, io.StringIO()))
    try:
        await asyncio.sleep(3.5)  # two 1 s windows delivered
        for line in lines:
            cmd = line.replace("8900", str(port)).replace("curl -s", "curl -sf")
            proc = await asyncio.create_subprocess_shell(cmd, stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            assert proc.returncode == 0, line
            if "/metrics" in line:
                assert b"capmon_collector" in out
                continue
            body = json.loads(out)
            if "/api/v1/fleet" in line:
                assert body["totals"]["devices"] == 8
            if "state=idle" in line:
                assert body["devices"] and all(
                    d["state"] in ("free", "allocated_idle") for d in body["devices"]
                )
            if "site=ams1" in line:
                assert len(body["devices"]) == 1  # sim-000 (ams1, H100, training pool) has one idle device
                assert all(d["labels"]["site"] == "ams1" for d in body["devices"])
                assert all(
                    d["model"] == "NVIDIA H100 80GB HBM3" and d["state"] == "free" for d in body["devices"]
                )
    finally:
        demo.cancel()
        await asyncio.gather(demo, return_exceptions=True)


def _sh_blocks(section: str) -> list[list[str]]:
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [b.strip().splitlines() for b in re.findall(r"```sh\n(.*?)```", body, re.S)]


def _command(line: str) -> str:
    return line.split("  #", 1)[0].strip()


def test_readme_install_commands_work_from_a_copy_of_the_repository(tmp_path):
    """`pip install .` into a fresh venv, and the wheel the README names, as a new user pastes them."""
    install, wheel = _sh_blocks("Install")[:2]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # Every folder the distribution maps a package from, read from pyproject.toml so none is missed.
    pyproject = parse_toml((ROOT / "pyproject.toml").read_text(), "pyproject.toml")
    package_dirs = pyproject["tool"]["setuptools"]["package-dir"]
    for name in sorted(set(package_dirs.values())):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "capmon"

    def run(line: str) -> str:
        cmd = _command(line).replace("~/capmon", str(venv)).replace("python3 ", f"{sys.executable} ", 1)
        done = subprocess.run(cmd, shell=True, cwd=src, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout

    assert install[0] == "python3 -m venv ~/capmon"
    run(install[0])
    plain = [ln for ln in install if _command(ln) == "~/capmon/bin/pip install ."]
    assert plain, install  # the Ascend line: no extra, nothing to download but the dependencies
    run(plain[0])
    assert "host" in run("~/capmon/bin/capmon agent probes")

    build = wheel[0]
    assert _command(build) == "~/capmon/bin/pip wheel --no-deps . -w dist"
    run(build)
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    built = sorted(p.name for p in (src / "dist").iterdir())
    assert built == [f"capmon-{version}-py3-none-any.whl"]
    # The README names the file it makes, and installs that file.
    assert build.endswith(f"# dist/{built[0]}")
    assert any(f"'/tmp/{built[0]}[nvidia]'" in ln for ln in wheel)
    run(f"~/capmon/bin/pip install --no-deps --force-reinstall dist/{built[0]}")
    assert run("~/capmon/bin/capmon --version").strip() == f"capmon {version}"
    assert "--hosts" in run("~/capmon/bin/capmon demo --help")  # the collector side came along
    assert "pip install capmon" not in README and "capmon[" not in README
