"""Simulated accelerators with load profiles, deterministic from a seed and the (injected) clock."""

from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from capmon.agent import DeviceSample, Probe, ProbeConfig
from capmon.agent.probe import Holder

GIB = 1024**3

# model → (memory total bytes, idle power W, max power W, idle memory bytes)
MODELS: dict[str, tuple[int, float, float, int]] = {
    "NVIDIA H100 80GB HBM3": (80 * GIB, 70.0, 700.0, 512 * 1024**2),
    "NVIDIA A100-SXM4-80GB": (80 * GIB, 55.0, 400.0, 512 * 1024**2),
    "910B3": (64 * GIB, 90.0, 350.0, 4 * GIB),
}

PROFILES = ("idle", "training", "inference", "notebook", "flaky", "lost")
# Profiles whose device is held by processes (1–4 of them); the others have none.
HOLDING_PROFILES = ("training", "inference", "notebook")

# Simulated PIDs start above Linux's PID_MAX_LIMIT (2**22): no real process can ever have one, so a
# mock holder is never mistaken for (or resolved to) a process of the machine running the demo.
FIRST_PID = 2**22 + 1
# Simulated users (uid → name): uids no real account is likely to have.
USERS: dict[int, str] = {
    41001: "alice",
    41002: "bob",
    41003: "chen",
    41004: "dana",
    41005: "emeka",
    41006: "farah",
}
# Who runs what (a holder's owner kind, weighted): the kinds a fleet shows, per profile.
_OWNERS = {
    "training": ("slurm", "slurm", "pod", "docker"),
    "inference": ("pod", "pod", "pod", "docker"),
    "notebook": ("session", "session", "pod"),
}
_COMMANDS = {
    "training": ("pt_main_thread", "python3", "torchrun"),
    "inference": ("tritonserver", "python3", "vllm"),
    "notebook": ("python3", "ipykernel"),
}
_CLOCK_TICKS = 100  # USER_HZ: the unit of /proc/<pid>/stat's start time
_BOOTED_S = 7 * 86400  # the simulated host booted this long before setup()


@dataclass(frozen=True, slots=True)
class SimulatedProcess:
    """One process holding a simulated device, and what its /proc entry says about its owner."""

    pid: int
    command: str
    uid: int
    cgroup: str
    started_s_before_setup: float
    # Its share of the device memory the job uses.
    memory_share: float


class SimulatedFault(RuntimeError):
    """What the mock raises when asked to fail (`raise_every`)."""


@dataclass(frozen=True, slots=True)
class MockConfig(ProbeConfig):
    # Number of simulated devices on this host.
    devices: int = 8
    # Load profile per device, cycled over the devices: idle, training (steady ~95%), inference
    # (bursty; holds its memory between bursts), notebook (holds memory at ~0%), flaky (errors now
    # and then), lost (unreadable). A phase list "idle:600,training:300" runs each for that many seconds, in a loop.
    profiles: tuple[str, ...] = (
        "training",
        "training",
        "inference",
        "notebook",
        "idle",
        "idle",
        "idle",
        "flaky",
    )
    # Model name (see MODELS), cycled over the devices.
    models: tuple[str, ...] = ("NVIDIA H100 80GB HBM3",)
    # Seed of the simulation: the same seed and clock give the same samples.
    seed: int = 0
    # Host number in a simulated fleet; part of the device ids so hosts differ.
    host_index: int = 0
    # Every Nth sample() raises (0 = never): for testing the agent's containment.
    raise_every: int = 0
    # Seconds every sample() sleeps (0 = none): for testing timeouts.
    hang_s: float = 0.0
    # Report process counts and holders (False: both unknown, like a probe that cannot tell).
    count_processes: bool = True


def _rng(*parts: object) -> random.Random:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def profile_at(spec: str, t: float) -> str:
    """The profile a device runs at time `t` under `spec` ("training" or "idle:600,training:300")."""
    if ":" not in spec:
        return spec
    phases = [(name, float(secs)) for name, secs in (p.split(":") for p in spec.split(","))]
    cycle = sum(secs for _, secs in phases)
    pos = t % cycle
    for name, secs in phases:
        if pos < secs:
            return name
        pos -= secs
    return phases[-1][0]


def validate_profile(spec: str) -> None:
    for part in spec.split(","):
        name, _, secs = part.partition(":")
        if name not in PROFILES:
            raise ValueError(f"unknown mock profile {name!r} (known: {', '.join(PROFILES)})")
        if secs and float(secs) <= 0:
            raise ValueError(f"mock profile phase {part!r} needs a positive number of seconds")


class MockProbe(Probe):
    name = "mock"
    vendor = "mock"
    Config = MockConfig
    auto = False
    # Simulated uid → user name, for a resolver that cannot find these uids in the host's passwd.
    users: ClassVar[Mapping[int, str]] = USERS

    def __init__(self, config: MockConfig | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(config)
        self.config: MockConfig
        self.clock = clock
        self._calls = 0
        self._plans: dict[tuple[int, str], tuple[SimulatedProcess, ...]] = {}
        # The simulated /proc tree written by setup(): the agent's owner resolver reads it as it
        # reads the real /proc. None before setup(), after close(), or when nothing holds a device.
        self.proc_root: str | None = None
        self._remove_tree: weakref.finalize | None = None

    def setup(self) -> None:
        if self.config.devices < 0:
            raise ValueError("devices must be ≥ 0")
        for spec in self.config.profiles:
            validate_profile(spec)
        for model in self.config.models:
            if model not in MODELS:
                raise ValueError(f"unknown mock model {model!r} (known: {', '.join(MODELS)})")
        if self.proc_root is None:
            self._write_proc_tree()

    def close(self) -> None:
        self.proc_root = None
        if self._remove_tree is not None:
            self._remove_tree()

    def processes(self, device_index: int, profile: str) -> tuple[SimulatedProcess, ...]:
        """The processes holding device `device_index` while it runs `profile`: a function of the seed."""
        key = (device_index, profile)
        if key not in self._plans:
            self._plans[key] = _plan(self.config, device_index, profile)
        return self._plans[key]

    def _write_proc_tree(self) -> None:
        """A /proc entry (status, comm, stat, cgroup) for every process any device's profiles can run."""
        cfg = self.config
        plans = (
            [
                self.processes(i, profile)
                for i in range(cfg.devices)
                for profile in _profiles_of(cfg.profiles[i % len(cfg.profiles)])
            ]
            if cfg.count_processes and cfg.profiles
            else []
        )
        if not any(plans):
            return
        root = Path(tempfile.mkdtemp(prefix="capmon-mock-proc-"))
        now = self.clock()
        boot = int(now) - _BOOTED_S
        (root / "stat").write_text(f"btime {boot}\n")
        for plan in plans:
            for p in plan:
                started = max(0.0, now - p.started_s_before_setup - boot)
                _write_process(root / str(p.pid), p, int(started * _CLOCK_TICKS))
        self.proc_root = str(root)
        # Removed by close(), or when the probe is collected if nobody closes it (a test, a demo).
        self._remove_tree = weakref.finalize(self, shutil.rmtree, str(root), True)

    def device_ids(self) -> list[str]:
        return [f"MOCK-{self.config.host_index:03d}-{i:02d}" for i in range(self.config.devices)]

    def sample(self) -> Sequence[DeviceSample]:
        self._calls += 1
        if self.config.hang_s:
            time.sleep(self.config.hang_s)
        if self.config.raise_every and self._calls % self.config.raise_every == 0:
            raise SimulatedFault(f"simulated failure on call {self._calls}")
        t = self.clock()
        cfg = self.config
        return [
            self._device(i, profile_at(cfg.profiles[i % len(cfg.profiles)], t), t) for i in range(cfg.devices)
        ]

    def _device(self, i: int, profile: str, t: float) -> DeviceSample:
        cfg = self.config
        model = cfg.models[i % len(cfg.models)]
        total, idle_w, max_w, idle_mem = MODELS[model]
        rng = _rng(cfg.seed, cfg.host_index, i, int(t))
        device_id = f"MOCK-{cfg.host_index:03d}-{i:02d}"
        if profile == "lost" or (profile == "flaky" and rng.random() < 0.2):
            error = "GPU is lost (simulated)" if profile == "lost" else "simulated XID 79: fallen off the bus"
            return DeviceSample(
                device_id, "mock", model, i, healthy=False, error=error, memory_total_bytes=total
            )
        if profile == "training":
            util, mem = 92 + rng.random() * 7, int(total * 0.85)
        elif profile == "inference":
            bursting = (int(t) + i * 7) % 30 < 10  # 10 s bursts every 30 s, process stays resident
            util = 55 + rng.random() * 40 if bursting else rng.random() * 3
            mem = int(total * 0.45)
        elif profile == "notebook":
            util, mem = (rng.random() * 2 if rng.random() < 0.1 else 0.0), int(total * 0.25)
        else:  # idle, and flaky between its errors
            util, mem = 0.0, idle_mem
        power = idle_w + (max_w - idle_w) * util / 100 + rng.random() * 5
        holders = None
        if cfg.count_processes:
            # The job's processes share what it holds beyond the driver's idle memory.
            held = mem - idle_mem
            holders = tuple(
                Holder(p.pid, int(held * p.memory_share), p.command) for p in self.processes(i, profile)
            )
        return DeviceSample(
            device_id=device_id,
            vendor="mock",
            model=model,
            index=i,
            util_pct=round(util, 2),
            memory_used_bytes=mem,
            memory_total_bytes=total,
            power_w=round(power, 1),
            temp_c=round(32 + util * 0.4 + rng.random(), 1),
            processes=len(holders) if holders is not None else None,
            holders=holders,
        )


def _profiles_of(spec: str) -> list[str]:
    """The profiles a spec runs ("training", or each phase of "idle:600,training:300")."""
    return [part.partition(":")[0] for part in spec.split(",")]


def _plan(cfg: MockConfig, i: int, profile: str) -> tuple[SimulatedProcess, ...]:
    """1–4 processes of one job (one owner: a Slurm job, a pod, a container or a login session)."""
    if profile not in HOLDING_PROFILES:
        return ()
    rng = _rng(cfg.seed, cfg.host_index, i, profile, "holders")
    count = rng.choice((1, 1, 2, 3, 4))
    uid = rng.choice(sorted(USERS))
    owner = rng.choice(_OWNERS[profile])
    command = rng.choice(_COMMANDS[profile])
    started = rng.uniform(600, 36 * 3600)
    # PIDs unique per (host, device, profile) within a fleet, and above any real PID.
    base = FIRST_PID + ((cfg.host_index * 64 + i) * len(PROFILES) + PROFILES.index(profile)) * 8
    weights = [rng.uniform(1, 4) for _ in range(count)]
    weights[0] *= 3  # the main process holds most of the memory, its workers the rest
    shares = [w / sum(weights) for w in weights]
    if owner == "pod":
        pod = uuid.UUID(int=rng.getrandbits(128), version=4)
        qos = rng.choice(("burstable", "besteffort", ""))  # "": a guaranteed pod has no QoS slice
        slice_ = f"kubepods-{qos}-pod" if qos else "kubepods-pod"
        parent = f"/kubepods.slice/kubepods-{qos}.slice" if qos else "/kubepods.slice"
        container = f"{rng.getrandbits(256):064x}"
        cgroups = [
            f"{parent}/{slice_}{str(pod).replace('-', '_')}.slice/cri-containerd-{container}.scope"
        ] * count
    elif owner == "docker":
        cgroups = [f"/system.slice/docker-{rng.getrandbits(256):064x}.scope"] * count
    elif owner == "slurm":
        job = 100_000 + rng.randrange(900_000)
        cgroups = [f"/system.slice/slurmstepd.scope/job_{job}/step_0/user/task_{k}" for k in range(count)]
    else:  # a login session (a notebook someone started by hand)
        cgroups = [f"/user.slice/user-{uid}.slice/session-{rng.randrange(1, 400)}.scope"] * count
    return tuple(
        SimulatedProcess(base + k, command, uid, "0::" + cgroups[k], started - k, shares[k])
        for k in range(count)
    )


def _write_process(entry: Path, p: SimulatedProcess, start_ticks: int) -> None:
    """The four files the owner resolver reads, in the kernel's formats (never cmdline or environ)."""
    entry.mkdir()
    (entry / "comm").write_text(p.command + "\n")
    (entry / "cgroup").write_text(p.cgroup + "\n")
    ids = f"{p.uid}\t{p.uid}\t{p.uid}\t{p.uid}"
    (entry / "status").write_text(
        f"Name:\t{p.command}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{p.pid}\nNgid:\t0\n"
        f"Pid:\t{p.pid}\nPPid:\t1\nTracerPid:\t0\nUid:\t{ids}\nGid:\t{ids}\nNSpid:\t{p.pid}\n"
    )
    # Fields 3..52 of /proc/<pid>/stat (state, ppid, pgrp, session, tty, tpgid, flags, 8 fault and
    # time counters, priority, nice, threads, itrealvalue); field 22 is the start time in clock ticks
    # since boot, which tells a reused PID apart.
    fields = ["S", "1", str(p.pid), str(p.pid), "0", "-1", "4194560", *["0"] * 8, "20", "0", "4", "0"]
    fields += [str(start_ticks)] + ["0"] * 30
    (entry / "stat").write_text(f"{p.pid} ({p.command}) {' '.join(fields)}\n")


@dataclass(frozen=True, slots=True)
class SimulatedHost:
    """One host of a simulated fleet: its name, labels and mock configuration."""

    host: str
    labels: dict[str, str]
    config: MockConfig


def mock_fleet(hosts: int = 4, devices: int = 8, seed: int = 0) -> list[SimulatedHost]:
    """A mixed fleet for demos and tests: sites, clusters, pools and models vary by host."""
    sites = ("ams1", "fra2")
    pools = ("training", "inference", "research")
    fleet = []
    for h in range(hosts):
        rng = _rng(seed, "fleet", h)
        pool = pools[h % len(pools)]
        if pool == "training":
            profiles = ("training",) * (devices - 2) + ("idle", "notebook")
        elif pool == "inference":
            profiles = ("inference", "inference", "idle", "idle", "notebook", "training", "idle", "flaky")
        else:
            profiles = ("notebook", "notebook", "idle", "idle", "idle", "training", "notebook", "idle")
        if h == hosts - 1 and hosts > 2:
            profiles = ("lost", *profiles[1:])
        models = (
            ("910B3",)
            if h % 4 == 3
            else ("NVIDIA H100 80GB HBM3",)
            if h % 2 == 0
            else ("NVIDIA A100-SXM4-80GB",)
        )
        config = MockConfig(
            devices=devices,
            profiles=tuple(profiles[i % len(profiles)] for i in range(devices)),
            models=models,
            seed=rng.randrange(2**31),
            host_index=h,
        )
        labels = {"site": sites[h % len(sites)], "cluster": f"c{h // 4 + 1}", "pool": pool}
        fleet.append(SimulatedHost(f"sim-{h:03d}", labels, config))
    return fleet
