"""capmon_agent: the real agent pipeline on the test clock, its windows, and delivery to capmon_collector."""

from __future__ import annotations

import pytest

from capmon.agent.classifier import ClassifierConfig
from capmon.testing import agent_config


async def test_a_window_of_mock_devices_is_classified_busy_allocated_idle_and_free(
    capmon_agent, mock_devices
):
    probe = mock_devices(3, profiles=["training", "notebook", "idle"])
    agent = capmon_agent(probes=[probe])
    [window] = await agent.run_until_window()
    assert agent.states() == {"MOCK-000-00": "busy", "MOCK-000-01": "allocated_idle", "MOCK-000-02": "free"}
    # A whole window, ending on a multiple of window_s, state seconds adding up to it.
    assert (window.seq, window.end % 60, window.end - window.start) == (1, 0, 60)
    assert agent.device("MOCK-000-02").free_s == pytest.approx(60.0)


async def test_windows_follow_the_clock_without_sleeping(capmon_agent, mock_devices, capmon_clock):
    agent = capmon_agent(agent_config(window_s=10), [mock_devices(1, profiles="idle")])
    first = capmon_clock()
    windows = await agent.run_until_window(3)
    assert [w.seq for w in windows] == [1, 2, 3]
    assert [w.end - w.start for w in windows] == [10, 10, 10]
    assert capmon_clock() == first + 30


async def test_a_failing_probe_is_contained_and_its_devices_are_unavailable(capmon_agent, mock_devices):
    agent = capmon_agent(agent_config(window_s=10), [mock_devices(2, profiles="idle", raise_every=2)])
    await agent.run_until_window()
    assert set(agent.states()) == {"MOCK-000-00", "MOCK-000-01"}
    d = agent.device("MOCK-000-00")
    assert d.unavailable_s > 0 and d.free_s > 0
    stats = agent.last_window.agent.probes[0]
    assert stats.errors >= 4 and "simulated failure" in stats.reason


async def test_the_classifier_config_is_the_one_the_agent_uses(capmon_agent, mock_devices):
    # A notebook hovering at 0-2 % is busy when the threshold is 0.
    config = agent_config(window_s=10, classifier=ClassifierConfig(busy_util_pct=0.0))
    agent = capmon_agent(config, [mock_devices(1, profiles="idle")])
    await agent.run_until_window()
    assert agent.states() == {"MOCK-000-00": "busy"}


async def test_stop_reports_the_partial_window(capmon_agent, mock_devices):
    agent = capmon_agent(agent_config(window_s=60), [mock_devices(1, profiles="idle")])
    await agent.tick(5)
    last = await agent.stop()
    assert last is not None and last.end - last.start == 5
    assert agent.windows == [last]


async def test_windows_delivered_to_the_collector_show_in_its_api(
    capmon_agent, capmon_collector, mock_devices
):
    collector = await capmon_collector()
    agent = capmon_agent(
        agent_config(labels={"site": "lab"}),
        [mock_devices(3, profiles=["training", "notebook", "idle"])],
        collector=collector,
    )
    await agent.run_until_window()
    free = await collector.devices()
    assert [d["device_id"] for d in free["devices"]] == ["MOCK-000-02"]
    idle = await collector.devices(state="idle")
    assert {d["device_id"] for d in idle["devices"]} == {"MOCK-000-01", "MOCK-000-02"}
    agents = await collector.agents()
    assert "test-agent" in str(agents)


async def test_a_probe_from_the_configuration_runs_on_the_test_clock(capmon_agent, capmon_clock):
    from capmon.agent.config import ProbesSection

    config = agent_config(
        window_s=10,
        probes=ProbesSection(
            enable=("mock",),
            disable=("host", "nvml", "ascend"),
            options={"mock": {"devices": 2, "profiles": ["idle"]}},
        ),
    )
    agent = capmon_agent(config)
    assert [p.name for p in agent.probes] == ["mock"]
    assert agent.probes[0].clock is capmon_clock
    await agent.run_until_window()
    assert agent.states() == {"MOCK-000-00": "free", "MOCK-000-01": "free"}


async def test_an_allocation_source_runs_in_the_kit_agent(capmon_agent, mock_devices):
    """A scheduler's allocation with no process on the device makes it allocated_idle, named."""
    from capmon.agent import Allocation, AllocationSource

    class OnePod(AllocationSource):
        name = "onepod"
        closed = False

        def allocations(self):
            return [Allocation("onepod", "MOCK-000-01", device_id="MOCK-000-01", namespace="ml", pod="nb-0")]

        def covers(self, vendor):
            return True

        def close(self):
            OnePod.closed = True

    agent = capmon_agent(agent_config(window_s=10), [mock_devices(2, profiles="idle")], sources=[OnePod()])
    await agent.run_until_window()
    assert agent.states() == {"MOCK-000-00": "free", "MOCK-000-01": "allocated_idle"}
    [holder] = agent.device("MOCK-000-01").holders
    assert (holder.source, holder.namespace, holder.pod) == ("onepod", "ml", "nb-0")
    await agent.stop()
    assert OnePod.closed
