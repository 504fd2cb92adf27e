"""How `GET /api/v1/holders` splits a device over its holders (reviewed in the demo: a pod's
allocation and that pod's own processes were split as if they were different holders, and by user the
allocation's share went to "(unknown)")."""

from __future__ import annotations

from typing import Any

import msgspec
from collector_helpers import NOW, Clock, batch, device, report

from capmon.agent import wire
from capmon.collector.config import PricingConfig
from capmon.collector.fleet import FleetView, Pricing, holder_shares

POD_UID = "7f0c1d2e-0000-4000-8000-000000000001"
OTHER_UID = "7f0c1d2e-0000-4000-8000-000000000002"


def allocation(**kw: Any) -> dict[str, Any]:
    return {"source": "kubernetes", "namespace": "research", "pod": "nb-1", "pod_uid": POD_UID, **kw}


def process(pid: int, user: str, **kw: Any) -> dict[str, Any]:
    return {"pid": pid, "user": user, "command": "python3", "held_s": 60.0, **kw}


def view_of(*holder_lists: list[dict[str, Any]]) -> FleetView:
    view = FleetView(("site",), Pricing(PricingConfig(default=1.2)), clock=Clock(NOW + 1))
    devs = [device(f"GPU-{i}", "allocated_idle", holders=hs) for i, hs in enumerate(holder_lists)]
    view.apply(msgspec.convert(batch([report(devices=devs)]), wire.Batch))
    return view


def shares(view: FleetView, by: str) -> dict[str | None, float]:
    return {x["holder"]: x["value_per_hour"] for x in view.holders(by)["holders"]}


# GPU-0: the pod's allocation, a process in that pod, and a process of another pod.
SHARED = [
    allocation(),
    process(10, "alice", namespace="research", pod="nb-1", pod_uid=POD_UID),
    process(20, "bob", namespace="research", pod="nb-2", pod_uid=OTHER_UID),
]


def test_an_allocation_and_its_pods_processes_are_one_holder():
    view = view_of(SHARED)
    assert shares(view, "pod") == {"research/nb-1": 0.6, "research/nb-2": 0.6}
    assert sum(shares(view, "pod").values()) == 1.2


def test_by_user_the_allocation_takes_the_user_of_its_pods_processes():
    view = view_of(SHARED)
    assert shares(view, "user") == {"alice": 0.6, "bob": 0.6}


def test_an_allocation_with_no_process_has_no_user_to_learn():
    """A reserved pod that runs nothing: the pod is known, its user is not (pods carry none)."""
    view = view_of([allocation()])
    assert shares(view, "user") == {None: 1.2} and shares(view, "pod") == {"research/nb-1": 1.2}


def test_record_shares_sum_to_one_and_lone_processes_keep_even_shares():
    recs = [msgspec.convert(h, wire.HolderWindow) for h in SHARED]
    assert holder_shares(recs) == [0.25, 0.25, 0.5]
    lone = [msgspec.convert(process(p, "carol"), wire.HolderWindow) for p in (1, 2, 3)]
    assert holder_shares(lone) == [1 / 3] * 3
