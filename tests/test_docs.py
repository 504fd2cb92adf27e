"""The README and the code tell the same story (datasette's test_docs.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from capmon.agent import hookspecs

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_plugin_guide_lists_exactly_the_hookspecs():
    guide = README.split("## Writing a probe plugin", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^- `(capmon_\w+)\(", guide, re.M))
    specs = {name for name in dir(hookspecs) if name.startswith("capmon_")}
    assert documented == specs


def test_every_hookspec_is_documented_with_an_example():
    for name in (n for n in dir(hookspecs) if n.startswith("capmon_")):
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Example::" in doc and "@capmon.agent.hookimpl" in doc, name


def test_the_plugin_example_in_the_readme_works(tmp_path):
    guide = README.split("## Writing a probe plugin", 1)[1]
    code = re.search(r"```python\n(.*?)```", guide, re.S).group(1)
    (tmp_path / "my_capmon_probe.py").write_text(code)
    script = (
        "import importlib.metadata as m, shutil\n"
        "from capmon.agent.registry import ProbeRegistry\n"
        "ep = m.EntryPoint(name='acme', value='my_capmon_probe', group='capmon.probes')\n"
        "shutil.which = lambda name: '/usr/bin/' + name\n"
        "[s] = [s for s in ProbeRegistry([ep]).activate() if s.name == 'acme']\n"
        "print(s.status, s.probe.sample()[0].device_id)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["active", "ACME-0"]


def test_every_builtin_probe_has_a_readme_and_a_sample():
    for probe in ("nvml", "ascend", "host", "mock"):
        folder = ROOT / "plugins" / probe
        assert (folder / "README.md").read_text().strip()
        assert f"[probes.{probe}]" in (folder / "sample.toml").read_text()
        assert f"plugins/{probe}/README.md" in README
