"""The idle classifier: every device, every tick, in exactly one state; folded into report windows.

States (DESIGN.md): `busy` (utilisation at or above the threshold), `allocated_idle` (below it, but a
process holds the device), `free` (below it and nothing holds it), `unavailable` (unreadable,
unhealthy, or its probe failed). Time is passed in, never read, so traces replay in microseconds.

Accounting is sample-and-hold: a state observed at `t` holds until the next observation or the end
of the window, so a device seen for a whole window has state seconds that add up to the window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from capmon.agent.probe import DeviceSample
from capmon.agent.wire import DeviceWindow

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ClassifierConfig:
    """Thresholds of the idle classifier (`[classifier]` in the agent's TOML)."""

    # Utilisation (%) at or above which a device counts as busy. Monitoring and health-check
    # kernels stay well below 10%.
    busy_util_pct: float = 10.0
    # Seconds busy (or unavailable) must last before an idle streak ends: shorter blips keep `idle_since`.
    busy_grace_s: float = 60.0
    # Memory above the device's baseline by more than the margin means something holds it
    # (used only when the probe cannot count processes). Margin = max(MiB, % of total).
    memory_margin_mib: float = 512.0
    memory_margin_pct: float = 2.0
    # Baseline memory (MiB) by model or vendor, overriding the learned one (lowest seen with no
    # process). Example: {"910B3" = 3400, "ascend" = 4096}.
    memory_baseline_mib: Mapping[str, float] = field(default_factory=dict)
    # Where nothing above applies and no zero-process sample taught a baseline: the baseline as % of
    # total memory by vendor or model. Ascend reserves ~3 of 32 GB, 4 of 64, ~4.8 of 96 with no workload.
    memory_baseline_pct: Mapping[str, float] = field(default_factory=lambda: {"ascend": 8.0})


@dataclass(frozen=True, slots=True)
class Observation:
    """A device's instant state as the classifier decided it, with why (for `capmon agent probe`)."""

    state: str
    ghost: bool = False
    util_unknown: bool = False
    reason: str | None = None


class _DeviceTrack:
    """Everything the classifier remembers about one device between ticks and within a window."""

    __slots__ = (
        "allocated_idle_s",
        "baseline_bytes",
        "busy_run_start",
        "busy_s",
        "free_s",
        "ghost",
        "ghost_s",
        "idle_since",
        "last_sample",
        "last_state",
        "last_t",
        "power_n",
        "power_sum",
        "processes_max",
        "restored_idle_since",
        "seen_t",
        "temp_max",
        "unavailable_s",
        "util_max",
        "util_n",
        "util_sum",
    )

    def __init__(self) -> None:
        self.baseline_bytes: int | None = None
        self.idle_since: float | None = None
        self.restored_idle_since: float | None = None
        self.busy_run_start: float | None = None
        self.last_state: str | None = None
        self.ghost = False
        self.last_t: float | None = None
        self.seen_t: float | None = None
        self.last_sample: DeviceSample | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self.busy_s = self.allocated_idle_s = self.free_s = self.unavailable_s = self.ghost_s = 0.0
        self.util_sum = 0.0
        self.util_n = 0
        self.util_max: float | None = None
        self.power_sum = 0.0
        self.power_n = 0
        self.temp_max: float | None = None
        self.processes_max: int | None = None

    def hold(self, until: float) -> None:
        """Credit the time since the last observation to the state observed then."""
        if self.last_state is None or self.last_t is None or until <= self.last_t:
            return
        dt = until - self.last_t
        if self.last_state == "busy":
            self.busy_s += dt
            if self.ghost:
                self.ghost_s += dt
        elif self.last_state == "allocated_idle":
            self.allocated_idle_s += dt
        elif self.last_state == "free":
            self.free_s += dt
        else:
            self.unavailable_s += dt
        self.last_t = until


class IdleClassifier:
    """Classifies device samples and folds them into `DeviceWindow`s."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        self.config = config or ClassifierConfig()
        self._tracks: dict[str, _DeviceTrack] = {}
        self._restored: dict[str, tuple[float | None, int | None]] = {}

    # -- one tick ---------------------------------------------------------------------------

    def classify(self, sample: DeviceSample, baseline_bytes: int | None = None) -> Observation:
        """The state of one sample, with no history (history only affects the idle streak)."""
        cfg = self.config
        if not sample.healthy:
            return Observation("unavailable", reason=sample.error or "unhealthy")
        held, why = self._held(sample, baseline_bytes)
        util = sample.util_pct
        if util is None:
            if held:
                return Observation("busy", util_unknown=True, reason=f"utilisation unknown, {why}")
            return Observation("free", util_unknown=True, reason="utilisation unknown, nothing holds it")
        if util >= cfg.busy_util_pct:
            ghost = sample.processes == 0
            return Observation("busy", ghost=ghost, reason="busy with no process (ghost)" if ghost else None)
        if held:
            return Observation("allocated_idle", reason=why)
        return Observation("free")

    def _held(self, sample: DeviceSample, baseline_bytes: int | None) -> tuple[bool, str]:
        if sample.processes is not None:
            return sample.processes > 0, f"{sample.processes} process(es)"
        used = sample.memory_used_bytes
        if used is None:
            return False, "processes and memory unknown"
        total = sample.memory_total_bytes or 0
        base = self._baseline_override(sample)
        if base is None:
            # Never the memory in use now: a job holding 40 of 64 GB from the first sample on
            # would become its own baseline and the device would look free.
            base = baseline_bytes if baseline_bytes is not None else self._default_baseline(sample, total)
        margin = max(self.config.memory_margin_mib * MIB, total * self.config.memory_margin_pct / 100)
        if used > base + margin:
            return True, f"{(used - base) / MIB:.0f} MiB in use above baseline"
        return False, "memory at baseline"

    def _default_baseline(self, sample: DeviceSample, total: int) -> int:
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

    def observe_probe(self, probe: str, t: float, devices: Iterable[DeviceSample]) -> None:
        """Record everything one probe listed at `t`: the unit in which devices appear and vanish.

        A GPU split into MIG instances is capacity only through its instances: it is counted once.
        """
        devices = list(devices)
        parents = {d.parent_id for d in devices if d.parent_id}
        for d in devices:
            if d.device_id not in parents:
                self.observe(t, d)

    def observe(self, t: float, sample: DeviceSample) -> Observation:
        """Record one sample taken at `t` (seconds); returns its instant state."""
        track = self._tracks.get(sample.device_id)
        if track is None:
            track = self._tracks[sample.device_id] = _DeviceTrack()
            saved = self._restored.pop(sample.device_id, None)
            if saved is not None:
                track.restored_idle_since, track.baseline_bytes = saved
        # A result that arrives after a later one (a slow probe; a window already closed past it)
        # must not move the track's clock back: that time would be credited twice.
        if track.last_t is not None and t < track.last_t:
            t = track.last_t
        track.hold(t)
        if sample.healthy and sample.processes == 0:
            used = sample.memory_used_bytes
            if used is not None and (track.baseline_bytes is None or used < track.baseline_bytes):
                track.baseline_bytes = used
        obs = self.classify(sample, track.baseline_bytes)
        self._advance_streak(track, t, obs.state)
        track.last_state = obs.state
        track.ghost = obs.ghost
        track.last_t = track.seen_t = t
        track.last_sample = sample
        if sample.util_pct is not None:
            track.util_sum += sample.util_pct
            track.util_n += 1
            track.util_max = (
                sample.util_pct if track.util_max is None else max(track.util_max, sample.util_pct)
            )
        if sample.power_w is not None:
            track.power_sum += sample.power_w
            track.power_n += 1
        if sample.temp_c is not None:
            track.temp_max = sample.temp_c if track.temp_max is None else max(track.temp_max, sample.temp_c)
        if sample.processes is not None:
            track.processes_max = max(track.processes_max or 0, sample.processes)
        return obs

    def _advance_streak(self, track: _DeviceTrack, t: float, state: str) -> None:
        restored, track.restored_idle_since = track.restored_idle_since, None
        if state in ("free", "allocated_idle"):
            if track.idle_since is None:
                # Idle again right after an agent restart: the streak that was running goes on.
                track.idle_since = restored if restored is not None and restored <= t else t
            track.busy_run_start = None
            return
        if track.busy_run_start is None:
            track.busy_run_start = t
        if track.idle_since is not None and t - track.busy_run_start >= self.config.busy_grace_s:
            track.idle_since = None

    def idle_since(self, device_id: str) -> float | None:
        track = self._tracks.get(device_id)
        return None if track is None else track.idle_since

    # -- one window -------------------------------------------------------------------------

    def close_window(self, start: float, end: float) -> list[DeviceWindow]:
        """Fold everything observed up to `end` into one record per device, and start the next window.

        A device not observed for a whole window before this one (it disappeared: a MIG instance
        destroyed, a probe removed) is forgotten rather than reported forever; one merely sampled
        less often than windows close keeps its state and its idle streak.
        """
        windows: list[DeviceWindow] = []
        forget_before = start - (end - start)
        for device_id in list(self._tracks):
            track = self._tracks[device_id]
            if track.seen_t is None or track.seen_t < forget_before or track.last_sample is None:
                del self._tracks[device_id]
                continue
            track.hold(end)
            windows.append(self._window(track, track.last_sample))
            track._reset_window()
        return windows

    def _window(self, track: _DeviceTrack, s: DeviceSample) -> DeviceWindow:
        # A busy blip inside the grace keeps the streak; report it while the streak is alive.
        idle_since = int(track.idle_since) if track.idle_since is not None else None
        return DeviceWindow(
            device_id=s.device_id,
            vendor=s.vendor,
            model=s.model,
            index=s.index,
            parent_id=s.parent_id,
            state=track.last_state or "unavailable",  # type: ignore[arg-type]
            busy_s=round(track.busy_s, 3),
            allocated_idle_s=round(track.allocated_idle_s, 3),
            free_s=round(track.free_s, 3),
            unavailable_s=round(track.unavailable_s, 3),
            ghost_s=round(track.ghost_s, 3),
            util_mean_pct=round(track.util_sum / track.util_n, 3) if track.util_n else None,
            util_max_pct=track.util_max,
            memory_used_bytes=s.memory_used_bytes,
            memory_total_bytes=s.memory_total_bytes,
            power_mean_w=round(track.power_sum / track.power_n, 3) if track.power_n else None,
            temp_max_c=track.temp_max,
            processes=track.processes_max,
            idle_since=idle_since,
            error=s.error[:1024] if s.error else None,
            extra={k: float(v) for k, v in s.extra.items()},
            info=dict(s.info),
        )

    def remember(self) -> dict[str, tuple[float | None, int | None]]:
        """What must survive an agent restart: each device's idle streak start and learned baseline."""
        return {d: (t.idle_since, t.baseline_bytes) for d, t in self._tracks.items()}

    def restore(self, saved: Mapping[str, tuple[float | None, int | None]]) -> None:
        """Take back what `remember()` gave before a restart; applied as each device is first seen."""
        self._restored = {d: (v[0], v[1]) for d, v in saved.items()}

    def forget(self, device_ids: Iterable[str]) -> None:
        for device_id in device_ids:
            self._tracks.pop(device_id, None)
