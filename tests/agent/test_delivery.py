"""SpoolingSink, as the daemon drives it: start, next_seq + put per window, close with a deadline."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web

from capmon.agent import wire
from capmon.agent.delivery import SpoolingSink
from capmon.agent.spool import Spool, SpoolConfig
from capmon.agent.transport import TransportConfig

IDENTITY = wire.AgentIdentity(id="node-1", host="node-1.example", version="0.1.0")


class Collector:
    def __init__(self) -> None:
        self.up = True
        self.batches: list[wire.Batch] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        batch = wire.decode_batch(await request.read())
        if not self.up:
            return web.json_response(
                {"error": "storage unavailable"}, status=503, headers={"Retry-After": "1"}
            )
        self.batches.append(batch)
        self.arrived.set()
        return web.json_response({"accepted": len(batch.reports)})

    @property
    def seqs(self) -> list[int]:
        return [r.seq for b in self.batches for r in b.reports]


@pytest.fixture
async def collector(aiohttp_server):
    c = Collector()
    app = web.Application()
    app.router.add_post("/api/v1/reports", c.handle)
    server = await aiohttp_server(app)
    c.url = str(server.make_url("/api/v1/reports"))
    return c


def window(seq: int) -> wire.Report:
    end = 1_700_000_000 + 60 * seq
    return wire.Report(seq=seq, start=end - 60, end=end)


async def put_windows(sink: SpoolingSink, n: int) -> list[int]:
    seqs = []
    for _ in range(n):
        seq = sink.next_seq()
        await sink.put(window(seq))
        seqs.append(seq)
    return seqs


async def test_reports_put_are_delivered_with_the_spool_instance_and_seq_continues_after_restart(
    collector, tmp_path
):
    spool = SpoolConfig(path=str(tmp_path / "spool"))
    transport = TransportConfig(url=collector.url)

    sink = SpoolingSink(IDENTITY, spool, transport)
    await sink.start()
    assert await put_windows(sink, 3) == [1, 2, 3]
    await sink.close(timeout_s=10)
    assert collector.seqs == [1, 2, 3]
    instance = collector.batches[0].agent.instance
    assert instance and collector.batches[0].agent == wire.AgentIdentity(
        id="node-1", host="node-1.example", version="0.1.0", instance=instance
    )

    sink = SpoolingSink(IDENTITY, spool, transport)
    await sink.start()
    assert await put_windows(sink, 2) == [4, 5]
    await sink.close(timeout_s=10)
    assert collector.seqs == [1, 2, 3, 4, 5]
    assert {b.agent.instance for b in collector.batches} == {instance}


async def test_a_put_wakes_the_transport_at_once(collector, tmp_path):
    sink = SpoolingSink(IDENTITY, SpoolConfig(path=str(tmp_path)), TransportConfig(url=collector.url))
    await sink.start()
    await put_windows(sink, 1)
    await asyncio.wait_for(collector.arrived.wait(), 10)
    assert collector.seqs == [1]
    await sink.close(timeout_s=1)


async def test_close_gives_up_at_its_deadline_and_keeps_what_it_could_not_send(collector, tmp_path):
    collector.up = False
    config = SpoolConfig(path=str(tmp_path))
    sink = SpoolingSink(IDENTITY, config, TransportConfig(url=collector.url))
    await sink.start()
    await put_windows(sink, 2)
    assert sink.stats()["spool_reports"] == 2
    # The collector asked for Retry-After: 1 s; close waits only as long as it was given.
    await asyncio.wait_for(sink.close(timeout_s=0.2), 5)
    assert collector.seqs == []

    with Spool.open(config) as spool:
        assert [s for s, _ in spool.oldest(10, 10**9)] == [1, 2]

    collector.up = True
    sink = SpoolingSink(IDENTITY, config, TransportConfig(url=collector.url))
    await sink.start()
    await sink.close(timeout_s=10)
    assert collector.seqs == [1, 2]
    assert sink.stats()["spool_reports"] == 0


async def test_stats_count_what_the_spool_holds_and_drops(tmp_path, unused_tcp_port):
    size = len(wire.encode(window(1)))
    sink = SpoolingSink(
        IDENTITY,
        SpoolConfig(path=str(tmp_path), max_bytes=size * 3),
        TransportConfig(url=f"http://127.0.0.1:{unused_tcp_port}/api/v1/reports"),  # nobody listens
    )
    await sink.start()
    await put_windows(sink, 5)
    stats = sink.stats()
    assert stats["spool_reports"] == 3
    assert stats["dropped_reports"] == 2
    assert stats["spool_bytes"] == 3 * size
    assert stats["dead_letter_reports"] == 0
    await sink.close(timeout_s=0)


async def test_a_spool_discarded_at_exit_never_promises_a_restart_that_will_not_come(
    tmp_path, unused_tcp_port, caplog
):
    # `capmon demo` removes its agents' spools when it stops: they never start again to send them.
    url = f"http://127.0.0.1:{unused_tcp_port}/api/v1/reports"  # nobody listens
    for discarded, expected in (
        (False, "sent when the agent starts again"),
        (True, "this spool is discarded"),
    ):
        sink = SpoolingSink(
            IDENTITY,
            SpoolConfig(path=str(tmp_path / str(discarded))),
            TransportConfig(url=url),
            discarded_at_exit=discarded,
        )
        await sink.start()
        await put_windows(sink, 2)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="capmon.agent.delivery"):
            await sink.close(timeout_s=0)
        assert expected in caplog.text
        if discarded:
            assert "starts again" not in caplog.text
            assert all(r.levelno < logging.WARNING for r in caplog.records)
