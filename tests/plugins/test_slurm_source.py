"""The slurm source with a scripted command runner (recorded 22.05 outputs): sample config, a job that
ends mid-reading, and Slurm commands sharing one time budget."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import tomllib

from capmon.agent.probe import config_from_mapping
from capmon.plugins.slurm import SlurmConfig, SlurmSource

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "slurm"


def test_sample_toml_is_the_defaults():
    text = (ROOT / "plugins" / "slurm" / "sample.toml").read_text()
    uncommented = "\n".join(line.removeprefix("# ") if " = " in line else line for line in text.splitlines())
    table = tomllib.loads(uncommented)["allocations"]["slurm"]
    assert config_from_mapping(SlurmConfig, table, "allocations.slurm") == SlurmConfig(
        interval_s=SlurmSource.default_interval_s, timeout_s=SlurmSource.default_timeout_s
    )


class Runner:
    def __init__(self, answers: dict[str, tuple[int, str, str]], hang: str | None = None, now=None) -> None:
        self.answers, self.hang, self.calls, self.now = answers, hang, [], now

    def __call__(self, argv, timeout_s):
        self.calls.append((" ".join(argv), timeout_s))
        if self.now is not None:
            self.now[0] += 3.0  # every command takes 3 s of the budget
        key = " ".join(argv)
        if self.hang and key.startswith(self.hang):
            raise subprocess.TimeoutExpired(argv, timeout_s)
        return self.answers[key]


def source(runner: Runner, tmp_path: Path, clock=lambda: 0.0) -> SlurmSource:
    gres = tmp_path / "gres.conf"
    gres.write_text("Name=gpu File=/dev/nvidia[0-3]\n")
    s = SlurmSource(
        SlurmConfig(node_name="vm", gres_conf=str(gres), jobstats_dir=str(tmp_path / "none")),
        run=runner,
        clock=clock,
    )
    s.gres_files, s.gres_files_note = s._read_gres_conf()
    return s


SQUEUE = "squeue --noheader -w vm -t CONFIGURING,RUNNING,SUSPENDED,COMPLETING -o %A"


def test_a_job_that_ends_between_squeue_and_scontrol_is_skipped(tmp_path):
    runner = Runner(
        {
            SQUEUE: (0, "1\n7\n", ""),
            "scontrol show job -d 1": (0, (FIXTURES / "22.05-show-job-d-one.txt").read_text(), ""),
            "scontrol show job -d 7": (1, "", "slurm_load_jobs error: Invalid job id specified\n"),
        }
    )
    assert [(a.job_id, a.index) for a in source(runner, tmp_path).allocations()] == [("1", 0), ("1", 1)]


def test_the_commands_share_one_budget_and_a_hang_is_named(tmp_path):
    now = [0.0]
    runner = Runner({SQUEUE: (0, "1\n", "")}, hang="scontrol show job", now=now)
    s = source(runner, tmp_path, clock=lambda: now[0])
    with pytest.raises(TimeoutError, match=r"scontrol show job did not answer within 5\.0s"):
        s.allocations()
    # 80 % of timeout_s 10 for all of them: squeue took 3 s, scontrol had what was left.
    assert [t for _, t in runner.calls] == [8.0, 5.0]


def test_a_squeue_error_is_raised_with_slurms_words(tmp_path):
    runner = Runner({SQUEUE: (1, "", "squeue: error: Invalid node name vm\n")})
    with pytest.raises(RuntimeError, match="squeue exited with 1: squeue: error: Invalid node name vm"):
        source(runner, tmp_path).allocations()
