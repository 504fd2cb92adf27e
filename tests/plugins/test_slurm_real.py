"""The slurm source against a real one-node Slurm 22.05 (munged + slurmctld + slurmd started by the
`slurm_cluster` fixture): jobs that request GPUs and sleep are reported as holding exactly their
devices, by job id, user and partition, and released when they end."""

from __future__ import annotations

import pytest
from slurm_cluster import GRES_MINORS, PARTITION, SlurmCluster, slurm_cluster  # noqa: F401 - the fixture

from capmon.agent import ProbeUnavailable
from capmon.plugins.slurm import SlurmConfig, SlurmSource


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster):  # noqa: F811 - the module fixture, per test
    try:
        yield slurm_cluster
    finally:
        slurm_cluster.cancel_all()


def source_for(cluster: SlurmCluster, **options) -> SlurmSource:
    source = SlurmSource(
        SlurmConfig(node_name=cluster.node, jobstats_dir=str(cluster.base / "no-gpustat"), **options),
        run=cluster.run_command,
    )
    source.setup()
    return source


def held(source: SlurmSource) -> set[tuple]:
    return {(a.vendor, a.index, a.device_id, a.job_id, a.user, a.partition) for a in source.allocations()}


def test_running_jobs_hold_exactly_their_devices_until_they_end(cluster):
    source = source_for(cluster)
    assert source.gres_files_note is None  # gres.conf found through `scontrol show config`
    two = cluster.submit("--gres=gpu:2", "--wrap", "sleep 60")
    one = cluster.submit("--gpus=1", "--wrap", "sleep 60")
    cpu = cluster.submit("--wrap", "sleep 60")
    cluster.wait_running(two, one, cpu)
    waiting = cluster.submit("--gres=gpu:2", "--wrap", "sleep 60")  # one GPU left: stays pending

    # GRES indices 0-1 and 2, through gres.conf's out-of-order File list, are minors 2, 3 and 0.
    assert held(source) == {
        ("nvidia", GRES_MINORS[0], None, two, "root", PARTITION),
        ("nvidia", GRES_MINORS[1], None, two, "root", PARTITION),
        ("nvidia", GRES_MINORS[2], None, one, "root", PARTITION),
    }
    assert cluster.job_state(waiting) == "PENDING"
    assert all(a.since is not None and a.source == "slurm" for a in source.allocations())

    cluster.run("scancel", two)
    # The pending job takes the two freed GPUs once the first ends.
    cluster.wait_for(lambda: {a.job_id for a in source.allocations()} == {one, waiting}, "the GPUs handed on")
    assert {a.index for a in source.allocations() if a.job_id == waiting} == {GRES_MINORS[0], GRES_MINORS[1]}
    cluster.cancel_all()
    assert source.allocations() == []


def test_without_gres_conf_the_gres_index_is_taken_as_the_minor(cluster, tmp_path):
    source = source_for(cluster, gres_conf=str(tmp_path / "missing-gres.conf"))
    assert "cannot read" in source.gres_files_note
    job = cluster.submit("--gres=gpu:1", "--wrap", "sleep 60")
    cluster.wait_running(job)
    assert held(source) == {("nvidia", 0, None, job, "root", PARTITION)}


def test_jobstats_files_name_the_gpus_of_running_jobs_and_stale_ones_are_ignored(cluster, tmp_path):
    gpustat = tmp_path / "gpustat"
    gpustat.mkdir()
    source = SlurmSource(
        SlurmConfig(node_name=cluster.node, jobstats_dir=str(gpustat)), run=cluster.run_command
    )
    source.setup()
    covered = cluster.submit("--gres=gpu:1", "--wrap", "sleep 60")
    plain = cluster.submit("--gres=gpu:1", "--wrap", "sleep 60")
    cluster.wait_running(covered, plain)
    uuid = "GPU-03aa20a1-2e97-d125-629d-fd4e5734553f"
    (gpustat / uuid).write_text(f"{covered} 0\n")
    (gpustat / "0").write_text(f"{covered} 0\n")  # the ordinal file the prolog also writes: not used
    (gpustat / "GPU-ffffffff-0000-0000-0000-000000000000").write_text("999999 0\n")  # epilog never ran
    assert held(source) == {
        ("nvidia", None, uuid, covered, "root", PARTITION),
        ("nvidia", GRES_MINORS[1], None, plain, "root", PARTITION),
    }


def test_a_host_that_is_not_a_node_is_skipped_with_why(cluster):
    source = SlurmSource(SlurmConfig(node_name="not-a-node"), run=cluster.run_command)
    with pytest.raises(
        ProbeUnavailable, match="not-a-node is not a Slurm node here: Node not-a-node not found"
    ):
        source.setup()


def test_a_slurm_that_cannot_answer_is_an_error_not_an_empty_answer(cluster):
    source = source_for(cluster, timeout_s=1.0)
    lost = SlurmCluster(cluster.base)
    # A client without its slurm.conf waits for a controller it cannot find: the source says so.
    lost.env = {**cluster.env, "SLURM_CONF": str(cluster.base / "nowhere.conf")}
    source._run = lost.run_command
    with pytest.raises(TimeoutError, match=r"squeue --noheader -w did not answer within 0\.8s"):
        source.allocations()
