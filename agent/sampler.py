"""The sampling loop: one asyncio task per probe, each `sample()` on its own thread under a timeout.

Containment (STYLE.md): a probe that raises, hangs or returns garbage is counted and its known
devices are reported `unavailable` with the reason; the other probes' tasks never notice. A probe
whose last `sample()` has not returned is not called again until it does.

A task may carry a post-processing step (`post`, e.g. resolving who holds each device from
`/proc`): it runs on the same worker thread right after `sample()`, under the same timeout, so its
blocking file reads never run on the event loop. Allocation sources (`AllocationTask`) are run the
same way: own thread, timeout, never two calls in flight.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

from capmon.agent import wire
from capmon.agent.allocation import Allocation, AllocationSource
from capmon.agent.probe import DeviceSample, Holder, HostSample, Probe

log = logging.getLogger("capmon.agent.sampler")

_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(slots=True)
class ProbeHealth:
    """Self-metrics of one probe, cumulative since the agent started."""

    name: str
    samples: int = 0
    errors: int = 0
    timeouts: int = 0
    skipped_ticks: int = 0
    last_duration_s: float | None = None
    last_error: str | None = None
    devices: set[str] = field(default_factory=set)


# (probe name, wall time of the tick, device samples, host sample or None); a task with a `post`
# step passes its result as a fifth argument (None when the probe failed or the step raised).
SampleCallback = Callable[..., None]
# Runs on the probe's worker thread after `sample()`, over the checked device samples.
PostStep = Callable[[list[DeviceSample]], object]


class GarbageSample(ValueError):
    """A probe returned something that is not a valid list of samples."""


def check_samples(probe: Probe, result: object) -> tuple[list[DeviceSample], HostSample | None, list[str]]:
    """Validate what `sample()` returned; drop bad optional fields (with a note), reject bad records."""
    if not isinstance(result, (list, tuple)):
        raise GarbageSample(f"sample() returned {type(result).__name__}, not a list of samples")
    devices: list[DeviceSample] = []
    host: HostSample | None = None
    notes: list[str] = []
    seen: set[str] = set()
    for item in result:
        if isinstance(item, HostSample):
            host = item
            continue
        if not isinstance(item, DeviceSample):
            raise GarbageSample(f"sample() returned a {type(item).__name__} among its samples")
        if not isinstance(item.device_id, str) or not item.device_id or len(item.device_id) > 128:
            raise GarbageSample(f"device_id {item.device_id!r} is not a non-empty string of ≤128 characters")
        if item.device_id in seen:
            raise GarbageSample(f"device_id {item.device_id!r} returned twice")
        seen.add(item.device_id)
        fixed, why = _sanitise(item)
        if why:
            notes.append(f"{item.device_id}: {why}")
        devices.append(fixed)
    return devices, host, notes


def _finite(value: object, lo: float, hi: float) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and lo <= value <= hi
    )


def _sanitise(s: DeviceSample) -> tuple[DeviceSample, str | None]:
    """A value out of its range becomes unknown (None) rather than poisoning the whole report."""
    changes: dict[str, object] = {}
    why: list[str] = []
    checks = {
        "util_pct": (0, 100),
        "memory_used_bytes": (0, 2**53),
        "memory_total_bytes": (0, 2**53),
        "power_w": (0, 100_000),
        # A cumulative counter: any finite non-negative reading (NVML's is 64-bit millijoules).
        "energy_j": (0, math.inf),
        "temp_c": (-100, 300),
        "processes": (0, 1_000_000),
        "index": (0, 2**31),
    }
    for name, (lo, hi) in checks.items():
        value = getattr(s, name)
        if value is not None and not _finite(value, lo, hi):
            changes[name] = None
            why.append(f"{name}={value!r} out of range, dropped")
    for name in ("memory_used_bytes", "memory_total_bytes", "processes", "index"):
        value = changes.get(name, getattr(s, name))
        if isinstance(value, float):
            changes[name] = int(value)
    # The wire protocol's limits (agent/wire.py): the collector refuses a whole report for one bad
    # record, so whatever this probe got wrong is mended or dropped here, never sent.
    extra = {k: float(v) for k, v in s.extra.items() if _FIELD_NAME.match(str(k)) and _finite(v, -1e15, 1e15)}
    if len(extra) > 32:
        extra = dict(list(extra.items())[:32])
    if len(extra) != len(s.extra):
        changes["extra"] = extra
        why.append("invalid or surplus extra fields dropped (at most 32)")
    info = {k: str(v)[:1024] for k, v in s.info.items() if _FIELD_NAME.match(str(k))}
    if len(info) > 16:
        info = dict(list(info.items())[:16])
    if len(info) != len(s.info) or any(len(str(v)) > 1024 for v in s.info.values()):
        changes["info"] = info
    if not isinstance(s.vendor, str) or not s.vendor:
        changes["vendor"] = "unknown"
    elif len(s.vendor) > 64:
        changes["vendor"] = s.vendor[:64]
    if s.model is not None and (not isinstance(s.model, str) or not s.model or len(s.model) > 256):
        changes["model"] = s.model[:256] if isinstance(s.model, str) and s.model else None
    if s.parent_id is not None and (
        not isinstance(s.parent_id, str) or not s.parent_id or len(s.parent_id) > 128
    ):
        changes["parent_id"] = None
        why.append(f"parent_id {s.parent_id!r} dropped")
    if s.error is not None and not isinstance(s.error, str):
        changes["error"] = str(s.error)
    if s.holders is not None:
        holders, dropped = _holders(s.holders)
        if holders is None or dropped:
            changes["holders"] = holders
            why.append(
                f"holders {type(s.holders).__name__} is not a list of Holder, dropped"
                if holders is None
                else f"{dropped} invalid holder(s) dropped"
            )
    if not changes:
        return s, None
    return replace(s, **changes), "; ".join(why) or None


def _integral(value: object, hi: int) -> int | None:
    """An int in 0..hi (an integral float taken as one), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value) if 0 <= value <= hi else None


def _holders(raw: object) -> tuple[tuple[Holder, ...] | None, int]:
    """A probe's holders as the agent can resolve and send them: each a `Holder` with an integer pid
    in range (one pid once), memory a byte count or unknown, a name a bounded string or unknown. A bad
    record costs that record (counted), never the device or the window; a holders value that is not a
    list at all is "cannot tell" (None)."""
    if not isinstance(raw, (tuple, list)):
        return None, 0
    kept: list[Holder] = []
    seen: set[int] = set()
    for h in raw:
        pid = _integral(getattr(h, "pid", None), 2**31) if isinstance(h, Holder) else None
        if pid is None or pid in seen:
            continue
        seen.add(pid)
        memory = h.memory_bytes if h.memory_bytes is None else _integral(h.memory_bytes, 2**53)
        name = h.name[: wire.MAX_NAME_LEN] if isinstance(h.name, str) and h.name else None
        if (pid, memory, name) != (h.pid, h.memory_bytes, h.name):
            h = Holder(pid, memory, name)
        kept.append(h)
    return tuple(kept), len(raw) - len(kept)


def unavailable(device_id: str, vendor: str, reason: str, last: DeviceSample | None = None) -> DeviceSample:
    """What a device is when its probe could not read it: identity kept, measurements unknown."""
    return DeviceSample(
        device_id=device_id,
        vendor=vendor,
        model=last.model if last else None,
        index=last.index if last else None,
        parent_id=last.parent_id if last else None,
        memory_total_bytes=last.memory_total_bytes if last else None,
        healthy=False,
        error=reason,
    )


def _call_in_thread(fn: Callable[[], object], loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """Run `fn` on a daemon thread: a wedged driver call must never block the agent's exit."""
    fut: asyncio.Future = loop.create_future()

    def deliver(ok: bool, value: object) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)  # type: ignore[arg-type]

    def target() -> None:
        try:
            value = fn()
        except BaseException as exc:  # a probe's failure is data for the agent, not a crash
            ok, value = False, exc
        else:
            ok = True
        try:
            loop.call_soon_threadsafe(deliver, ok, value)
        except RuntimeError:
            pass  # the loop closed while the probe was wedged

    threading.Thread(target=target, name="capmon-sample", daemon=True).start()
    return fut


class ProbeTask:
    """Samples one probe on its interval, forever, surviving whatever the probe does."""

    def __init__(
        self,
        probe: Probe,
        on_samples: SampleCallback,
        clock: Callable[[], float] = time.time,
        post: PostStep | None = None,
    ) -> None:
        self.probe = probe
        self.on_samples = on_samples
        self.clock = clock
        self.post = post
        self.health = ProbeHealth(probe.name)
        self._inflight: asyncio.Future | None = None
        self._inflight_since = 0.0
        self._last: dict[str, DeviceSample] = {}
        self._warned: set[str] = set()

    @property
    def busy(self) -> bool:
        """A `sample()` is running on its thread (a hung probe)."""
        return self._inflight is not None and not self._inflight.done()

    async def tick(self) -> None:
        """One sampling attempt: returns after the probe answered, failed or timed out."""
        loop = asyncio.get_running_loop()
        now = self.clock()
        if self._inflight is not None and not self._inflight.done():
            self.health.skipped_ticks += 1
            stuck = now - self._inflight_since
            self._report_failure(now, f"sample() still running after {stuck:.1f}s (probe hung)")
            return
        started = time.perf_counter()
        self._inflight_since = now
        fut = self._inflight = _call_in_thread(self._work, loop)
        try:
            devices, host, notes, extra = await asyncio.wait_for(asyncio.shield(fut), self.probe.timeout_s)
        except asyncio.TimeoutError:
            self.health.timeouts += 1
            fut.add_done_callback(_consume)
            self._report_failure(now, f"sample() timed out after {self.probe.timeout_s:g}s")
            return
        except GarbageSample as exc:
            self.health.errors += 1
            self._report_failure(now, f"garbage from probe: {exc}")
            return
        except Exception as exc:
            self.health.errors += 1
            self._report_failure(now, f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.health.last_duration_s = time.perf_counter() - started
        for note in notes:
            self._warn_once(note)
        self.health.samples += 1
        self.health.last_error = None
        self._last = {d.device_id: d for d in devices}
        self.health.devices = set(self._last)
        self._deliver(now, devices, host, extra)

    def _work(self) -> tuple[list[DeviceSample], HostSample | None, list[str], object]:
        """The worker thread's part: sample, check, then the post step over the checked devices."""
        devices, host, notes = check_samples(self.probe, self.probe.sample())
        extra = None
        if self.post is not None:
            try:
                extra = self.post(devices)
            except Exception as exc:  # the agent's own step: the samples still count
                notes.append(f"probe {self.probe.name}: post-processing failed: {type(exc).__name__}: {exc}")
        return devices, host, notes, extra

    def _deliver(
        self, now: float, devices: list[DeviceSample], host: HostSample | None, extra: object = None
    ) -> None:
        if self.post is None:
            self.on_samples(self.probe.name, now, devices, host)
        else:
            self.on_samples(self.probe.name, now, devices, host, extra)

    def _report_failure(self, now: float, reason: str) -> None:
        self.health.last_error = reason
        self._warn_once(f"probe {self.probe.name}: {reason}", key=reason.split(" after ")[0])
        vendor = self.probe.vendor or self.probe.name
        devices = [unavailable(d, vendor, reason, last) for d, last in self._last.items()]
        if devices:
            self._deliver(now, devices, None)

    def _warn_once(self, message: str, key: str | None = None) -> None:
        key = key or message
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)
        else:
            log.debug("%s", message)

    async def run(self, stop: asyncio.Event) -> None:
        await _every(self.probe.interval_s, self.tick, self.clock, stop, f"probe {self.probe.name}")


async def _every(
    interval: float,
    tick: Callable[[], Awaitable[None]],
    clock: Callable[[], float],
    stop: asyncio.Event,
    what: str,
) -> None:
    """Call `tick` every `interval` seconds until `stop`, surviving whatever it raises."""
    while not stop.is_set():
        began = clock()
        try:
            await tick()
        except Exception:  # the agent's own bug must not silence a probe forever
            log.exception("%s: unexpected error in the sampling loop", what)
        # Sleep to the next multiple of the interval so ticks do not drift.
        delay = interval - ((clock() - began) % interval)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass


NO_ANSWER_YET = "no answer yet"


class AllocationTask:
    """Asks one allocation source for its allocations on its interval, contained like a probe: on a
    worker thread, under its timeout, never two calls in flight. `allocations` is the last answer;
    `error` says why there is no current one (raised, timed out, hung, garbage, not asked yet), and
    then the devices the source covers are "allocation unknown"."""

    def __init__(self, source: AllocationSource, clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.clock = clock
        self.health = ProbeHealth(f"alloc:{source.name}")
        self.allocations: tuple[Allocation, ...] = ()
        self.error: str | None = NO_ANSWER_YET
        self._inflight: asyncio.Future | None = None
        self._inflight_since = 0.0
        self._warned: set[str] = set()

    @property
    def probe(self) -> AllocationSource:
        """The source, under the name a scheduler of tasks reads `interval_s` from (as for probes)."""
        return self.source

    @property
    def busy(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = self.clock()
        if self.busy:
            self.health.skipped_ticks += 1
            self._fail(f"allocations() still running after {now - self._inflight_since:.1f}s (hung)")
            return
        started = time.perf_counter()
        self._inflight_since = now
        fut = self._inflight = _call_in_thread(self._work, loop)
        try:
            answer = await asyncio.wait_for(asyncio.shield(fut), self.source.timeout_s)
        except asyncio.TimeoutError:
            self.health.timeouts += 1
            fut.add_done_callback(_consume)
            self._fail(f"allocations() timed out after {self.source.timeout_s:g}s")
            return
        except Exception as exc:
            self.health.errors += 1
            self._fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return
        finally:
            self.health.last_duration_s = time.perf_counter() - started
        self.health.samples += 1
        self.health.last_error = None
        if self.error is not None and self.error != NO_ANSWER_YET:
            log.info("allocation source %s answers again", self.source.name)
        self.allocations, self.error = answer, None

    def _work(self) -> tuple[Allocation, ...]:
        result = self.source.allocations()
        if not isinstance(result, (list, tuple)):
            raise GarbageSample(f"allocations() returned {type(result).__name__}, not a list of Allocation")
        for item in result:
            if not isinstance(item, Allocation):
                raise GarbageSample(f"allocations() returned a {type(item).__name__} among its allocations")
        return tuple(result)

    def _fail(self, reason: str) -> None:
        self.health.last_error = reason
        self.error = reason
        key = reason.split(" after ")[0]
        if key not in self._warned:
            self._warned.add(key)
            log.warning("allocation source %s: %s", self.source.name, reason)
        else:
            log.debug("allocation source %s: %s", self.source.name, reason)

    async def run(self, stop: asyncio.Event) -> None:
        await _every(
            self.source.interval_s, self.tick, self.clock, stop, f"allocation source {self.source.name}"
        )


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


class Sampler:
    """Runs every active probe's task (and every allocation source's); hands every result to one
    callback. `post_for(probe)` gives a probe's post step, run on its thread after each `sample()`.

    `tasks` lists the sources' tasks first, so whoever steps them in order (the test kit) has each
    source's answer before the probes' samples of the same tick.
    """

    def __init__(
        self,
        probes: Sequence[Probe],
        on_samples: SampleCallback,
        clock: Callable[[], float] = time.time,
        *,
        sources: Sequence[AllocationSource] = (),
        post_for: Callable[[Probe], PostStep | None] | None = None,
    ) -> None:
        self.sources = [AllocationTask(s, clock) for s in sources]
        self.probe_tasks = [
            ProbeTask(p, on_samples, clock, post_for(p) if post_for else None) for p in probes
        ]
        self.tasks: list[ProbeTask | AllocationTask] = [*self.sources, *self.probe_tasks]

    async def prime(self) -> None:
        """Ask every source once (each under its timeout), so the first samples are classified
        knowing the allocations."""
        await asyncio.gather(*(t.tick() for t in self.sources))

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(t.run(stop) for t in self.tasks))

    def health(self) -> list[ProbeHealth]:
        return [t.health for t in self.tasks]
