"""`ProbeContract`: the conformance suite every probe plugin runs against itself.

    from capmon.testing import ProbeContract

    class TestMyProbe(ProbeContract):
        def make_probe(self):
            return MyProbe(device=FakeDevice())        # its boundary present, not yet set up

        def make_absent_probe(self):
            return MyProbe(device=None)                # its boundary absent: setup() must refuse

Each `test_*` method below then runs for `TestMyProbe`. Override `advance(seconds)` when the fake
boundary needs time to pass between samples, and `make_unknown_probe()` to check that what the
hardware cannot say is `None`, never a made-up 0.
"""

from __future__ import annotations

import math
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pytest

from capmon.agent import wire
from capmon.agent.probe import DeviceSample, Holder, HostSample, Probe, ProbeConfig, ProbeUnavailable
from capmon.agent.sampler import check_samples

__all__ = ["NetworkTouched", "ProbeContract", "check_sample_list"]

_KEY = re.compile(wire.KEY_PATTERN)
# (field, low, high): the sample's units, as the wire protocol bounds them.
_RANGES = (
    ("util_pct", 0, 100),
    ("memory_used_bytes", 0, 2**53),
    ("memory_total_bytes", 0, 2**53),
    ("power_w", 0, 100_000),
    ("temp_c", -100, 300),
    ("processes", 0, wire.MAX_COUNT),
    ("index", 0, 2**31),
)
_INTEGERS = ("memory_used_bytes", "memory_total_bytes", "processes", "index")


class NetworkTouched(AssertionError):
    """A probe opened a socket or resolved a name: a probe only measures (DESIGN.md)."""


def _problems(sample: DeviceSample, where: str) -> Iterator[str]:
    if not isinstance(sample.device_id, str) or not 0 < len(sample.device_id) <= wire.MAX_ID_LEN:
        yield f"{where}: device_id {sample.device_id!r} is not 1..{wire.MAX_ID_LEN} characters"
    if not isinstance(sample.vendor, str) or not 0 < len(sample.vendor) <= wire.MAX_VENDOR_LEN:
        yield f"{where}: vendor {sample.vendor!r} is not 1..{wire.MAX_VENDOR_LEN} characters"
    for name in ("model", "parent_id", "error"):
        value = getattr(sample, name)
        if value is not None and (not isinstance(value, str) or not value):
            yield f"{where}: {name} {value!r} is not a non-empty string or None"
    for name, lo, hi in _RANGES:
        value = getattr(sample, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            yield f"{where}: {name} {value!r} is not a number (None when unknown)"
        elif not (math.isfinite(value) and lo <= value <= hi):
            yield f"{where}: {name} {value!r} is outside {lo}..{hi}"
        elif name in _INTEGERS and not isinstance(value, int):
            yield f"{where}: {name} {value!r} is a count of bytes or things: an int"
    used, total = sample.memory_used_bytes, sample.memory_total_bytes
    if isinstance(used, int) and isinstance(total, int) and used > total:
        yield f"{where}: memory_used_bytes {used} exceeds memory_total_bytes {total}"
    if not isinstance(sample.healthy, bool):
        yield f"{where}: healthy {sample.healthy!r} is not a bool"
    elif not sample.healthy and not sample.error:
        yield f"{where}: unhealthy with no error saying why (error is for people)"
    if len(sample.extra) > wire.MAX_EXTRA:
        yield f"{where}: {len(sample.extra)} extra fields, at most {wire.MAX_EXTRA}"
    for key, value in sample.extra.items():
        if not isinstance(key, str) or not _KEY.match(key) or len(key) > wire.MAX_KEY_LEN:
            yield f"{where}: extra key {key!r} is not lower_case_with_digits (≤{wire.MAX_KEY_LEN})"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            yield f"{where}: extra[{key!r}] {value!r} is not a finite number"
    if len(sample.info) > wire.MAX_INFO:
        yield f"{where}: {len(sample.info)} info fields, at most {wire.MAX_INFO}"
    for key, value in sample.info.items():
        if not isinstance(key, str) or not _KEY.match(key) or len(key) > wire.MAX_KEY_LEN:
            yield f"{where}: info key {key!r} is not lower_case_with_digits (≤{wire.MAX_KEY_LEN})"
        if not isinstance(value, str) or len(value) > wire.MAX_TEXT_LEN:
            yield f"{where}: info[{key!r}] is not text of ≤{wire.MAX_TEXT_LEN} characters"
    if sample.holders is not None:
        if not isinstance(sample.holders, tuple) or not all(isinstance(h, Holder) for h in sample.holders):
            yield f"{where}: holders is not a tuple of capmon.agent.probe.Holder (or None: cannot tell)"
            return
        if sample.processes is not None and sample.processes != len(sample.holders):
            yield f"{where}: processes {sample.processes} but {len(sample.holders)} holders"
        pids = [h.pid for h in sample.holders]
        if len(set(pids)) != len(pids):
            yield f"{where}: a pid listed twice among the holders {pids}"
        for h in sample.holders:
            if isinstance(h.pid, bool) or not isinstance(h.pid, int) or not 0 <= h.pid <= 2**31:
                yield f"{where}: holder pid {h.pid!r} is not a pid"
            if h.memory_bytes is not None and (
                isinstance(h.memory_bytes, bool)
                or not isinstance(h.memory_bytes, int)
                or not 0 <= h.memory_bytes <= 2**53
            ):
                yield f"{where}: holder {h.pid} memory_bytes {h.memory_bytes!r} is not a byte count"


def check_sample_list(probe: Probe, result: object) -> list[DeviceSample | HostSample]:
    """Assert that `result` (what `probe.sample()` returned) is a valid list of samples, as the agent's
    sampler and the wire protocol judge it, naming every problem; returns it."""
    assert isinstance(result, (list, tuple)), f"sample() returned {type(result).__name__}, not a list"
    problems = []
    ids: list[str] = []
    for i, item in enumerate(result):
        if isinstance(item, HostSample):
            continue
        if not isinstance(item, DeviceSample):
            problems.append(f"[{i}]: a {type(item).__name__}, not a DeviceSample or HostSample")
            continue
        ids.append(item.device_id)
        problems += _problems(item, f"[{i}] {item.device_id!r}")
    if len(set(ids)) != len(ids):
        problems.append(
            f"a device_id returned twice in one sample: {sorted(i for i in ids if ids.count(i) > 1)}"
        )
    if not problems:
        # What the agent itself would mend or drop: nothing, for a conforming probe.
        _, _, notes = check_samples(probe, list(result))
        problems += [f"the agent's sampler would change it: {n}" for n in notes]
    assert not problems, f"probe {probe.name!r} returned invalid samples:\n  " + "\n  ".join(problems)
    return list(result)


def _device_ids(samples: Sequence[object]) -> list[str]:
    return [s.device_id for s in samples if isinstance(s, DeviceSample)]


class _NoNetwork:
    """While on, every way to open a socket or resolve a name raises `NetworkTouched` and is
    recorded, so a probe that swallows the error is caught all the same."""

    def __init__(self) -> None:
        self.touched: list[str] = []
        self._patch = pytest.MonkeyPatch()

    def __enter__(self) -> _NoNetwork:
        def refusing(name: str) -> Any:
            def refuse(*args: Any, **kwargs: Any) -> Any:
                self.touched.append(f"socket.{name}{args!r}"[:200])
                raise NetworkTouched(f"a probe only measures: it called socket.{name}")

            return refuse

        class Socket(socket.socket):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                refusing("socket")(*args)

        for name in ("create_connection", "getaddrinfo", "gethostbyname", "socketpair", "fromfd"):
            self._patch.setattr(socket, name, refusing(name))
        self._patch.setattr(socket, "socket", Socket)
        return self

    def __exit__(self, *exc: object) -> None:
        self._patch.undo()


class ProbeContract:
    """Subclass as `TestYourProbe(ProbeContract)` and implement `make_probe()`; see the module doc."""

    # Samples taken by the checks that sample repeatedly, and the seconds `advance()` lets pass
    # between them (the agent's tick).
    samples: ClassVar[int] = 3
    interval_s: ClassVar[float] = 1.0
    # Fields `make_unknown_probe()`'s devices cannot report: each must be None, never 0.
    unknown_fields: ClassVar[frozenset[str]] = frozenset()

    # -- what a probe's test class provides ----------------------------------------------------

    def make_probe(self) -> Probe:
        """A probe with its hardware boundary present (a fake), not set up yet."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_probe()")

    def make_absent_probe(self) -> Probe | None:
        """A probe whose boundary is absent (no library, no binary, no device): `setup()` must raise
        `ProbeUnavailable`. None skips that check (a probe that needs nothing, like the mock)."""
        return None

    def make_unknown_probe(self) -> Probe | None:
        """A probe whose devices cannot report `unknown_fields` (not supported by the hardware)."""
        return None

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass on the fake boundary between two samples (default: nothing)."""

    # -- helpers ------------------------------------------------------------------------------

    def _set_up(self, probe: Probe | None = None) -> Probe:
        probe = probe if probe is not None else self.make_probe()
        assert isinstance(probe, Probe), f"make_probe() returned {probe!r}, not a capmon.agent.Probe"
        probe.setup()
        self._made = [*getattr(self, "_made", []), probe]
        return probe

    def _series(self, probe: Probe, n: int | None = None) -> list[list[DeviceSample | HostSample]]:
        out = []
        for _ in range(n or self.samples):
            self.advance(self.interval_s)
            out.append(check_sample_list(probe, probe.sample()))
        return out

    def teardown_method(self, method: object) -> None:
        for probe in getattr(self, "_made", []):
            probe.close()
        self._made = []

    # -- the contract -------------------------------------------------------------------------

    def test_probe_class_is_complete(self) -> None:
        probe = self.make_probe()
        cls = type(probe)
        assert isinstance(cls.name, str) and _KEY.match(cls.name) and len(cls.name) <= wire.MAX_ID_LEN, (
            f"{cls.__name__}.name {cls.name!r}: a unique lower_case name"
        )
        assert isinstance(cls.vendor, str) and 0 < len(cls.vendor) <= wire.MAX_VENDOR_LEN, (
            f"{cls.__name__}.vendor {cls.vendor!r}: the vendor its devices report"
        )
        assert isinstance(cls.Config, type) and issubclass(cls.Config, ProbeConfig), (
            f"{cls.__name__}.Config must subclass capmon.agent.ProbeConfig"
        )
        cls.Config()  # every option has a default
        assert probe.interval_s > 0 and probe.timeout_s > 0

    def test_setup_without_its_boundary_raises_probe_unavailable_with_a_reason(self) -> None:
        probe = self.make_absent_probe()
        if probe is None:
            pytest.skip("make_absent_probe() gives no probe without its boundary")
        try:
            probe.setup()
        except ProbeUnavailable as exc:
            reason = str(exc).strip()
        else:
            probe.close()
            raise AssertionError(
                "setup() without its boundary returned: it must raise ProbeUnavailable with a reason"
            )
        # "npu-smi not on PATH": words for the person reading `capmon agent probes`.
        assert len(reason.split()) >= 2, f"ProbeUnavailable({reason!r}) does not say why, for people"
        probe.close()  # after a refused setup too

    def test_samples_are_valid_device_samples(self) -> None:
        probe = self._set_up()
        for samples in self._series(probe):
            assert samples, (
                "sample() returned nothing: a probe with its boundary present has something to say"
            )

    def test_device_ids_are_stable_across_calls(self) -> None:
        probe = self._set_up()
        ids = [_device_ids(s) for s in self._series(probe)]
        assert all(i == ids[0] for i in ids), f"device ids changed between calls: {ids}"

    def test_unknown_is_none_never_zero(self) -> None:
        probe = self.make_unknown_probe()
        if probe is None or not self.unknown_fields:
            pytest.skip("make_unknown_probe() and unknown_fields name no field the hardware cannot report")
        probe = self._set_up(probe)
        devices = [d for s in self._series(probe) for d in s if isinstance(d, DeviceSample)]
        assert devices, "make_unknown_probe() reported no device"
        wrong = {
            f"{d.device_id}.{name}={getattr(d, name)!r}"
            for d in devices
            for name in self.unknown_fields
            if getattr(d, name) is not None
        }
        assert not wrong, f"unknown values must be None (never a made-up 0): {sorted(wrong)}"

    def test_sample_survives_a_worker_thread(self) -> None:
        """The agent calls sample() on a fresh thread every tick."""
        probe = self._set_up()
        on_main = _device_ids(check_sample_list(probe, probe.sample()))
        for _ in range(2):
            self.advance(self.interval_s)
            result: list[Any] = []

            def run(result: list[Any] = result) -> None:
                try:
                    result.append(probe.sample())
                except BaseException as exc:
                    result.append(exc)

            thread = threading.Thread(target=run, name="capmon-sample", daemon=True)
            thread.start()
            thread.join(max(10.0, probe.timeout_s * 2))
            assert not thread.is_alive(), "sample() on a worker thread did not return"
            if isinstance(result[0], BaseException):
                raise result[0]
            assert _device_ids(check_sample_list(probe, result[0])) == on_main

    def test_never_touches_the_network(self) -> None:
        with _NoNetwork() as network:
            probe = self._set_up()
            self._series(probe, 2)
            probe.close()
        assert not network.touched, f"a probe only measures; it touched the network: {network.touched}"

    def test_close_is_idempotent(self) -> None:
        self.make_probe().close()  # never set up
        probe = self._set_up()
        self.advance(self.interval_s)
        probe.sample()
        probe.close()
        probe.close()
