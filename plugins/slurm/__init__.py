"""slurm allocation source: which Slurm job holds which device on this node."""

from __future__ import annotations

from capmon.agent import hookimpl
from capmon.plugins.slurm.parse import GresUse, JobNodes, SlurmJob, parse_gres_conf, parse_scontrol_jobs
from capmon.plugins.slurm.source import SlurmConfig, SlurmSource

__all__ = [
    "GresUse",
    "JobNodes",
    "SlurmConfig",
    "SlurmJob",
    "SlurmSource",
    "capmon_allocation_sources",
    "parse_gres_conf",
    "parse_scontrol_jobs",
]


@hookimpl
def capmon_allocation_sources() -> list[type]:
    return [SlurmSource]
