"""The live fleet view through `FleetView` itself: staleness, bounds, replays, refusals, MIG, state_since.

Issue 11 items 6, 8 (data side), 12, 16, 21; issue 19 items 3 (live view), 6, 10.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from collector_helpers import NOW, Clock, batch, device, report

from capmon.agent import wire
from capmon.collector import fleet as fleet_module
from capmon.collector.config import PricingConfig
from capmon.collector.fleet import FleetView, Pricing

PRICES = {"H100": 2.5, "910B": 1.25}


def make_view(clock: Clock, prices: dict[str, float] | None = None, **kw: Any) -> FleetView:
    pricing = Pricing(PricingConfig(default=0.5, models=PRICES if prices is None else prices))
    return FleetView(("site",), pricing, clock=clock, **kw)


def apply(view: FleetView, payload: dict) -> tuple[int, int]:
    return view.apply(msgspec.convert(payload, wire.Batch))


def with_window_s(payload: dict, window_s: int) -> dict:
    payload["agent"]["window_s"] = window_s
    return payload


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW - 3600)  # the view starts an hour before the reports


# -- issue 11 item 6: staleness by the configured window ---------------------------------------------


def test_first_partial_window_does_not_make_an_agent_stale(clock):
    """A 20 s agent started 1.2 s before a boundary: its first window is 1 s long."""
    view = make_view(clock)
    clock.now = NOW + 0.5
    apply(view, with_window_s(batch([report(end=NOW, window=1)]), 20))
    clock.advance(5)
    assert view.stale_agents() == 0
    assert view.devices()[0]["state"] == "free"
    clock.advance(3 * 20 - 5)  # three configured windows: not yet
    assert view.stale_agents() == 0
    clock.advance(1)
    assert view.stale_agents() == 1


def test_older_agent_falls_back_to_the_longest_window_seen(clock):
    view = make_view(clock)
    clock.now = NOW + 0.5
    apply(view, batch([report(end=NOW, window=1)]))  # no window_s: at least the default 60 s
    clock.advance(5)
    assert view.stale_agents() == 0
    apply(view, batch([report(seq=2, end=NOW + 20, window=20)]))
    apply(view, batch([report(seq=3, end=NOW + 21, window=1)]))  # a short last window does not shrink it
    assert view.agents()[0]["window_s"] == 20.0


# -- issue 11 item 12: bounded whatever agents send ---------------------------------------------------


def test_unique_model_names_from_one_agent_are_bounded(clock):
    """88,001 models from one agent with one live device: totals folded, /api/v1/fleet small."""
    view = make_view(clock)
    ident = wire.AgentIdentity(id="node-1", host="h", window_s=60)
    for i in range(88_001):
        d = wire.DeviceWindow(
            device_id="GPU-0", vendor="nvidia", model=f"model-{i:06d}", state="free", free_s=1.0
        )
        view.apply(
            wire.Batch(
                agent=ident, reports=[wire.Report(seq=i + 1, start=NOW + i, end=NOW + i + 1, devices=[d])]
            )
        )
    agent = view.by_id["node-1"]
    assert len(agent.seconds) <= fleet_module.MAX_MODELS_PER_AGENT
    assert agent.folded_models == 88_001 - (fleet_module.MAX_MODELS_PER_AGENT - 1)
    summary = view.summary()
    assert len(summary["by_model"]) <= fleet_module.MAX_BREAKDOWN_KEYS
    assert len(json.dumps(summary)) < 100_000
    # Nothing is lost by folding: every second is still in the totals.
    assert summary["totals"]["device_hours"]["free"] == pytest.approx(88_001 / 3600, rel=1e-5)
    assert view.agents()[0]["models_folded"] == agent.folded_models


def test_breakdowns_cap_their_keys_and_count_what_they_fold(clock):
    view = make_view(clock)
    for a in range(250):
        apply(
            view,
            batch(
                [report(devices=[device(model=f"model-{a:03d}")])], agent_id=f"n{a}", labels={"site": f"s{a}"}
            ),
        )
    summary = view.summary()
    assert len(summary["by_model"]) == fleet_module.MAX_BREAKDOWN_KEYS
    assert len(summary["by_label"]["site"]) == fleet_module.MAX_BREAKDOWN_KEYS
    kept = fleet_module.MAX_BREAKDOWN_KEYS - 1
    assert summary["folded"] == {"by_model": 250 - kept, "by_label": {"site": 250 - kept}}
    assert summary["by_model"]["(other)"]["devices"] == 250 - kept
    assert sum(m["devices"] for m in summary["by_model"].values()) == 250


def test_price_cache_is_bounded():
    pricing = Pricing(PricingConfig(models=PRICES))
    for i in range(fleet_module.MAX_PRICE_CACHE * 3):
        pricing.price(f"H100 variant {i}")
    assert len(pricing._cache) <= fleet_module.MAX_PRICE_CACHE


# -- issue 11 item 16: replays count once ---------------------------------------------------------------


def test_one_window_under_fifty_seqs_counts_once(clock):
    view = make_view(clock)
    for seq in range(1, 51):
        apply(view, batch([report(seq=seq, end=NOW)]))
    assert view.summary()["totals"]["device_hours"]["free"] == pytest.approx(60 / 3600, rel=1e-4)


def test_flipping_instance_does_not_recount_a_window(clock):
    view = make_view(clock)
    for instance in ("a", "b", "a", "c"):
        assert apply(view, batch([report(seq=1, end=NOW)], instance=instance)) in ((1, 0), (0, 1))
    assert view.summary()["totals"]["device_hours"]["free"] == pytest.approx(60 / 3600, rel=1e-4)


def test_a_huge_seq_does_not_turn_later_windows_into_replays(clock):
    view = make_view(clock)
    apply(view, batch([report(seq=2**53, end=NOW, devices=[device(state="busy")])]))
    assert apply(view, batch([report(seq=7, end=NOW + 60)])) == (1, 0)
    assert view.summary()["totals"]["states"]["free"] == 1
    # And an older window under a new seq leaves the view where it is.
    assert apply(view, batch([report(seq=8, end=NOW - 60, devices=[device(state="busy")])])) == (0, 1)
    assert view.summary()["totals"]["states"]["free"] == 1
    assert view.summary()["totals"]["device_hours"]["free"] == pytest.approx(60 / 3600, rel=1e-4)


# -- issue 11 item 21: why a device is unavailable ---------------------------------------------------------


def test_devices_say_why_a_device_is_unavailable(clock):
    view = make_view(clock)
    clock.now = NOW
    error = "simulated XID 79: fallen off the bus"
    apply(view, batch([report(devices=[device(state="unavailable", error=error, reason="needs a reset")])]))
    (found,) = view.devices(frozenset({"unavailable"}))
    assert found["error"] == error and found["reason"] == "needs a reset"


# -- issue 11 item 8 (data side): refusals per agent ------------------------------------------------------


def test_refusals_of_an_agent_that_never_delivered_are_listed(clock):
    view = make_view(clock)
    for i in range(3):
        detail = f"$.reports[0].end: end is {400 + i}s in the future"
        view.record_refusal("node-9", "clock", detail, NOW + i, host="gpu-node-9")
    (listed,) = view.agents(now=NOW + 3)
    assert listed["id"] == "node-9" and listed["devices"] == 0 and listed["stale"] is True
    assert listed["host"] == "gpu-node-9"
    assert listed["last_report_end"] is None
    assert listed["refusals"] == {
        "clock": {
            "count": 3,
            "last_detail": "$.reports[0].end: end is 402s in the future",
            "last_at": NOW + 2,
        }
    }
    # It delivers: the same entry, refusals kept, now with its report.
    clock.now = NOW + 10
    apply(view, with_window_s(batch([report(end=NOW + 10)], agent_id="node-9"), 60))
    (listed,) = view.agents(now=NOW + 10)
    assert listed["refusals"]["clock"]["count"] == 3
    assert listed["last_report_end"] == NOW + 10 and listed["devices"] == 1 and listed["window_s"] == 60
    assert listed["stale"] is False and listed["instance"] == "spool-a" and listed["version"] == "0.1.0"


def test_refusal_records_are_bounded(clock):
    view = make_view(clock)
    view.record_refusal("node-1", "invalid", "x" * 100_000, NOW)
    for r in range(40):
        view.record_refusal("node-1", f"reason-{r}", "d", NOW)
    (listed,) = view.agents(now=NOW)
    assert len(listed["refusals"]) == fleet_module.MAX_REFUSAL_REASONS
    assert len(listed["refusals"]["invalid"]["last_detail"]) == wire.MAX_TEXT_LEN
    assert listed["refusals"]["(other)"]["count"] == 40 - (fleet_module.MAX_REFUSAL_REASONS - 2)
    for a in range(fleet_module.MAX_REFUSED_ONLY_AGENTS + 50):
        view.record_refusal(f"ghost-{a}", "forbidden", "d", NOW)
    assert len(view.agents(now=NOW)) == fleet_module.MAX_REFUSED_ONLY_AGENTS
    assert view.refused_only_evicted == 51  # node-1 was the least recently refused


def test_refusing_agents_are_forgotten_like_silent_ones(clock):
    view = make_view(clock, forget_after_s=600.0)
    view.record_refusal("node-9", "clock", "d", NOW)
    assert [a["id"] for a in view.agents(now=NOW + 600)] == ["node-9"]
    assert view.agents(now=NOW + 601) == []


# -- issue 19 item 10: MIG instances priced and counted as their fraction ----------------------------------


def mig(i: int, parent: str = "GPU-p", profile: str = "1g.10gb", fraction: float = 1 / 7, **kw: Any) -> dict:
    return device(
        f"MIG-{parent}-{i}",
        model="NVIDIA H100 80GB HBM3",
        parent_id=parent,
        fraction=fraction,
        info={"mig_profile": profile},
        **kw,
    )


def test_mig_instances_count_and_price_as_their_fraction(clock):
    """One idle whole H100 plus one 7-way MIG H100 at 2.50/h: 5.0/h and 2 GPU-equivalents."""
    view = make_view(clock, prices={"H100": 2.5})
    apply(view, batch([report(devices=[device("GPU-w"), *(mig(i) for i in range(7))])]))
    totals = view.summary()["totals"]
    assert totals["idle_value_per_hour"] == pytest.approx(5.0)
    assert totals["idle_gpu_equivalents"] == pytest.approx(2.0)
    assert totals["gpu_equivalents"]["free"] == pytest.approx(2.0)
    assert totals["idle_gpu_hours"] == pytest.approx(2 * 60 / 3600, rel=1e-4)
    assert totals["states"]["free"] == 8 and totals["idle_device_hours"] == pytest.approx(
        8 * 60 / 3600, rel=1e-4
    )
    found = {d["device_id"]: d for d in view.devices(limit=10)}
    assert found["MIG-GPU-p-0"]["value_per_hour"] == pytest.approx(2.5 / 7, abs=1e-6)
    assert found["MIG-GPU-p-0"]["fraction"] == pytest.approx(1 / 7)
    assert found["GPU-w"]["value_per_hour"] == 2.5 and found["GPU-w"]["fraction"] == 1.0


@pytest.mark.parametrize(
    ("prices", "model", "expected"),
    [
        ({"H100": 2.5, "1g.10gb": 0.5}, "NVIDIA H100 80GB HBM3", 0.5),
        ({"H100": 2.5, "H100 1g.10gb": 0.4}, "NVIDIA H100 80GB HBM3", 0.4),
        ({"H100": 2.5, "A100 1g.10gb": 0.4}, "NVIDIA H100 80GB HBM3", 2.5 / 7),
        ({"H100": 2.5}, "NVIDIA H100 80GB HBM3", 2.5 / 7),
    ],
)
def test_a_price_set_for_the_mig_profile_wins(prices, model, expected):
    pricing = Pricing(PricingConfig(models=prices))
    d = msgspec.convert({**mig(0), "model": model}, wire.DeviceWindow)
    assert pricing.for_device(d) == pytest.approx(expected)
    assert pricing.price(model) == 2.5  # unchanged for callers that price a model


# -- issue 19 item 6: state_since ---------------------------------------------------------------------------


def test_reclaim_list_goes_by_time_in_state_not_the_idle_streak(clock):
    """Free for 3 days, taken by a job 2 minutes ago: not a 1-day reclaim candidate."""
    view = make_view(clock)
    clock.now = NOW
    taken = device("GPU-new", state="allocated_idle", idle_since=NOW - 3 * 86400, state_since=NOW - 120)
    held = device("GPU-old", state="allocated_idle", idle_since=NOW - 2 * 86400, state_since=NOW - 2 * 86400)
    legacy = device("GPU-legacy", state="allocated_idle", idle_since=NOW - 129600)  # no state_since
    apply(view, batch([report(devices=[taken, held, legacy])]))
    ids = lambda found: [d["device_id"] for d in found]  # noqa: E731
    reclaim = view.devices(frozenset({"allocated_idle"}), min_idle_s=86400)
    assert ids(reclaim) == ["GPU-old", "GPU-legacy"]
    assert reclaim[0]["in_state_for_s"] == 2 * 86400 and reclaim[0]["state_since"] == NOW - 2 * 86400
    assert ids(view.devices(frozenset({"allocated_idle"}))) == ["GPU-old", "GPU-legacy", "GPU-new"]
    # state=idle (both idle states) still goes by the idle streak.
    assert ids(view.devices(frozenset(wire.IDLE_STATES), min_idle_s=86400)) == [
        "GPU-new",
        "GPU-old",
        "GPU-legacy",
    ]


# -- issue 19 item 3: a vanished or destroyed device is never capacity -----------------------------------------


def test_mig_reconfiguration_removes_the_destroyed_instances(clock):
    """7×1g → 2×3g: 2 devices afterwards, not 9 with the 7 destroyed ones free."""
    view = make_view(clock, prices={"H100": 2.5})
    apply(view, batch([report(devices=[mig(i) for i in range(7)])]))
    apply(
        view,
        batch(
            [
                report(
                    seq=2,
                    end=NOW + 60,
                    devices=[mig(10 + i, profile="3g.40gb", fraction=3 / 7) for i in range(2)],
                )
            ]
        ),
    )
    totals = view.summary()["totals"]
    assert totals["devices"] == 2 and totals["gpu_equivalents"]["free"] == pytest.approx(6 / 7)
    assert totals["idle_value_per_hour"] == pytest.approx(2.5 * 6 / 7)


def test_a_vanished_device_is_unavailable_until_known_gone(clock):
    view = make_view(clock, forget_after_s=3600.0)
    clock.now = NOW
    apply(view, batch([report(devices=[device("GPU-0"), device("npu0-chip1", vendor="ascend")])]))
    apply(view, batch([report(seq=2, end=NOW + 60, devices=[device("GPU-0")])]))
    totals = view.summary()["totals"]
    assert totals["states"] == {"busy": 0, "allocated_idle": 0, "free": 1, "unavailable": 1}
    (gone,) = view.devices(frozenset({"unavailable"}))
    assert gone["device_id"] == "npu0-chip1" and gone["reason"] == "no longer reported"
    assert gone["state_since"] == NOW  # the end of the last window that listed it
    # It comes back: listed again.
    apply(
        view,
        batch(
            [report(seq=3, end=NOW + 120, devices=[device("GPU-0"), device("npu0-chip1", vendor="ascend")])]
        ),
    )
    assert view.summary()["totals"]["states"]["free"] == 2
    # Missing longer than forget_after_s: removed.
    apply(view, batch([report(seq=4, end=NOW + 180, devices=[device("GPU-0")])]))
    apply(view, batch([report(seq=5, end=NOW + 180 + 3601, devices=[device("GPU-0")])]))
    assert view.summary()["totals"]["devices"] == 1


def test_a_gpu_lost_in_mig_mode_is_one_unavailable_gpu(clock):
    """The parent listed (unavailable) without its instances: the instances are gone, not capacity."""
    view = make_view(clock)
    apply(view, batch([report(devices=[mig(i, fraction=1 / 3) for i in range(3)])]))
    apply(
        view,
        batch([report(seq=2, end=NOW + 60, devices=[device("GPU-p", state="unavailable", error="lost")])]),
    )
    totals = view.summary()["totals"]
    assert totals["devices"] == 1 and totals["gpu_equivalents"]["unavailable"] == 1.0
    assert totals["idle_value_per_hour"] == 0
