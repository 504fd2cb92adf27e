"""The idle classifier: every device, every tick, in exactly one state; folded into report windows.

States (DESIGN.md): `busy` (utilisation at or above the threshold), `allocated_idle` (below it, but a
process, memory beyond the idle baseline, or a scheduler allocation holds the device), `free` (below
it and nothing holds it), `unavailable` (unreadable, unhealthy, its parent GPU unhealthy, no longer
listed by its probe, or nothing visibly holding it while an allocation source that covers it cannot
answer: "allocation unknown" is never offered as free).
Time is passed in, never read, so traces replay in microseconds.

Accounting is sample-and-hold: a state observed at `t` holds until the next observation or the end
of the window, so a device seen for a whole window has state seconds that add up to the window.
Durations come from the accounting clock: the monotonic time the daemon passes (`mono`) where it
does, else the wall time; wall time only names windows, `idle_since` and `state_since`.

Energy is held the same way, by the same interval: the time between two observations is credited
with the device's energy counter's delta (`DeviceSample.energy_j`, NVML's total-energy counter)
when both observations read the counter, it did not go back (a driver reload resets it) and the
rate it implies is a power the wire allows; otherwise (and for the tail up to a window's end, whose
counter reading is not known yet) with the last power held over the time, the last sample's
`power_w`, else the counter's last rate. An interval that a window's end split takes the part of
the counter's delta its remaining time is of the whole. Energy held while `allocated_idle` or
`free` is idle energy. A device whose probe stops listing it gets no energy: nothing is invented.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import get_args

from capmon.agent.probe import DeviceSample, Holder
from capmon.agent.wire import IDLE_STATES, STATES, DeviceWindow, Watts

MIB = 1024 * 1024
GIB = 1024 * MIB

# What the NVML probe passes for a MIG instance: its share of the physical GPU (0 < f <= 1).
FRACTION_KEY = "gpu_fraction"
SM_ACTIVE_KEY = "sm_active_pct"
VANISHED = "no longer reported by its probe"
# The highest power the wire protocol accepts: a counter delta implying more is a broken counter.
MAX_POWER_W: float = float(get_args(Watts)[1].le)


@dataclass(frozen=True, slots=True)
class ClassifierConfig:
    """Thresholds of the idle classifier (`[classifier]` in the agent's TOML)."""

    # Utilisation (%) at or above which a device counts as busy. Monitoring and health-check
    # kernels stay well below 10%. Where the probe reports SM activity (`sm_active_pct`, GPM on
    # Hopper and newer) that decides instead of the coarser "a kernel was resident" utilisation.
    busy_util_pct: float = 10.0
    # The grace works in both directions, each over a sliding period (not an unbroken run, so
    # repeated short idleness inside busy work never adds up to an idle streak):
    # - a running idle streak (`idle_since`) ends when the device was busy or unavailable for more
    #   than `busy_grace_pct` % of the last `busy_grace_s` seconds (30 of 120 s): a 3 s health check
    #   every few minutes, or one blip of up to 30 s, keeps the streak; work with idle gaps (bursty
    #   inference, 10 s of every 30) ends it;
    # - an idle streak starts only once the device was idle for at least `idle_grace_pct` % of the
    #   last `idle_grace_s` seconds (time before the agent first saw it does not count against it),
    #   and then dates back to the first idle moment of that period: a 5 s data-loader stall per
    #   minute, or 10 s between 50 s requests, never starts one.
    # `state_since` (time in the current state) follows the same rule: a run of a state survives
    # other states for up to `busy_grace_pct` % of the last `busy_grace_s` (a 1 s blip does not reset
    # "allocated_idle since"), and a new state's run starts at its first tick. A streak or run
    # restored after an agent restart is subject to the same rule as a live one.
    busy_grace_s: float = 120.0
    busy_grace_pct: float = 25.0
    idle_grace_s: float = 30.0
    idle_grace_pct: float = 90.0
    # Busy but doing nothing (an NCCL hang, a spin-wait): GPU utilisation at or above
    # `spin_util_pct` while SM activity is below `spin_sm_pct`. Counted busy (a hung job is not
    # capacity to offer) and flagged: `spin_s`, part of `busy_s` like `ghost_s`.
    spin_util_pct: float = 90.0
    spin_sm_pct: float = 5.0
    # A device its probe stops listing is `unavailable` ("no longer reported") until it is known to
    # be gone: a MIG instance whose parent GPU is listed with other instances (the layout changed)
    # is forgotten at once; anything else after this many seconds unseen. An agent cannot tell a GPU
    # that fell off the bus (the operator must see it) from one pulled on purpose; an hour covers a
    # driver reload or a GPU reset without keeping a removed card on the dashboards for ever.
    forget_vanished_s: float = 3600.0
    # Memory above the device's idle baseline by more than the margin means something holds it,
    # even when the process table is empty (npu-smi in containers, processes in another PID
    # namespace): "memory held, no process visible". Margin = max(MiB, % of total).
    memory_margin_mib: float = 512.0
    memory_margin_pct: float = 2.0
    # The idle baseline, first that applies: (1) `memory_baseline_mib` by model or vendor, set by
    # the operator; (2) the learned one; (3) the default, `memory_idle_mib` by model, then by vendor
    # and memory size as "<vendor>@<GiB>", then `memory_baseline_pct` by model or vendor; else 0.
    # Learning: the lowest memory of a sample with no process counted (processes = 0), or, where
    # the probe cannot count processes, the lowest seen at 0 % utilisation once the device spent
    # `learn_quiet_s` seconds there; a sample more than the margin above the default (or the
    # operator's baseline) never teaches, so a job holding memory is not its own baseline.
    memory_baseline_mib: Mapping[str, float] = field(default_factory=dict)
    # Ascend holds HBM with no workload: about 3 GB of 32, 4 of 64, 4.8 of 96 (910B parts;
    # recorded fixtures: 910B3 3.4 of 64 GB, 910B4 2.8 of 32). 910A/910ProB idle near 0: learned.
    memory_idle_mib: Mapping[str, float] = field(
        default_factory=lambda: {
            "ascend@32": 3072.0,
            "ascend@64": 4096.0,
            "ascend@96": 4915.0,
            # By model too, so a part is known whoever reports it (the mock simulates 910B3s under
            # vendor "mock"); the same figure as its size class.
            "910B3": 4096.0,
        }
    )
    memory_baseline_pct: Mapping[str, float] = field(default_factory=lambda: {"ascend": 8.0})
    learn_quiet_s: float = 600.0

    def __post_init__(self) -> None:
        for name in (
            "busy_util_pct",
            "busy_grace_s",
            "busy_grace_pct",
            "idle_grace_s",
            "idle_grace_pct",
            "spin_util_pct",
            "spin_sm_pct",
            "forget_vanished_s",
            "memory_margin_mib",
            "memory_margin_pct",
            "learn_quiet_s",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if value < 0 or (name.endswith("_pct") and value > 100):
                raise ValueError(f"{name} must be between 0 and {100 if name.endswith('_pct') else 'inf'}")


@dataclass(frozen=True, slots=True)
class Observation:
    """A device's instant state as the classifier decided it, with why (for `capmon agent probe`)."""

    state: str
    ghost: bool = False
    util_unknown: bool = False
    reason: str | None = None
    spin: bool = False


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device as the agent sees it now (`IdleClassifier.snapshot()`): what the exporter serves.

    Times are wall seconds; `state_seconds` and `energy_joules` count since the agent started
    (monotonic: they only grow while the device is tracked). Readings are the last sample's; None
    when unknown or when the device vanished.
    """

    device_id: str
    vendor: str
    model: str | None
    parent_id: str | None
    state: str
    state_seconds: Mapping[str, float]
    energy_joules: float | None
    idle_since: float | None
    state_since: float | None
    fraction: float
    util_pct: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    power_w: float | None
    temp_c: float | None
    processes: int | None
    holders: tuple[Holder, ...] | None
    reason: str | None


class _DeviceTrack:
    """Everything the classifier remembers about one device between ticks and within a window.

    Times are on the accounting clock (see the module docstring).
    """

    __slots__ = (
        "allocated_idle_s",
        "baseline_bytes",
        "busy_s",
        "counter_j",
        "counter_t",
        "counter_w",
        "energy_j",
        "free_s",
        "ghost",
        "ghost_s",
        "history",
        "idle_since",
        "last_sample",
        "last_state",
        "last_t",
        "power_n",
        "power_sum",
        "processes_max",
        "quiet",
        "quiet_low",
        "quiet_s",
        "reason",
        "runs",
        "seen_in_window",
        "seen_t",
        "spin",
        "spin_s",
        "temp_max",
        "totals",
        "unavailable_s",
        "util_max",
        "util_n",
        "util_sum",
        "vanished",
        "window_energy_j",
        "window_idle_energy_j",
    )

    def __init__(self) -> None:
        self.baseline_bytes: int | None = None
        self.quiet = False
        self.quiet_s = 0.0
        self.quiet_low: int | None = None
        self.idle_since: float | None = None
        # Start of the current run of each state still alive under the grace rule.
        self.runs: dict[str, float] = {}
        # (start, end, state) of the recent past, for the grace rules' sliding periods.
        self.history: deque[list] = deque()
        self.last_state: str | None = None
        self.reason: str | None = None
        self.ghost = self.spin = self.vanished = False
        self.last_t: float | None = None
        self.seen_t: float | None = None
        self.last_sample: DeviceSample | None = None
        # Since the agent started (never reset at a window's end): seconds per state, and energy
        # (last power held like a state), for the exporter's counters.
        self.totals: dict[str, float] = dict.fromkeys(STATES, 0.0)
        self.energy_j: float | None = None
        # The energy counter as of the last observation (None: that observation had none), when it
        # was read (accounting clock), and the power its last delta measured.
        self.counter_j: float | None = None
        self.counter_t: float | None = None
        self.counter_w: float | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self.busy_s = self.allocated_idle_s = self.free_s = self.unavailable_s = 0.0
        self.ghost_s = self.spin_s = 0.0
        self.util_sum = 0.0
        self.util_n = 0
        self.util_max: float | None = None
        self.power_sum = 0.0
        self.power_n = 0
        self.temp_max: float | None = None
        self.processes_max: int | None = None
        self.seen_in_window = False
        self.window_energy_j: float | None = None
        self.window_idle_energy_j = 0.0

    def held_power(self) -> float | None:
        """The power held since the last observation: its `power_w`, else the counter's last rate."""
        if self.vanished or self.last_sample is None:
            return None
        power = self.last_sample.power_w
        return power if power is not None else self.counter_w

    def counter_energy(self, sample: DeviceSample, a: float) -> float | None:
        """The energy counter's share of the time since the last observation, when it can be trusted.

        Remembers this sample's reading for the next one. None (so power x time) when either
        observation has no reading, the counter went back (reset), or the rate it implies is impossible.
        """
        reading, before, since = sample.energy_j, self.counter_j, self.counter_t
        self.counter_j, self.counter_t = (reading, a) if reading is not None else (None, None)
        if reading is None or before is None or since is None or self.last_t is None:
            return None
        span = a - since
        delta = reading - before
        if span <= 0 or delta < 0 or delta > MAX_POWER_W * span:
            return None
        self.counter_w = delta / span
        return delta * max(0.0, a - self.last_t) / span

    def hold(self, until: float, keep_s: float, energy_j: float | None = None) -> None:
        """Credit the time since the last observation to the state observed then, with its energy:
        `energy_j` where the counter measured it, else the held power over the time."""
        if self.last_state is None or self.last_t is None or until <= self.last_t:
            return
        dt = until - self.last_t
        if self.last_state == "busy":
            self.busy_s += dt
            if self.ghost:
                self.ghost_s += dt
            if self.spin:
                self.spin_s += dt
        elif self.last_state == "allocated_idle":
            self.allocated_idle_s += dt
        elif self.last_state == "free":
            self.free_s += dt
        else:
            self.unavailable_s += dt
        self.totals[self.last_state] += dt
        if energy_j is None:
            power = self.held_power()
            energy_j = None if power is None else power * dt
        if energy_j is not None:
            self.energy_j = (self.energy_j or 0.0) + energy_j
            self.window_energy_j = (self.window_energy_j or 0.0) + energy_j
            if self.last_state in IDLE_STATES:
                self.window_idle_energy_j += energy_j
        if self.quiet:
            self.quiet_s += dt
        h = self.history
        if h and h[-1][2] == self.last_state and h[-1][1] == self.last_t:
            h[-1][1] = until
        else:
            h.append([self.last_t, until, self.last_state])
        while len(h) > 1 and h[0][1] < until - keep_s:
            h.popleft()
        self.last_t = until

    def seconds(self, now: float, period: float, states: Iterable[str], inside: bool = True) -> float:
        """Seconds of the last `period` spent in (or, `inside=False`, outside) `states`."""
        states = frozenset(states)
        lo = now - period
        total = 0.0
        for a, b, s in self.history:
            if (s in states) == inside and b > lo:
                total += min(b, now) - max(a, lo)
        return max(0.0, total)


class IdleClassifier:
    """Classifies device samples and folds them into `DeviceWindow`s."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        self.config = config or ClassifierConfig()
        self._tracks: dict[str, _DeviceTrack] = {}
        self._restored: dict[str, tuple[float | None, int | None, str | None, float | None]] = {}
        # Devices each probe listed last time: what it stops listing has vanished.
        self._listed: dict[str, set[str]] = {}
        # Wall time minus accounting time, as of the last call.
        self._offset = 0.0

    # -- one tick ---------------------------------------------------------------------------

    def classify(
        self,
        sample: DeviceSample,
        baseline_bytes: int | None = None,
        *,
        allocated_to: str | None = None,
        allocation_unknown: str | None = None,
    ) -> Observation:
        """The state of one sample, with no history (history only affects the idle streak).

        `allocated_to` names the scheduler holder a source says has the device ("pod ns/name",
        "job 42"): below the threshold it is `allocated_idle` even with no process. `allocation_unknown`
        ("<source>: <why>") says a source that covers the device cannot answer now: then a device
        nothing visibly holds is `unavailable`, never `free` (it may be allocated).
        """
        cfg = self.config
        if not sample.healthy:
            return Observation("unavailable", reason=sample.error or "unhealthy")
        held, why = self._held(sample, baseline_bytes)
        if not held and allocated_to is not None:
            held, why = True, f"allocated to {allocated_to}, no process"
        util = sample.util_pct
        sm = sample.extra.get(SM_ACTIVE_KEY)
        if util is None and sm is None:
            # Unknown is not busy: GPM has no previous sample on the first tick, A100 MIG has no
            # utilisation at all; a held device is reserved whatever it does.
            if held:
                return Observation("allocated_idle", util_unknown=True, reason=f"utilisation unknown, {why}")
            if allocation_unknown is not None:
                return Observation(
                    "unavailable", util_unknown=True, reason=f"allocation unknown: {allocation_unknown}"
                )
            return Observation("free", util_unknown=True, reason="utilisation unknown, nothing holds it")
        ghost = sample.processes == 0
        if util is not None and sm is not None and util >= cfg.spin_util_pct and sm < cfg.spin_sm_pct:
            return Observation(
                "busy",
                ghost=ghost,
                spin=True,
                reason=f"spinning: utilisation {util:.0f}% with SM activity {sm:.1f}%",
            )
        active = sm if sm is not None else util
        assert active is not None
        if active >= cfg.busy_util_pct:
            return Observation("busy", ghost=ghost, reason="busy with no process (ghost)" if ghost else None)
        if held:
            return Observation("allocated_idle", reason=why)
        if allocation_unknown is not None:
            return Observation("unavailable", reason=f"allocation unknown: {allocation_unknown}")
        return Observation("free")

    def _held(self, sample: DeviceSample, baseline_bytes: int | None) -> tuple[bool, str]:
        procs = sample.processes
        if procs is not None and procs > 0:
            return True, f"{procs} process(es)"
        used = sample.memory_used_bytes
        if used is None:
            return False, "no process" if procs == 0 else "processes and memory unknown"
        base = self._baseline_override(sample)
        if base is None:
            # Never the memory in use now: a job holding 40 of 64 GB from the first sample on
            # would become its own baseline and the device would look free.
            base = baseline_bytes if baseline_bytes is not None else self._default_baseline(sample)
        above = used - base
        if above > self._margin(sample):
            if procs == 0:
                return True, f"memory held, no process visible ({above / MIB:.0f} MiB above baseline)"
            return True, f"{above / MIB:.0f} MiB in use above baseline"
        return False, "memory at baseline"

    def _margin(self, sample: DeviceSample) -> float:
        total = sample.memory_total_bytes or 0
        return max(self.config.memory_margin_mib * MIB, total * self.config.memory_margin_pct / 100)

    def _default_baseline(self, sample: DeviceSample) -> int:
        total = sample.memory_total_bytes or 0
        idle = self.config.memory_idle_mib
        size = f"{sample.vendor}@{round(total / GIB)}" if total else None
        for key in (sample.model, size, sample.vendor):
            if key is not None and key in idle:
                return int(idle[key] * MIB)
        table = self.config.memory_baseline_pct
        for key in (sample.model, sample.vendor):
            if key is not None and key in table:
                return int(total * table[key] / 100)
        return 0

    def _baseline_override(self, sample: DeviceSample) -> int | None:
        table = self.config.memory_baseline_mib
        for key in (sample.model, sample.vendor):
            if key is not None and key in table:
                return int(table[key] * MIB)
        return None

    def observe_probe(
        self,
        probe: str,
        t: float,
        devices: Iterable[DeviceSample],
        mono: float | None = None,
        *,
        allocated_to: Mapping[str, str] | None = None,
        allocation_unknown: Mapping[str, str] | None = None,
    ) -> None:
        """Record everything one probe listed at `t`: the unit in which devices appear and vanish.

        A GPU split into MIG instances is capacity only through its instances: it is counted once,
        and its instances inherit its health. A device listed last time and not now is unavailable
        until it is known to be gone (see `ClassifierConfig.forget_vanished_s`). `allocated_to` and
        `allocation_unknown` map device ids to what `classify` takes of the allocation sources.
        """
        a = self._clock(t, mono)
        devices = list(devices)
        by_id = {d.device_id: d for d in devices}
        counted = self.counted(devices)
        listed = {d.device_id for d in counted}
        for device_id in self._listed.get(probe, set()) - listed:
            track = self._tracks.get(device_id)
            if track is None:
                continue
            parent_id = track.last_sample.parent_id if track.last_sample else None
            if device_id in by_id or (parent_id is not None and parent_id in by_id):
                # Known to be gone: the GPU is now split (it is a parent), or its parent is listed
                # with another set of instances (MIG reconfigured, or GPU lost): not capacity.
                del self._tracks[device_id]
            else:
                self._vanish(track, a)
        self._listed[probe] = listed
        allocated_to = allocated_to or {}
        allocation_unknown = allocation_unknown or {}
        for d in counted:
            self._observe(
                a,
                t,
                d,
                allocated_to=allocated_to.get(d.device_id),
                allocation_unknown=allocation_unknown.get(d.device_id),
            )

    @staticmethod
    def counted(devices: Iterable[DeviceSample]) -> list[DeviceSample]:
        """The devices of one probe's listing that are capacity: a GPU split into MIG instances
        counts only through its instances, and they inherit its health. `capmon agent probe`
        classifies these, so it says what the agent reports."""
        devices = list(devices)
        by_id = {d.device_id: d for d in devices}
        parents = {d.parent_id for d in devices if d.parent_id}
        counted: list[DeviceSample] = []
        for d in devices:
            if d.device_id in parents:
                continue
            parent = by_id.get(d.parent_id) if d.parent_id else None
            if parent is not None and not parent.healthy and d.healthy:
                # A MIG instance of a GPU that needs a reset (row remap pending, fatal XID) runs nothing.
                error = f"parent GPU {parent.device_id} unhealthy: {parent.error or 'unhealthy'}"
                d = dataclasses.replace(d, healthy=False, error=error)
            counted.append(d)
        return counted

    def observe(self, t: float, sample: DeviceSample, mono: float | None = None) -> Observation:
        """Record one sample taken at `t` (wall seconds; `mono` on the accounting clock); its instant state."""
        return self._observe(self._clock(t, mono), t, sample)

    def _clock(self, t: float, mono: float | None) -> float:
        a = t if mono is None else mono
        self._offset = t - a
        return a

    def _keep_s(self) -> float:
        return max(self.config.busy_grace_s, self.config.idle_grace_s)

    def _track(self, device_id: str, wall: float) -> _DeviceTrack:
        track = self._tracks.get(device_id)
        if track is not None:
            return track
        track = self._tracks[device_id] = _DeviceTrack()
        saved = self._restored.pop(device_id, None)
        if saved is not None:
            idle_since, track.baseline_bytes, state, state_since = saved
            # The streak and the state's run that were running go on, subject to the same grace
            # as live ones: a first tick that is unreadable or briefly busy does not end them.
            if idle_since is not None and idle_since <= wall:
                track.idle_since = idle_since - self._offset
            if state is not None and state_since is not None and state_since <= wall:
                track.runs[state] = state_since - self._offset
        return track

    def _observe(
        self,
        a: float,
        wall: float,
        sample: DeviceSample,
        *,
        allocated_to: str | None = None,
        allocation_unknown: str | None = None,
    ) -> Observation:
        track = self._track(sample.device_id, wall)
        # A result that arrives after a later one (a slow probe; a window already closed past it)
        # must not move the track's clock back: that time would be credited twice.
        if track.last_t is not None and a < track.last_t:
            a = track.last_t
        track.hold(a, self._keep_s(), track.counter_energy(sample, a))
        obs = self.classify(
            sample, track.baseline_bytes, allocated_to=allocated_to, allocation_unknown=allocation_unknown
        )
        self._learn(track, sample, obs)
        self._advance(track, a, obs.state)
        track.last_state = obs.state
        track.reason = obs.reason
        track.ghost = obs.ghost
        track.spin = obs.spin
        track.vanished = False
        track.last_t = track.seen_t = a
        track.seen_in_window = True
        track.last_sample = sample
        util = sample.util_pct
        if util is not None:
            track.util_sum += util
            track.util_n += 1
            track.util_max = util if track.util_max is None else max(track.util_max, util)
        if sample.power_w is not None:
            track.power_sum += sample.power_w
            track.power_n += 1
        if sample.temp_c is not None:
            track.temp_max = sample.temp_c if track.temp_max is None else max(track.temp_max, sample.temp_c)
        if sample.processes is not None:
            track.processes_max = max(track.processes_max or 0, sample.processes)
        return obs

    def _learn(self, track: _DeviceTrack, sample: DeviceSample, obs: Observation) -> None:
        """Lower the learned baseline from a sample that shows the device with nothing on it."""
        track.quiet = False
        used = sample.memory_used_bytes
        if not sample.healthy or used is None or obs.state not in ("free", "allocated_idle"):
            return
        ceiling = self._baseline_override(sample)
        if ceiling is None:
            ceiling = self._default_baseline(sample)
        if used > ceiling + self._margin(sample):
            return  # held memory never teaches
        if sample.processes == 0:
            candidate: int | None = used
        elif sample.processes is None and sample.util_pct == 0:
            # No process table (Ascend in containers, 310 SoCs): the lowest memory seen while the
            # device sat at 0 %, once it sat there long enough to have been idle at some point.
            track.quiet = True
            track.quiet_low = used if track.quiet_low is None else min(track.quiet_low, used)
            candidate = track.quiet_low if track.quiet_s >= self.config.learn_quiet_s else None
        else:
            return
        if candidate is not None and (track.baseline_bytes is None or candidate < track.baseline_bytes):
            track.baseline_bytes = candidate

    def _advance(self, track: _DeviceTrack, a: float, state: str) -> None:
        """Apply the grace rules (see `ClassifierConfig`) at `a`, the device now in `state`."""
        cfg = self.config
        end_after = cfg.busy_grace_s * cfg.busy_grace_pct / 100
        # Only time since a streak or run began can end it: what came before is why it began.
        if track.idle_since is not None:
            period = min(cfg.busy_grace_s, a - track.idle_since)
            if track.seconds(a, period, IDLE_STATES, inside=False) > end_after:
                track.idle_since = None
        if track.idle_since is None and state in IDLE_STATES:
            lo = a - cfg.idle_grace_s
            # Busy or unavailable for at most the rest of the period: time before the agent first saw
            # the device is no evidence of work, so a device idle from its first tick is idle at once.
            allowed = cfg.idle_grace_s * (100 - cfg.idle_grace_pct) / 100
            if track.seconds(a, cfg.idle_grace_s, IDLE_STATES, inside=False) <= allowed:
                starts = [s for s, e, st in track.history if st in IDLE_STATES and e > lo]
                track.idle_since = starts[0] if starts else a
        for s, since in list(track.runs.items()):
            if track.seconds(a, min(cfg.busy_grace_s, a - since), (s,), inside=False) > end_after:
                del track.runs[s]
        track.runs.setdefault(state, a)

    def _vanish(self, track: _DeviceTrack, a: float) -> None:
        """The device's probe no longer lists it: unavailable from `a` on."""
        if track.last_t is not None and a < track.last_t:
            a = track.last_t
        track.hold(a, self._keep_s())
        self._advance(track, a, "unavailable")
        track.last_state = "unavailable"
        track.reason = VANISHED
        track.ghost = track.spin = track.quiet = False
        track.vanished = True
        track.last_t = a
        # Whatever the counter reads when the device is back spans time nothing was credited for.
        track.counter_j = track.counter_t = track.counter_w = None

    def idle_since(self, device_id: str) -> float | None:
        track = self._tracks.get(device_id)
        return None if track is None or track.idle_since is None else track.idle_since + self._offset

    def snapshot(self) -> list[DeviceView]:
        """Every tracked device as of its last observation, for the exporter: read-only and cheap
        (no accounting happens here, so a scrape changes nothing and costs no tick)."""
        views = []
        for track in self._tracks.values():
            s = track.last_sample
            if s is None or track.last_state is None:
                continue
            state = track.last_state
            since = track.runs.get(state)
            fraction = s.extra.get(FRACTION_KEY)
            current = not track.vanished
            views.append(
                DeviceView(
                    device_id=s.device_id,
                    vendor=s.vendor,
                    model=s.model,
                    parent_id=s.parent_id,
                    state=state,
                    state_seconds=dict(track.totals),
                    energy_joules=track.energy_j,
                    idle_since=None if track.idle_since is None else track.idle_since + self._offset,
                    state_since=None if since is None else since + self._offset,
                    fraction=float(fraction) if fraction is not None and 0 < fraction <= 1 else 1.0,
                    util_pct=s.util_pct if current else None,
                    memory_used_bytes=s.memory_used_bytes if current else None,
                    memory_total_bytes=s.memory_total_bytes,
                    power_w=s.power_w if current else None,
                    temp_c=s.temp_c if current else None,
                    processes=s.processes if current else None,
                    holders=s.holders if current else None,
                    reason=VANISHED if track.vanished else (track.reason or s.error),
                )
            )
        return views

    # -- one window -------------------------------------------------------------------------

    def close_window(self, start: float, end: float, mono_end: float | None = None) -> list[DeviceWindow]:
        """Fold everything observed up to `end` into one record per device, and start the next window.

        A device not observed since before the previous window (its probe stopped answering for it)
        is unavailable, "no longer reported", like one its probe stopped listing; either is
        forgotten after `forget_vanished_s` unseen. One sampled less often than windows close keeps
        its state.
        """
        # `end` is the window's boundary, read on the wall clock, not the instant it closes: only
        # samples (wall and accounting time of one instant) set the offset between the clocks.
        a_end = end if mono_end is None else mono_end
        if mono_end is None:
            self._offset = 0.0
        length = end - start
        windows: list[DeviceWindow] = []
        for device_id in list(self._tracks):
            track = self._tracks[device_id]
            if track.last_sample is None or track.seen_t is None:
                del self._tracks[device_id]
                continue
            if not track.vanished and track.seen_t < a_end - 2 * length:
                self._vanish(track, a_end - length)
            if track.vanished and a_end - track.seen_t > self.config.forget_vanished_s:
                del self._tracks[device_id]
                continue
            track.hold(a_end, self._keep_s())
            if track.last_state is not None:
                self._advance(track, a_end, track.last_state)
            windows.append(self._window(track, track.last_sample))
            track._reset_window()
        return windows

    def _wall(self, a: float | None) -> int | None:
        # Rounded, not truncated: the offset moves by microseconds between readings, and a streak
        # that started on a whole second would otherwise be reported a second early now and then.
        return None if a is None else round(a + self._offset)

    def _window(self, track: _DeviceTrack, s: DeviceSample) -> DeviceWindow:
        state = track.last_state or "unavailable"
        fraction = s.extra.get(FRACTION_KEY)
        if fraction is not None and not 0 < fraction <= 1:
            fraction = None
        # A vanished device's last readings are not what it holds now.
        current = not track.vanished
        error = VANISHED if track.vanished else s.error
        energy = None if track.window_energy_j is None else round(track.window_energy_j, 3)
        idle_energy = None if energy is None else min(round(track.window_idle_energy_j, 3), energy)
        return DeviceWindow(
            device_id=s.device_id,
            vendor=s.vendor,
            model=s.model,
            index=s.index,
            parent_id=s.parent_id,
            state=state,  # type: ignore[arg-type]
            busy_s=round(track.busy_s, 3),
            allocated_idle_s=round(track.allocated_idle_s, 3),
            free_s=round(track.free_s, 3),
            unavailable_s=round(track.unavailable_s, 3),
            ghost_s=round(track.ghost_s, 3),
            spin_s=round(track.spin_s, 3),
            util_mean_pct=round(track.util_sum / track.util_n, 3) if track.util_n else None,
            util_max_pct=track.util_max,
            memory_used_bytes=s.memory_used_bytes if current else None,
            memory_total_bytes=s.memory_total_bytes,
            power_mean_w=round(track.power_sum / track.power_n, 3) if track.power_n else None,
            energy_j=energy,
            idle_energy_j=idle_energy,
            temp_max_c=track.temp_max,
            processes=track.processes_max,
            # A busy blip inside the grace keeps the streak; report it while the streak is alive.
            idle_since=self._wall(track.idle_since),
            state_since=self._wall(track.runs.get(state)),
            fraction=None if fraction is None or fraction == 1 else float(fraction),
            error=error[:1024] if error else None,
            reason=track.reason[:1024] if track.reason else None,
            extra={k: float(v) for k, v in s.extra.items() if k != FRACTION_KEY},
            info=dict(s.info),
        )

    def remember(self) -> dict[str, tuple[float | None, int | None, str | None, float | None]]:
        """What must survive an agent restart, per device: idle streak start, learned baseline,
        state and since when (wall seconds). Only devices seen since the restart: one that never
        came back must not be carried from file to file for ever."""
        saved = {}
        for d, t in self._tracks.items():
            state = t.last_state
            since = t.runs.get(state) if state is not None else None
            saved[d] = (
                None if t.idle_since is None else t.idle_since + self._offset,
                t.baseline_bytes,
                state,
                None if since is None else since + self._offset,
            )
        return saved

    def restore(self, saved: Mapping[str, Iterable[object]]) -> None:
        """Take back what `remember()` gave before a restart; applied as each device is first seen.

        Accepts the older `[idle_since, baseline]` pairs too. An entry that is not numbers is skipped.
        """

        def number(v: object) -> float | None:
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return None
            return float(v)

        restored = {}
        for d, value in saved.items():
            v = list(value)
            if len(v) < 2:
                continue
            idle_since, base = number(v[0]), number(v[1])
            state = v[2] if len(v) > 2 and v[2] in STATES else None
            since = number(v[3]) if len(v) > 3 and state is not None else None
            restored[str(d)] = (idle_since, None if base is None else int(base), state, since)
        self._restored = restored

    def forget(self, device_ids: Iterable[str]) -> None:
        for device_id in device_ids:
            self._tracks.pop(device_id, None)
