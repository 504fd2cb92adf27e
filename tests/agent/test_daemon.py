"""The agent loop with its real sink (SpoolingSink: spool + transport): restarts, stopping, counting."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import pytest
from aiohttp import web

from capmon.agent import wire
from capmon.agent.config import AgentConfig, AgentSection
from capmon.agent.daemon import Agent, checked_report, identity_of
from capmon.agent.delivery import SpoolingSink
from capmon.agent.spool import Spool, SpoolConfig
from capmon.agent.transport import TransportConfig
from capmon.plugins.mock import MockConfig, MockProbe

WINDOW_S = 60


class OffsetClock:
    """The wall clock moved so that "now" is a chosen fraction of a second before a window boundary:
    real time passes (the agent waits on it), the boundary is wherever the test needs it."""

    def __init__(self, before_boundary_s: float) -> None:
        now = time.time()
        self.boundary = (math.floor(now / WINDOW_S) + 2) * WINDOW_S
        self.offset = self.boundary - before_boundary_s - now

    def __call__(self) -> float:
        return time.time() + self.offset


def config(tmp_path, url: str, **agent) -> AgentConfig:
    return AgentConfig(
        agent=AgentSection(id="node-1", host="node-1", window_s=WINDOW_S, **agent),
        spool=SpoolConfig(path=str(tmp_path / "spool")),
        transport=TransportConfig(url=url, backoff_min_s=300, backoff_max_s=300, timeout_s=600),
    )


def agent_of(cfg: AgentConfig, clock) -> Agent:
    probe = MockProbe(MockConfig(devices=2, profiles=("idle",), interval_s=0.05))
    return Agent(
        cfg, sink=SpoolingSink(identity_of(cfg), cfg.spool, cfg.transport), probes=[probe], clock=clock
    )


async def run_until(agent: Agent, clock, t: float) -> None:
    """Run the agent until its clock reads `t`, then ask it to stop, as SIGTERM does."""
    task = asyncio.create_task(agent.run())
    await asyncio.sleep(max(0.0, t - clock()))
    agent.request_stop()
    await asyncio.wait_for(task, 60)


def spooled(cfg: AgentConfig) -> list[wire.Report]:
    with Spool.open(cfg.spool) as spool:
        return [wire.decode_report(body) for _, body in spool.oldest(1000, 10**9)]


async def test_a_restart_in_the_last_second_of_a_window_never_ends_a_window_twice(tmp_path, unused_tcp_port):
    # Issue 11.1: stopped 0.8 s before a boundary, the partial window ends at the boundary (rounded
    # up); the agent restarted at once started its window at the second before it, ending it at the
    # same boundary, and its short point replaced the full one in InfluxDB.
    cfg = config(tmp_path, f"http://127.0.0.1:{unused_tcp_port}/api/v1/reports")
    clock = OffsetClock(before_boundary_s=0.8)
    b = clock.boundary
    await run_until(agent_of(cfg, clock), clock, b - 0.6)
    await run_until(agent_of(cfg, clock), clock, b + 0.2)  # restarted 0.6 s before the boundary

    reports = spooled(cfg)
    assert [(r.seq, r.start, r.end) for r in reports] == [(1, b - 1, b), (2, b, b + 1)]
    for r in reports:
        assert all(d.free_s <= r.end - r.start + wire.window_slack_s(r.end - r.start) for d in r.devices)


async def test_first_window_after_a_restart_starts_where_the_last_one_ended_across_a_reopen(
    tmp_path, unused_tcp_port
):
    cfg = config(tmp_path, f"http://127.0.0.1:{unused_tcp_port}/api/v1/reports")
    clock = OffsetClock(before_boundary_s=0.9)
    b = clock.boundary
    await run_until(agent_of(cfg, clock), clock, b - 0.7)
    # Stopped again before the boundary: there is no window to produce (it would end at b again).
    await run_until(agent_of(cfg, clock), clock, b - 0.5)
    assert [(r.seq, r.end) for r in spooled(cfg)] == [(1, b)]


async def test_stopping_with_the_collector_unreachable_says_so_and_does_not_wait(
    tmp_path, unused_tcp_port, caplog
):
    caplog.set_level(logging.INFO)
    cfg = config(tmp_path, f"http://127.0.0.1:{unused_tcp_port}/api/v1/reports", shutdown_timeout_s=600.0)
    clock = OffsetClock(before_boundary_s=0.9)
    agent = agent_of(cfg, clock)
    # The transport backs off 300 s after its first failure and shutdown would allow 600 s: the agent
    # returns anyway, because nothing can be delivered and the spool is durable.
    await run_until(agent, clock, clock.boundary + 0.3)
    assert (
        "stopping: delivering 1 spooled window(s) and the last, partial one, up to 600s; Ctrl-C again to exit now"
        in caplog.text
    )
    assert [r.seq for r in spooled(cfg)] == [1, 2]


async def test_a_second_stop_request_exits_at_once_while_the_collector_hangs(
    tmp_path, aiohttp_server, caplog
):
    answered = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        answered.set()
        await asyncio.sleep(3600)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/api/v1/reports", hang)
    server = await aiohttp_server(app)
    cfg = config(tmp_path, str(server.make_url("/api/v1/reports")), shutdown_timeout_s=600.0)
    clock = OffsetClock(before_boundary_s=0.9)
    agent = agent_of(cfg, clock)
    task = asyncio.create_task(agent.run())
    await asyncio.sleep(max(0.0, clock.boundary + 0.2 - clock()))
    await asyncio.wait_for(answered.wait(), 30)  # a request is in flight and will never be answered
    agent.request_stop()
    await asyncio.sleep(0.3)
    assert not task.done()  # the first request waits for delivery (up to 600 s)
    agent.request_stop()
    await asyncio.wait_for(task, 30)
    assert "stopping now" in caplog.text
    assert [r.seq for r in spooled(cfg)] == [1, 2]  # nothing acknowledged, nothing lost


async def test_windows_the_spool_cannot_write_are_lost_windows_not_dropped_and_seqs_go_on(
    tmp_path, unused_tcp_port
):
    cfg = config(tmp_path, f"http://127.0.0.1:{unused_tcp_port}/api/v1/reports")
    sink = SpoolingSink(identity_of(cfg), cfg.spool, cfg.transport)
    agent = Agent(cfg, sink=sink, probes=[], clock=lambda: 1_800_000_000.0)
    await sink.start()
    spool = sink._spool
    await agent._keep(agent.close_window(sink.next_seq(), 1_799_999_940, 1_800_000_000))
    spool._db.execute("PRAGMA query_only = 1")  # SQLite refuses writes, as on a read-only disk
    for n in range(2):
        end = 1_800_000_060 + 60 * n
        await agent._keep(agent.close_window(sink.next_seq(), end - 60, end))
    spool._db.execute("PRAGMA query_only = 0")
    await agent._keep(agent.close_window(sink.next_seq(), 1_800_000_120, 1_800_000_180))
    await sink.close(0)
    reports = spooled(cfg)
    assert [r.seq for r in reports] == [1, 4]
    assert reports[-1].agent.lost_windows == 2
    assert reports[-1].agent.dropped_reports == 0
    assert agent.lost_windows == 0  # counted once, by the spool


async def test_the_identity_sent_keeps_the_configured_window(tmp_path, aiohttp_server):
    # Issue 11.6: the collector judges staleness by `window_s`, never by a short first window.
    batches: list[wire.Batch] = []

    async def take(request: web.Request) -> web.Response:
        batches.append(wire.decode_batch(await request.read()))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/api/v1/reports", take)
    server = await aiohttp_server(app)
    cfg = config(tmp_path, str(server.make_url("/api/v1/reports")))
    clock = OffsetClock(before_boundary_s=0.5)
    await run_until(agent_of(cfg, clock), clock, clock.boundary - 0.2)
    assert batches and {b.agent.window_s for b in batches} == {WINDOW_S}
    assert batches[0].reports[0].end - batches[0].reports[0].start < WINDOW_S  # a short first window


def test_a_device_record_the_collector_would_refuse_as_impossible_is_left_out(caplog):
    good = wire.DeviceWindow(device_id="GPU-0", vendor="nvidia", state="busy", busy_s=60.0)
    bad = wire.DeviceWindow(device_id="GPU-1", vendor="nvidia", state="busy", busy_s=1.0, ghost_s=30.0)
    report = wire.Report(seq=7, start=1_800_000_000, end=1_800_000_060, devices=[good, bad])
    assert checked_report(report).devices == [good]
    assert "device GPU-1 left out of window seq 7: ghost_s is part of busy_s" in caplog.text
    with pytest.raises(ValueError, match="end must be after start"):
        checked_report(wire.Report(seq=8, start=1_800_000_060, end=1_800_000_060))


def test_idle_since_stays_put_however_late_samples_arrive_and_windows_close():
    """A sample is handed over a little after it was taken and a window closes a little after its
    boundary. The wall time of the streak's start must not move with those delays: it did, by the
    delay of the last window close (hundreds of ms), so idle_since crept from window to window and
    across restarts (a flaky agent-restart test, 1 in 6 runs)."""
    from capmon.agent.probe import DeviceSample

    wall, mono = [1_000_000_000.4], [100.0]
    cfg = AgentConfig(agent=AgentSection(id="n", host="n", window_s=1))
    agent = Agent(cfg, probes=[], clock=lambda: wall[0], mono=lambda: mono[0])
    sample = DeviceSample("GPU-0", "nvidia", util_pct=0.0, processes=0, memory_used_bytes=0)

    def advance(s: float) -> None:
        wall[0] += s
        mono[0] += s

    seen = []
    for k in range(6):
        taken = wall[0]
        advance(0.02 + 0.01 * k)  # handed over late
        agent._on_samples("nvml", taken, [sample], None)
        boundary = int(wall[0]) + 1
        advance(boundary - wall[0] + 0.3 + 0.1 * (k % 3))  # the window closes late, by 0.3-0.5 s
        [w] = agent.close_window(k + 1, boundary - 1, boundary).devices
        seen.append(w.idle_since)
    assert seen == [1_000_000_000] * 6


def test_a_wall_clock_step_credits_no_time_that_did_not_pass():
    """State seconds come from the monotonic clock; the wall clock only names the windows (issue 19
    item 9): a 40 s NTP step forward inside a window adds no free time, a step back erases none."""
    wall, mono = [1_000_000_000.0], [100.0]
    cfg = AgentConfig(agent=AgentSection(id="n", host="n", window_s=5))
    agent = Agent(cfg, probes=[], clock=lambda: wall[0], mono=lambda: mono[0])
    from capmon.agent.probe import DeviceSample

    sample = DeviceSample("GPU-0", "nvidia", util_pct=0.0, processes=0, memory_used_bytes=0)

    def tick(wall_step: float, mono_step: float) -> None:
        wall[0] += wall_step
        mono[0] += mono_step
        agent._on_samples("nvml", wall[0], [sample], None)

    start = int(wall[0])
    tick(0, 0)
    tick(1, 1)
    tick(40, 1)  # the wall clock jumps 40 s ahead while 1 s passes
    tick(1, 1)
    mono[0] += 1
    [forward] = agent.close_window(1, start, start + 5).devices
    assert forward.free_s == pytest.approx(4.0)
    # And back: 300 s behind while 4 s pass; the time still counts.
    wall[0] -= 300
    tick(0, 0)
    tick(1, 1)
    tick(1, 1)
    mono[0] += 2
    [back] = agent.close_window(2, int(wall[0]) - 2, int(wall[0]) + 2).devices
    assert back.free_s == pytest.approx(4.0)
