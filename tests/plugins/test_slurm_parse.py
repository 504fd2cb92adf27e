"""The slurm source's pure readers, over outputs recorded from Slurm 22.05 here (tests/fixtures/slurm/
22.05-*) and composed ones in the layouts other versions and sites print (composed-*)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from capmon.plugins.slurm.parse import (
    GresUse,
    device_of_file,
    expand_hostlist,
    parse_gres_conf,
    parse_gres_detail,
    parse_index_list,
    parse_jobstats_file,
    parse_key_values,
    parse_scontrol_jobs,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurm"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", (0,)),
        ("0-1", (0, 1)),
        ("0,2", (0, 2)),
        ("0-1,3", (0, 1, 3)),
        ("1-3,5-6", (1, 2, 3, 5, 6)),
        ("N/A", None),
        ("", None),
        ("0-", None),
    ],
)
def test_index_lists(text, expected):
    assert parse_index_list(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu:2(IDX:0-1)", [GresUse("gpu", None, 2, (0, 1))]),
        ("gpu:a100:2(IDX:0,2)", [GresUse("gpu", "a100", 2, (0, 2))]),
        ("gpu:a100:3(IDX:0-1,3)", [GresUse("gpu", "a100", 3, (0, 1, 3))]),
        (
            "gpu:h100:1(IDX:5),mps:100(0/100,0/100)",
            [GresUse("gpu", "h100", 1, (5,))],
        ),
        ("gpu:1(IDX:2),npu:2(IDX:6-7)", [GresUse("gpu", None, 1, (2,)), GresUse("npu", None, 2, (6, 7))]),
        ("gpu:0(IDX:N/A)", []),
        ("(null)", []),
        ("", []),
    ],
)
def test_gres_detail(text, expected):
    assert list(parse_gres_detail(text)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vm", ("vm",)),
        ("gpu[01-03]", ("gpu01", "gpu02", "gpu03")),
        ("gpu[01-02,07],dgx7", ("gpu01", "gpu02", "gpu07", "dgx7")),
        ("/dev/nvidia[0-3]", ("/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia3")),
        ("r[1-2]n[1-2]", ("r1n1", "r1n2", "r2n1", "r2n2")),
        ("odd[x]", ("odd[x]",)),
    ],
)
def test_hostlists(text, expected):
    assert expand_hostlist(text) == expected


def test_recorded_22_05_all_jobs_running_pending_and_cpu_only():
    jobs = {j.job_id: j for j in parse_scontrol_jobs(fixture("22.05-show-job-d-all.txt"))}
    assert set(jobs) == {"1", "2", "3", "4"}
    assert jobs["1"].state == "RUNNING"
    assert (jobs["1"].user, jobs["1"].uid, jobs["1"].partition) == ("root", 0, "capmon")
    assert jobs["1"].gres_on("vm") == (GresUse("gpu", None, 2, (0, 1)),)
    # --gpus=1 (a TRES per job, not --gres) shows the same per-node line.
    assert jobs["2"].gres_on("vm") == (GresUse("gpu", None, 1, (2,)),)
    assert jobs["3"].gres_on("vm") == ()  # CPU-only job
    assert jobs["4"].state == "PENDING" and jobs["4"].gres_on("vm") == ()
    assert jobs["1"].gres_on("other-node") == ()
    assert jobs["1"].start_time == time.mktime(time.strptime("2026-12-01T08:53:35", "%Y-%m-%dT%H:%M:%S"))


def test_recorded_22_05_one_job():
    [job] = parse_scontrol_jobs(fixture("22.05-show-job-d-one.txt"))
    assert job.job_id == "1" and job.gres_on("vm") == (GresUse("gpu", None, 2, (0, 1)),)


def test_composed_multinode_typed_array_and_unnamed_user():
    jobs = {j.job_id: j for j in parse_scontrol_jobs(fixture("composed-show-job-d-multinode.txt"))}
    train = jobs["4242"]
    assert (train.user, train.uid, train.partition, train.array_job_id) == ("alice", 1001, "gpu", "4240")
    assert train.gres_on("gpu02") == (GresUse("gpu", "a100", 2, (0, 2)),)
    assert train.gres_on("gpu03") == (GresUse("gpu", "a100", 3, (0, 1, 3)),)
    assert train.gres_on("dgx7") == (GresUse("gpu", "h100", 1, (5,)),)
    notebook = jobs["4300"]
    assert (notebook.user, notebook.uid, notebook.state) == (None, 4711, "SUSPENDED")
    assert notebook.gres_on("gpu03") == (GresUse("gpu", None, 1, (2,)),)


def test_garbage_gives_no_jobs():
    assert parse_scontrol_jobs("No jobs in the system\n") == []
    assert parse_scontrol_jobs("") == []


def test_recorded_gres_conf_keeps_the_file_order():
    files = parse_gres_conf(fixture("22.05-gres.conf"), "vm")
    assert [device_of_file(f) for f in files["gpu"]] == [("nvidia", m) for m in (2, 3, 0, 1)]


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ("gpu02", {"gpu": [("nvidia", m) for m in range(4)]}),
        ("dgx7", {"gpu": [("nvidia", m) for m in (4, 5, 6, 7, 0, 1, 2, 3)], "mps": [("nvidia", 0)]}),
        ("mig1", {"gpu": [("nvidia", 0), ("nvidia", 0)]}),
        ("npu1", {"npu": [("ascend", m) for m in range(8)]}),
        ("auto1", {}),
        ("elsewhere", {}),
    ],
)
def test_composed_gres_conf(node, expected):
    files = parse_gres_conf(fixture("composed-gres.conf"), node)
    assert {name: [device_of_file(f) for f in fs] for name, fs in files.items()} == expected


def test_device_files():
    assert device_of_file("/dev/nvidia3") == ("nvidia", 3)
    assert device_of_file("/dev/davinci12") == ("ascend", 12)
    assert device_of_file("/dev/nvidiactl") is None
    assert device_of_file("/dev/null") is None


def test_show_config_names_slurm_conf():
    assert parse_key_values(fixture("22.05-show-config.txt"))["SLURM_CONF"].endswith("/slurm.conf")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("45916256 262563\n", ("45916256", 262563)), ("247609", ("247609", None)), ("", None), ("x 1", None)],
)
def test_jobstats_files(text, expected):
    assert parse_jobstats_file(text) == expected
