"""The pytest fixtures of `capmon.testing` (registered by `-p capmon.testing` or the `pytest11` entry point).

Only the clock is imported up front: the agent, the collector and the fakes load when a test asks
for them, so the plugin costs nothing in a suite that does not use it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from capmon.testing.clock import CapmonClock

if TYPE_CHECKING:
    from capmon.testing.agent import InProcessAgent
    from capmon.testing.collector import InProcessCollector


@pytest.fixture
def capmon_clock() -> CapmonClock:
    """The test's wall clock: starts on a whole minute, moves only by `advance()` / `set()`."""
    return CapmonClock()


@pytest.fixture
def mock_devices(capmon_clock: CapmonClock) -> Iterator[Any]:
    """`mock_devices(devices=8, profiles=..., models=..., seed=0, **MockConfig fields)`: a set-up mock
    probe on the test clock; closed after the test."""
    from capmon.testing.mock import make_mock_devices

    made: list[Any] = []

    def make(devices: int = 8, profiles: Any = None, models: Any = None, seed: int = 0, **config: Any) -> Any:
        probe = make_mock_devices(capmon_clock, devices, profiles, models, seed, **config)
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.close()


@pytest.fixture
def mock_fleet(capmon_clock: CapmonClock) -> Iterator[Any]:
    """`mock_fleet(hosts=4, devices=8, profiles=None, seed=0)`: simulated hosts (`.host`, `.labels`,
    `.probe`) on the test clock."""
    from capmon.testing.mock import make_mock_fleet

    made: list[Any] = []

    def make(hosts: int = 4, devices: int = 8, profiles: Any = None, seed: int = 0) -> Any:
        fleet = make_mock_fleet(capmon_clock, hosts, devices, profiles, seed)
        made.extend(h.probe for h in fleet)
        return fleet

    yield make
    for probe in made:
        probe.close()


@pytest_asyncio.fixture
async def capmon_agent(capmon_clock: CapmonClock) -> AsyncIterator[Any]:
    """`capmon_agent(config=None, probes=None, *, collector=None, sink=None, tick_s=1.0, sources=None)`:
    the real agent pipeline on the test clock (`InProcessAgent`), with allocation sources when given;
    windows go to memory and, with `collector=` (a `capmon_collector`), to that collector. Stopped
    after the test."""
    from capmon.testing.agent import InProcessAgent

    made: list[InProcessAgent] = []

    def make(
        config: Any = None,
        probes: Any = None,
        *,
        collector: InProcessCollector | None = None,
        sink: Any = None,
        tick_s: float = 1.0,
        boundaries: Any = None,
        sources: Any = None,
    ) -> InProcessAgent:
        agent = InProcessAgent(
            capmon_clock,
            config,
            probes,
            sink=sink,
            deliver=collector.deliver if collector is not None else None,
            tick_s=tick_s,
            boundaries=boundaries,
            sources=sources,
        )
        made.append(agent)
        return agent

    yield make
    for agent in made:
        await agent.stop()


@pytest_asyncio.fixture
async def capmon_collector(capmon_clock: CapmonClock) -> AsyncIterator[Any]:
    """`await capmon_collector(config=None, *, writer=None)`: the real collector app on aiohttp's test
    server and the test clock (`InProcessCollector`); storage `none` unless `config` or `writer` say."""
    from capmon.testing.collector import InProcessCollector

    made: list[InProcessCollector] = []

    async def make(config: Any = None, *, writer: Any = None, **tokens: str) -> InProcessCollector:
        collector = InProcessCollector(capmon_clock, config, writer=writer, **tokens)
        made.append(collector)
        return await collector.start()

    yield make
    for collector in made:
        await collector.close()
