"""Simulated accelerators with load profiles, deterministic from a seed and the (injected) clock."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from capmon.agent import DeviceSample, Probe, ProbeConfig

GIB = 1024**3

# model → (memory total bytes, idle power W, max power W, idle memory bytes)
MODELS: dict[str, tuple[int, float, float, int]] = {
    "NVIDIA H100 80GB HBM3": (80 * GIB, 70.0, 700.0, 512 * 1024**2),
    "NVIDIA A100-SXM4-80GB": (80 * GIB, 55.0, 400.0, 512 * 1024**2),
    "910B3": (64 * GIB, 90.0, 350.0, 4 * GIB),
}

PROFILES = ("idle", "training", "inference", "notebook", "flaky", "lost")


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
    # Report process counts (False: processes unknown, like a probe that cannot tell).
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

    def __init__(self, config: MockConfig | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(config)
        self.config: MockConfig
        self.clock = clock
        self._calls = 0

    def setup(self) -> None:
        if self.config.devices < 0:
            raise ValueError("devices must be ≥ 0")
        for spec in self.config.profiles:
            validate_profile(spec)
        for model in self.config.models:
            if model not in MODELS:
                raise ValueError(f"unknown mock model {model!r} (known: {', '.join(MODELS)})")

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
            util, procs, mem = 92 + rng.random() * 7, 1, int(total * 0.85)
        elif profile == "inference":
            bursting = (int(t) + i * 7) % 30 < 10  # 10 s bursts every 30 s, process stays resident
            util = 55 + rng.random() * 40 if bursting else rng.random() * 3
            procs, mem = 1, int(total * 0.45)
        elif profile == "notebook":
            util, procs, mem = (rng.random() * 2 if rng.random() < 0.1 else 0.0), 1, int(total * 0.25)
        else:  # idle, and flaky between its errors
            util, procs, mem = 0.0, 0, idle_mem
        power = idle_w + (max_w - idle_w) * util / 100 + rng.random() * 5
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
            processes=procs if cfg.count_processes else None,
        )


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
