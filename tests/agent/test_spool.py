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
from capmon.agent.spool import (
    COUNTERS_NAME,
    DB_NAME,
    DEAD_LETTER_NAME,
    Spool,
    SpoolConfig,
    SpoolLocked,
    SpoolUnavailable,
)


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


def test_reports_sent_without_an_answer_are_never_dropped_so_dropped_is_exact(tmp_path):
    # Found end to end (issue 11.3): a batch whose request timed out was stored by the collector
    # anyway; the bound then dropped it and counted it, so dropped + delivered exceeded produced.
    size = len(wire.encode(report(1)))
    config = SpoolConfig(path=str(tmp_path), max_bytes=int(size * 3.5))
    with Spool.open(config) as spool:
        fill(spool, 3)
        in_flight = [s for s, _ in spool.oldest(2, 10**9)]
        assert spool.sending(in_flight) == [1, 2]
        assert spool.sending(in_flight) == []  # already marked: nothing to write
        fill(spool, 2)  # over the bound: 1 and 2 may be stored, so 3 and 4 go instead
        assert spool.stats()["dropped_reports"] == 2
        assert [s for s, _ in spool.oldest(100, 10**9)] == [1, 2, 5]
    with Spool.open(config) as spool:  # the mark survives a restart
        fill(spool, 1)
        assert [s for s, _ in spool.oldest(100, 10**9)] == [1, 2, 6]
        assert spool.stats()["dropped_reports"] == 3
        spool.remove([1, 2])  # 2xx
        assert spool.stats()["dropped_reports"] == 3


def test_reports_the_collector_did_not_store_are_dropped_oldest_first_again(tmp_path):
    size = len(wire.encode(report(1)))
    config = SpoolConfig(path=str(tmp_path), max_bytes=int(size * 3.5))
    with Spool.open(config) as spool:
        fill(spool, 3)
        marked = spool.sending([1, 2, 3])
        spool.not_delivered(marked)  # e.g. connection refused, 401, 429: nothing was stored
        fill(spool, 2)
        assert [s for s, _ in spool.oldest(100, 10**9)] == [3, 4, 5]
        assert spool.stats()["dropped_reports"] == 2


def test_last_window_end_is_durable_and_only_moves_forward(tmp_path):
    config = SpoolConfig(path=str(tmp_path))
    with Spool.open(config) as spool:
        assert spool.last_end == 0
        spool.append(report(spool.next_seq()))
        assert spool.last_end == report(1).end
    with Spool.open(config) as spool:
        assert spool.last_end == report(1).end


def _fill_the_disk(spool: Spool) -> None:
    """SQLite's own "database or disk is full", exactly as on a full disk: no page may be added."""
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count = {pages}")


def test_windows_that_cannot_be_written_are_counted_and_their_seqs_never_reused(tmp_path, caplog):
    config = SpoolConfig(path=str(tmp_path))
    with Spool.open(config) as spool:
        fill(spool, 1)
        _fill_the_disk(spool)
        for _ in range(3):
            seq = spool.next_seq()
            with pytest.raises(SpoolUnavailable, match=rf"spool {tmp_path} cannot be written: .*full"):
                spool.append(report(seq, devices=500))
        assert spool.stats()["lost_windows"] == 3
        assert spool.failing and "full" in spool.failing
    # Said once, not once per window.
    assert caplog.text.count("cannot be written") == 1
    with Spool.open(config) as spool:  # the database never learnt of 2..4: the counters file did
        assert spool.last_seq == 4
        assert spool.next_seq() == 5
        assert spool.last_end == report(4).end
        assert spool.stats()["lost_windows"] == 3
        spool.append(report(5))
    (tmp_path / COUNTERS_NAME).unlink()  # the next good write put them in the database too
    with Spool.open(config) as spool:
        assert (spool.last_seq, spool.stats()["lost_windows"]) == (5, 3)


def test_a_spool_that_becomes_writable_again_says_so_once(tmp_path, caplog):
    with Spool.open(SpoolConfig(path=str(tmp_path))) as spool:
        spool._db.execute("PRAGMA query_only = 1")  # SQLite's "attempt to write a readonly database"
        for _ in range(2):
            with pytest.raises(SpoolUnavailable, match="readonly"):
                spool.append(report(spool.next_seq()))
        spool._db.execute("PRAGMA query_only = 0")
        fill(spool, 2)
        assert spool.failing is None
        assert spool.stats() | {"spool_bytes": 0} == {
            "spool_reports": 2,
            "spool_bytes": 0,
            "dropped_reports": 0,
            "lost_windows": 2,
            "dead_letter_reports": 0,
        }
    assert caplog.text.count("cannot be written") == 1
    assert caplog.text.count("writable again; 2 window(s) lost") == 1


def test_an_unusable_spool_path_is_one_clear_error_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpoolUnavailable) as err:
        Spool.open(SpoolConfig(path=str(blocker / "spool")))
    assert str(err.value) == f"spool {blocker / 'spool'} cannot be opened: Not a directory"
