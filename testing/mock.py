"""Mock devices and fleets on the test's clock: the `mock` probe, built the way the agent would run it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from capmon.plugins.mock import MockConfig, MockProbe
from capmon.plugins.mock import mock_fleet as _fleet

__all__ = ["MockHost", "make_mock_devices", "make_mock_fleet"]


def make_mock_devices(
    clock: Callable[[], float],
    devices: int = 8,
    profiles: Sequence[str] | str | None = None,
    models: Sequence[str] | str | None = None,
    seed: int = 0,
    **config: Any,
) -> MockProbe:
    """A set-up `MockProbe` of `devices` simulated devices on `clock`. `profiles` and `models` are
    cycled over the devices (one name is every device); `config` sets any other `MockConfig` field."""
    fields: dict[str, Any] = {"devices": devices, "seed": seed, **config}
    if profiles is not None:
        fields["profiles"] = (profiles,) if isinstance(profiles, str) else tuple(profiles)
    if models is not None:
        fields["models"] = (models,) if isinstance(models, str) else tuple(models)
    probe = MockProbe(MockConfig(**fields), clock=clock)
    probe.setup()
    return probe


@dataclass(frozen=True)
class MockHost:
    """One simulated host: its name and labels (site, cluster, pool) and its mock probe."""

    host: str
    labels: Mapping[str, str]
    probe: MockProbe

    @property
    def agent_id(self) -> str:
        return self.host


def make_mock_fleet(
    clock: Callable[[], float],
    hosts: int = 4,
    devices: int = 8,
    profiles: Sequence[str] | None = None,
    seed: int = 0,
) -> list[MockHost]:
    """The demo's mixed fleet (sites, pools, models vary by host) on `clock`; `profiles`, when given,
    replaces every host's load profiles."""
    out = []
    for sim in _fleet(hosts=hosts, devices=devices, seed=seed):
        config = sim.config
        if profiles is not None:
            config = dataclasses.replace(config, profiles=tuple(profiles))
        probe = MockProbe(config, clock=clock)
        probe.setup()
        out.append(MockHost(sim.host, dict(sim.labels), probe))
    return out
