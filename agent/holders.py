"""Who holds a device: a vendor tool's PIDs turned into owners from `/proc`, folded into windows.

Pure and boundary-driven (DESIGN.md, "Who holds a device"): the `/proc` tree is a parameter
(`proc_root`), time is passed in, and nothing here talks to the network. Four parts:

- `parse_cgroup(text)`: the contents of `/proc/<pid>/cgroup` → `CgroupOwner` (container runtime
  and id, Kubernetes pod UID, Slurm job, systemd session or service). Never raises.
- `resolve_process(pid, proc_root)`: one PID → `ProcessOwner` (user, uid, process name from `comm`,
  start time, and the cgroup owner). Never reads `cmdline` or `environ`: they carry secrets.
- `HolderResolver`: the same with a cache keyed by (pid, start time), so a warm tick costs one small
  read per distinct PID, and a reused PID is resolved again.
- `HolderWindows`: per-tick holders → per-window `wire.HolderWindow` records (sample-and-hold
  seconds, peak memory, bounded to the wire's limits).

The daemon's use, once per tick and once per window::

    resolver = HolderResolver(config.holders)
    windows = HolderWindows()
    ...
    resolved = resolver.resolve_devices({s.device_id: s.holders for s in samples})
    for device_id, holders in resolved.items():
        windows.observe(device_id, mono_now, holders)
    ...
    for device_id, (records, omitted) in windows.close(None, mono_end).items():
        ...  # DeviceWindow(holders=records, holders_omitted=omitted)
"""

from __future__ import annotations

import functools
import os
import pwd
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from capmon.agent import wire
from capmon.agent.allocation import Allocation
from capmon.agent.probe import Holder, Probe

__all__ = [
    "REASON_EXITED",
    "REASON_NOT_READABLE",
    "REASON_NOT_VISIBLE",
    "AllocationHolder",
    "CgroupOwner",
    "HolderRecord",
    "HolderResolver",
    "HolderWindows",
    "HoldersConfig",
    "ProcessOwner",
    "ResolvedHolder",
    "parse_cgroup",
    "resolve_process",
    "resolver_for",
]

REASON_NOT_VISIBLE = "process not visible in this PID namespace"
REASON_EXITED = "process exited"
REASON_NOT_READABLE = "process not readable by the agent (permission denied)"


@dataclass(frozen=True, slots=True)
class HoldersConfig:
    """Who-holds-a-device options (`[holders]` in the agent's TOML).

    What leaves the host, per device per window, for each process the vendor tool lists on the
    device: its PID, the device memory it used (peak), how many seconds of the window it held the
    device and since when (process start); with `users = "name"` its user name and uid, with
    `users = "uid"` the uid only (also sent as the user, so holders still group by user), with
    `users = "none"` neither; with `commands = true` its process name as the kernel keeps it
    (`/proc/<pid>/comm`, at most 15 characters, or the vendor tool's name for it) — never its
    command line or environment; and from its cgroup the container runtime, container id,
    Kubernetes pod UID and Slurm job id. `enabled = false` sends no holders at all (the process
    count still travels).
    """

    # Resolve and send who holds each device.
    enabled: bool = True
    # How a holder's user travels: "name" (user name and uid), "uid" (the uid only), "none".
    users: Literal["name", "uid", "none"] = "name"
    # Send each holder's process name (`comm`, never the command line).
    commands: bool = True

    def __post_init__(self) -> None:
        if self.users not in ("name", "uid", "none"):
            raise ValueError(f"users must be 'name', 'uid' or 'none', got {self.users!r}")


# ---------------------------------------------------------------------------------------------
# /proc/<pid>/cgroup


@dataclass(frozen=True, slots=True)
class CgroupOwner:
    """What a process's cgroup says about who runs it; None where the path does not say."""

    # docker, containerd, crio, podman, lxc, slurm, systemd-session, systemd-service.
    runtime: str | None = None
    container_id: str | None = None
    # Canonical dashed form; a static pod's UID (its config hash, 32 hex digits) as the kubelet has it.
    pod_uid: str | None = None
    slurm_job_id: str | None = None
    # The uid of the systemd user slice (`user-1000.slice`, `user@1000.service`) the process is in.
    session_uid: int | None = None
    # The innermost systemd unit that is not a container's own scope: `sshd.service`, `session-3.scope`.
    unit: str | None = None


_CONTAINER_RUNTIMES = frozenset({"docker", "containerd", "crio", "podman", "lxc"})
_NOTHING = CgroupOwner()

_HEX_ID = r"[0-9a-f]{12,128}"
# `docker-<id>.scope` (systemd driver), `cri-containerd-<id>.scope`, `crio-<id>.scope`,
# `libpod-<id>.scope` (podman); also without `.scope` (podman's cgroupfs `libpod-<id>`).
# `crio-conmon-<id>` and `libpod-conmon-<id>` are the monitors, not the containers: no match
# (ids are letters and digits only).
_SCOPE_RE = re.compile(r"^(docker|cri-containerd|crio|libpod)-([0-9A-Za-z]{3,128})(?:\.scope)?$")
_SCOPE_RUNTIME = {"docker": "docker", "cri-containerd": "containerd", "crio": "crio", "libpod": "podman"}
# The systemd driver's colon form (containerd with systemd_cgroup and cgroupfs paths):
# `kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`.
_COLON_RUNTIME = {
    "cri-containerd": "containerd",
    "containerd": "containerd",
    "crio": "crio",
    "docker": "docker",
}
# A pod's cgroup: `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid>.slice` (systemd); guaranteed
# pods have no QoS level. The UID spelled with `-` or (systemd) `_`.
_POD_RE = re.compile(
    r"^(?:kubepods-(?:besteffort-|burstable-|guaranteed-)?)?pod([0-9a-fA-F][0-9a-fA-F_-]{7,63})(?:\.slice)?$"
)
# A container's own directory under its pod (cgroupfs): a hex id, or a UUID (some runtimes).
_BARE_ID_RE = re.compile(
    rf"^(?:{_HEX_ID}|[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}})$"
)
_KUBE_RE = re.compile(
    r"^kubepods(?:-(?:besteffort|burstable|guaranteed))?(?:\.slice)?$|^(?:besteffort|burstable|guaranteed)$"
)
# Slurm: `/slurm/uid_N/job_N/step_N` (v1, also `slurm_<node>` with multiple slurmd) and
# `…/slurmstepd.scope/job_N/step_N/…` (v2, also `<node>_slurmstepd.scope`).
_SLURM_ROOT_RE = re.compile(r"^slurm(?:_[^/]+)?$")
_SLURMSTEPD_RE = re.compile(r"^(?:[^/]+_)?slurmstepd\.scope$")
_SLURM_JOB_RE = re.compile(r"^job_(\d{1,20})$")
# Slurm 26.05 names the v2 job directory by its SLUID unless CgroupJobIdPaths=yes.
_SLUID_RE = re.compile(r"^s[0-9A-Z]{10,20}$")
_USER_SLICE_RE = re.compile(r"^user-(\d{1,10})\.slice$")
_USER_MANAGER_RE = re.compile(r"^user@(\d{1,10})\.service$")
# systemd before v205: `/user/1000.user/c2.session`.
_OLD_USER_RE = re.compile(r"^(\d{1,10})\.user$")
_LXC_PAYLOAD_RE = re.compile(r"^lxc\.payload[.:](.+)$")


def _canonical_uid(raw: str) -> str:
    # The systemd driver spells `-` as `_`; a static pod's UID (the kubelet's config hash, 32 hex
    # digits with no dashes) stays as the kubelet has it.
    return raw.replace("_", "-").lower()


def _parse_path(path: str) -> CgroupOwner:
    """One cgroup path, read from the root down: the innermost container or Slurm job decides the
    runtime; a systemd session or service decides it only where nothing stronger has."""
    runtime: str | None = None
    container_id = pod_uid = job = unit = None
    session_uid: int | None = None
    kube = slurm = user_manager = False
    prev = ""
    parts = [p for p in path.split("/") if p]
    for part in parts:
        colon_runtime = colon_id = None
        if ":" in part:  # kubepods-…-pod<uid>.slice:cri-containerd:<id>
            bits = part.split(":")
            if len(bits) == 3 and bits[1] in _COLON_RUNTIME and re.fullmatch(_HEX_ID, bits[2]):
                part, colon_runtime, colon_id = bits[0], _COLON_RUNTIME[bits[1]], bits[2]
        if _KUBE_RE.match(part):
            kube = True
        elif (m := _POD_RE.match(part)) and (kube or part.startswith("kubepods")):
            kube, pod_uid = True, _canonical_uid(m.group(1))
            container_id = None
        elif m := _SCOPE_RE.match(part):
            runtime, container_id = _SCOPE_RUNTIME[m.group(1)], m.group(2)
        elif prev == "docker" and re.fullmatch(_HEX_ID, part):
            runtime, container_id = "docker", part
        elif (prev in ("lxc", "lxc.payload")) and part not in (".lxc",):
            runtime, container_id = "lxc", part
        elif m := _LXC_PAYLOAD_RE.match(part):
            runtime, container_id = "lxc", m.group(1)
        elif _BARE_ID_RE.match(part) and (pod_uid is not None or prev == "" or kube):
            # Under a pod (cgroupfs driver) or at the top (an old docker): the runtime is not named.
            container_id = part
            if runtime not in _CONTAINER_RUNTIMES:
                runtime = None
        elif _SLURM_ROOT_RE.match(part) and prev == "":
            slurm = True
        elif _SLURMSTEPD_RE.match(part):
            slurm = True
            if runtime is None or runtime.startswith("systemd-"):
                runtime, unit = "systemd-service", part
        elif slurm and (m := _SLURM_JOB_RE.match(part)):
            runtime, job = "slurm", m.group(1)
        elif slurm and prev.endswith("slurmstepd.scope") and _SLUID_RE.match(part):
            runtime, job = "slurm", part
        elif m := _USER_SLICE_RE.match(part):
            session_uid = int(m.group(1))
        elif m := _USER_MANAGER_RE.match(part):
            session_uid, user_manager = int(m.group(1)), True
        elif prev == "user" and (m := _OLD_USER_RE.match(part)):
            session_uid = int(m.group(1))
        elif part.endswith((".service", ".scope", ".session")) and not part.startswith("lxc.monitor"):
            unit = part
            if runtime is None or runtime.startswith("systemd-"):
                in_session = session_uid is not None and (
                    user_manager or part.startswith("session-") or part.endswith(".session")
                )
                runtime = "systemd-session" if in_session else "systemd-service"
        if colon_runtime is not None:
            runtime, container_id = colon_runtime, colon_id
        prev = part
    return CgroupOwner(runtime, container_id, pod_uid, job, session_uid, unit)


_RANK = {"systemd-service": 1, "systemd-session": 2, "slurm": 3}


def _specificity(owner: CgroupOwner) -> tuple[int, int]:
    rank = (
        4 if owner.runtime in _CONTAINER_RUNTIMES or owner.container_id else _RANK.get(owner.runtime or "", 0)
    )
    return rank, sum(
        v is not None
        for v in (owner.container_id, owner.pod_uid, owner.slurm_job_id, owner.session_uid, owner.unit)
    )


def parse_cgroup(text: str) -> CgroupOwner:
    """The owner `/proc/<pid>/cgroup` names: of every line (cgroup v1 has one per hierarchy, v2 one
    `0::` line, hybrid systems both), the most specific — a container over a Slurm job over a
    session over a service. Shapes it does not know give None fields, never an exception."""
    best, best_score = _NOTHING, (0, 0)
    for line in text.splitlines():
        fields = line.strip().split(":", 2)
        if len(fields) != 3 or not fields[2].startswith("/"):
            continue
        owner = _parse_path(fields[2])
        score = _specificity(owner)
        if score > best_score:
            best, best_score = owner, score
    return best


# ---------------------------------------------------------------------------------------------
# /proc/<pid>


@dataclass(frozen=True, slots=True)
class ProcessOwner:
    """Who runs a process. Only `pid` (and `reason`) when the process cannot be read."""

    pid: int
    user: str | None = None
    uid: int | None = None
    # `/proc/<pid>/comm`: the kernel's name for it, at most 15 bytes. Never the command line.
    command: str | None = None
    # Field 22 of `/proc/<pid>/stat`: clock ticks after boot. With the pid, the process's identity.
    start_time: int | None = None
    # The start as unix seconds, where the boot time is known.
    started_at: int | None = None
    runtime: str | None = None
    container_id: str | None = None
    pod_uid: str | None = None
    slurm_job_id: str | None = None
    session_uid: int | None = None
    unit: str | None = None
    # Why only the pid is known, for people: REASON_NOT_VISIBLE, REASON_EXITED, REASON_NOT_READABLE.
    reason: str | None = None


class _Gone(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _read(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise _Gone(REASON_EXITED) from None
    except PermissionError:
        raise _Gone(REASON_NOT_READABLE) from None
    except ProcessLookupError:
        raise _Gone(REASON_EXITED) from None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except ProcessLookupError:  # ESRCH: the task died while we read (a zombie's files)
        raise _Gone(REASON_EXITED) from None
    except PermissionError:
        raise _Gone(REASON_NOT_READABLE) from None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def _start_time(proc_root: str, pid: int) -> int:
    """Field 22 of `/proc/<pid>/stat`. The warm path of every tick: one open, one read."""
    try:
        fd = os.open(f"{proc_root}/{pid}/stat", os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError):
        raise _Gone(REASON_EXITED) from None
    except PermissionError:
        raise _Gone(REASON_NOT_READABLE) from None
    try:
        data = os.read(fd, 4096)  # the whole file: comm is at most 64 bytes, 52 short numbers after it
    except ProcessLookupError:
        raise _Gone(REASON_EXITED) from None
    finally:
        os.close(fd)
    # `pid (comm) state ppid …`: comm may hold spaces and parentheses; fields follow the last ')'.
    rest = data[data.rfind(b")") + 2 :].split(b" ", 20)
    try:
        return int(rest[19])  # field 22; `rest` starts at field 3
    except (IndexError, ValueError):
        raise _Gone(REASON_EXITED) from None


def _uid(status: str) -> int | None:
    for line in status.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
    return None


@functools.lru_cache(maxsize=4096)
def _passwd_name(uid: int) -> str:
    """The password database's name for a uid; the uid as text when it has no entry."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def host_pid_namespace(proc_root: str = "/proc") -> bool:
    """Whether `proc_root` shows the host's PID namespace, where the vendor tool's PIDs live:
    kthreadd is PID 2 there and invisible in any other."""
    try:
        return _read(f"{proc_root}/2/comm").strip() == "kthreadd"
    except _Gone:
        return False


def boot_time(proc_root: str = "/proc") -> int | None:
    """`btime` of `/proc/stat`: unix seconds at boot, for turning start ticks into a time."""
    try:
        for line in _read(f"{proc_root}/stat").splitlines():
            if line.startswith("btime "):
                return int(line.split()[1])
    except (_Gone, ValueError, IndexError):
        pass
    return None


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _owner(
    pid: int,
    proc_root: str,
    start: int,
    config: HoldersConfig,
    user_name: Callable[[int], str],
    btime: int | None,
) -> ProcessOwner:
    base = f"{proc_root}/{pid}"
    uid = _uid(_read(f"{base}/status"))
    command = _read(f"{base}/comm").rstrip("\n") or None if config.commands else None
    cgroup = parse_cgroup(_read(f"{base}/cgroup"))
    # Read the start again: a PID that exited and was reused while we read is not this process.
    if _start_time(proc_root, pid) != start:
        raise _Gone(REASON_EXITED)
    user = None
    if uid is None or config.users == "none":
        uid = None
    elif config.users == "name":
        user = user_name(uid)
    else:
        user = str(uid)
    started_at = btime + start // _CLK_TCK if btime is not None else None
    return ProcessOwner(
        pid,
        user,
        uid,
        command,
        start,
        started_at,
        cgroup.runtime,
        cgroup.container_id,
        cgroup.pod_uid,
        cgroup.slurm_job_id,
        cgroup.session_uid,
        cgroup.unit,
    )


def resolve_process(
    pid: int,
    proc_root: str = "/proc",
    *,
    config: HoldersConfig | None = None,
    user_name: Callable[[int], str] | None = None,
    host_pids: bool | None = None,
) -> ProcessOwner:
    """Who runs `pid` (a PID in the host's namespace, as vendor tools report them).

    Reads `status` (uid), `comm`, `stat` (start time) and `cgroup` under `proc_root/<pid>`; never
    `cmdline` or `environ`. A PID that is gone gives the pid alone with `reason`; so does every PID
    when `proc_root` is not the host's PID namespace (`host_pids`, detected when None), where a
    number could name an unrelated process.
    """
    config = config or HoldersConfig()
    if host_pids is None:
        host_pids = host_pid_namespace(proc_root)
    if not host_pids:
        return ProcessOwner(pid, reason=REASON_NOT_VISIBLE)
    try:
        start = _start_time(proc_root, pid)
        return _owner(pid, proc_root, start, config, user_name or _passwd_name, boot_time(proc_root))
    except _Gone as gone:
        return ProcessOwner(pid, reason=gone.reason)


# ---------------------------------------------------------------------------------------------
# The cached resolver


def _bounded(value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value[:limit] or None


def _in(value: int | None, low: int, high: int) -> int | None:
    return value if value is not None and low <= value <= high else None


class HolderRecord(Protocol):
    """What `HolderWindows` accumulates: a holder with a hashable identity. Processes
    (`ResolvedHolder`) are one kind; scheduler allocations can be another."""

    @property
    def key(self) -> Hashable: ...

    @property
    def memory_bytes(self) -> int | None: ...

    def window(self, held_s: float, memory_bytes: int | None) -> wire.HolderWindow: ...


@dataclass(frozen=True, slots=True)
class ResolvedHolder:
    """A process on a device at one tick: what the vendor tool said plus who owns it."""

    owner: ProcessOwner
    memory_bytes: int | None = None
    # The vendor tool's name for the process (npu-smi prints one), used where `comm` is unknown.
    name: str | None = None
    source: str = "process"
    # The scheduler allocation this process runs under (same pod UID or Slurm job): its names.
    allocation: Allocation | None = None

    @property
    def pid(self) -> int:
        return self.owner.pid

    @property
    def key(self) -> Hashable:
        return (self.source, self.owner.pid, self.owner.start_time)

    @property
    def command(self) -> str | None:
        return self.owner.command or self.name

    def window(self, held_s: float, memory_bytes: int | None) -> wire.HolderWindow:
        """The wire record, every string cut to the protocol's limits."""
        o = self.owner
        return wire.HolderWindow(
            source=self.source,
            pid=_in(o.pid, 0, 2**31),
            user=_bounded(o.user, wire.MAX_NAME_LEN),
            uid=_in(o.uid, 0, 2**32),
            command=_bounded(self.command, wire.MAX_NAME_LEN),
            runtime=_bounded(o.runtime, wire.MAX_ID_LEN),
            container_id=_bounded(o.container_id, wire.MAX_ID_LEN),
            pod_uid=_bounded(o.pod_uid, wire.MAX_ID_LEN),
            slurm_job_id=_bounded(o.slurm_job_id, wire.MAX_ID_LEN),
            memory_bytes=_in(memory_bytes, 0, 2**53),
            held_s=round(min(max(held_s, 0.0), float(wire.MAX_WINDOW_S)), 3),
            since=_in(o.started_at, 1_000_000_000, 4_102_444_800),
            **_allocation_names(self.allocation),
        )


def _allocation_names(a: Allocation | None) -> dict[str, str | None]:
    if a is None:
        return {}
    return {
        "namespace": _bounded(a.namespace, wire.MAX_NAME_LEN),
        "pod": _bounded(a.pod, wire.MAX_NAME_LEN),
        "container": _bounded(a.container, wire.MAX_NAME_LEN),
        "partition": _bounded(a.partition, wire.MAX_NAME_LEN),
    }


@dataclass(frozen=True, slots=True)
class AllocationHolder:
    """A scheduler's allocation holding a device with no process of its own on it (a pod or job
    given the device, nothing running yet or any more). `send_user` applies `[holders] users`: the
    scheduler names a user, never a uid, so only "name" sends it."""

    allocation: Allocation
    send_user: bool = True

    @property
    def key(self) -> Hashable:
        a = self.allocation
        return (a.source, a.namespace, a.pod, a.container, a.pod_uid, a.job_id)

    @property
    def memory_bytes(self) -> int | None:
        return None

    def window(self, held_s: float, memory_bytes: int | None) -> wire.HolderWindow:
        a = self.allocation
        since = int(a.since) if isinstance(a.since, (int, float)) and a.since == a.since else None
        return wire.HolderWindow(
            source=_bounded(a.source, wire.MAX_ID_LEN) or "allocation",
            user=_bounded(a.user, wire.MAX_NAME_LEN) if self.send_user else None,
            pod_uid=_bounded(a.pod_uid, wire.MAX_ID_LEN),
            slurm_job_id=_bounded(a.job_id, wire.MAX_ID_LEN),
            held_s=round(min(max(held_s, 0.0), float(wire.MAX_WINDOW_S)), 3),
            since=_in(since, 1_000_000_000, 4_102_444_800),
            **_allocation_names(a),
        )


@dataclass(slots=True)
class _Entry:
    start_time: int
    owner: ProcessOwner
    tick: int


class HolderResolver:
    """`resolve_process` with a cache by (pid, start time), applying `HoldersConfig`.

    A warm tick reads one small file (`stat`) per distinct PID to make sure the PID still names the
    same process; a PID reused by a new process (another start time) is resolved again; entries of
    PIDs not seen since the previous `prune()` are dropped. Not thread-safe: one per agent loop.
    """

    def __init__(
        self,
        config: HoldersConfig | None = None,
        proc_root: str = "/proc",
        *,
        user_name: Callable[[int], str] | None = None,
        host_pids: bool | None = None,
    ) -> None:
        self.config = config or HoldersConfig()
        self.proc_root = proc_root
        self._user_name = user_name or _passwd_name
        self._host_pids = host_pid_namespace(proc_root) if host_pids is None else host_pids
        self._btime = boot_time(proc_root)
        self._cache: dict[int, _Entry] = {}
        self._tick = 0
        # This tick's answers, so a PID on several devices is read once.
        self._seen: dict[int, ProcessOwner] = {}

    @property
    def host_pids(self) -> bool:
        return self._host_pids

    def __len__(self) -> int:
        return len(self._cache)

    def owner(self, pid: int) -> ProcessOwner:
        """Who runs `pid` now, from the cache where the PID still names the same process."""
        if (seen := self._seen.get(pid)) is not None:
            return seen
        if not self._host_pids:
            owner = ProcessOwner(pid, reason=REASON_NOT_VISIBLE)
        else:
            try:
                start = _start_time(self.proc_root, pid)
                entry = self._cache.get(pid)
                if entry is None or entry.start_time != start:
                    owner = _owner(pid, self.proc_root, start, self.config, self._user_name, self._btime)
                    entry = self._cache[pid] = _Entry(start, owner, self._tick)
                entry.tick = self._tick
                owner = entry.owner
            except _Gone as gone:
                self._cache.pop(pid, None)
                owner = ProcessOwner(pid, reason=gone.reason)
        self._seen[pid] = owner
        return owner

    def resolve(self, holders: Sequence[Holder] | None) -> list[ResolvedHolder] | None:
        """One device's holders at this tick; None stays None (the probe cannot tell)."""
        if holders is None or not self.config.enabled:
            return None
        out = []
        for h in holders:
            owner = self.owner(h.pid)
            name = h.name if self.config.commands else None
            out.append(ResolvedHolder(owner, h.memory_bytes, name))
        return out

    def prune(self) -> None:
        """End a tick: forget PIDs no device listed since the previous prune."""
        self._cache = {pid: e for pid, e in self._cache.items() if e.tick == self._tick}
        self._tick += 1
        self._seen = {}

    def resolve_devices(
        self, holders: Mapping[str, Sequence[Holder] | None]
    ) -> dict[str, list[ResolvedHolder] | None]:
        """One tick for every device: resolve each device's holders, then `prune()`."""
        try:
            return {device_id: self.resolve(h) for device_id, h in holders.items()}
        finally:
            self.prune()


def resolver_for(probe: Probe, config: HoldersConfig) -> HolderResolver:
    """The resolver for one probe's PIDs: its own `proc_root` where it says one (the mock's
    simulated tree, taken as the namespace of its PIDs, with its uid → name table), else `/proc`."""
    root = getattr(probe, "proc_root", None)
    if not root:
        return HolderResolver(config, "/proc")
    users: Mapping[int, str] = getattr(probe, "users", None) or {}

    def user_name(uid: int) -> str:
        return users.get(uid) or _passwd_name(uid)

    return HolderResolver(config, root, user_name=user_name, host_pids=True)


# ---------------------------------------------------------------------------------------------
# Per-window accumulation


@dataclass(slots=True)
class _Held:
    record: HolderRecord
    held_s: float = 0.0
    memory_bytes: int | None = None
    order: int = 0


@dataclass(slots=True)
class _Device:
    # The holders seen at the last observation (sample-and-hold), None when the probe could not tell.
    current: dict[Hashable, HolderRecord] | None = None
    last_t: float | None = None
    window_start: float | None = None
    known: bool = False
    held: dict[Hashable, _Held] = field(default_factory=dict)


class HolderWindows:
    """Per-device holders of the current window, sample-and-hold like the state seconds.

    `observe(device_id, t, holders)` each tick: each holder seen at `t` holds the device until the
    next observation of that device (or the window's end). `close(device_id or None, end)` ends the
    window and returns, per device, `(records, omitted)`: the `wire.HolderWindow` records, most
    memory first, then longest held, at most `max_holders`, and how many more there were; records is
    None where the probe never could tell in the window. `t` and `end` are the accounting clock
    (the daemon's monotonic time), the same one the classifier is given.
    """

    def __init__(self, max_holders: int = wire.MAX_HOLDERS) -> None:
        if not 0 <= max_holders <= wire.MAX_HOLDERS:
            raise ValueError(f"max_holders must be 0..{wire.MAX_HOLDERS} (the wire protocol's limit)")
        self.max_holders = max_holders
        self._devices: dict[str, _Device] = {}

    def _credit(self, d: _Device, until: float) -> None:
        if d.current is None or d.last_t is None:
            return
        start = d.last_t if d.window_start is None else max(d.last_t, d.window_start)
        span = until - start
        if span <= 0:
            return
        for key in d.current:
            d.held[key].held_s += span

    def observe(self, device_id: str, t: float, holders: Iterable[HolderRecord] | None) -> None:
        d = self._devices.get(device_id)
        if d is None:
            d = self._devices[device_id] = _Device(window_start=t)
        self._credit(d, t)
        if d.last_t is None or t >= d.last_t:
            d.last_t = t
        if holders is None:
            d.current = None
            return
        d.known = True
        current: dict[Hashable, HolderRecord] = {}
        for r in holders:
            key = r.key
            current[key] = r
            h = d.held.get(key)
            if h is None:
                h = d.held[key] = _Held(r, order=len(d.held))
            h.record = r  # the latest sighting names it (a user or pod resolved later)
            if r.memory_bytes is not None and (h.memory_bytes is None or r.memory_bytes > h.memory_bytes):
                h.memory_bytes = r.memory_bytes
        d.current = current

    def forget(self, device_id: str) -> None:
        """Drop a device (gone from its probe): it holds nothing into later windows."""
        self._devices.pop(device_id, None)

    def close(
        self, device_id: str | None, end: float
    ) -> dict[str, tuple[list[wire.HolderWindow] | None, int]]:
        """End the window of one device, or of every device with None."""
        ids = list(self._devices) if device_id is None else [device_id]
        out: dict[str, tuple[list[wire.HolderWindow] | None, int]] = {}
        for did in ids:
            d = self._devices.get(did)
            if d is None:
                out[did] = (None, 0)
                continue
            self._credit(d, end)
            if d.last_t is None or end > d.last_t:
                d.last_t = end
            if not d.known and d.current is None:
                out[did] = (None, 0)
            else:
                ranked = sorted(
                    d.held.values(),
                    key=lambda h: (
                        -(h.memory_bytes if h.memory_bytes is not None else -1),
                        -h.held_s,
                        h.order,
                    ),
                )
                kept = ranked[: self.max_holders]
                out[did] = (
                    [h.record.window(h.held_s, h.memory_bytes) for h in kept],
                    len(ranked) - len(kept),
                )
            # The next window starts holding what was seen last.
            d.window_start = end
            d.known = d.current is not None
            d.held = {
                key: _Held(r, memory_bytes=r.memory_bytes, order=i)
                for i, (key, r) in enumerate((d.current or {}).items())
            }
        return out
