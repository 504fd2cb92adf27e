"""The spool keeps every finished window across restarts and crashes, bounded, and counts what it drops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from capmon.agent import wire
from capmon.agent.spool import DB_NAME, DEAD_LETTER_NAME, Spool, SpoolConfig, SpoolLocked


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def report(seq: int, devices: int = 2) -> wire.Report:
    end = 1_700_000_000 + 60 * seq
    return wire.Report(
        seq=seq,
        start=end - 60,
        end=end,
        devices=[
            wire.DeviceWindow(device_id=f"GPU-{i}", vendor="nvidia", state="free", free_s=60.0)
            for i in range(devices)
        ],
    )


def fill(spool: Spool, n: int) -> list[int]:
    seqs = []
    for _ in range(n):
        seq = spool.next_seq()
        spool.append(report(seq))
        seqs.append(seq)
    return seqs


def test_reports_survive_reopen_in_seq_order_and_seq_continues(tmp_path):
    config = SpoolConfig(path=str(tmp_path / "spool"))
    with Spool.open(config) as spool:
        instance = spool.instance
        assert fill(spool, 5) == [1, 2, 3, 4, 5]
        spool.remove([1, 2])

    with Spool.open(config) as spool:
        assert spool.instance == instance
        batch = spool.oldest(10, 10**9)
        assert [seq for seq, _ in batch] == [3, 4, 5]
        assert [wire.decode_report(body) for _, body in batch] == [report(3), report(4), report(5)]
        # Even after everything was delivered, a restarted agent continues seq rather than restart it.
        spool.remove([3, 4, 5])
    with Spool.open(config) as spool:
        assert spool.next_seq() == 6
        assert spool.stats()["spool_reports"] == 0


def test_a_fresh_spool_has_a_new_instance(tmp_path):
    with (
        Spool.open(SpoolConfig(path=str(tmp_path / "a"))) as a,
        Spool.open(SpoolConfig(path=str(tmp_path / "b"))) as b,
    ):
        assert a.instance != b.instance
        assert a.next_seq() == b.next_seq() == 1


def test_oldest_bounds_the_batch_by_count_and_bytes_but_always_returns_one(tmp_path):
    with Spool.open(SpoolConfig(path=str(tmp_path))) as spool:
        fill(spool, 10)
        assert [s for s, _ in spool.oldest(3, 10**9)] == [1, 2, 3]
        one = len(spool.oldest(1, 10**9)[0][1])
        assert [s for s, _ in spool.oldest(10, 2 * one)] == [1, 2]
        assert [s for s, _ in spool.oldest(10, 1)] == [1]


def test_seq_must_increase(tmp_path):
    with Spool.open(SpoolConfig(path=str(tmp_path))) as spool:
        fill(spool, 3)
        with pytest.raises(ValueError, match="seq 2"):
            spool.append(report(2))


def test_size_bound_drops_oldest_first_and_counts_it_across_reopen(tmp_path):
    size = len(wire.encode(report(1)))
    config = SpoolConfig(path=str(tmp_path), max_bytes=int(size * 10.5))
    with Spool.open(config) as spool:
        appended = fill(spool, 25)
        stats = spool.stats()
        kept = [s for s, _ in spool.oldest(100, 10**9)]
    assert kept == appended[-10:]
    assert stats["dropped_reports"] == 15
    assert stats["dropped_reports"] + stats["spool_reports"] == len(appended)
    assert stats["spool_bytes"] <= config.max_bytes
    with Spool.open(config) as spool:
        assert spool.stats() == stats


def test_age_bound_drops_old_reports_on_append_and_on_open_and_counts_them(tmp_path):
    clock = FakeClock()
    config = SpoolConfig(path=str(tmp_path), max_age_s=3600)
    with Spool.open(config, clock=clock) as spool:
        fill(spool, 3)
        clock.now += 1800
        fill(spool, 2)
        clock.now += 1801  # the first three are now older than an hour
        fill(spool, 1)
        assert [s for s, _ in spool.oldest(100, 10**9)] == [4, 5, 6]
        assert spool.stats()["dropped_reports"] == 3
    clock.now += 7200  # the agent was down for two hours
    with Spool.open(config, clock=clock) as spool:
        stats = spool.stats()
        assert stats["spool_reports"] == 0
        assert stats["dropped_reports"] == 6
        assert spool.next_seq() == 7


def test_dead_letter_moves_the_report_with_its_reason_and_counts_it(tmp_path):
    config = SpoolConfig(path=str(tmp_path))
    with Spool.open(config) as spool:
        fill(spool, 3)
        spool.dead_letter(2, "400 invalid value: Expected `float` at $.reports[0].devices[0].busy_s")
        assert [s for s, _ in spool.oldest(10, 10**9)] == [1, 3]
        instance = spool.instance
    lines = (tmp_path / DEAD_LETTER_NAME).read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["seq"] == 2 and entry["instance"] == instance
    assert "busy_s" in entry["reason"]
    assert wire.decode_report(json.dumps(entry["report"]).encode()) == report(2)
    with Spool.open(config) as spool:
        assert spool.stats()["dead_letter_reports"] == 1


def test_dead_letter_file_rotates_past_its_bound(tmp_path):
    config = SpoolConfig(path=str(tmp_path), dead_letter_max_bytes=2000)
    with Spool.open(config) as spool:
        fill(spool, 10)
        for seq in range(1, 11):
            spool.dead_letter(seq, "bad")
        assert spool.stats()["dead_letter_reports"] == 10
    current = (tmp_path / DEAD_LETTER_NAME).read_bytes()
    previous = (tmp_path / (DEAD_LETTER_NAME + ".1")).read_bytes()
    assert 0 < len(current) <= 2000 and 0 < len(previous) <= 2000


def test_a_second_agent_cannot_open_a_spool_in_use(tmp_path):
    config = SpoolConfig(path=str(tmp_path))
    with Spool.open(config), pytest.raises(SpoolLocked):
        Spool.open(config)
    Spool.open(config).close()  # released on close


_WRITER = textwrap.dedent(
    """
    import sys
    from capmon.agent import wire
    from capmon.agent.spool import Spool, SpoolConfig

    spool = Spool.open(SpoolConfig(path=sys.argv[1]))
    for _ in range(5000):  # bounded: stops by itself if nobody kills it
        seq = spool.next_seq()
        devices = [
            wire.DeviceWindow(device_id=f"GPU-{i}", vendor="nvidia", state="free", info={"pad": "x" * 900})
            for i in range(16)
        ]
        spool.append(wire.Report(seq=seq, start=1_700_000_000, end=1_700_000_060, devices=devices))
        print(seq, flush=True)
    """
)


def test_a_spool_killed_mid_append_opens_cleanly_with_every_acknowledged_report(tmp_path):
    path = tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    acknowledged = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            acknowledged.append(int(line))
            if len(acknowledged) == 60:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert len(acknowledged) == 60, "the writer stopped before it was killed"

    with Spool.open(SpoolConfig(path=str(path))) as spool:
        spooled = [seq for seq, _ in spool.oldest(10_000, 10**12)]
        # Every append that returned is there; at most the one in flight may have made it too.
        assert spooled[: len(acknowledged)] == acknowledged
        assert len(spooled) <= len(acknowledged) + 2
        for _, body in spool.oldest(10_000, 10**12):
            wire.decode_report(body)
        next_seq = spool.next_seq()
        assert next_seq == spooled[-1] + 1
        spool.append(report(next_seq))


def test_a_torn_wal_tail_is_ignored(tmp_path):
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    with Spool.open(SpoolConfig(path=str(tmp_path / "live"))) as spool:
        spool._db.execute("PRAGMA wal_autocheckpoint = 0")  # keep every commit in the WAL
        fill(spool, 6)
        # What a crash leaves: the database and its WAL as they are, no checkpoint on close ...
        for name in (DB_NAME, DB_NAME + "-wal"):
            (crashed / name).write_bytes((tmp_path / "live" / name).read_bytes())
    # ... with half a frame of a write that never finished at the WAL's end.
    with open(crashed / (DB_NAME + "-wal"), "ab") as f:
        f.write(os.urandom(3000))
    with Spool.open(SpoolConfig(path=str(crashed))) as reopened:
        assert [s for s, _ in reopened.oldest(100, 10**9)] == [1, 2, 3, 4, 5, 6]
        assert reopened.next_seq() == 7


def test_an_unreadable_spool_is_moved_aside_and_a_new_one_starts(tmp_path, caplog):
    (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 100)
    with Spool.open(SpoolConfig(path=str(tmp_path))) as spool:
        assert spool.next_seq() == 1
        fill(spool, 1)
    assert any(p.name.startswith(DB_NAME + ".corrupt-") for p in tmp_path.iterdir())
    assert "unreadable" in caplog.text


def test_reports_dropped_while_being_sent_and_then_delivered_are_not_counted_as_dropped(tmp_path):
    # Found end to end (tests/faults): the collector came back, the agent sent its full spool, a new
    # window pushed the oldest of that batch out, the send succeeded — and the counter said "lost".
    size = len(wire.encode(report(1)))
    config = SpoolConfig(path=str(tmp_path), max_bytes=int(size * 3.5))
    with Spool.open(config) as spool:
        fill(spool, 3)
        in_flight = [s for s, _ in spool.oldest(100, 10**9)]
        fill(spool, 2)  # the bound drops 1 and 2 while they are on the wire
        assert spool.stats()["dropped_reports"] == 2
        spool.remove(in_flight)  # 2xx: the collector stored them
        assert spool.stats()["dropped_reports"] == 0
        assert [s for s, _ in spool.oldest(100, 10**9)] == [4, 5]
        spool.remove([999])  # an unknown seq changes nothing
        assert spool.stats()["dropped_reports"] == 0
    with Spool.open(config) as spool:
        assert spool.stats()["dropped_reports"] == 0


def test_reports_dropped_during_a_failed_send_stay_counted(tmp_path):
    size = len(wire.encode(report(1)))
    config = SpoolConfig(path=str(tmp_path), max_bytes=int(size * 3.5))
    with Spool.open(config) as spool:
        fill(spool, 3)
        spool.oldest(100, 10**9)  # this send fails ...
        fill(spool, 2)  # ... while 1 and 2 are dropped
        retry = [s for s, _ in spool.oldest(100, 10**9)]  # the next attempt
        assert retry == [3, 4, 5]
        spool.remove(retry)
        assert spool.stats()["dropped_reports"] == 2
