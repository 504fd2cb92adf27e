"""ProbeContract fails each probe that breaks one rule of the probe contract, and names the rule."""

from __future__ import annotations

import socket
import threading

import pytest

from capmon.agent import DeviceSample, Probe, ProbeUnavailable
from capmon.agent.probe import Holder
from capmon.testing import ProbeContract


class GoodProbe(Probe):
    name = "good"
    vendor = "acme"

    def __init__(self, config=None, device=True):
        super().__init__(config)
        self.device = device
        self.calls = 0

    def setup(self):
        if not self.device:
            raise ProbeUnavailable("no acme device at /dev/acme0")

    def sample(self):
        self.calls += 1
        return [self.record(i) for i in range(2)]

    def record(self, i):
        return DeviceSample(
            f"ACME-{i}",
            "acme",
            "Acme X1",
            i,
            util_pct=12.5,
            memory_used_bytes=1024,
            memory_total_bytes=2**34,
            processes=1,
            holders=(Holder(100 + i, 1024),),
        )


def contract_for(cls):
    class Contract(ProbeContract):
        def make_probe(self):
            return cls()

        def make_absent_probe(self):
            return cls(device=False)

    return Contract()


def run_all(contract) -> dict[str, str]:
    """Each test of the contract: '' when it passed, else the failure message."""
    results = {}
    for name in dir(contract):
        if name.startswith("test_"):
            try:
                getattr(contract, name)()
                results[name] = ""
            except pytest.skip.Exception:
                results[name] = "skipped"
            except AssertionError as exc:
                results[name] = str(exc) or "AssertionError"
            finally:
                contract.teardown_method(None)
    return results


def failures(cls) -> dict[str, str]:
    return {k: v for k, v in run_all(contract_for(cls)).items() if v and v != "skipped"}


def test_a_conforming_probe_passes_every_check():
    assert failures(GoodProbe) == {}


def test_ids_that_change_between_calls_fail():
    class Drifting(GoodProbe):
        def record(self, i):
            return DeviceSample(f"ACME-{i}-{self.calls}", "acme", util_pct=1.0)

    assert "device ids changed" in failures(Drifting)["test_device_ids_are_stable_across_calls"]


def test_out_of_range_units_and_memory_beyond_total_fail():
    class Wild(GoodProbe):
        def record(self, i):
            return DeviceSample(
                f"ACME-{i}", "acme", util_pct=250.0, memory_used_bytes=5, memory_total_bytes=4
            )

    message = failures(Wild)["test_samples_are_valid_device_samples"]
    assert "util_pct 250.0 is outside 0..100" in message
    assert "memory_used_bytes 5 exceeds memory_total_bytes 4" in message


def test_processes_that_disagree_with_holders_fail():
    class Miscounting(GoodProbe):
        def record(self, i):
            return DeviceSample(f"ACME-{i}", "acme", processes=0, holders=(Holder(7),))

    assert "processes 0 but 1 holders" in failures(Miscounting)["test_samples_are_valid_device_samples"]


def test_an_unhealthy_device_without_a_reason_fails():
    class Mute(GoodProbe):
        def record(self, i):
            return DeviceSample(f"ACME-{i}", "acme", healthy=False)

    assert "no error saying why" in failures(Mute)["test_samples_are_valid_device_samples"]


def test_a_made_up_zero_for_an_unknown_field_fails():
    class Guessing(GoodProbe):
        def record(self, i):
            return DeviceSample(f"ACME-{i}", "acme", power_w=0.0)  # the hardware has no power sensor

    class Contract(ProbeContract):
        unknown_fields = frozenset({"power_w"})

        def make_probe(self):
            return Guessing()

        def make_unknown_probe(self):
            return Guessing()

    with pytest.raises(AssertionError, match=r"never a made-up 0.*ACME-0.power_w=0.0"):
        Contract().test_unknown_is_none_never_zero()


def test_a_setup_refusal_that_does_not_say_why_fails():
    class Terse(GoodProbe):
        def setup(self):
            if not self.device:
                raise ProbeUnavailable()

    assert (
        "does not say why"
        in failures(Terse)["test_setup_without_its_boundary_raises_probe_unavailable_with_a_reason"]
    )


def test_a_setup_that_does_not_refuse_a_missing_boundary_fails():
    class Blind(GoodProbe):
        def setup(self):
            pass

    assert (
        "ProbeUnavailable"
        in failures(Blind)["test_setup_without_its_boundary_raises_probe_unavailable_with_a_reason"]
    )


def test_a_probe_that_works_only_on_its_first_thread_fails():
    class ThreadBound(GoodProbe):
        def setup(self):
            self.owner = threading.get_ident()

        def sample(self):
            if threading.get_ident() != self.owner:
                raise RuntimeError("handle used from another thread")
            return super().sample()

    with pytest.raises(RuntimeError, match="another thread"):
        contract_for(ThreadBound).test_sample_survives_a_worker_thread()


def test_a_probe_that_opens_a_socket_fails_even_when_it_swallows_the_error():
    class Chatty(GoodProbe):
        def sample(self):
            try:
                socket.create_connection(("127.0.0.1", 9))
            except Exception:
                pass
            return super().sample()

    assert "touched the network" in failures(Chatty)["test_never_touches_the_network"]
    # The patch is gone after the check.
    assert socket.socket is not None and socket.create_connection.__module__ == "socket"


def test_a_close_that_raises_the_second_time_fails():
    class Fragile(GoodProbe):
        def close(self):
            if getattr(self, "closed", False):
                raise RuntimeError("already closed")
            self.closed = True

    with pytest.raises(RuntimeError, match="already closed"):
        contract_for(Fragile).test_close_is_idempotent()
