"""Idle energy at the collector (issue 16 item 1): `[pricing]` energy price and PUE, the
`capmon_device` energy fields, and idle power / idle energy in /api/v1/fleet and /api/v1/devices."""

from __future__ import annotations

import re

import msgspec
import pytest
from collector_helpers import NOW, batch, device, report

from capmon.agent.configfile import ConfigError
from capmon.agent.wire import Batch
from capmon.collector.config import PricingConfig, parse
from capmon.collector.fleet import FleetView, Pricing
from capmon.collector.lineproto import batch_lines

LABEL_KEYS = ("site", "cluster", "pool")
H100 = "NVIDIA H100 80GB HBM3"
PRICED = PricingConfig(models={"H100": 2.5}, energy_price_per_kwh=0.20, pue=1.3)


def fields_of(data: dict, pricing: PricingConfig) -> dict[str, dict[str, str]]:
    p = Pricing(pricing)
    out = {}
    for line in batch_lines(msgspec.convert(data, Batch), LABEL_KEYS, p.for_device, p.energy_cost):
        if line.startswith("capmon_device"):
            dev = re.search(r",device=((?:[^,\\ ]|\\.)+)", line).group(1)
            fields = re.match(r"^(?:[^ \\]|\\.)+ (.+) \d+$", line).group(1)
            out[dev] = dict(kv.split("=", 1) for kv in fields.split(","))
    return out


def energy_batch(end: int = NOW) -> dict:
    return batch(
        [
            report(
                end=end,
                devices=[
                    device("GPU-0", "free", power_mean_w=70.0, energy_j=4200.0, idle_energy_j=4200.0),
                    device(
                        "GPU-1",
                        "allocated_idle",
                        allocated_idle_s=20.0,
                        busy_s=40.0,
                        power_mean_w=220.0,
                        energy_j=13400.0,
                        idle_energy_j=1400.0,
                    ),
                    device("GPU-2", "busy", power_mean_w=300.0, energy_j=18000.0, idle_energy_j=0.0),
                    device("MIG-0", "free", power_mean_w=None, fraction=3 / 7, model=f"{H100} MIG 3g.40gb"),
                ],
            )
        ]
    )


# -- configuration ---------------------------------------------------------------------------------


def test_pricing_reads_the_energy_price_and_pue_with_defaults_that_price_nothing():
    assert (PricingConfig().energy_price_per_kwh, PricingConfig().pue) == (0.0, 1.0)
    cfg = parse("[pricing]\nenergy_price_per_kwh = 0.2\npue = 1.3\n")
    assert (cfg.pricing.energy_price_per_kwh, cfg.pricing.pue) == (0.2, 1.3)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "pue = 0.9",
            "c.toml: [pricing] pue: must be 1..10 (a PUE is 1 or more; above 10 is a typo), got 0.9",
        ),
        ("pue = nan", "c.toml: [pricing] pue: must be a finite number, got nan"),
        ("energy_price_per_kwh = -0.1", "c.toml: [pricing] energy_price_per_kwh: must be ≥ 0, got -0.1"),
        ("energy_price_per_kwh = inf", "c.toml: [pricing] energy_price_per_kwh: must be a finite number"),
    ],
)
def test_a_bad_energy_price_or_pue_is_refused_naming_the_key(text, says):
    with pytest.raises(ConfigError) as err:
        parse(f"[pricing]\n{text}\n", source="c.toml")
    assert says in str(err.value)


def test_the_sample_documents_the_energy_options_with_their_defaults():
    from importlib.resources import files

    sample = parse(files("capmon.collector").joinpath("sample.toml").read_text())
    assert (sample.pricing.energy_price_per_kwh, sample.pricing.pue) == (0.0, 1.0)


# -- capmon_device ---------------------------------------------------------------------------------


def test_energy_fields_are_floats_and_the_idle_energy_is_priced_with_the_pue():
    f = fields_of(energy_batch(), PRICED)
    assert (f["GPU-0"]["energy_j"], f["GPU-0"]["idle_energy_j"]) == ("4200.0", "4200.0")
    assert float(f["GPU-0"]["idle_energy_cost"]) == pytest.approx(4200 / 3.6e6 * 0.20 * 1.3)
    assert float(f["GPU-1"]["idle_energy_cost"]) == pytest.approx(1400 / 3.6e6 * 0.20 * 1.3)
    assert f["GPU-2"]["idle_energy_cost"] == "0.0"  # priced, busy: worth 0
    # No energy reported: no fields at all, never a made-up 0.
    assert not {"energy_j", "idle_energy_j", "idle_energy_cost"} & set(f["MIG-0"])


def test_unpriced_energy_is_written_without_a_cost():
    f = fields_of(energy_batch(), PricingConfig(models={"H100": 2.5}))
    assert f["GPU-0"]["idle_energy_j"] == "4200.0" and "idle_energy_cost" not in f["GPU-0"]
    assert "idle_value" in f["GPU-0"]


# -- /api/v1/fleet and /api/v1/devices -------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def view(pricing: PricingConfig = PRICED) -> tuple[FleetView, Clock]:
    """A view started an hour before NOW whose clock then reads NOW + 1 (a report just arrived)."""
    clock = Clock(NOW - 3600)
    fleet = FleetView(LABEL_KEYS, Pricing(pricing), clock=clock)
    clock.now = NOW + 1
    return fleet, clock


def test_idle_power_now_is_the_power_of_the_devices_idle_now():
    fleet, _ = view()
    fleet.apply(msgspec.convert(energy_batch(), Batch))
    t = fleet.summary()["totals"]
    assert t["idle_power_w"] == 70.0 + 220.0  # the free and the allocated-idle GPU; not the busy one
    assert t["idle_energy_kwh"] == round((4200 + 1400) / 3.6e6, 6)
    assert t["idle_energy_cost"] == round((4200 + 1400) / 3.6e6 * 0.20 * 1.3, 6)
    by_model = fleet.summary()["by_model"]
    assert by_model[H100]["idle_power_w"] == 290.0
    assert by_model[f"{H100} MIG 3g.40gb"]["idle_power_w"] is None  # no power known: not 0
    assert by_model[f"{H100} MIG 3g.40gb"]["idle_energy_kwh"] is None
    assert fleet.summary()["by_label"]["site"]["fra1"]["idle_energy_kwh"] == t["idle_energy_kwh"]


def test_a_silent_agents_devices_burn_no_idle_power_in_the_view():
    fleet, clock = view()
    fleet.apply(msgspec.convert(energy_batch(), Batch))
    clock.now = NOW + 3 * 60 + 2  # three windows silent: unavailable
    t = fleet.summary()["totals"]
    assert t["idle_power_w"] == 0.0
    assert t["idle_energy_kwh"] == round(5600 / 3.6e6, 6)  # what it spent idle still counts


def test_windows_before_the_collector_started_are_not_since_start_energy():
    clock = Clock(NOW + 10)  # the collector started after the window ended (an agent catching up)
    fleet = FleetView(LABEL_KEYS, Pricing(PRICED), clock=clock)
    fleet.apply(msgspec.convert(energy_batch(), Batch))
    t = fleet.summary()["totals"]
    assert t["idle_energy_kwh"] is None and t["idle_power_w"] == 290.0
    [gpu0] = [d for d in fleet.devices(frozenset({"free"})) if d["device_id"] == "GPU-0"]
    assert gpu0["idle_energy_kwh"] is None


def test_unpriced_energy_has_kwh_and_no_cost():
    fleet, _ = view(PricingConfig())
    fleet.apply(msgspec.convert(energy_batch(), Batch))
    t = fleet.summary()["totals"]
    assert t["idle_energy_kwh"] > 0 and t["idle_energy_cost"] is None


def test_each_device_shows_its_power_now_if_idle_and_its_idle_energy_since_start():
    fleet, clock = view()
    for k in range(3):
        clock.now = NOW + 60 * k + 1
        fleet.apply(msgspec.convert(energy_batch(NOW + 60 * k), Batch))
    by_id = {d["device_id"]: d for d in fleet.devices(None)}
    assert by_id["GPU-0"]["idle_power_w"] == 70.0
    assert by_id["GPU-0"]["idle_energy_kwh"] == round(3 * 4200 / 3.6e6, 6)
    assert by_id["GPU-0"]["idle_energy_cost"] == round(3 * 4200 / 3.6e6 * 0.26, 6)
    assert by_id["GPU-2"]["idle_power_w"] == 0.0 and by_id["GPU-2"]["idle_energy_kwh"] == 0.0
    assert by_id["MIG-0"]["idle_power_w"] is None and by_id["MIG-0"]["idle_energy_kwh"] is None
    assert by_id["GPU-0"]["power_mean_w"] == 70.0  # the existing key stays
