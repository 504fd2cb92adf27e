"""NVIDIA GPUs (and their MIG instances) through NVML, the library behind `nvidia-smi`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from capmon.agent import DeviceSample, Probe, ProbeConfig, ProbeUnavailable
from capmon.agent.probe import Holder

log = logging.getLogger(__name__)

INSTALL_HINT = "nvidia-ml-py not installed: pip install '.[nvidia]' in a capmon checkout (README: Install)"

# After one of these the NVML session itself is gone, not just one field: shut down and init again.
_REINIT_ERRORS = (
    "NVMLError_GpuIsLost",
    "NVMLError_Uninitialized",
    "NVMLError_DriverNotLoaded",
    "NVMLError_LibRmVersionMismatch",
)
# An empty MIG slot answers one of these; the next slot may still hold an instance.
_EMPTY_SLOT_ERRORS = ("NVMLError_NotFound", "NVMLError_InvalidArgument")


@dataclass(frozen=True, slots=True)
class NvmlConfig(ProbeConfig):
    """Options of the `nvml` probe (`[probes.nvml]`)."""

    # Hopper and newer: read SM activity from GPU Performance Monitoring into `extra["sm_active_pct"]`.
    gpm: bool = True
    # Report each MIG instance as its own device (parent_id = the GPU's UUID).
    mig: bool = True
    # Count XID critical errors per GPU on a background thread (`extra["xid_errors"]`).
    xid_events: bool = True
    # Also count graphics (OpenGL/Vulkan) processes, not only CUDA compute ones, like nvidia-smi does.
    graphics_processes: bool = True
    # A graphics-only process with one of these names (`/proc/<pid>/comm`) does not hold the GPU:
    # a display server keeps a few MiB on every GPU of a workstation and computes nothing.
    display_servers: tuple[str, ...] = ("Xorg", "X", "gnome-shell", "Xwayland", "kwin_x11", "kwin_wayland")
    # XIDs after which NVIDIA says the GPU needs a reset (48 double-bit ECC, 79 fallen off the bus,
    # 95 uncontained ECC): the GPU is reported unhealthy (so `unavailable`, never rentable) for
    # `fatal_xid_hold_s` seconds after the last one. Needs `xid_events`.
    fatal_xids: tuple[int, ...] = (48, 79, 95)
    fatal_xid_hold_s: float = 600.0
    # Seconds between reads of what changes slowly (name, PCI bus id, minor number, MIG mode and
    # layout, row-remap health); each tick reads only utilisation, memory, power, temperature and
    # processes. An XID, or a MIG instance that stops answering, re-reads them at once.
    slow_interval_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.slow_interval_s > 0:  # also refuses NaN
            raise ValueError(f"slow_interval_s must be a positive number of seconds, got {self.slow_interval_s!r}")


MIG_WITHOUT_INSTANCES = "MIG enabled, no instances: nothing can run until instances are created"


@dataclass
class _GpmPair:
    """The previous tick's GPM sample and a spare buffer: two allocations reused for as long as the device lives."""

    previous: Any = None
    spare: Any = None


@dataclass
class _MigInstance:
    """One MIG instance as the last layout read found it."""

    uuid: str
    handle: Any
    gpu_instance_id: int | None
    model: str | None
    profile: str | None  # e.g. "1g.10gb"
    fraction: float | None  # the profile's slices / the GPU's slices


@dataclass
class _GpuState:
    """What the probe remembers about one GPU between ticks (keyed by UUID)."""

    uuid: str
    model: str | None = None
    bus_id: str | None = None
    # The N of /dev/nvidiaN: what Slurm's gres.conf and GKE's device plugin name the GPU by.
    minor_number: int | None = None
    # The total-energy counter: None not asked yet on this slow cycle, False not supported (asked
    # again at the next slow read, so a transient error does not turn it off for good).
    energy_supported: bool | None = None
    last_util_ts: int = 0
    gpm_supported: bool | None = None
    gpm: _GpmPair = field(default_factory=_GpmPair)
    mig_gpm: dict[str, _GpmPair] = field(default_factory=dict)  # by MIG UUID: GI ids are reused
    # Read every `slow_interval_s` (None: not read on this NVML session yet).
    slow_at: float | None = None
    xids_seen: int = 0
    healthy: bool = True
    error: str | None = None
    mig_on: bool = False
    instances: list[_MigInstance] = field(default_factory=list)
    profiles: dict[int, tuple[str | None, int]] = field(default_factory=dict)  # profile id -> (name, slices)


class NvmlProbe(Probe):
    """Utilisation, memory, power, temperature and processes of every NVIDIA GPU and MIG instance."""

    name = "nvml"
    vendor = "nvidia"
    Config = NvmlConfig
    default_interval_s = 1.0
    default_timeout_s = 5.0

    def __init__(
        self,
        config: NvmlConfig | None = None,
        nvml: ModuleType | None = None,
        proc_root: Path | str = "/proc",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config)
        self.config: NvmlConfig
        self._nvml: Any = nvml
        self._proc_root = Path(proc_root)
        self._clock = clock
        self._display_servers = frozenset(self.config.display_servers)
        self._initialised = False
        self._needs_reinit = False
        self._reinit_error: str | None = None
        self._gpus: dict[str, _GpuState] = {}
        self._uuid_at_index: dict[int, str] = {}
        # (handle, uuid) per index, or (None, error) where the handle could not be had.
        self._handles: list[tuple[Any, str]] = []
        self._enumerated_at: float | None = None
        self._memory_v2 = True
        self._xid = _XidWatcher(self) if self.config.xid_events else None

    # -- lifecycle -------------------------------------------------------------------------------

    def setup(self) -> None:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                raise ProbeUnavailable(INSTALL_HINT) from exc
            self._nvml = pynvml
        nv = self._nvml
        try:
            nv.nvmlInit()
        except nv.NVMLError_LibraryNotFound as exc:
            raise ProbeUnavailable("libnvidia-ml.so.1 not found (no NVIDIA driver on this host)") from exc
        except nv.NVMLError_DriverNotLoaded as exc:
            raise ProbeUnavailable("NVIDIA driver not loaded (nvidia kernel module absent)") from exc
        except nv.NVMLError_NoPermission as exc:
            raise ProbeUnavailable("no permission to open /dev/nvidia* (NVML init refused)") from exc
        except nv.NVMLError_LibRmVersionMismatch as exc:
            raise ProbeUnavailable(
                "NVML library and kernel driver versions differ (driver upgraded without reboot?)"
            ) from exc
        except nv.NVMLError as exc:
            raise ProbeUnavailable(f"NVML init failed: {exc}") from exc
        self._initialised = True
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as exc:
            self._shutdown()
            raise ProbeUnavailable(f"NVML cannot count GPUs: {exc}") from exc
        if count == 0:
            self._shutdown()
            raise ProbeUnavailable("NVIDIA driver loaded but no GPU visible")
        if self._xid is not None:
            self._xid.start()

    def close(self) -> None:
        if self._xid is not None:
            self._xid.stop()
        self._forget_session()
        self._shutdown()

    def _shutdown(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:  # close() must not raise; a dying driver may refuse shutdown
                log.debug("nvmlShutdown failed: %s", exc)

    def _reinitialise(self) -> bool:
        """Shut NVML down and open it again after the session was lost; False while the driver is still gone."""
        nv = self._nvml
        if self._xid is not None:
            self._xid.stop()
        self._forget_session()
        self._shutdown()
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            self._reinit_error = f"NVML re-initialisation failed: {exc}"
            log.warning("%s", self._reinit_error)
            return False
        log.info("NVML re-initialised")
        self._initialised = True
        self._needs_reinit = False
        self._reinit_error = None
        if self._xid is not None:
            self._xid.start()
        return True

    def _forget_session(self) -> None:
        """Drop what belongs to this NVML session: handles, GPM buffers; slow values are read again."""
        self._handles = []
        self._enumerated_at = None
        for gpu in self._gpus.values():
            for pair in [gpu.gpm, *gpu.mig_gpm.values()]:
                self._free_pair(pair)
            gpu.mig_gpm.clear()
            gpu.gpm_supported = None
            gpu.energy_supported = None
            gpu.slow_at = None
            # The instances are kept (without trusting their handles) so a GPU that cannot be read
            # still reports them unhealthy instead of letting them vanish.

    def _free_pair(self, pair: _GpmPair) -> None:
        for sample in (pair.previous, pair.spare):
            if sample is not None:
                try:
                    self._nvml.nvmlGpmSampleFree(sample)
                except Exception as exc:  # freeing after a lost GPU may fail; nothing to recover
                    log.debug("nvmlGpmSampleFree failed: %s", exc)
        pair.previous = pair.spare = None

    def _note(self, exc: BaseException) -> None:
        if type(exc).__name__ in _REINIT_ERRORS:
            self._needs_reinit = True

    # -- sampling --------------------------------------------------------------------------------

    def sample(self) -> list[DeviceSample]:
        nv = self._nvml
        if self._needs_reinit or not self._initialised:
            if not self._reinitialise():
                return self._all_unreadable(self._reinit_error or "NVML unavailable")
        now = self._clock()
        if self._enumerated_at is None or now - self._enumerated_at >= self.config.slow_interval_s:
            try:
                self._enumerate(now)
            except nv.NVMLError as exc:
                self._note(exc)
                self._needs_reinit = True
                return self._all_unreadable(f"NVML cannot count GPUs: {exc}")
        samples: list[DeviceSample] = []
        for index, (handle, uuid) in enumerate(self._handles):
            samples.extend(self._sample_gpu(index, handle, uuid, now))
        return samples

    def _enumerate(self, now: float) -> None:
        """Handles and UUIDs by index: fixed for an NVML session, so read on the slow cadence only."""
        nv = self._nvml
        count = nv.nvmlDeviceGetCount()
        handles: list[tuple[Any, str]] = []
        complete = True
        for index in range(count):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                uuid = nv.nvmlDeviceGetUUID(handle)
            except nv.NVMLError as exc:
                self._note(exc)
                complete = False
                handles.append((None, f"GPU {index}: {exc}"))
                continue
            self._uuid_at_index[index] = uuid
            if uuid not in self._gpus:
                self._gpus[uuid] = _GpuState(uuid=uuid)
            handles.append((handle, uuid))
        self._handles = handles
        # A GPU whose handle failed is asked again next tick, not in slow_interval_s.
        self._enumerated_at = now if complete else None

    def _all_unreadable(self, error: str) -> list[DeviceSample]:
        """Every GPU seen before, and its MIG instances, unhealthy with `error`: nothing silently vanishes."""
        out = []
        for index, uuid in sorted(self._uuid_at_index.items()):
            out.extend(self._unreadable_gpu(uuid, error, index))
        return out

    def _unreadable_gpu(self, uuid: str, error: str, index: int | None) -> list[DeviceSample]:
        gpu = self._gpus.get(uuid)
        model = gpu.model if gpu else None
        # The last known identity stays, so a scheduler's allocation still finds the unreadable GPU.
        out = [self._unreadable(uuid, error, model=model, index=index, info=_gpu_info(gpu))]
        for instance in gpu.instances if gpu is not None else []:
            out.append(
                self._unreadable(
                    instance.uuid, error, model=instance.model, parent_id=uuid, info=_instance_info(gpu)
                )
            )
        return out

    def _unreadable(
        self,
        device_id: str,
        error: str,
        model: str | None = None,
        index: int | None = None,
        parent_id: str | None = None,
        info: dict[str, str] | None = None,
    ) -> DeviceSample:
        return DeviceSample(
            device_id=device_id,
            vendor=self.vendor,
            model=model,
            index=index,
            parent_id=parent_id,
            healthy=False,
            error=error,
            info=info or {},
        )

    def _sample_gpu(self, index: int, handle: Any, uuid: str, now: float) -> list[DeviceSample]:
        nv = self._nvml
        if handle is None:
            # Without a handle there is no UUID to ask for: use the one this index had before.
            # A GPU lost before it was ever read is still reported, so it does not silently vanish.
            device_id = self._uuid_at_index.get(index, f"nvml-index-{index}")
            return self._unreadable_gpu(device_id, uuid, index)
        gpu = self._gpus[uuid]
        try:
            return self._read_gpu(handle, index, gpu, now)
        except nv.NVMLError as exc:
            self._note(exc)
            gpu.slow_at = None  # once it answers again, read everything afresh
            return self._unreadable_gpu(uuid, f"GPU {index}: {exc}", index)

    def _slow_due(self, gpu: _GpuState, now: float) -> bool:
        if gpu.slow_at is None or now - gpu.slow_at >= self.config.slow_interval_s:
            return True
        # Any new XID may come with a row remap or a retired page: look at the health now.
        return self._xid is not None and self._xid.counts(gpu.uuid)[0] != gpu.xids_seen

    def _read_slow(self, handle: Any, gpu: _GpuState, now: float) -> None:
        """Identity, health and MIG layout: what changes in minutes, not seconds."""
        nv = self._nvml
        gpu.slow_at = now
        if self._xid is not None:
            gpu.xids_seen = self._xid.counts(gpu.uuid)[0]
        if gpu.model is None:
            gpu.model = self._field(lambda: nv.nvmlDeviceGetName(handle))
        if gpu.bus_id is None:
            pci = self._field(lambda: nv.nvmlDeviceGetPciInfo(handle))
            if pci is not None:
                bus_id = pci.busId
                gpu.bus_id = bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)
        # Read again on every slow read, not once: the driver numbers the device files at load time.
        minor = self._field(lambda: nv.nvmlDeviceGetMinorNumber(handle))
        gpu.minor_number = int(minor) if minor is not None else None
        if gpu.energy_supported is False:
            gpu.energy_supported = None
        gpu.healthy, gpu.error = self._health(handle)
        mig_on = False
        if self.config.mig:
            mode = self._field(lambda: nv.nvmlDeviceGetMigMode(handle))
            mig_on = mode is not None and mode[0] == nv.NVML_DEVICE_MIG_ENABLE
        gpu.mig_on = mig_on
        if mig_on:
            self._read_mig_layout(handle, gpu)
        else:
            self._set_instances(gpu, [])

    def _read_gpu(self, handle: Any, index: int, gpu: _GpuState, now: float) -> list[DeviceSample]:
        nv = self._nvml
        if self._slow_due(gpu, now):
            self._read_slow(handle, gpu, now)
        info = _gpu_info(gpu)
        extra: dict[str, float] = {}

        util = None if gpu.mig_on else self._utilisation(handle, gpu)
        if self.config.gpm and not gpu.mig_on:
            # Kept for whole GPUs too: util 100 % with SM activity 2 % is a spin (an NCCL hang), not work.
            extra.update(self._gpm_metrics(handle, gpu))
        used, total, reserved = self._memory(handle)
        if reserved is not None:
            extra["memory_reserved_bytes"] = float(reserved)
        power_mw = self._field(lambda: nv.nvmlDeviceGetPowerUsage(handle))
        # A GPU split into MIG instances counts only through them, and they cannot share the counter out.
        energy_j = None if gpu.mig_on else self._energy(handle, gpu)
        temp = self._field(lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
        holders = self._holders(handle, graphics=True)
        healthy, error = gpu.healthy, gpu.error
        if self._xid is not None:
            xids, last_xid = self._xid.counts(gpu.uuid)
            extra["xid_errors"] = float(xids)
            if last_xid is not None:
                extra["last_xid"] = float(last_xid)
            fatal = self._xid.fatal(gpu.uuid, self.config.fatal_xid_hold_s)
            if fatal is not None and healthy:
                xid, ago = fatal
                healthy, error = False, f"XID {xid} {ago:.0f}s ago: the GPU needs a reset (nvidia-smi -r)"

        children: list[DeviceSample] = []
        if gpu.mig_on:
            info["mig"] = "enabled"
            if not gpu.instances and healthy:
                healthy, error = False, MIG_WITHOUT_INSTANCES
            # An instance of an unhealthy GPU is as unusable as the GPU: it inherits the verdict.
            children = self._read_mig(handle, gpu, None if healthy else error)
            extra["mig_instances"] = float(len(children))
        parent = DeviceSample(
            device_id=gpu.uuid,
            vendor=self.vendor,
            model=gpu.model,
            index=index,
            util_pct=util,
            memory_used_bytes=used,
            memory_total_bytes=total,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            energy_j=energy_j,
            temp_c=float(temp) if temp is not None else None,
            processes=len(holders) if holders is not None else None,
            healthy=healthy,
            error=error,
            extra=extra,
            info=info,
            holders=holders,
        )
        return [parent, *children]

    def _energy(self, handle: Any, gpu: _GpuState) -> float | None:
        """The GPU's total-energy counter in joules (NVML: millijoules since the driver loaded; Volta
        and newer). None where unsupported, or where the binding predates the call. Whole GPUs only:
        the counter is the GPU's, and a MIG instance's share of it is not measurable."""
        if gpu.energy_supported is False:
            return None
        nv = self._nvml
        read = getattr(nv, "nvmlDeviceGetTotalEnergyConsumption", None)
        millijoules = self._field(lambda: read(handle)) if read is not None else None
        gpu.energy_supported = millijoules is not None
        return None if millijoules is None else millijoules / 1000.0

    def _field(self, read: Any) -> Any:
        """One optional reading: None when this GPU or driver does not offer it (never a made-up 0).

        A lost GPU or a dead NVML session is not a missing field: that propagates so the whole
        device is reported unreadable.
        """
        nv = self._nvml
        try:
            return read()
        except nv.NVMLError as exc:
            if type(exc).__name__ in _REINIT_ERRORS:
                raise
            return None

    def _utilisation(self, handle: Any, gpu: _GpuState) -> float | None:
        """Mean GPU utilisation since the last tick from NVML's sample buffer; the driver's own figure otherwise."""
        nv = self._nvml
        try:
            value_type, samples = nv.nvmlDeviceGetSamples(
                handle, nv.NVML_GPU_UTILIZATION_SAMPLES, gpu.last_util_ts
            )
        except nv.NVMLError as exc:
            if type(exc).__name__ in _REINIT_ERRORS:
                raise
            samples = []  # NotFound: no new sample since the last tick (the buffer fills every ~167 ms)
        if samples:
            newest = max(s.timeStamp for s in samples)
            if gpu.last_util_ts == 0:
                # First tick: the buffer reaches back several seconds; keep only this interval's worth.
                since = newest - int(self.interval_s * 1_000_000)
                samples = [s for s in samples if s.timeStamp > since]
            else:
                samples = [s for s in samples if s.timeStamp > gpu.last_util_ts]
            gpu.last_util_ts = newest
            if samples:
                attr = _VALUE_FIELD.get(value_type, "uiVal")
                return sum(float(getattr(s.sampleValue, attr)) for s in samples) / len(samples)
        rates = self._field(lambda: nv.nvmlDeviceGetUtilizationRates(handle))
        return float(rates.gpu) if rates is not None else None

    def _memory(self, handle: Any, required: bool = False) -> tuple[int | None, int | None, int | None]:
        """(used, total, reserved) bytes; v2 `used` leaves out the driver's own reservation, v1 includes it.

        `required`: an error of the v1 call propagates (a MIG handle that no longer answers it is stale).
        """
        nv = self._nvml
        version = getattr(nv, "nvmlMemory_v2", None)
        if self._memory_v2 and version is not None:
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(handle, version=version)
                return int(mem.used), int(mem.total), int(mem.reserved)
            except (nv.NVMLError_FunctionNotFound, nv.NVMLError_ArgumentVersionMismatch):
                log.info("driver has no v2 memory info; memory used includes the driver reservation")
                self._memory_v2 = False
            except nv.NVMLError as exc:
                if type(exc).__name__ in _REINIT_ERRORS:
                    raise
                # Some handles (older MIG drivers) refuse v2 only; v1 below may still answer.
        if required:
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
        else:
            mem = self._field(lambda: nv.nvmlDeviceGetMemoryInfo(handle))
        if mem is None:
            return None, None, None
        return int(mem.used), int(mem.total), None

    def _holders(self, handle: Any, graphics: bool) -> tuple[Holder, ...] | None:
        """The distinct processes holding the device (compute, plus graphics if configured), with the
        device memory NVML gives each; None when the driver cannot list them (never a guessed empty tuple).

        A graphics-only process named in `display_servers` is not a holder. A PID in both lists is one
        holder; its memory is the compute entry's (NVML gives one figure per process), else the graphics one's.
        """
        compute = self._process_list(handle, "nvmlDeviceGetComputeRunningProcesses")
        if compute is None:
            return None
        found: dict[int, int | None] = {}
        for p in compute:
            pid = int(p.pid)
            if found.get(pid) is None:
                found[pid] = _used_memory(p)
        if graphics and self.config.graphics_processes:
            for p in self._process_list(handle, "nvmlDeviceGetGraphicsRunningProcesses") or []:
                pid = int(p.pid)
                if pid in found:
                    if found[pid] is None:
                        found[pid] = _used_memory(p)
                elif not self._is_display_server(pid):
                    found[pid] = _used_memory(p)
        return tuple(Holder(pid=pid, memory_bytes=memory) for pid, memory in found.items())

    def _is_display_server(self, pid: int) -> bool:
        """Whether `pid` is named in `display_servers`: one read of /proc/<pid>/comm, no NVML call.

        An unreadable name (another PID namespace, the process just exited) counts as a holder:
        never hide a process by guessing.
        """
        if not self._display_servers:
            return False
        try:
            name = (self._proc_root / str(pid) / "comm").read_text(errors="replace").strip()
        except OSError:
            return False
        return name in self._display_servers

    def _process_list(self, handle: Any, function: str) -> list[Any] | None:
        nv = self._nvml
        try:
            return list(getattr(nv, function)(handle))
        except nv.NVMLLibraryMismatchError:
            # Not an NVMLError: the unversioned call wanted _v3, which drivers before R510 lack. Try _v2.
            pass
        except nv.NVMLError as exc:
            if type(exc).__name__ in _REINIT_ERRORS:
                raise
            return None
        try:
            return list(getattr(nv, function + "_v2")(handle))
        except (nv.NVMLError, AttributeError) as exc:
            if type(exc).__name__ in _REINIT_ERRORS:
                raise
            return None

    def _health(self, handle: Any) -> tuple[bool, str | None]:
        """Unhealthy when a row remap failed or is waiting for a GPU reset (nvidia-smi -q "Remapped Rows")."""
        nv = self._nvml
        rows = self._field(lambda: nv.nvmlDeviceGetRemappedRows(handle))
        if rows is None:
            return True, None
        _corr, _unc, pending, failure = rows
        if failure:
            return False, "row remapping failed: uncorrectable memory error, GPU needs service"
        if pending:
            return False, "row remapping pending: GPU needs a reset"
        return True, None

    # -- GPM (Hopper and newer) ------------------------------------------------------------------

    def _gpm_supported(self, handle: Any, gpu: _GpuState) -> bool:
        if gpu.gpm_supported is None:
            nv = self._nvml
            support = self._field(lambda: nv.nvmlGpmQueryDeviceSupport(handle))
            gpu.gpm_supported = bool(support is not None and support.isSupportedDevice)
        return gpu.gpm_supported

    def _gpm_metrics(self, handle: Any, gpu: _GpuState) -> dict[str, float]:
        """SM activity between the previous tick's GPM sample and this one's."""
        if not self._gpm_supported(handle, gpu):
            return {}
        nv = self._nvml
        return self._gpm_tick(gpu.gpm, lambda sample: nv.nvmlGpmSampleGet(handle, sample))

    def _gpm_tick(self, pair: _GpmPair, read: Any) -> dict[str, float]:
        """Fill a buffer with `read`, compare it with the previous one; {} without a previous one (first tick)."""
        nv = self._nvml
        current, pair.spare = pair.spare, None
        if current is None:
            current = self._field(nv.nvmlGpmSampleAlloc)
            if current is None:
                return {}
        try:
            read(current)
        except nv.NVMLError as exc:
            pair.spare = current
            if type(exc).__name__ in _REINIT_ERRORS:
                raise
            return {}
        previous, pair.previous = pair.previous, current
        pair.spare = previous
        return self._gpm_compare(previous, current) if previous is not None else {}

    def _gpm_compare(self, previous: Any, current: Any) -> dict[str, float]:
        nv = self._nvml
        wanted = {
            "sm_active_pct": nv.NVML_GPM_METRIC_SM_UTIL,
            "gpm_util_pct": nv.NVML_GPM_METRIC_GRAPHICS_UTIL,
        }
        request = nv.c_nvmlGpmMetricsGet_t()
        request.version = nv.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(wanted)
        request.sample1 = previous
        request.sample2 = current
        for i, metric_id in enumerate(wanted.values()):
            request.metrics[i].metricId = metric_id
        result = self._field(lambda: nv.nvmlGpmMetricsGet(request))
        if result is None:
            return {}
        out = {}
        for i, key in enumerate(wanted):
            metric = result.metrics[i]
            if metric.nvmlReturn == nv.NVML_SUCCESS:
                out[key] = min(100.0, max(0.0, float(metric.value)))
        return out

    # -- MIG -------------------------------------------------------------------------------------

    def _read_mig_layout(self, parent_handle: Any, gpu: _GpuState) -> None:
        """Every MIG instance on this GPU, over every slot up to the maximum (a destroyed one leaves a hole)."""
        nv = self._nvml
        slots = self._field(lambda: nv.nvmlDeviceGetMaxMigDeviceCount(parent_handle)) or 0
        if not gpu.profiles:
            gpu.profiles = self._gpu_instance_profiles(parent_handle)
        total_slices = max((slices for _name, slices in gpu.profiles.values()), default=0)
        instances = []
        for slot in range(slots):
            try:
                handle = nv.nvmlDeviceGetMigDeviceHandleByIndex(parent_handle, slot)
            except nv.NVMLError as exc:
                if type(exc).__name__ in _REINIT_ERRORS:
                    raise
                if type(exc).__name__ not in _EMPTY_SLOT_ERRORS:
                    log.info("GPU %s MIG slot %d: %s", gpu.uuid, slot, exc)
                continue
            uuid = self._field(lambda h=handle: nv.nvmlDeviceGetUUID(h))
            if uuid is None:
                continue
            model = self._field(lambda h=handle: nv.nvmlDeviceGetName(h))
            gi = self._field(lambda h=handle: nv.nvmlDeviceGetGpuInstanceId(h))
            profile, slices = None, None
            if gi is not None:
                gi_handle = self._field(lambda g=gi: nv.nvmlDeviceGetGpuInstanceById(parent_handle, g))
                gi_info = self._field(lambda g=gi_handle: nv.nvmlGpuInstanceGetInfo(g)) if gi_handle else None
                if gi_info is not None:
                    profile, slices = gpu.profiles.get(gi_info.profileId, (None, None))
            if profile is None and model and " MIG " in model:
                profile = model.rsplit(" MIG ", 1)[1]  # "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
            fraction = slices / total_slices if slices and total_slices else None
            instances.append(_MigInstance(uuid, handle, gi, model, profile, fraction))
        self._set_instances(gpu, instances)

    def _gpu_instance_profiles(self, parent_handle: Any) -> dict[int, tuple[str | None, int]]:
        """The GPU's instance profiles by profile id: (name, slices). Fixed per GPU model, so read once."""
        nv = self._nvml
        profiles: dict[int, tuple[str | None, int]] = {}
        for index in range(nv.NVML_GPU_INSTANCE_PROFILE_COUNT):
            info = self._field(lambda i=index: nv.nvmlDeviceGetGpuInstanceProfileInfo(parent_handle, i))
            if info is None or not info.sliceCount:
                continue
            raw = getattr(info, "name", b"")  # v2 has a name ("MIG 1g.10gb"); v1 does not
            name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            profiles[int(info.id)] = (name.removeprefix("MIG ") or None, int(info.sliceCount))
        return profiles

    def _set_instances(self, gpu: _GpuState, instances: list[_MigInstance]) -> None:
        gpu.instances = instances
        # Forget GPM buffers of instances that were destroyed.
        for uuid in set(gpu.mig_gpm) - {i.uuid for i in instances}:
            self._free_pair(gpu.mig_gpm.pop(uuid))

    def _read_mig(self, parent_handle: Any, gpu: _GpuState, parent_error: str | None) -> list[DeviceSample]:
        """Every known instance; one that no longer answers means the layout changed: read it again now."""
        nv = self._nvml
        gpm = self.config.gpm and self._gpm_supported(parent_handle, gpu)
        children = []
        for instance in gpu.instances:
            try:
                children.append(self._read_mig_instance(parent_handle, instance, gpu, gpm, parent_error))
            except nv.NVMLError as exc:
                if type(exc).__name__ in _REINIT_ERRORS:
                    raise
                break
        else:
            return children
        self._read_mig_layout(parent_handle, gpu)
        children = []
        for instance in gpu.instances:
            try:
                children.append(self._read_mig_instance(parent_handle, instance, gpu, gpm, parent_error))
            except nv.NVMLError as exc:
                if type(exc).__name__ in _REINIT_ERRORS:
                    raise
                children.append(
                    self._unreadable(
                        instance.uuid,
                        f"MIG {instance.uuid}: {exc}",
                        instance.model,
                        None,
                        gpu.uuid,
                        _instance_info(gpu),
                    )
                )
        return children

    def _read_mig_instance(
        self, parent_handle: Any, instance: _MigInstance, gpu: _GpuState, gpm: bool, parent_error: str | None
    ) -> DeviceSample:
        nv = self._nvml
        used, total, reserved = self._memory(instance.handle, required=True)
        extra: dict[str, float] = {}
        if reserved is not None:
            extra["memory_reserved_bytes"] = float(reserved)
        if instance.fraction is not None:
            extra["gpu_fraction"] = instance.fraction
        # NVML has no utilisation counter for a MIG instance; GPM per GPU instance is the only source.
        # Its first tick has no previous sample: utilisation unknown (None), never a guess.
        util = None
        gi = instance.gpu_instance_id
        if gpm and gi is not None:
            pair = gpu.mig_gpm.setdefault(instance.uuid, _GpmPair())
            metrics = self._gpm_tick(pair, lambda sample: nv.nvmlGpmMigSampleGet(parent_handle, gi, sample))
            if "sm_active_pct" in metrics:
                extra["sm_active_pct"] = metrics["sm_active_pct"]
            util = metrics.get("gpm_util_pct")
        info = _instance_info(gpu)
        # MIG has no graphics: only compute processes can hold an instance, listed by its own handle.
        holders = self._holders(instance.handle, graphics=False)
        if gi is not None:
            info["gpu_instance_id"] = str(gi)
        if instance.profile:
            info["mig_profile"] = instance.profile
        return DeviceSample(
            device_id=instance.uuid,
            vendor=self.vendor,
            model=instance.model,
            parent_id=gpu.uuid,
            util_pct=util,
            memory_used_bytes=used,
            memory_total_bytes=total,
            processes=len(holders) if holders is not None else None,
            healthy=parent_error is None,
            error=parent_error,
            extra=extra,
            info=info,
            holders=holders,
        )


def _gpu_info(gpu: _GpuState | None) -> dict[str, str]:
    """A whole GPU's identity text: PCI bus id, and `minor_number` (the N of /dev/nvidiaN) where NVML tells it."""
    info: dict[str, str] = {}
    if gpu is not None and gpu.bus_id:
        info["bus_id"] = gpu.bus_id
    if gpu is not None and gpu.minor_number is not None:
        info["minor_number"] = str(gpu.minor_number)
    return info


def _instance_info(gpu: _GpuState | None) -> dict[str, str]:
    """A MIG instance's identity text: its GPU's bus id and `parent_minor_number`.

    Not `minor_number`: the instance's own device file is /dev/nvidia-caps/nvidia-capN, and what
    Slurm binds (gres.conf `MultipleFiles=`) is the parent's /dev/nvidiaN, which holds every instance.
    """
    info: dict[str, str] = {}
    if gpu is not None and gpu.bus_id:
        info["bus_id"] = gpu.bus_id
    if gpu is not None and gpu.minor_number is not None:
        info["parent_minor_number"] = str(gpu.minor_number)
    return info


class _XidWatcher:
    """Counts XID critical errors per GPU on its own daemon thread (NVML's event wait blocks)."""

    WAIT_MS = 500

    def __init__(self, probe: NvmlProbe) -> None:
        self._probe = probe
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._fatal: dict[str, tuple[int, float]] = {}  # uuid → (xid, monotonic time)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def counts(self, uuid: str) -> tuple[int, int | None]:
        with self._lock:
            return self._counts.get(uuid, 0), self._last.get(uuid)

    def fatal(self, uuid: str, hold_s: float) -> tuple[int, float] | None:
        """The last fatal XID on `uuid` and how many seconds ago, while within `hold_s`."""
        with self._lock:
            seen = self._fatal.get(uuid)
        if seen is None:
            return None
        ago = time.monotonic() - seen[1]
        return (seen[0], ago) if ago < hold_s else None

    def start(self) -> None:
        nv = self._probe._nvml
        try:
            event_set = nv.nvmlEventSetCreate()
        except nv.NVMLError as exc:
            log.info("XID events unavailable: %s", exc)
            return
        registered = 0
        for index in range(nv.nvmlDeviceGetCount()):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                nv.nvmlDeviceRegisterEvents(handle, nv.nvmlEventTypeXidCriticalError, event_set)
                registered += 1
            except nv.NVMLError as exc:
                log.info("XID events unavailable on GPU %d: %s", index, exc)
        if not registered:
            self._free(event_set)
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(event_set,), name="capmon-nvml-xid", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=self.WAIT_MS / 1000 * 4)

    def _run(self, event_set: Any) -> None:
        nv = self._probe._nvml
        try:
            while not self._stop.is_set():
                try:
                    data = nv.nvmlEventSetWait(event_set, self.WAIT_MS)
                except nv.NVMLError_Timeout:
                    continue
                except nv.NVMLError as exc:
                    log.warning("XID event wait failed, no more XID counts until NVML re-init: %s", exc)
                    return
                if not data.eventType & nv.nvmlEventTypeXidCriticalError:
                    continue
                try:
                    uuid = nv.nvmlDeviceGetUUID(data.device)
                except nv.NVMLError:
                    continue
                log.warning("XID %d on %s", data.eventData, uuid)
                with self._lock:
                    self._counts[uuid] = self._counts.get(uuid, 0) + 1
                    self._last[uuid] = int(data.eventData)
                    if int(data.eventData) in self._probe.config.fatal_xids:
                        self._fatal[uuid] = (int(data.eventData), time.monotonic())
        finally:
            self._free(event_set)

    def _free(self, event_set: Any) -> None:
        nv = self._probe._nvml
        try:
            nv.nvmlEventSetFree(event_set)
        except Exception as exc:  # the session may already be shut down
            log.debug("nvmlEventSetFree failed: %s", exc)


# NVML_VALUE_NOT_AVAILABLE as an unsigned long long: what the driver puts in `usedGpuMemory` when it
# cannot tell (Windows WDDM, some vGPU and MIG setups). nvidia-ml-py already turns it into None;
# an older binding or a direct ctypes struct may not.
_NOT_AVAILABLE_ULL = 2**64 - 1


def _used_memory(process: Any) -> int | None:
    """A process entry's device memory in bytes; None where NVML reports it not available."""
    used = getattr(process, "usedGpuMemory", None)
    if used is None or int(used) == _NOT_AVAILABLE_ULL:
        return None
    return int(used)


# nvmlDeviceGetSamples returns a union; which member holds the value depends on the sampling type.
_VALUE_FIELD = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
