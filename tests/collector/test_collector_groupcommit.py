"""Group commit: concurrent requests share storage writes; acks wait for storage; failures stay with their request."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from capmon.collector.config import StorageConfig
from capmon.collector.metrics import Metrics
from capmon.collector.storage import (
    CollectorOverloaded,
    GroupCommitWriter,
    RequestTooLarge,
    StorageRejected,
    StorageTooLarge,
    StorageUnavailable,
    classify,
)


class ScriptedWriter:
    """Records writes; refuses batches containing a "bad" line, or larger than `max_lines` (413)."""

    name = "scripted"

    def __init__(self, max_lines: int = 10**9, delay: float = 0.0) -> None:
        self.writes: list[list[str]] = []
        self.max_lines = max_lines
        self.delay = delay
        self.down = False

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def write(self, lines: Sequence[str]) -> None:
        await asyncio.sleep(self.delay)
        if self.down:
            raise StorageUnavailable("connection refused", 5)
        if len(lines) > self.max_lines:
            raise StorageTooLarge("request entity too large")
        if any("bad" in line for line in lines):
            raise StorageRejected("unable to parse 'bad'")
        self.writes.append(list(lines))


async def started(writer, **cfg) -> GroupCommitWriter:
    gc = GroupCommitWriter(writer, StorageConfig(**{"flush_interval_s": 0.01, **cfg}), Metrics())
    await gc.start()
    return gc


async def test_concurrent_requests_coalesce_into_one_write():
    writer = ScriptedWriter()
    gc = await started(writer, write_concurrency=1)
    await asyncio.gather(*(gc.submit([f"m v={i}.0 1"]) for i in range(50)))
    assert len(writer.writes) == 1 and len(writer.writes[0]) == 50
    await gc.close()


async def test_batches_never_exceed_batch_size_and_big_requests_span_batches():
    writer = ScriptedWriter()
    gc = await started(writer, batch_size=100)
    await asyncio.gather(gc.submit([f"a v={i}.0 1" for i in range(250)]), gc.submit(["b v=1.0 1"] * 30))
    assert max(len(w) for w in writer.writes) <= 100
    assert sum(len(w) for w in writer.writes) == 280
    await gc.close()


async def test_ack_waits_for_storage():
    writer = ScriptedWriter(delay=0.05)
    gc = await started(writer)
    task = asyncio.create_task(gc.submit(["m v=1.0 1"]))
    await asyncio.sleep(0.02)
    assert not task.done() and writer.writes == []
    await task
    assert writer.writes == [["m v=1.0 1"]]
    await gc.close()


async def test_rejection_stays_with_the_request_that_carried_it():
    writer = ScriptedWriter()
    gc = await started(writer, write_concurrency=1)
    results = await asyncio.gather(
        gc.submit(["good1 v=1.0 1"]),
        gc.submit(["bad v=1.0 1"]),
        gc.submit(["good2 v=1.0 1"]),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], StorageRejected)
    assert ["good1 v=1.0 1"] in writer.writes and ["good2 v=1.0 1"] in writer.writes


async def test_413_splits_the_batch():
    writer = ScriptedWriter(max_lines=8)
    gc = await started(writer)
    await gc.submit([f"m v={i}.0 1" for i in range(50)])
    assert sum(len(w) for w in writer.writes) == 50 and max(len(w) for w in writer.writes) <= 8
    await gc.close()


async def test_unavailable_fails_every_request_in_the_batch():
    writer = ScriptedWriter()
    writer.down = True
    gc = await started(writer)
    results = await asyncio.gather(gc.submit(["a v=1.0 1"]), gc.submit(["b v=1.0 1"]), return_exceptions=True)
    assert all(isinstance(r, StorageUnavailable) and r.retry_after == 5 for r in results)
    await gc.close()


async def test_overload_refuses_new_work():
    writer = ScriptedWriter(delay=0.2)
    gc = await started(writer, max_pending_lines=10)
    first = asyncio.create_task(gc.submit(["m v=1.0 1"] * 8))
    await asyncio.sleep(0)
    with pytest.raises(CollectorOverloaded):
        await gc.submit(["m v=1.0 1"] * 5)
    await first
    await gc.close()


async def test_close_flushes_queued_writes_then_refuses():
    writer = ScriptedWriter(delay=0.01)
    gc = await started(writer, flush_interval_s=0.5)
    task = asyncio.create_task(gc.submit(["m v=1.0 1"]))
    await asyncio.sleep(0)
    await gc.close()
    await task
    assert writer.writes == [["m v=1.0 1"]]
    with pytest.raises(StorageUnavailable):
        await gc.submit(["m v=2.0 1"])


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, StorageRejected),
        (422, StorageRejected),
        (413, StorageTooLarge),
        (401, StorageUnavailable),
        (403, StorageUnavailable),
        (404, StorageUnavailable),
        (429, StorageUnavailable),
        (500, StorageUnavailable),
        (503, StorageUnavailable),
    ],
)
def test_retry_classes_follow_telegraf(status, kind):
    assert type(classify(status, "x", None, 10)) is kind


def test_retry_after_from_storage_is_passed_on():
    assert classify(429, "slow down", "30", 10).retry_after == 30
    assert classify(503, "down", "garbage", 10).retry_after == 10


async def test_one_request_larger_than_max_pending_lines_is_refused_even_alone():
    writer = ScriptedWriter()
    gc = await started(writer, max_pending_lines=10)
    with pytest.raises(RequestTooLarge):
        await gc.submit(["m v=1.0 1"] * 11)
    await gc.submit(["m v=1.0 1"] * 10)
    assert sum(len(w) for w in writer.writes) == 10
    await gc.close()
