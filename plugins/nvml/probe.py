"""NVIDIA GPUs (and their MIG instances) through NVML, the library behind `nvidia-smi`."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from capmon.agent import DeviceSample, Probe, ProbeConfig, ProbeUnavailable

log = logging.getLogger(__name__)

INSTALL_HINT = "nvidia-ml-py not installed: pip install 'capmon[nvidia]'"

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
    # XIDs after which NVIDIA says the GPU needs a reset (48 double-bit ECC, 79 fallen off the bus,
    # 95 uncontained ECC): the GPU is reported unhealthy (so `unavailable`, never rentable) for
    # `fatal_xid_hold_s` seconds after the last one. Needs `xid_events`.
    fatal_xids: tuple[int, ...] = (48, 79, 95)
    fatal_xid_hold_s: float = 600.0


@dataclass
class _GpuState:
    """What the probe remembers about one GPU between ticks (keyed by UUID)."""

    uuid: str
    model: str | None = None
    bus_id: str | None = None
    last_util_ts: int = 0
    gpm_supported: bool | None = None
    gpm_prev: Any = None
    mig_gpm_prev: dict[int, Any] = field(default_factory=dict)


class NvmlProbe(Probe):
    """Utilisation, memory, power, temperature and processes of every NVIDIA GPU and MIG instance."""

    name = "nvml"
    vendor = "nvidia"
    Config = NvmlConfig
    default_interval_s = 1.0
    default_timeout_s = 5.0

    def __init__(self, config: NvmlConfig | None = None, nvml: ModuleType | None = None) -> None:
        super().__init__(config)
        self.config: NvmlConfig
        self._nvml: Any = nvml
        self._initialised = False
        self._needs_reinit = False
        self._reinit_error: str | None = None
        self._gpus: dict[str, _GpuState] = {}
        self._uuid_at_index: dict[int, str] = {}
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
        self._free_gpm_samples()
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
        self._free_gpm_samples()
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

    def _free_gpm_samples(self) -> None:
        for gpu in self._gpus.values():
            for sample in [gpu.gpm_prev, *gpu.mig_gpm_prev.values()]:
                if sample is not None:
                    try:
                        self._nvml.nvmlGpmSampleFree(sample)
                    except Exception as exc:  # freeing after a lost GPU may fail; nothing to recover
                        log.debug("nvmlGpmSampleFree failed: %s", exc)
            gpu.gpm_prev = None
            gpu.mig_gpm_prev.clear()
            # GPM support and the utilisation cursor are re-learnt after a re-init.
            gpu.gpm_supported = None

    def _note(self, exc: BaseException) -> None:
        if type(exc).__name__ in _REINIT_ERRORS:
            self._needs_reinit = True

    # -- sampling --------------------------------------------------------------------------------

    def sample(self) -> list[DeviceSample]:
        nv = self._nvml
        if self._needs_reinit or not self._initialised:
            if not self._reinitialise():
                return [
                    self._unreadable(uuid, self._reinit_error or "NVML unavailable", index=i)
                    for i, uuid in sorted(self._uuid_at_index.items())
                ]
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as exc:
            self._note(exc)
            self._needs_reinit = True
            return [
                self._unreadable(uuid, f"NVML cannot count GPUs: {exc}", index=i)
                for i, uuid in sorted(self._uuid_at_index.items())
            ]
        samples: list[DeviceSample] = []
        for index in range(count):
            samples.extend(self._sample_gpu(index))
        return samples

    def _unreadable(
        self, device_id: str, error: str, index: int | None = None, parent_id: str | None = None
    ) -> DeviceSample:
        gpu = self._gpus.get(device_id)
        info = {"bus_id": gpu.bus_id} if gpu is not None and gpu.bus_id else {}
        return DeviceSample(
            device_id=device_id,
            vendor=self.vendor,
            model=gpu.model if gpu else None,
            index=index,
            parent_id=parent_id,
            healthy=False,
            error=error,
            info=info,
        )

    def _sample_gpu(self, index: int) -> list[DeviceSample]:
        nv = self._nvml
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = nv.nvmlDeviceGetUUID(handle)
        except nv.NVMLError as exc:
            self._note(exc)
            # Without a handle there is no UUID to ask for: use the one this index had last tick.
            # A GPU lost before it was ever read is still reported, so it does not silently vanish.
            device_id = self._uuid_at_index.get(index, f"nvml-index-{index}")
            return [self._unreadable(device_id, f"GPU {index}: {exc}", index=index)]
        self._uuid_at_index[index] = uuid
        gpu = self._gpus.get(uuid)
        if gpu is None:
            gpu = self._gpus[uuid] = _GpuState(uuid=uuid)
        try:
            return self._read_gpu(handle, index, gpu)
        except nv.NVMLError as exc:
            self._note(exc)
            return [self._unreadable(uuid, f"GPU {index}: {exc}", index=index)]

    def _read_gpu(self, handle: Any, index: int, gpu: _GpuState) -> list[DeviceSample]:
        nv = self._nvml
        if gpu.model is None:
            gpu.model = self._field(lambda: nv.nvmlDeviceGetName(handle))
        if gpu.bus_id is None:
            pci = self._field(lambda: nv.nvmlDeviceGetPciInfo(handle))
            if pci is not None:
                bus_id = pci.busId
                gpu.bus_id = bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)
        info = {"bus_id": gpu.bus_id} if gpu.bus_id else {}
        extra: dict[str, float] = {}

        mig_on = False
        if self.config.mig:
            mode = self._field(lambda: nv.nvmlDeviceGetMigMode(handle))
            mig_on = mode is not None and mode[0] == nv.NVML_DEVICE_MIG_ENABLE

        util = None if mig_on else self._utilisation(handle, gpu)
        if self.config.gpm and not mig_on:
            extra.update(self._gpm_metrics(handle, gpu))
        used, total, reserved = self._memory(handle)
        if reserved is not None:
            extra["memory_reserved_bytes"] = float(reserved)
        power_mw = self._field(lambda: nv.nvmlDeviceGetPowerUsage(handle))
        temp = self._field(lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
        processes = self._processes(handle)
        healthy, error = self._health(handle)
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
        if mig_on:
            info["mig"] = "enabled"
            children = self._read_mig(handle, gpu)
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
            temp_c=float(temp) if temp is not None else None,
            processes=processes,
            healthy=healthy,
            error=error,
            extra=extra,
            info=info,
        )
        return [parent, *children]

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

    def _memory(self, handle: Any) -> tuple[int | None, int | None, int | None]:
        """(used, total, reserved) bytes; v2 `used` leaves out the driver's own reservation, v1 includes it."""
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
        mem = self._field(lambda: nv.nvmlDeviceGetMemoryInfo(handle))
        if mem is None:
            return None, None, None
        return int(mem.used), int(mem.total), None

    def _processes(self, handle: Any) -> int | None:
        """Distinct PIDs holding the device (compute, plus graphics if configured); None when unknown."""
        compute = self._process_list(handle, "nvmlDeviceGetComputeRunningProcesses")
        if compute is None:
            return None
        pids = {p.pid for p in compute}
        if self.config.graphics_processes:
            graphics = self._process_list(handle, "nvmlDeviceGetGraphicsRunningProcesses")
            if graphics is not None:
                pids.update(p.pid for p in graphics)
        return len(pids)

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
        """SM activity between the previous tick's GPM sample and this one's: two samples per interval."""
        if not self._gpm_supported(handle, gpu):
            return {}
        nv = self._nvml
        current = self._gpm_take(lambda sample: nv.nvmlGpmSampleGet(handle, sample))
        previous, gpu.gpm_prev = gpu.gpm_prev, current
        return self._gpm_compare(previous, current)

    def _gpm_take(self, read: Any) -> Any:
        """A freshly allocated GPM sample filled by `read`, or None (and nothing leaked) when that fails."""
        nv = self._nvml
        sample = self._field(nv.nvmlGpmSampleAlloc)
        if sample is None:
            return None
        try:
            read(sample)
        except nv.NVMLError as exc:
            self._field(lambda: nv.nvmlGpmSampleFree(sample))
            if type(exc).__name__ in _REINIT_ERRORS:
                raise
            return None
        return sample

    def _gpm_compare(self, previous: Any, current: Any) -> dict[str, float]:
        nv = self._nvml
        if previous is None or current is None:
            if previous is not None:
                self._field(lambda: nv.nvmlGpmSampleFree(previous))
            return {}
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
        try:
            result = self._field(lambda: nv.nvmlGpmMetricsGet(request))
        finally:
            self._field(lambda: nv.nvmlGpmSampleFree(previous))
        if result is None:
            return {}
        out = {}
        for i, key in enumerate(wanted):
            metric = result.metrics[i]
            if metric.nvmlReturn == nv.NVML_SUCCESS:
                out[key] = min(100.0, max(0.0, float(metric.value)))
        return out

    # -- MIG -------------------------------------------------------------------------------------

    def _read_mig(self, parent_handle: Any, gpu: _GpuState) -> list[DeviceSample]:
        """Every MIG instance on this GPU, enumerated afresh each tick (instances come and go)."""
        nv = self._nvml
        slots = self._field(lambda: nv.nvmlDeviceGetMaxMigDeviceCount(parent_handle)) or 0
        gpm = self.config.gpm and self._gpm_supported(parent_handle, gpu)
        seen_gi: set[int] = set()
        children = []
        for slot in range(slots):
            try:
                handle = nv.nvmlDeviceGetMigDeviceHandleByIndex(parent_handle, slot)
            except nv.NVMLError as exc:
                if type(exc).__name__ in _REINIT_ERRORS:
                    raise
                if type(exc).__name__ not in _EMPTY_SLOT_ERRORS:
                    log.info("GPU %s MIG slot %d: %s", gpu.uuid, slot, exc)
                # Instances need not be contiguous: a destroyed one leaves a hole, later slots may hold more.
                continue
            uuid = self._field(lambda h=handle: nv.nvmlDeviceGetUUID(h))
            if uuid is None:
                continue
            try:
                children.append(self._read_mig_instance(parent_handle, handle, uuid, gpu, gpm, seen_gi))
            except nv.NVMLError as exc:
                if type(exc).__name__ in _REINIT_ERRORS:
                    raise
                children.append(self._unreadable(uuid, f"MIG {uuid}: {exc}", parent_id=gpu.uuid))
        # Forget GPM samples of instances that were destroyed since the last tick.
        for gi in set(gpu.mig_gpm_prev) - seen_gi:
            stale = gpu.mig_gpm_prev.pop(gi)
            self._field(lambda s=stale: nv.nvmlGpmSampleFree(s))
        return children

    def _read_mig_instance(
        self, parent_handle: Any, handle: Any, uuid: str, gpu: _GpuState, gpm: bool, seen_gi: set[int]
    ) -> DeviceSample:
        nv = self._nvml
        model = self._field(lambda: nv.nvmlDeviceGetName(handle))
        used, total, reserved = self._memory(handle)
        extra: dict[str, float] = {}
        if reserved is not None:
            extra["memory_reserved_bytes"] = float(reserved)
        # NVML has no utilisation counter for a MIG instance; GPM per GPU instance is the only source.
        util = None
        gi = self._field(lambda: nv.nvmlDeviceGetGpuInstanceId(handle))
        if gpm and gi is not None:
            seen_gi.add(gi)
            current = self._gpm_take(lambda sample: nv.nvmlGpmMigSampleGet(parent_handle, gi, sample))
            previous = gpu.mig_gpm_prev.pop(gi, None)
            if current is not None:
                gpu.mig_gpm_prev[gi] = current
            metrics = self._gpm_compare(previous, current)
            extra.update({k: v for k, v in metrics.items() if k == "sm_active_pct"})
            util = metrics.get("gpm_util_pct")
        info = {"bus_id": gpu.bus_id} if gpu.bus_id else {}
        if gi is not None:
            info["gpu_instance_id"] = str(gi)
        return DeviceSample(
            device_id=uuid,
            vendor=self.vendor,
            model=model,
            parent_id=gpu.uuid,
            util_pct=util,
            memory_used_bytes=used,
            memory_total_bytes=total,
            processes=self._processes(handle),
            extra=extra,
            info=info,
        )


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


# nvmlDeviceGetSamples returns a union; which member holds the value depends on the sampling type.
_VALUE_FIELD = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
