"""A real one-node Slurm cluster for the `slurm` source's tests: munged, slurmctld and slurmd (Debian's
`slurm-wlm` 22.05 and `munge`) in a temp dir, on free loopback ports, four GPUs declared as GRES.

The node's gres.conf lists its four "GPUs" out of order (`nvidia2,nvidia3,nvidia0,nvidia1`,
character devices made in the temp dir, major 195 like the driver's), so GRES index 0 is minor number 2 and a test tells
the GRES index from the device it names. Everything started is stopped at teardown, even when a test
fails: every job cancelled and waited for, then slurmd, slurmctld and munged terminated (in that
order: slurmd stopped under running jobs leaves `slurmstepd` orphans). A missing binary skips.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

__all__ = ["SlurmCluster", "slurm_cluster"]

INSTALL_HINT = "apt-get install -y slurm-wlm munge"
# The order the node's gres.conf lists its GPUs in: GRES index i is /dev/nvidia<GRES_MINORS[i]>.
GRES_MINORS = (2, 3, 0, 1)
PARTITION = "capmon"
_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _device_node(path: Path, minor: int) -> None:
    """A character device like the driver's /dev/nvidiaN (major 195), so `slurmd -G` accepts it; a
    plain file where mknod is not allowed (Slurm binds by path and runs jobs either way)."""
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(195, minor))
    except OSError:
        path.touch()


class SlurmCluster:
    """munged + slurmctld + slurmd on this host; `run()` calls a Slurm client against it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.node = socket.gethostname().split(".")[0]
        self.conf = base / "slurm.conf"
        self.gres_conf = base / "gres.conf"
        self.munge_socket = base / "munge" / "munge.socket"
        self.dev = base / "dev"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- the boundary the source is given ------------------------------------------------------

    def run_command(self, argv: Sequence[str], timeout_s: float) -> tuple[int, str, str]:
        """A `capmon.agent.CommandRunner` that talks to this cluster (SLURM_CONF set)."""
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, env=self.env)
        return proc.returncode, proc.stdout, proc.stderr

    def run(self, *argv: str, check: bool = True) -> str:
        rc, out, err = self.run_command(argv, 30.0)
        if check and rc != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {rc}: {err.strip()}")
        return out

    # -- jobs ------------------------------------------------------------------------------------

    def submit(self, *args: str) -> str:
        """`sbatch --parsable` with the given arguments; the job id."""
        out = self.run("sbatch", "--parsable", f"--partition={PARTITION}", f"--chdir={self.base}", *args)
        return out.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        out = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).strip()
        return out or "GONE"

    def wait_for(self, predicate, what: str, timeout: float = 30.0):
        """Poll `predicate()` until it returns something truthy (no fixed sleeps); fail naming `what`."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.log_tail()}")
            time.sleep(0.05)

    def wait_running(self, *job_ids: str, timeout: float = 30.0) -> None:
        self.wait_for(
            lambda: all(self.job_state(j) == "RUNNING" for j in job_ids), f"jobs {job_ids} RUNNING", timeout
        )

    def cancel_all(self, timeout: float = 30.0) -> None:
        """scancel every job, then wait until none is queued and no job process is left on the node."""
        self.run("scancel", "--full", f"--partition={PARTITION}", check=False)
        self.wait_for(
            lambda: not self.run("squeue", "-h", "-o", "%i", check=False).strip(), "no jobs", timeout
        )
        self.wait_for(lambda: not self._listpids(), "no job processes", timeout)

    def _listpids(self) -> list[str]:
        out = self.run("scontrol", "listpids", check=False)
        return [line for line in out.splitlines()[1:] if line.strip()]

    # -- daemons ---------------------------------------------------------------------------------

    def start(self) -> None:
        for d in ("munge", "state", "spool", "log", "dev"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o711)
        os.chmod(self.base / "munge", 0o711)
        key = self.base / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for minor in range(len(GRES_MINORS)):
            _device_node(self.dev / f"nvidia{minor}", minor)
        files = ",".join(str(self.dev / f"nvidia{m}") for m in GRES_MINORS)
        self.gres_conf.write_text(f"Name=gpu File={files}\n")
        self.conf.write_text(self._slurm_conf())
        self._spawn(
            "munged",
            [
                "munged", "--foreground", "--force",
                f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--log-file={self.base / 'log' / 'munged.log'}",
                f"--pid-file={self.base / 'munge' / 'munged.pid'}",
                f"--seed-file={self.base / 'munge' / 'munged.seed'}",
            ],
        )  # fmt: skip
        self.wait_for(self.munge_socket.exists, "munged's socket", 15.0)
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self.wait_for(self._node_idle, f"node {self.node} idle", 30.0)

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.base / "log" / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.base
            )

    def _node_idle(self) -> bool:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.log_tail()}")
        out = self.run("sinfo", "-h", "-n", self.node, "-o", "%t", check=False).strip()
        return out == "idle"

    def stop(self) -> None:
        try:
            if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
                self.cancel_all()
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                _stop(self._procs.pop(name, None))

    def log_tail(self, n: int = 1500) -> str:
        parts = []
        for path in sorted((self.base / "log").glob("*")):
            text = path.read_text(errors="replace")[-n:]
            parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)

    def _slurm_conf(self) -> str:
        b = self.base
        return f"""\
ClusterName=capmon
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=8 RealMemory=1000 Gres=gpu:{len(GRES_MINORS)} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A started one-node cluster for the module's tests; each test cancels its own jobs."""
    missing = [b for b in _BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: {INSTALL_HINT}")
    if os.geteuid() != 0:
        pytest.skip("a one-node Slurm cluster runs its daemons as root (SlurmUser=root)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
