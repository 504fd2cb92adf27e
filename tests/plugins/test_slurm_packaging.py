"""packaging/slurm's prolog and epilog, run as Slurm runs them (environment in, files out), with a
stand-in nvidia-smi that answers a UUID per index."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from capmon.plugins.slurm.parse import parse_jobstats_file

SCRIPTS = Path(__file__).resolve().parents[2] / "packaging" / "slurm"


def run(script: str, tmp_path: Path, job: str, devices: str) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$4" = 9 ] && exit 6\necho "GPU-0000000$4-aaaa-bbbb-cccc-dddddddddddd"\n')
    smi.chmod(0o755)
    env = {
        **os.environ,
        "CAPMON_GPUSTAT_DIR": str(tmp_path / "gpustat"),
        "CAPMON_NVIDIA_SMI": str(smi),
        "SLURM_JOB_ID": job,
        "SLURM_JOB_UID": "1001",
        "CUDA_VISIBLE_DEVICES": devices,
    }
    subprocess.run(["bash", str(SCRIPTS / script)], env=env, check=True, timeout=10)


def files(tmp_path: Path) -> dict[str, tuple]:
    return {p.name: parse_jobstats_file(p.read_text()) for p in (tmp_path / "gpustat").iterdir()}


def test_prolog_writes_uuid_and_ordinal_files_and_epilog_removes_only_its_own(tmp_path):
    mig = "MIG-265a219d-a49f-578a-825d-222c72699c16"
    run("prolog.d/capmon-gpustat.sh", tmp_path, "41", f"0,2,{mig},9")
    assert files(tmp_path) == {
        "0": ("41", 1001),
        "2": ("41", 1001),
        "9": ("41", 1001),  # nvidia-smi failed for it: the ordinal file only
        "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd": ("41", 1001),
        "GPU-00000002-aaaa-bbbb-cccc-dddddddddddd": ("41", 1001),
        mig: ("41", 1001),
    }
    # Job 42 took GPU 2 before job 41's epilog ran: 41's epilog leaves 42's record alone.
    run("prolog.d/capmon-gpustat.sh", tmp_path, "42", "2")
    run("epilog.d/capmon-gpustat.sh", tmp_path, "41", f"0,2,{mig},9")
    assert files(tmp_path) == {"2": ("42", 1001), "GPU-00000002-aaaa-bbbb-cccc-dddddddddddd": ("42", 1001)}
