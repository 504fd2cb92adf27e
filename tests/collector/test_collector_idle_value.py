"""`idle_value` on `capmon_device`: (allocated_idle_s + free_s) / 3600 × the collector's price for the model."""

from __future__ import annotations

import re

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from collector_helpers import (
    AGENT_TOKEN,
    JSON,
    RecordingWriter,
    auth,
    batch,
    body,
    device,
    make_config,
    report,
)

from capmon.agent.wire import Batch
from capmon.collector.app import create_app
from capmon.collector.config import PricingConfig
from capmon.collector.fleet import Pricing
from capmon.collector.lineproto import batch_lines

LABEL_KEYS = ("site", "cluster", "pool")
H100 = "NVIDIA H100 80GB HBM3"


def device_fields(data: dict, pricing: PricingConfig | None) -> dict[str, dict[str, str]]:
    """device id → fields of its `capmon_device` line (no string field here contains `,` or `=`)."""
    price = Pricing(pricing).for_device if pricing is not None else None
    out = {}
    for line in batch_lines(msgspec.convert(data, Batch), LABEL_KEYS, price):
        if line.startswith("capmon_device"):
            dev = re.search(r",device=((?:[^,\\ ]|\\.)+)", line).group(1)
            fields = re.match(r"^(?:[^ \\]|\\.)+ (.+) \d+$", line).group(1)
            out[dev] = dict(kv.split("=", 1) for kv in fields.split(","))
    return out


def mixed_batch() -> dict:
    """Two H100 (free 60 s, allocated-idle 45 s + busy 15 s), a busy 910B3, an A100, a model-less device."""
    return batch(
        [
            report(
                devices=[
                    device("GPU-0", "free", model=H100),
                    device("GPU-1", "allocated_idle", model=H100, allocated_idle_s=45.0, busy_s=15.0),
                    device("NPU-0", "busy", model="910B3", vendor="huawei"),
                    device("GPU-2", "free", model="NVIDIA A100-SXM4-80GB"),
                    device("GPU-3", "free", model=None),
                ]
            )
        ]
    )


def test_exact_and_substring_prices():
    pricing = PricingConfig(models={"910B3": 0.9, "H100": 2.1, "h100 80gb": 3.0})
    f = device_fields(mixed_batch(), pricing)
    # "NVIDIA H100 80GB HBM3": no exact key; the longest key contained (case-insensitive) wins: 3.0.
    assert float(f["GPU-0"]["idle_value"]) == pytest.approx(60 / 3600 * 3.0)
    assert float(f["GPU-1"]["idle_value"]) == pytest.approx(45 / 3600 * 3.0)
    # Exact key, busy the whole window: priced, worth 0.
    assert f["NPU-0"]["idle_value"] == "0.0"
    # No key matches and no default: no price, no field (never a made-up 0).
    assert "idle_value" not in f["GPU-2"] and "idle_value" not in f["GPU-3"]
    for fields in f.values():
        if "idle_value" in fields:
            assert "." in fields["idle_value"] and not fields["idle_value"].endswith("i")


def test_exact_key_beats_substring_and_default_prices_the_rest():
    pricing = PricingConfig(default=0.5, models={H100: 4.0, "H100": 2.0})
    f = device_fields(mixed_batch(), pricing)
    assert float(f["GPU-0"]["idle_value"]) == pytest.approx(60 / 3600 * 4.0)
    assert float(f["GPU-2"]["idle_value"]) == pytest.approx(60 / 3600 * 0.5)  # default
    assert float(f["GPU-3"]["idle_value"]) == pytest.approx(60 / 3600 * 0.5)  # no model: default
    assert f["NPU-0"]["idle_value"] == "0.0"


def test_no_pricing_writes_no_idle_value():
    for pricing in (None, PricingConfig()):
        f = device_fields(mixed_batch(), pricing)
        assert all("idle_value" not in fields for fields in f.values())
        assert f["GPU-0"]["idle_s"] == "60.0"


def test_same_lines_as_without_pricing_apart_from_idle_value():
    data = mixed_batch()
    plain = batch_lines(msgspec.convert(data, Batch), LABEL_KEYS)
    priced = batch_lines(
        msgspec.convert(data, Batch), LABEL_KEYS, Pricing(PricingConfig(default=1.0)).for_device
    )
    assert [re.sub(r",idle_value=[^, ]+", "", line) for line in priced] == plain


async def test_collector_writes_idle_value_with_its_configured_pricing():
    # make_config: default 0.5, H100 2.5, 910B 1.25 (the same prices /api/v1/fleet uses).
    writer = RecordingWriter()
    app = create_app(make_config(), writer=writer, clock=lambda: 1_760_000_000)
    data = batch([report(devices=[device("GPU-0", "free"), device("NPU-0", "free", model="Ascend 910B3")])])
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/api/v1/reports", data=body(data), headers={**auth(AGENT_TOKEN), **JSON})
        assert resp.status == 200, await resp.text()
    values = {
        re.search(r",device=(\S+?),", line).group(1): float(re.search(r",idle_value=([^, ]+)", line).group(1))
        for line in writer.lines
        if line.startswith("capmon_device")
    }
    assert values == pytest.approx({"GPU-0": 60 / 3600 * 2.5, "NPU-0": 60 / 3600 * 1.25})


def test_agent_version_is_a_string_field_of_the_report_point_only():
    lines = batch_lines(msgspec.convert(batch(), Batch), LABEL_KEYS)
    [agent_line] = [x for x in lines if x.startswith("capmon_agent,") and ",probe=" not in x.split(" ")[0]]
    assert agent_line.split(" ")[1].endswith(',version="0.1.0"')
    assert sum("version=" in x for x in lines) == 1
    data = batch()
    data["agent"]["version"] = ""
    assert not any("version=" in x for x in batch_lines(msgspec.convert(data, Batch), LABEL_KEYS))
