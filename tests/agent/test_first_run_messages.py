"""What a new user reads on a first run: the real `capmon` in a subprocess, and the texts it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HINT = "in a capmon checkout (README: Install)"


def capmon(
    *argv: str, block: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real CLI; `block` names a module the interpreter cannot import (an extra not installed)."""
    code = (
        "import sys\n"
        + (f"sys.modules[{block!r}] = None\n" if block else "")
        + "from capmon.agent.cli import main\n"
        + "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60, env=env
    )


def test_no_message_or_sample_tells_people_to_install_capmon_from_pypi():
    # capmon is not on PyPI: `pip install 'capmon[nvidia]'` fails for everyone who copies it.
    files = [ROOT / "collector" / "demo.py"] + [
        p
        for folder in ("agent", "plugins", "testing")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".toml", ".md")
    ]
    offenders = [
        f"{p.relative_to(ROOT)}: {m[0]}" for p in files for m in re.finditer(r"capmon\[\w+\]", p.read_text())
    ]
    assert offenders == []


def test_a_missing_extra_names_the_checkout_install():
    proc = capmon("agent", "probes", "--enable", "nvml", "--json", block="pynvml")
    assert proc.returncode == 0, proc.stderr
    assert f"nvidia-ml-py not installed: pip install '.[nvidia]' {HINT}" in proc.stdout


def test_the_exporter_without_prometheus_client_names_the_checkout_install(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[exporter]\nlisten = "127.0.0.1:9477"\n')
    proc = capmon("agent", "probes", "--config", str(config), block="prometheus_client")
    assert proc.returncode == 2
    assert proc.stderr.startswith("capmon: configuration error: ")
    assert f"pip install '.[prometheus]' {HINT}" in proc.stderr
