"""The allocation-source contract: what a scheduler (Kubernetes, Slurm) says holds which device.

A probe sees processes; a scheduler sees allocations, which may hold a device with no process on it
(a notebook pod holding 8 GPUs overnight, a job whose allocation outlives its processes). An
allocation source is a plugin kind of its own (`capmon_allocation_sources()`, entry-point group
`capmon.allocations`), run by the agent like a probe: `setup()` once, `allocations()` every
`interval_s` on a worker thread under a timeout (never two at once), `close()` at shutdown.

A device an active source covers is never `free` while the source cannot answer: "allocation
unknown" is `unavailable`, not capacity to rent out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from capmon.agent.probe import Scheduled


@dataclass(frozen=True, slots=True)
class Allocation:
    """One device given to one holder, as the scheduler says.

    `device` is the scheduler's own name for it (a GPU UUID from the NVIDIA device plugin, `Ascend910-3`
    from Huawei's, `gpu:2` for a Slurm GRES index). The source sets `device_id` to capmon's id for the
    device when it knows it (NVIDIA UUIDs are capmon's ids; an Ascend device plugin id maps to
    `npu<id>-chip<id>`); otherwise it sets `vendor` and `index` (the device's minor number, the
    `/dev/nvidiaN` or `/dev/davinciN` the scheduler binds), and the agent matches them to the probes'
    devices.
    """

    source: str
    device: str
    device_id: str | None = None
    vendor: str | None = None
    index: int | None = None
    # Kubernetes
    namespace: str | None = None
    pod: str | None = None
    container: str | None = None
    pod_uid: str | None = None
    # Slurm
    job_id: str | None = None
    user: str | None = None
    partition: str | None = None
    # Since when the holder has the device (unix seconds), when the scheduler says.
    since: float | None = None
    # Several holders share the device (Kubernetes time-slicing / MPS replicas).
    shared: bool = False


class AllocationSource(Scheduled):
    """Base class of every allocation source. Subclass it, set `name` and `Config`, implement the three
    methods. Sources take their boundary (a socket path, a command runner) as constructor parameters,
    so tests hand them fakes or real servers.
    """

    default_interval_s: ClassVar[float] = 10.0

    def setup(self) -> None:
        """Open the boundary. Raise `ProbeUnavailable` with a human reason when the scheduler is absent
        on this host ("no kubelet pod-resources socket at …", "scontrol not on PATH")."""

    def allocations(self) -> Sequence[Allocation]:
        """Every device allocation on this node now. Blocking is allowed (off the event loop). Raise on
        any failure to answer (the agent marks the devices it covers "allocation unknown")."""
        raise NotImplementedError

    def covers(self, vendor: str) -> bool:
        """Whether this source would know of an allocation of a device of `vendor` (`nvidia`, `ascend`):
        only covered devices become "allocation unknown" while the source cannot answer."""
        return vendor in ("nvidia", "ascend")

    def close(self) -> None:
        """Release what `setup()` opened. Must not raise; called once, also after a failed setup."""
