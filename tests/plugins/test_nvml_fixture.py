"""Real captures from `benchmarks/nvml_capture.py`, checked against nvidia-smi's view of the same GPUs.

Each `tests/fixtures/nvml/<name>.json` is what NvmlProbe read on a real host; `<name>_smi.xml`, when
present, is `nvidia-smi -q -x` taken right after it. Add a capture from a new GPU model or driver by
copying `nvml_probe.json` and `nvidia_smi_q.xml` from `--out DIR` here under a new name.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"
# h100_agent_* are the whole agent's output (test_nvml_real_agent.py), not probe captures.
CAPTURES = sorted(p for p in FIXTURES.glob("*.json") if not p.name.startswith("h100_agent_"))
MIB = 1024**2


def mib(text: str) -> int:
    value, unit = text.split()
    assert unit == "MiB"
    return int(value)


pytestmark = pytest.mark.skipif(not CAPTURES, reason="no real NVML capture in tests/fixtures/nvml")


@pytest.fixture(params=CAPTURES, ids=lambda p: p.stem)
def capture(request):
    path = request.param
    smi = path.with_name(path.stem + "_smi.xml")
    return json.loads(path.read_text()), (ET.parse(smi).getroot() if smi.exists() else None)


def test_real_samples_are_plausible(capture):
    data, _ = capture
    for tick in data["ticks"]:
        ids = [s["device_id"] for s in tick]
        assert len(ids) == len(set(ids))
        gpus = {s["device_id"] for s in tick if s["parent_id"] is None}
        for s in tick:
            assert s["vendor"] == "nvidia" and s["healthy"], s
            assert s["device_id"].startswith("MIG-" if s["parent_id"] else "GPU-")
            assert s["parent_id"] is None or s["parent_id"] in gpus
            assert s["util_pct"] is None or 0 <= s["util_pct"] <= 100
            assert 0 <= s["memory_used_bytes"] <= s["memory_total_bytes"]
            if s["parent_id"] is None:
                assert s["power_w"] > 0 and 0 < s["temp_c"] < 120
                assert "bus_id" in s["info"]


def test_real_samples_agree_with_nvidia_smi(capture):
    data, smi = capture
    if smi is None:
        pytest.skip("no nvidia-smi -q -x next to this capture")
    gpus = {s["device_id"]: s for s in data["ticks"][-1] if s["parent_id"] is None}
    smi_gpus = {g.findtext("uuid"): g for g in smi.iter("gpu")}
    assert set(gpus) == set(smi_gpus)
    for uuid, s in gpus.items():
        g = smi_gpus[uuid]
        assert s["model"] == g.findtext("product_name")
        assert s["info"]["bus_id"] == g.findtext("pci/pci_bus_id")
        fb = g.find("fb_memory_usage")
        assert s["memory_total_bytes"] // MIB == mib(fb.findtext("total"))
        if "memory_reserved_bytes" in s["extra"]:
            # v2 memory info: the reservation nvidia-smi shows separately is not counted as used.
            assert s["extra"]["memory_reserved_bytes"] // MIB == mib(fb.findtext("reserved"))
        assert abs(s["memory_used_bytes"] // MIB - mib(fb.findtext("used"))) <= 256
        if g.findtext("mig_mode/current_mig") != "Enabled":
            assert s["processes"] == len(g.findall("processes/process_info"))
        arch = g.findtext("product_architecture")
        if arch in {"Hopper", "Blackwell"} and g.findtext("mig_mode/current_mig") != "Enabled":
            # GPM needs two samples: the second tick of a Hopper+ GPU carries SM activity.
            assert 0 <= s["extra"]["sm_active_pct"] <= 100
