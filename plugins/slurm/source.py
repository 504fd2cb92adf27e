"""The `slurm` allocation source: which running job holds which device on this node (README.md here)."""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from capmon.agent import (
    Allocation,
    AllocationSource,
    CommandRunner,
    ProbeConfig,
    ProbeUnavailable,
    run_command,
)
from capmon.plugins.slurm.parse import (
    SlurmJob,
    device_of_file,
    parse_gres_conf,
    parse_jobstats_file,
    parse_key_values,
    parse_scontrol_jobs,
)

log = logging.getLogger(__name__)

# Job states in which a job holds its GRES: prolog running, running, suspended (keeps its GRES),
# completing (released only when the epilog is done).
HOLDING_STATES = "CONFIGURING,RUNNING,SUSPENDED,COMPLETING"
# Slurm's commands together get this share of the source's timeout, so the source (not the agent)
# says which one did not answer.
_COMMAND_SHARE_OF_TIMEOUT = 0.8
# A GRES name and the vendor its devices are when gres.conf names no device file.
_VENDOR_OF_GRES = {"gpu": "nvidia", "npu": "ascend"}
_MAX_ERROR = 300


@dataclass(frozen=True, slots=True)
class SlurmConfig(ProbeConfig):
    """Options of the slurm allocation source (`[allocations.slurm]`)."""

    # This node's Slurm NodeName; empty: the host name up to the first dot (slurmd's default).
    node_name: str = ""
    # The Slurm client binaries: names looked up on PATH, or absolute paths.
    scontrol: str = "scontrol"
    squeue: str = "squeue"
    # gres.conf, read once at setup to map GRES indices to device files; empty: the gres.conf beside
    # the slurm.conf that `scontrol show config` names.
    gres_conf: str = ""
    # Where the jobstats prolog writes one file per GPU UUID (`<job id> <uid>`); read when present.
    jobstats_dir: str = "/run/gpustat"


class SlurmSource(AllocationSource):
    """Running jobs on this node (`squeue -w`), each job's GRES indices (`scontrol show job -d`),
    mapped to devices through gres.conf; GPU UUIDs from the jobstats prolog's files where present."""

    name: ClassVar[str] = "slurm"
    Config: ClassVar[type[ProbeConfig]] = SlurmConfig
    default_interval_s: ClassVar[float] = 15.0
    default_timeout_s: ClassVar[float] = 10.0
    config: SlurmConfig

    def __init__(
        self,
        config: SlurmConfig | None = None,
        run: CommandRunner | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config)
        self._run: CommandRunner = run if run is not None else run_command
        self._clock = clock
        self.node = self.config.node_name or socket.gethostname().split(".")[0]
        # GRES name → device file per GRES index; None: not known (indices are used as minor numbers).
        self.gres_files: dict[str, list[str]] | None = None
        self.gres_files_note: str | None = None
        self._deadline = 0.0

    # -- contract --------------------------------------------------------------------------------

    def setup(self) -> None:
        for binary in (self.config.scontrol, self.config.squeue):
            if shutil.which(binary) is None:
                raise ProbeUnavailable(f"{binary} not on PATH")
        self._deadline = self._clock() + self.timeout_s * _COMMAND_SHARE_OF_TIMEOUT
        rc, out, err = self._call([self.config.scontrol, "show", "node", self.node])
        if rc != 0 or not out.startswith("NodeName="):
            raise ProbeUnavailable(_not_a_node(self.node, err or out))
        self.gres_files, self.gres_files_note = self._read_gres_conf()
        if self.gres_files_note:
            log.warning("slurm: %s; GRES indices are taken as device minor numbers", self.gres_files_note)

    def allocations(self) -> Sequence[Allocation]:
        self._deadline = self._clock() + self.timeout_s * _COMMAND_SHARE_OF_TIMEOUT
        rc, out, err = self._call(
            [self.config.squeue, "--noheader", "-w", self.node, "-t", HOLDING_STATES, "-o", "%A"]
        )
        if rc != 0:
            raise RuntimeError(f"squeue exited with {rc}: {_first_line(err or out)}")
        jobs: dict[str, SlurmJob] = {}
        for job_id in dict.fromkeys(out.split()):
            job = self._job(job_id)
            if job is not None:
                jobs[job.job_id] = job
        by_gres = [a for job in jobs.values() for a in self._from_gres(job)]
        by_uuid = self._from_jobstats(jobs)
        # The prolog's files name GPUs exactly; a job they cover is taken from them alone.
        exact = {a.job_id for a in by_uuid}
        return by_uuid + [a for a in by_gres if a.job_id not in exact]

    # -- the pieces ------------------------------------------------------------------------------

    def _call(self, argv: list[str]) -> tuple[int, str, str]:
        left = self._deadline - self._clock()
        if left <= 0:
            raise TimeoutError(f"no time left for {argv[0]} {argv[1]} (timeout_s {self.timeout_s:g})")
        try:
            return self._run(argv, left)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{' '.join(argv[:3])} did not answer within {left:.1f}s") from None

    def _job(self, job_id: str) -> SlurmJob | None:
        rc, out, err = self._call([self.config.scontrol, "show", "job", "-d", job_id])
        if rc != 0:
            if "Invalid job id" in err:
                return None  # ended between squeue and scontrol
            raise RuntimeError(f"scontrol show job -d {job_id} exited with {rc}: {_first_line(err or out)}")
        found = [j for j in parse_scontrol_jobs(out) if j.job_id == job_id]
        if not found:
            raise RuntimeError(f"scontrol show job -d {job_id}: no JobId={job_id} block in its output")
        return found[0]

    def _from_gres(self, job: SlurmJob) -> list[Allocation]:
        out: list[Allocation] = []
        for gres in job.gres_on(self.node):
            files = (self.gres_files or {}).get(gres.name)
            for idx in gres.indices:
                device = device_of_file(files[idx]) if files is not None and idx < len(files) else None
                if device is None:
                    vendor = _VENDOR_OF_GRES.get(gres.name)
                    if vendor is None:
                        continue  # a GRES that is not a device capmon measures
                    device = (vendor, idx)
                out.append(
                    Allocation(
                        source=self.name,
                        device=f"{gres.name}:{idx}",
                        vendor=device[0],
                        index=device[1],
                        job_id=job.job_id,
                        user=job.user,
                        partition=job.partition,
                        since=job.start_time,
                    )
                )
        return out

    def _from_jobstats(self, jobs: dict[str, SlurmJob]) -> list[Allocation]:
        """Files named by GPU or MIG UUID whose job runs here; stale files (epilog never ran) are not."""
        root = Path(self.config.jobstats_dir)
        try:
            entries = sorted(p for p in root.iterdir() if p.name.startswith(("GPU-", "MIG-")))
        except OSError:
            return []
        out: list[Allocation] = []
        for path in entries:
            try:
                parsed = parse_jobstats_file(path.read_text(errors="replace")[:200])
            except OSError:
                continue
            if parsed is None or parsed[0] not in jobs:
                continue
            job = jobs[parsed[0]]
            out.append(
                Allocation(
                    source=self.name,
                    device=path.name,
                    device_id=path.name,
                    vendor="nvidia",
                    job_id=job.job_id,
                    user=job.user or _user_of(parsed[1]),
                    partition=job.partition,
                    since=job.start_time,
                )
            )
        return out

    def _read_gres_conf(self) -> tuple[dict[str, list[str]] | None, str | None]:
        path = self.config.gres_conf
        if not path:
            rc, out, _ = self._call([self.config.scontrol, "show", "config"])
            slurm_conf = parse_key_values(out).get("SLURM_CONF") if rc == 0 else None
            if not slurm_conf:
                return None, "scontrol show config names no SLURM_CONF, so gres.conf is not known"
            path = os.path.join(os.path.dirname(slurm_conf), "gres.conf")
        try:
            text = Path(path).read_text(errors="replace")
        except OSError as exc:
            return None, f"cannot read {path}: {exc.strerror or exc}"
        files = parse_gres_conf(text, self.node)
        if not files:
            return None, f"{path} lists no File= for {self.node} (AutoDetect?)"
        return files, None


def _user_of(uid: int | None) -> str | None:
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# What scontrol says on a host with no slurm.conf and no DNS SRV record for a controller (configless).
_NO_CONTROLLER = (
    "resolve_ctls_from_dns_srv",
    "fetch_config",
    "establish_config_source",
    "Could not establish a configuration source",
)
_SCONTROL_PREFIX = re.compile(r"^scontrol: (?:error|fatal): ")


def _not_a_node(node: str, text: str) -> str:
    """Why setup skips: on most hosts simply that Slurm is not set up here, not its DNS lookup's errno."""
    if any(marker in text for marker in _NO_CONTROLLER):
        lines = [s.strip() for s in text.splitlines() if s.strip()]
        last = _SCONTROL_PREFIX.sub("", lines[-1])[:120]
        return f"no Slurm controller configured on this host (scontrol: {last})"
    return f"{node} is not a Slurm node here: {_first_line(text)}"


def _first_line(text: str) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "no output")
    return line[:_MAX_ERROR]
