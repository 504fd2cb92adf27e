"""capmon_collector: the real collector app on aiohttp's test server, its answers and refusals."""

from __future__ import annotations

import pytest

from capmon.agent import wire
from capmon.testing.collector import DeliveryRefused


def batch(end: int, state: str = "free", device_id: str = "GPU-0") -> wire.Batch:
    record = wire.DeviceWindow(
        device_id=device_id, vendor="nvidia", model="NVIDIA H100 80GB HBM3", state=state, free_s=60.0
    )
    return wire.Batch(
        agent=wire.AgentIdentity(id="node-1", host="node-1"),
        reports=[wire.Report(seq=1, start=end - 60, end=end, devices=[record])],
    )


async def test_a_posted_batch_shows_in_the_devices_api(capmon_collector, capmon_clock):
    collector = await capmon_collector()
    answer = await collector.post(batch(int(capmon_clock())), gzip=True)
    assert answer.ok, answer.body
    found = await collector.devices()
    assert [(d["device_id"], d["state"]) for d in found["devices"]] == [("GPU-0", "free")]
    assert collector.url.startswith("http://127.0.0.1:")


async def test_a_refused_batch_names_the_field_and_a_delivery_raises(capmon_collector, capmon_clock):
    collector = await capmon_collector()
    bad = batch(int(capmon_clock()))
    bad.reports[0].devices[0].free_s = 600.0  # more state seconds than the 60 s window
    answer = await collector.post(bad)
    assert answer.status == 400 and answer.body["path"].endswith("devices[0].busy_s")
    with pytest.raises(DeliveryRefused, match="400"):
        await collector.deliver(bad)


async def test_wrong_tokens_and_bad_queries_are_refused(capmon_collector, capmon_clock):
    collector = await capmon_collector()
    assert (await collector.post(batch(int(capmon_clock())), token="wrong")).status == 401
    assert (await collector.request("/api/v1/devices", token="wrong")).status == 401
    with pytest.raises(AssertionError, match=r"400.*unknown parameter"):
        await collector.devices(colour="red")
