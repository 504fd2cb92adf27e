"""Who holds what in the live view: `FleetView.holders()`, the reclaim candidates (issue 12 item 6).

One scripted fleet with known holders, prices and times; every number below is worked out by hand.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from collector_helpers import NOW, Clock, batch, device, report

from capmon.agent import wire
from capmon.collector import fleet as fleet_module
from capmon.collector.config import PricingConfig
from capmon.collector.fleet import FleetView, Pricing

H100 = "NVIDIA H100 80GB HBM3"


def make_view(clock: Clock) -> FleetView:
    pricing = Pricing(PricingConfig(default=0.5, models={"H100": 2.5, "910B": 1.25}))
    return FleetView(("site",), pricing, clock=clock)


def apply(view: FleetView, payload: dict) -> tuple[int, int]:
    return view.apply(msgspec.convert(payload, wire.Batch))


def h(pid: int, user: str | None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"pid": pid, "command": "python3", "held_s": 60.0}
    if user is not None:
        out["user"] = user
    out.update(kw)
    return out


def fleet_devices(end: int) -> list[dict]:
    """Times relative to the window end, so a second window at end + 60 means the same."""
    return [
        # alice twice on one H100: all of it is hers
        device("GPU-0", "allocated_idle", holders=[h(1, "alice"), h(2, "alice")], state_since=end - 1800,
               idle_since=end - 7200),
        # alice and bob on one H100: half each
        device("GPU-1", "allocated_idle", holders=[h(3, "alice"), h(4, "bob", namespace="team-a", pod="train-0")],
               state_since=end - 600, idle_since=end - 600),
        device("GPU-2", "busy", holders=[h(5, "carol", slurm_job_id="889")], state_since=end - 60),
        # memory held, nobody the probe can name
        device("GPU-3", "allocated_idle", model="Ascend 910B3", vendor="ascend", state_since=end - 300),
        device("GPU-4", "free", holders=[], idle_since=end - 50_000),
        # a MIG 1g instance of an H100: 1/7 of the GPU and of its price
        device("MIG-1", "allocated_idle", parent_id="GPU-p", fraction=1 / 7, holders=[h(6, "bob")],
               state_since=end - 100),
    ]  # fmt: skip


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW - 3600)  # the view starts an hour before the reports


@pytest.fixture
def view(clock: Clock) -> FleetView:
    v = make_view(clock)
    clock.now = NOW + 1
    apply(v, batch([report(end=NOW, devices=fleet_devices(NOW))], labels={"site": "fra1"}))
    return v


def summary(answer: dict) -> list[tuple]:
    return [
        (x["holder"], x["devices"], x["allocated_idle_value_per_hour"], x["longest_for_s"])
        for x in answer["holders"]
    ]


def test_reclaim_candidates_by_user_most_wasteful_first(view):
    answer = view.holders("user")
    assert summary(answer) == [
        ("alice", 2, 3.75, 1801.0),  # GPU-0 (2.5) + half of GPU-1 (1.25); allocated-idle 1801 s on GPU-0
        ("bob", 2, 1.607143, 601.0),  # half of GPU-1 (1.25) + the MIG instance (2.5 / 7)
        (None, 1, 1.25, 301.0),  # the 910B3 nobody can be named for
    ]
    assert answer["count"] == 3 and answer["currency"] == "USD" and answer["by"] == "user"
    alice, bob, unknown = answer["holders"]
    assert alice["states"] == {"busy": 0, "allocated_idle": 2, "free": 0, "unavailable": 0}
    assert alice["gpu_equivalents"] == 2.0 and bob["gpu_equivalents"] == pytest.approx(1 + 1 / 7, abs=1e-6)
    # One 60 s window since the collector started: alice 60 + 30 s, bob 30 + 60 s (30 + 60/7 GPU-s).
    assert alice["allocated_idle_device_hours"] == 0.025 and alice["allocated_idle_gpu_hours"] == 0.025
    assert bob["allocated_idle_device_hours"] == 0.025
    assert bob["allocated_idle_gpu_hours"] == round((30 + 60 / 7) / 3600, 6)
    assert unknown["allocated_idle_device_hours"] == round(60 / 3600, 6)
    # The devices, most valuable first, with the processes of this holder on each.
    assert [(d["device_id"], d["share"], d["value_per_hour"]) for d in alice["held"]] == [
        ("GPU-0", 1.0, 2.5),
        ("GPU-1", 0.5, 1.25),
    ]
    gpu0 = alice["held"][0]
    assert [p["pid"] for p in gpu0["holders"]] == [1, 2] and gpu0["holders"][0]["command"] == "python3"
    assert gpu0["in_state_for_s"] == 1801.0 and gpu0["idle_for_s"] == 7201.0 and gpu0["host"] == "gpu-node-1"
    assert unknown["held"][0]["holders"] == [] and unknown["held"][0]["model"] == "Ascend 910B3"


def test_shares_sum_to_the_fleet(view):
    """Split evenly over holders: the holders' hours and values are the fleet's, nothing twice."""
    answer = view.holders("user")
    fleet = view.summary()["totals"]
    hours = sum(x["allocated_idle_device_hours"] for x in answer["holders"])
    assert fleet["device_hours"]["allocated_idle"] == pytest.approx(4 * 60 / 3600, abs=1e-6)
    assert hours == pytest.approx(fleet["device_hours"]["allocated_idle"], abs=1e-5)
    gpu_hours = sum(x["allocated_idle_gpu_hours"] for x in answer["holders"])
    assert gpu_hours == pytest.approx(fleet["gpu_hours"]["allocated_idle"], abs=1e-5)
    value = sum(x["allocated_idle_value_per_hour"] for x in answer["holders"])
    assert value == pytest.approx(2.5 + 2.5 + 1.25 + 2.5 / 7, abs=1e-5)


def test_other_groupings_and_states(view):
    by_pod = view.holders("pod")
    # No pod known: GPU-0 (2.5), alice's half of GPU-1 (1.25), GPU-3 (1.25), the MIG instance (2.5 / 7).
    assert summary(by_pod) == [(None, 4, 5.357143, 1801.0), ("team-a/train-0", 1, 1.25, 601.0)]
    assert summary(view.holders("namespace"))[1] == ("team-a", 1, 1.25, 601.0)
    busy = view.holders("job", frozenset({"busy"}))
    assert summary(busy) == [("889", 1, 0.0, 61.0)]
    assert busy["holders"][0]["value_per_hour"] == 2.5
    # all states: ranked by allocated-idle value, then by the idle streak; free GPU-4 is held by nobody.
    everything = view.holders("user", None)
    assert [(x["holder"], x["longest_for_s"]) for x in everything["holders"]] == [
        ("alice", 7201.0),
        ("bob", 601.0),
        (None, None),  # GPU-3 has no idle streak given
        ("carol", None),
    ]
    assert everything["holders"][3]["states"]["busy"] == 1


def test_min_idle_and_filters(view):
    assert summary(view.holders("user", min_idle_s=900)) == [("alice", 1, 2.5, 1801.0)]
    only_h100 = view.holders("user", filters={"model": H100})
    assert [x["holder"] for x in only_h100["holders"]] == ["alice", "bob"]
    assert view.holders("user", filters={"site": "ams2"})["holders"] == []
    assert view.holders("user", filters={"host": "gpu-node-1"})["count"] == 3
    assert view.holders("user", limit=1)["count"] == 3 and len(view.holders("user", limit=1)["holders"]) == 1


def test_hours_accumulate_once_per_window_and_replays_do_not_count(view, clock):
    payload = batch([report(seq=2, end=NOW + 60, devices=fleet_devices(NOW + 60))], labels={"site": "fra1"})
    clock.now = NOW + 61
    assert apply(view, payload) == (1, 0)
    assert apply(view, payload) == (0, 1)
    alice = view.holders("user")["holders"][0]
    assert alice["holder"] == "alice" and alice["allocated_idle_device_hours"] == 0.05


def test_a_silent_agents_devices_are_unavailable_not_reclaim_candidates(view, clock):
    clock.advance(3 * 60 + 1)
    assert view.holders("user")["holders"] == []
    stale = view.holders("user", None)["holders"]
    assert {x["holder"] for x in stale} == {"alice", "bob", None, "carol"}
    assert all(d["state"] == "unavailable" and d["stale"] for x in stale for d in x["held"])


def test_devices_list_their_holders(view):
    devices = {d["device_id"]: d for d in view.devices(None)}
    assert [p["pid"] for p in devices["GPU-1"]["holders"]] == [3, 4]
    bob = devices["GPU-1"]["holders"][1]
    assert bob["user"] == "bob" and bob["namespace"] == "team-a" and bob["pod"] == "train-0"
    assert (
        bob["source"] == "process"
        and bob["memory_bytes"] is None
        and devices["GPU-1"]["holders_omitted"] == 0
    )
    assert devices["GPU-3"]["holders"] is None  # the probe cannot tell
    assert devices["GPU-4"]["holders"] == []  # nobody holds it


def test_since_start_holders_per_agent_are_bounded_and_nothing_is_lost(clock, monkeypatch):
    """A new pod every window, for 40 windows: at most 8 keys kept per agent; the rest in "(other)"."""
    monkeypatch.setattr(fleet_module, "MAX_HOLDER_KEYS_PER_AGENT", 8)
    view = make_view(clock)
    for i in range(40):
        d = device("GPU-0", "allocated_idle", holders=[h(100 + i, "u", namespace="ns", pod=f"job-{i}")])
        clock.now = NOW + 60 * i + 1
        apply(view, batch([report(seq=i + 1, end=NOW + 60 * i, devices=[d])]))
    agent = view.by_id["node-1"]
    assert all(len(keys) <= 8 for keys in agent.held.values())
    answer = view.holders("pod")
    assert summary(answer) == [("ns/job-39", 1, 2.5, None)]
    assert answer["holders"][0]["allocated_idle_device_hours"] == round(60 / 3600, 6)
    # 40 pods: 7 kept (the newest, job-33..39), 33 folded, their hours all in "(other)".
    assert answer["folded"]["holders"] == 33
    assert answer["folded"]["allocated_idle_device_hours"] == round(33 * 60 / 3600, 6)
    # By user nothing folds: one user.
    assert view.holders("user")["holders"][0]["allocated_idle_device_hours"] == round(40 * 60 / 3600, 6)


def test_holder_names_are_kept_once_across_devices(clock):
    """At 100,000 devices a user's name and `python3` are one string each, not one per holder."""
    view = make_view(clock)
    payload = batch(
        [report(devices=[device(f"GPU-{i}", "allocated_idle", holders=[h(i, "alice")]) for i in range(2)])]
    )
    view.apply(
        msgspec.json.decode(msgspec.json.encode(payload), type=wire.Batch)
    )  # fresh strings, as ingest decodes
    a, b = (dev.holders[0] for dev in view.by_id["node-1"].devices.values())
    assert a.user is b.user and a.command is b.command
