"""The probe contract: what a probe is, and the samples it returns (DESIGN.md, "The probe contract")."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol


class ProbeUnavailable(Exception):
    """Raised by `Probe.setup()` when the hardware, library or binary is absent.

    The message is for people: "libnvidia-ml.so.1 not found", "npu-smi not on PATH".
    """


@dataclass(frozen=True, slots=True)
class Holder:
    """A process the vendor tool sees on a device: its PID (in the host's PID namespace as the
    driver reports it), the device memory it uses when the tool says, and its name when the tool
    prints one (npu-smi does; NVML does not)."""

    pid: int
    memory_bytes: int | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """One device at one instant. Units are in the names; `None` means unknown, never a made-up 0."""

    device_id: str
    vendor: str
    model: str | None = None
    index: int | None = None
    parent_id: str | None = None
    util_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_w: float | None = None
    # The device's cumulative energy counter (joules since the driver loaded: NVML's total-energy
    # counter on Volta and newer), when the vendor keeps one; it may reset (driver reload). None: the
    # agent integrates power over time instead.
    energy_j: float | None = None
    temp_c: float | None = None
    processes: int | None = None
    healthy: bool = True
    error: str | None = None
    # Vendor-specific numbers that travel as fields (e.g. `sm_active_pct`, `xid_errors`).
    extra: Mapping[str, float] = field(default_factory=dict)
    # Static identity for people (e.g. `bus_id`, `serial`); shown by the CLI, never used as a tag.
    info: Mapping[str, str] = field(default_factory=dict)
    # The processes the vendor tool lists on the device; None when the probe cannot tell (never a
    # guessed empty tuple). `processes` is their count where both are known.
    holders: tuple[Holder, ...] | None = None


@dataclass(frozen=True, slots=True)
class HostSample:
    """The host itself (psutil): a host record, not a device."""

    cpu_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    load1: float | None = None
    load5: float | None = None
    load15: float | None = None
    cpu_count: int | None = None


Sample = DeviceSample | HostSample


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """Options every probe has. A probe's own config dataclass subclasses this."""

    # Seconds between two `sample()` calls; `None` takes the probe class's `default_interval_s`.
    interval_s: float | None = None
    # Seconds a `sample()` may take before its devices are reported unavailable.
    timeout_s: float | None = None


class Scheduled:
    """What the agent schedules, probe or allocation source: a configured object whose calls run
    every `interval_s` on a worker thread under `timeout_s`. Boundaries come as keyword arguments."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[ProbeConfig]] = ProbeConfig
    default_interval_s: ClassVar[float] = 1.0
    default_timeout_s: ClassVar[float] = 5.0
    # `auto = False`: runs only when the configuration names it (`enable`).
    auto: ClassVar[bool] = True

    def __init__(self, config: ProbeConfig | None = None, **boundary: Any) -> None:
        self.config = config if config is not None else self.Config()

    @property
    def interval_s(self) -> float:
        return self.config.interval_s or self.default_interval_s

    @property
    def timeout_s(self) -> float:
        return self.config.timeout_s or self.default_timeout_s


class Probe(Scheduled):
    """Base class of every probe. Subclass it, set `name`, `vendor` and `Config`, implement the three methods.

    The agent constructs the probe with its config, calls `setup()` once, then `sample()` every
    `interval_s` on a worker thread (never two at once), and `close()` at shutdown.
    """

    vendor: ClassVar[str] = ""
    # Where the PIDs in this probe's `holders` live: None is the host's `/proc`. The mock probe points
    # it at the simulated /proc tree it writes, so its holders resolve like real ones.
    proc_root: str | None = None
    # Seconds after `setup()` before a sample has every field (a rate needs two readings):
    # `capmon agent probe` waits this long before its one sample.
    warmup_s: ClassVar[float] = 0.0

    def setup(self) -> None:
        """Open the hardware boundary. Raise `ProbeUnavailable` with a human reason when it is absent."""

    def sample(self) -> Sequence[Sample]:
        """Measure every device now. Blocking is allowed: the agent runs this off the event loop."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what `setup()` opened. Must not raise."""


def config_from_mapping(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Build a frozen config dataclass from a TOML table: the one loader of `capmon.agent.configfile`,
    so a probe's options are checked and worded like every other section (raises its `ConfigError`,
    a `ValueError`)."""
    from capmon.agent.configfile import decode

    return decode(cls, values, where)


class CommandRunner(Protocol):
    """Runs a vendor CLI: argv in, (exit code, stdout, stderr) out; raises `subprocess.TimeoutExpired`."""

    def __call__(self, argv: Sequence[str], timeout_s: float) -> tuple[int, str, str]: ...


def run_command(argv: Sequence[str], timeout_s: float) -> tuple[int, str, str]:
    """The real `CommandRunner`: a subprocess killed (with its children) when `timeout_s` passes."""
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        import os
        import signal

        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return proc.returncode, out, err
