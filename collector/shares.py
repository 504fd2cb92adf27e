"""How a device is split among its holders: evenly over the parties holding it, then evenly over a
party's records. A party is one pod (an allocation and the processes in that pod are one holder), one
Slurm job, one container, else a record alone. The live view (`/api/v1/holders`) and the store
(`capmon_holder`) split alike, so the API and a SUM over the store agree."""

from __future__ import annotations

from collections.abc import Sequence

from capmon.agent.wire import HolderWindow


def party(h: HolderWindow) -> tuple[str, str | int | None]:
    """Who a holder record holds the device for: its pod (an allocation and the processes in that pod
    are one holder), its Slurm job, its container, else the process (or allocation) alone."""
    if h.pod_uid or h.pod:
        return "pod", h.pod_uid or f"{h.namespace}/{h.pod}"
    if h.slurm_job_id:
        return "job", h.slurm_job_id
    if h.container_id:
        return "container", h.container_id
    return "alone", id(h)


def holder_shares(holders: Sequence[HolderWindow]) -> list[float]:
    """Each record's share of its device: split evenly over the parties holding it (`party`), then
    evenly over a party's records; the shares sum to 1."""
    parties: dict[tuple[str, str | int | None], int] = {}
    keys = [party(h) for h in holders]
    for k in keys:
        parties[k] = parties.get(k, 0) + 1
    n = len(parties)
    return [1.0 / n / parties[k] for k in keys]
