"""`capmon.testing.nvml`: a faithful fake `pynvml` module, for testing NVML probes without a GPU.

Simulated GPUs behind the real module's error classes, constants and structs (it needs the
`nvidia-ml-py` package, which imports without a driver). Build it with the builder::

    nvml = FakeNvml().gpu(util=95, processes=[4242]).gpu(model="NVIDIA A100-SXM4-80GB")
    probe = NvmlProbe(nvml=nvml)

or from `FakeGpu`/`FakeMig` records (`FakeNvml([FakeGpu(...)])`), then flip their state between
ticks (`nvml.gpus[0].load_pct = 0`, `.lost = True`, `nvml.raise_xid(gpu, 79)`, `driver="r470"`).

Only the functions below exist; anything else the probe calls raises AttributeError, as an older
pynvml would. Errors are the real `pynvml.NVMLError_*` classes (importing pynvml needs no driver), so
the probe's except clauses are exercised against what production raises. Time is simulated:
`advance(seconds)` runs every GPU at its current load, filling the utilisation sample buffer (one
sample every 1/6 s, as the driver does), the GPM counters and the total-energy counter (its power
x the time; `reload_driver()` sets it back to 0, as a driver reload does). `calls` counts every NVML function the
probe calls, by name, so tests and benchmarks/nvml_cost.py can see what one tick costs in calls.
"""

from __future__ import annotations

import collections
import ctypes
import inspect
import itertools
import queue
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pynvml as real

__all__ = ["GIB", "H100_GI_PROFILES", "H100_MIG_SLOTS", "SAMPLE_PERIOD_US", "FakeGpu", "FakeMig", "FakeNvml"]

GIB = 1024**3
SAMPLE_PERIOD_US = 166_667
H100_MIG_SLOTS = 7
# H100 80GB GPU instance profiles as `nvidia-smi mig -lgip` lists them:
# profile index (NVML_GPU_INSTANCE_PROFILE_*) -> (profile id, name, slices, memory MiB).
H100_GI_PROFILES = {
    real.NVML_GPU_INSTANCE_PROFILE_1_SLICE: (19, "1g.10gb", 1, 9856),
    real.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1: (20, "1g.10gb+me", 1, 9856),
    real.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2: (15, "1g.20gb", 1, 19968),
    real.NVML_GPU_INSTANCE_PROFILE_2_SLICE: (14, "2g.20gb", 2, 19968),
    real.NVML_GPU_INSTANCE_PROFILE_3_SLICE: (9, "3g.40gb", 3, 40192),
    real.NVML_GPU_INSTANCE_PROFILE_4_SLICE: (5, "4g.40gb", 4, 40192),
    real.NVML_GPU_INSTANCE_PROFILE_7_SLICE: (0, "7g.80gb", 7, 80896),
}
_PROFILE_BY_NAME = {name: (pid, slices) for pid, name, slices, _mib in H100_GI_PROFILES.values()}
_PROFILE_MIB = {name: mib for _pid, name, _slices, mib in H100_GI_PROFILES.values()}


def _pids(processes: Sequence[int | tuple[int, int]]) -> tuple[list[int], dict[int, int]]:
    pids, memory = [], {}
    for p in processes:
        pid, used = p if isinstance(p, tuple) else (p, GIB)
        pids.append(pid)
        memory[pid] = used
    return pids, memory


def _raise(code: int) -> None:
    raise real.NVMLError(code)


@dataclass
class FakeMig:
    """One MIG instance (a GPU instance with one compute instance)."""

    uuid: str
    gpu_instance_id: int
    name: str = "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
    profile: str = "1g.10gb"  # a name from H100_GI_PROFILES
    memory_total: int = 10 * GIB
    memory_used: int = 0
    pids: list[int] = field(default_factory=list)
    load_pct: float = 0.0
    process_memory: dict[int, int] = field(default_factory=dict)
    busy_us: float = 0.0
    active_us: float = 0.0
    elapsed_us: float = 0.0


@dataclass
class FakeGpu:
    """One physical GPU. `load_pct` is what it is doing now; `None` for power means "not supported"."""

    uuid: str
    bus_id: str
    name: str = "NVIDIA H100 80GB HBM3"
    load_pct: float = 0.0
    sm_active_ratio: float = 0.8  # SM activity per unit of "GPU busy": kernels rarely fill every SM
    memory_total: int = 85_520_809_984
    memory_reserved: int = 503_316_480
    memory_used: int = 0
    power_mw: int | None = 70_000
    utilisation: bool = True  # False: NVML reports NotSupported (some vGPU and passthrough setups)
    temp_c: int = 35
    # nvmlDeviceGetTotalEnergyConsumption: millijoules since the driver loaded, advanced by
    # `FakeNvml.advance` at `power_mw`. False: NotSupported (GPUs before Volta).
    energy_mj: float = 0.0
    energy_supported: bool = True
    # The N of /dev/nvidiaN; None: the GPU's position in `FakeNvml.gpus`. The driver numbers the files
    # in PCI order, so on a real host it can differ from the NVML index (CUDA_DEVICE_ORDER, hot-plug).
    minor_number: int | None = None
    minor_supported: bool = True  # False: NVML reports NotSupported (e.g. WSL, some vGPU guests)
    compute_pids: list[int] = field(default_factory=list)
    graphics_pids: list[int] = field(default_factory=list)
    # Device memory NVML reports per pid (usedGpuMemory); a pid not listed uses 1 GiB.
    process_memory: dict[int, int] = field(default_factory=dict)
    gpm: bool = True
    mig_slots: list[FakeMig | None] | None = None  # None: MIG off; a list: MIG on, None entries empty
    lost: bool = False
    remap_pending: bool = False
    samples: list[tuple[int, int]] = field(default_factory=list)
    busy_us: float = 0.0
    active_us: float = 0.0
    elapsed_us: float = 0.0


@dataclass(frozen=True)
class _Handle:
    gpu: FakeGpu
    mig: FakeMig | None = None


@dataclass(frozen=True)
class _GpuInstance:
    """What nvmlDeviceGetGpuInstanceById returns (a `c_nvmlGpuInstance_t` in real pynvml)."""

    gpu: FakeGpu
    mig: FakeMig


class FakeNvml(types.SimpleNamespace):
    """Stands in for the `pynvml` module. Build it with GPUs; flip their state between ticks."""

    def __init__(
        self,
        gpus: list[FakeGpu] | None = None,
        *,
        library: bool = True,
        driver_loaded: bool = True,
        driver: str = "r550",
    ) -> None:
        super().__init__()
        self.gpus = gpus if gpus is not None else []
        self.library = library
        self.driver_loaded = driver_loaded
        # "r550": current; "r470": no v3 processes, no v2 memory; "r450": no v2 processes either.
        self.driver = driver
        self.initialised = 0
        self.init_calls = 0
        self.calls: collections.Counter[str] = collections.Counter()
        self.now_us = 1_700_000_000_000_000
        self.gpm_samples: dict[int, tuple[float, float, float] | None] = {}
        self._gpm_buffers: dict[int, ctypes.Array] = {}
        self.event_sets: dict[int, tuple[set[str], queue.Queue]] = {}
        self._event_ids = itertools.count(1)
        # The unversioned process calls of real pynvml wrap _v3 and turn FunctionNotFound into
        # NVMLLibraryMismatchError; wrap ours with the very same decorator.
        # Bound without the call counter: one unversioned call is one NVML call, not two.
        self.nvmlDeviceGetComputeRunningProcesses = real.throwOnVersionMismatch(
            FakeNvml.nvmlDeviceGetComputeRunningProcesses_v3.__get__(self)
        )
        self.nvmlDeviceGetGraphicsRunningProcesses = real.throwOnVersionMismatch(
            FakeNvml.nvmlDeviceGetGraphicsRunningProcesses_v3.__get__(self)
        )

    def __getattr__(self, name: str):
        # Constants, error classes and structs come from the real module; its functions do not.
        value = getattr(real, name)
        if isinstance(value, types.FunctionType):
            raise AttributeError(f"fake pynvml has no {name}")
        return value

    def __getattribute__(self, name: str):
        value = super().__getattribute__(name)
        if name.startswith("nvml") and inspect.isroutine(value):
            calls = super().__getattribute__("calls")

            def counted(*args, **kwargs):
                calls[name] += 1
                return value(*args, **kwargs)

            return counted
        return value

    # -- building --------------------------------------------------------------------------------

    def gpu(
        self,
        model: str = "NVIDIA H100 80GB HBM3",
        util: float = 0.0,
        processes: Sequence[int | tuple[int, int]] = (),
        *,
        memory_used: int | None = None,
        memory_total: int = 85_520_809_984,
        power_w: float | None = 70.0,
        temp_c: int = 35,
        mig: Sequence[str] | None = None,
        **fields: Any,
    ) -> FakeNvml:
        """Add a GPU and return the fake, so calls chain. `processes` are compute pids, or
        `(pid, memory_bytes)` pairs; `memory_used` defaults to what they use. `mig` lists the GPU
        instance profiles of a MIG-mode GPU ("1g.10gb", "3g.40gb", ...); `fields` set any other
        `FakeGpu` field (`gpm=False`, `utilisation=False`, `lost=True`)."""
        i = len(self.gpus)
        pids, memory = _pids(processes)
        gpu = FakeGpu(
            uuid=fields.pop("uuid", f"GPU-{i:08x}-c0de-4a11-8e57-{0xCA9A0 + i:012x}"),
            bus_id=fields.pop("bus_id", f"00000000:{0x18 + i:02X}:00.0"),
            name=model,
            load_pct=util,
            memory_total=memory_total,
            memory_used=sum(memory.values()) if memory_used is None else memory_used,
            power_mw=None if power_w is None else int(power_w * 1000),
            temp_c=temp_c,
            compute_pids=pids,
            process_memory=memory,
            **fields,
        )
        if mig is not None:
            gpu.mig_slots = [
                FakeMig(
                    uuid=f"MIG-{i:08x}-c0de-4a11-8e57-{0xB1600 + k:012x}",
                    gpu_instance_id=7 + k,
                    name=f"{model} MIG {profile}",
                    profile=profile,
                    memory_total=_PROFILE_MIB[profile] * 1024 * 1024,
                )
                for k, profile in enumerate(mig)
            ]
        self.gpus.append(gpu)
        return self

    # -- simulation ------------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass with every GPU at its current load and power."""
        end = self.now_us + int(seconds * 1_000_000)
        for gpu in self.gpus:
            if gpu.power_mw is not None:
                gpu.energy_mj += gpu.power_mw * (end - self.now_us) / 1_000_000
        step = SAMPLE_PERIOD_US
        while self.now_us + step <= end:
            self.now_us += step
            for gpu in self.gpus:
                gpu.samples.append((self.now_us, round(gpu.load_pct)))
                gpu.samples[:] = gpu.samples[-120:]
                gpu.busy_us += step * gpu.load_pct / 100 * gpu.sm_active_ratio
                gpu.active_us += step * gpu.load_pct / 100
                gpu.elapsed_us += step
                for mig in gpu.mig_slots or []:
                    if mig is not None:
                        mig.busy_us += step * mig.load_pct / 100
                        mig.active_us += step * mig.load_pct / 100
                        mig.elapsed_us += step
        self.now_us = end

    def reload_driver(self) -> None:
        """What a driver reload does to the energy counters: every GPU's starts again from 0."""
        for gpu in self.gpus:
            gpu.energy_mj = 0.0

    def raise_xid(self, gpu: FakeGpu, xid: int) -> None:
        for uuids, events in self.event_sets.values():
            if gpu.uuid in uuids:
                data = real.c_nvmlEventData_t()
                data.eventType = real.nvmlEventTypeXidCriticalError
                data.eventData = xid
                events.put((gpu.uuid, data))

    # -- checks every real call makes --------------------------------------------------------------

    def _check_init(self) -> None:
        if not self.initialised:
            _raise(real.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: _Handle) -> FakeGpu:
        self._check_init()
        if not self.driver_loaded:
            _raise(real.NVML_ERROR_DRIVER_NOT_LOADED)
        if handle.gpu.lost:
            _raise(real.NVML_ERROR_GPU_IS_LOST)
        if handle.mig is not None and not any(m is handle.mig for m in handle.gpu.mig_slots or []):
            # The handle of a destroyed MIG instance: NVML no longer knows the device.
            _raise(real.NVML_ERROR_INVALID_ARGUMENT)
        return handle.gpu

    def _function(self, since: str) -> None:
        """Raise FunctionNotFound when the simulated driver predates the function."""
        order = ["r450", "r470", "r550"]
        if order.index(self.driver) < order.index(since):
            _raise(real.NVML_ERROR_FUNCTION_NOT_FOUND)

    # -- init ------------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if not self.library:
            _raise(real.NVML_ERROR_LIBRARY_NOT_FOUND)
        if not self.driver_loaded:
            _raise(real.NVML_ERROR_DRIVER_NOT_LOADED)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._check_init()
        self.initialised -= 1

    # -- enumeration -----------------------------------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        if not self.driver_loaded:
            _raise(real.NVML_ERROR_DRIVER_NOT_LOADED)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check_init()
        if not 0 <= index < len(self.gpus):
            _raise(real.NVML_ERROR_INVALID_ARGUMENT)
        handle = _Handle(self.gpus[index])
        self._gpu(handle)
        return handle

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        gpu = self._gpu(handle)
        return handle.mig.uuid if handle.mig else gpu.uuid

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        gpu = self._gpu(handle)
        return handle.mig.name if handle.mig else gpu.name

    def nvmlDeviceGetMinorNumber(self, handle: _Handle) -> int:
        gpu = self._gpu(handle)
        # The probe asks only whole GPUs: a MIG instance's device file is a /dev/nvidia-caps one.
        if handle.mig is not None or not gpu.minor_supported:
            _raise(real.NVML_ERROR_NOT_SUPPORTED)
        if gpu.minor_number is not None:
            return gpu.minor_number
        return next(i for i, g in enumerate(self.gpus) if g is gpu)

    def nvmlDeviceGetPciInfo(self, handle: _Handle):
        gpu = self._gpu(handle)
        info = real.nvmlPciInfo_t()
        info.busId = gpu.bus_id.encode()
        return info

    # -- readings --------------------------------------------------------------------------------

    def nvmlDeviceGetSamples(self, handle: _Handle, sampling_type: int, timestamp: int):
        gpu = self._gpu(handle)
        if sampling_type != real.NVML_GPU_UTILIZATION_SAMPLES:
            _raise(real.NVML_ERROR_NOT_SUPPORTED)
        if handle.mig or gpu.mig_slots is not None or not gpu.utilisation:
            _raise(real.NVML_ERROR_NOT_SUPPORTED)
        newer = [(ts, value) for ts, value in gpu.samples if ts > timestamp]
        if not newer:
            _raise(real.NVML_ERROR_NOT_FOUND)
        out = []
        for ts, value in newer:
            sample = real.c_nvmlSample_t()
            sample.timeStamp = ts
            sample.sampleValue.uiVal = value
            out.append(sample)
        return real.NVML_VALUE_TYPE_UNSIGNED_INT, out

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle):
        gpu = self._gpu(handle)
        if handle.mig or gpu.mig_slots is not None or not gpu.utilisation:
            _raise(real.NVML_ERROR_NOT_SUPPORTED)
        rates = real.c_nvmlUtilization_t()
        rates.gpu = round(gpu.load_pct)
        return rates

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version=None):
        gpu = self._gpu(handle)
        total = handle.mig.memory_total if handle.mig else gpu.memory_total
        used = handle.mig.memory_used if handle.mig else gpu.memory_used
        reserved = 0 if handle.mig else gpu.memory_reserved
        if version:
            self._function("r550")
            if version != real.nvmlMemory_v2:
                _raise(real.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
            mem = real.c_nvmlMemory_v2_t()
            mem.version = version
            mem.total, mem.reserved, mem.used = total, reserved, used
            mem.free = total - reserved - used
            return mem
        mem = real.c_nvmlMemory_t()
        # v1 counts the driver's reservation as used.
        mem.total, mem.used = total, used + reserved
        mem.free = total - mem.used
        return mem

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        gpu = self._gpu(handle)
        if handle.mig or gpu.power_mw is None:
            _raise(real.NVML_ERROR_NOT_SUPPORTED)
        return gpu.power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: _Handle) -> int:
        gpu = self._gpu(handle)
        if handle.mig or not gpu.energy_supported:
            _raise(real.NVML_ERROR_NOT_SUPPORTED)
        return int(gpu.energy_mj)  # a c_uint64 of millijoules in real pynvml

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        gpu = self._gpu(handle)
        if handle.mig or sensor != real.NVML_TEMPERATURE_GPU:
            _raise(real.NVML_ERROR_NOT_SUPPORTED)
        return gpu.temp_c

    def nvmlDeviceGetRemappedRows(self, handle: _Handle):
        gpu = self._gpu(handle)
        if handle.mig:
            _raise(real.NVML_ERROR_NOT_SUPPORTED)
        return (0, 0, int(gpu.remap_pending), 0)

    def _processes(self, handle: _Handle, pids: list[int]):
        memory = handle.mig.process_memory if handle.mig else handle.gpu.process_memory
        return [
            real.nvmlFriendlyObject(
                {
                    "pid": pid,
                    "usedGpuMemory": memory.get(pid, GIB),
                    "gpuInstanceId": 0xFFFFFFFF,
                    "computeInstanceId": 0xFFFFFFFF,
                }
            )
            for pid in pids
        ]

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: _Handle):
        gpu = self._gpu(handle)
        self._function("r550")
        return self._processes(handle, handle.mig.pids if handle.mig else gpu.compute_pids)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: _Handle):
        gpu = self._gpu(handle)
        self._function("r470")
        return self._processes(handle, handle.mig.pids if handle.mig else gpu.compute_pids)

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle: _Handle):
        gpu = self._gpu(handle)
        self._function("r550")
        return self._processes(handle, [] if handle.mig else gpu.graphics_pids)

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: _Handle):
        gpu = self._gpu(handle)
        self._function("r470")
        return self._processes(handle, [] if handle.mig else gpu.graphics_pids)

    # -- MIG -------------------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, handle: _Handle):
        gpu = self._gpu(handle)
        on = int(gpu.mig_slots is not None)
        return [on, on]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: _Handle) -> int:
        self._gpu(handle)
        return H100_MIG_SLOTS

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: _Handle, index: int) -> _Handle:
        gpu = self._gpu(handle)
        if gpu.mig_slots is None or index >= H100_MIG_SLOTS:
            _raise(real.NVML_ERROR_INVALID_ARGUMENT)
        mig = gpu.mig_slots[index] if index < len(gpu.mig_slots) else None
        if mig is None:
            _raise(real.NVML_ERROR_NOT_FOUND)
        return _Handle(gpu, mig)

    def nvmlDeviceGetGpuInstanceId(self, handle: _Handle) -> int:
        self._gpu(handle)
        if handle.mig is None:
            _raise(real.NVML_ERROR_INVALID_ARGUMENT)
        return handle.mig.gpu_instance_id

    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle: _Handle, profile: int, version: int = 2):
        gpu = self._gpu(handle)
        if handle.mig is not None or gpu.mig_slots is None or profile not in H100_GI_PROFILES:
            _raise(real.NVML_ERROR_NOT_SUPPORTED)
        profile_id, name, slices, mib = H100_GI_PROFILES[profile]
        if version == 2:
            info = real.c_nvmlGpuInstanceProfileInfo_v2_t()
            info.name = f"MIG {name}".encode()
        else:
            info = real.c_nvmlGpuInstanceProfileInfo_t()
        info.id, info.sliceCount, info.memorySizeMB = profile_id, slices, mib
        info.instanceCount = H100_MIG_SLOTS // slices
        return info

    def nvmlDeviceGetGpuInstanceById(self, handle: _Handle, gpu_instance_id: int) -> _GpuInstance:
        gpu = self._gpu(handle)
        for mig in gpu.mig_slots or []:
            if mig is not None and mig.gpu_instance_id == gpu_instance_id:
                return _GpuInstance(gpu, mig)
        _raise(real.NVML_ERROR_NOT_FOUND)

    def nvmlGpuInstanceGetInfo(self, gpu_instance: _GpuInstance):
        self._gpu(_Handle(gpu_instance.gpu))
        info = real.c_nvmlGpuInstanceInfo_t()
        info.id = gpu_instance.mig.gpu_instance_id
        info.profileId = _PROFILE_BY_NAME[gpu_instance.mig.profile][0]
        return info

    # -- GPM -------------------------------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, handle: _Handle):
        gpu = self._gpu(handle)
        support = real.c_nvmlGpmSupport_t()
        support.isSupportedDevice = int(gpu.gpm)
        return support

    def nvmlGpmSampleAlloc(self):
        self._check_init()
        buffer = ctypes.create_string_buffer(8)
        sample = ctypes.cast(buffer, real.c_nvmlGpmSample_t)
        address = ctypes.addressof(buffer)
        self._gpm_buffers[address] = buffer
        self.gpm_samples[address] = None
        return sample

    def _address(self, sample) -> int:
        address = ctypes.cast(sample, ctypes.c_void_p).value
        if address not in self.gpm_samples:
            _raise(real.NVML_ERROR_INVALID_ARGUMENT)
        return address

    def nvmlGpmSampleFree(self, sample) -> None:
        self._check_init()
        address = self._address(sample)
        del self.gpm_samples[address]
        del self._gpm_buffers[address]

    def nvmlGpmSampleGet(self, handle: _Handle, sample):
        gpu = self._gpu(handle)
        if not gpu.gpm:
            _raise(real.NVML_ERROR_NOT_SUPPORTED)
        self.gpm_samples[self._address(sample)] = (gpu.busy_us, gpu.active_us, gpu.elapsed_us)
        return sample

    def nvmlGpmMigSampleGet(self, handle: _Handle, gpu_instance_id: int, sample):
        gpu = self._gpu(handle)
        for mig in gpu.mig_slots or []:
            if mig is not None and mig.gpu_instance_id == gpu_instance_id:
                self.gpm_samples[self._address(sample)] = (mig.busy_us, mig.active_us, mig.elapsed_us)
                return sample
        _raise(real.NVML_ERROR_NOT_FOUND)

    def nvmlGpmMetricsGet(self, request):
        self._check_init()
        if request.version != real.NVML_GPM_METRICS_GET_VERSION:
            _raise(real.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        first = self.gpm_samples[self._address(request.sample1)]
        second = self.gpm_samples[self._address(request.sample2)]
        if first is None or second is None:
            _raise(real.NVML_ERROR_INVALID_ARGUMENT)
        elapsed = second[2] - first[2]
        for i in range(request.numMetrics):
            metric = request.metrics[i]
            if elapsed <= 0:
                metric.nvmlReturn = real.NVML_ERROR_INVALID_ARGUMENT
            elif metric.metricId == real.NVML_GPM_METRIC_SM_UTIL:
                metric.value = 100 * (second[0] - first[0]) / elapsed
                metric.nvmlReturn = real.NVML_SUCCESS
            elif metric.metricId == real.NVML_GPM_METRIC_GRAPHICS_UTIL:
                metric.value = 100 * (second[1] - first[1]) / elapsed
                metric.nvmlReturn = real.NVML_SUCCESS
            else:
                metric.nvmlReturn = real.NVML_ERROR_NOT_SUPPORTED
        return request

    # -- events ----------------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> int:
        self._check_init()
        event_set = next(self._event_ids)
        self.event_sets[event_set] = (set(), queue.Queue())
        return event_set

    def nvmlDeviceRegisterEvents(self, handle: _Handle, event_types: int, event_set: int) -> None:
        gpu = self._gpu(handle)
        self.event_sets[event_set][0].add(gpu.uuid)

    def nvmlEventSetWait(self, event_set: int, timeout_ms: int):
        self._check_init()
        try:
            uuid, data = self.event_sets[event_set][1].get(timeout=timeout_ms / 1000)
        except queue.Empty:
            _raise(real.NVML_ERROR_TIMEOUT)
        gpu = next(g for g in self.gpus if g.uuid == uuid)
        # The C struct holds a device pointer; the probe only hands it back to nvmlDeviceGetUUID.
        data_out = types.SimpleNamespace(
            device=_Handle(gpu), eventType=data.eventType, eventData=data.eventData
        )
        return data_out

    def nvmlEventSetFree(self, event_set: int) -> None:
        self.event_sets.pop(event_set, None)

    @property
    def event_threads(self) -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "capmon-nvml-xid"]
