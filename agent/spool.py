"""The agent's durable spool: every finished window is on disk (fsync) before the agent moves on.

Why SQLite (WAL, `synchronous=FULL`) and not append-only segment files: the spool must keep, *atomically
together*, the report, the last assigned `seq`, and the drop and dead-letter counters. SQLite gives one
transaction for all of them, torn-write recovery after `kill -9` or power loss (WAL frames carry
checksums; an incomplete commit is ignored on the next open), delete-oldest by primary key, and it is in
the standard library, tested far beyond anything we would write. Segment files would need our own
framing, CRCs, a recovery scan, compaction of partly delivered segments, and a separate metadata file
kept consistent through atomic renames — more code in the one place that must not lose data. The cost,
one WAL fsync per commit, is nothing at one window a minute: about 280 appends/s were measured on a
virtual ext4 disk.

Layout, under `SpoolConfig.path` (a directory, created 0700):
`spool.db` (+ `-wal`, `-shm`), `lock` (an exclusive `flock`, so two agents never share a spool),
`dead-letter.jsonl` (reports the collector rejected as invalid, one JSON object a line), and
`counters` (a small preallocated file rewritten in place when the database cannot be written: the last
seq and window end handed out and the windows lost, so neither is reused or forgotten after a restart
on a full disk).

What the spool counts, so that per agent produced = delivered + dropped + lost, exactly:
`dropped` (the size/age bound removed a report that was never possibly delivered: a report sent in a
request whose outcome is unknown — a timeout, a cut connection, a 5xx — is kept until an answer says
what became of it, so the bound may overshoot by at most one batch), and `lost` (a window that could
not be written at all: disk full, I/O error, read-only). A report that leaves the spool any other way
was delivered (2xx) or dead-lettered (400, counted as `dead_lettered`).

All methods except `next_seq()`, `stats()` and `instance` block on disk I/O; the agent calls them through
`asyncio.to_thread`. They are thread-safe (one lock around the connection).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from capmon.agent import wire

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DB_NAME = "spool.db"
LOCK_NAME = "lock"
DEAD_LETTER_NAME = "dead-letter.jsonl"
COUNTERS_NAME = "counters"
_COUNTERS_SIZE = 512


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    """`[spool]` in the agent's TOML file."""

    # Directory that holds the spool database, its lock and `dead-letter.jsonl`. systemd's
    # `StateDirectory=capmon` makes /var/lib/capmon writable for the agent.
    path: str = "/var/lib/capmon/spool"
    # Most report bytes (encoded JSON, before gzip) kept while the collector is unreachable. The oldest
    # reports are dropped first, and counted, when a new one would exceed it. An 8-GPU host's window
    # is 2.6-3.3 kB (3.3 kB measured with the mock probe's 8 devices), so 256 MiB holds 80,000-100,000
    # windows: about two months of 60 s windows. `max_age_s` (7 days) binds first; `max_bytes` matters
    # for hosts with hundreds of devices. The database file may be somewhat larger
    # (SQLite page overhead); freed pages are reused, so it does not grow past its high-water mark.
    max_bytes: int = 256 * MiB
    # Reports older than this (by the agent's clock when they were spooled) are dropped, and counted:
    # after a week the gap is better told as a gap than back-filled.
    max_age_s: float = 7 * 86_400.0
    # `dead-letter.jsonl` is rotated to `dead-letter.jsonl.1` (one old generation kept) past this size.
    dead_letter_max_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"spool max_bytes must be positive, got {self.max_bytes}")
        if self.max_age_s <= 0:
            raise ValueError(f"spool max_age_s must be positive, got {self.max_age_s}")
        if self.dead_letter_max_bytes <= 0:
            raise ValueError(
                f"spool dead_letter_max_bytes must be positive, got {self.dead_letter_max_bytes}"
            )


class SpoolUnavailable(Exception):
    """The spool cannot be opened or written (read-only, disk full, I/O error, not a directory).

    The message is one line for people: the path and the cause, never a traceback's worth.
    """


class SpoolLocked(SpoolUnavailable):
    """Another process (a second agent) holds this spool."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reports (
    seq INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS reports_created ON reports (created);
"""


class Spool:
    """Durable, bounded FIFO of encoded `wire.Report`s, keyed by `seq`. Open with `Spool.open(config)`."""

    def __init__(
        self,
        config: SpoolConfig,
        db: sqlite3.Connection,
        lock_fd: int,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self._db = db
        self._lock_fd = lock_fd
        self._clock = clock
        self._mutex = threading.Lock()
        self._dir = Path(config.path)
        self.dead_letter_path = self._dir / DEAD_LETTER_NAME
        self.counters_path = self._dir / COUNTERS_NAME
        self.instance: str = self._meta("instance")
        self._last_seq: int = self._meta("last_seq")
        self._last_end: int = self._meta("last_end")
        self._dropped: int = self._meta("dropped")
        self._dead_lettered: int = self._meta("dead_lettered")
        self._lost: int = self._meta("lost")
        self._take_counters_file()
        self._next_seq: int = self._last_seq + 1
        self._seq_mutex = threading.Lock()
        self._count = self._bytes = 0
        self._load_totals()
        # Reports sent in a request whose outcome is unknown: maybe stored, so never dropped by a bound.
        self._sent: set[int] = {seq for (seq,) in db.execute("SELECT seq FROM reports WHERE sent = 1")}
        self._closed = False
        self._failing: str | None = None  # why the last write failed, until one succeeds

    # -- opening -------------------------------------------------------------------------------------

    @classmethod
    def open(cls, config: SpoolConfig, clock: Callable[[], float] = time.time) -> Spool:
        """Open (or create) the spool at `config.path`; enforce the bounds.

        Raises `SpoolLocked` if another agent uses it, `SpoolUnavailable` (path and cause, one line) if
        it cannot be created, opened or written. A database SQLite cannot read (disk corruption, not a
        crash: crashes are recovered) is moved aside to `spool.db.corrupt-<unix time>` with a loud log
        line and a fresh spool is created, with a new `instance`, so the agent keeps measuring; the
        collector sees the new instance and does not mistake its `seq` 1 for a replay.
        """
        directory = Path(config.path)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolUnavailable(f"spool {directory} cannot be opened: {_cause(exc)}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise SpoolLocked(f"spool {directory} is in use by another process") from None
        try:
            db_path = directory / DB_NAME
            try:
                try:
                    db = _connect(db_path)
                except sqlite3.DatabaseError as exc:
                    if not _is_corrupt(exc):
                        raise
                    aside = directory / f"{DB_NAME}.corrupt-{int(clock())}"
                    log.error(
                        "spool %s is unreadable (%s); moved aside to %s, starting a new spool",
                        db_path,
                        exc,
                        aside,
                    )
                    for suffix in ("", "-wal", "-shm"):
                        with contextlib.suppress(FileNotFoundError):
                            os.replace(f"{db_path}{suffix}", f"{aside}{suffix}")
                    db = _connect(db_path)
                _fsync_dir(directory)
                spool = cls(config, db, lock_fd, clock)
            except (OSError, sqlite3.Error) as exc:
                raise SpoolUnavailable(f"spool {db_path} cannot be opened: {_cause(exc)}") from None
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            spool._write_counters()
            with spool._mutex, _transaction(spool._db):
                spool._enforce_bounds()
        except (OSError, sqlite3.Error) as exc:
            spool.close()
            raise SpoolUnavailable(f"spool {directory} cannot be written: {_cause(exc)}") from None
        except BaseException:
            spool.close()
            raise
        return spool

    # -- the API ---------------------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The highest seq ever handed to `append` of this spool, kept or lost (0 for a new one)."""
        return self._last_seq

    @property
    def last_end(self) -> int:
        """The latest window end ever handed to `append` (0 for a new spool): the next window ends after."""
        return self._last_end

    @property
    def failing(self) -> str | None:
        """Why the spool cannot be written now (None when the last write succeeded)."""
        return self._failing

    def next_seq(self) -> int:
        """Reserve the `seq` for the next finished window: one more than the last, across restarts.

        Non-blocking (memory only). `append` persists it, kept or lost (in the database, else in the
        counters file); a seq reserved but never appended (the agent crashed in between) is handed
        out again after a restart, which is harmless because nothing carrying it existed.
        """
        with self._seq_mutex:
            seq = self._next_seq
            self._next_seq += 1
            return seq

    def append(self, report: wire.Report) -> None:
        """Store `report` durably (committed and fsynced when this returns), then enforce the bounds.

        `report.seq` must be greater than every seq appended before (use `next_seq()`); anything else is
        a bug in the caller and raises `ValueError`. If the bounds are hit, the oldest reports are
        dropped and counted — including, in the degenerate case, this one when it alone exceeds
        `max_bytes`. If it cannot be written (`SpoolUnavailable`), the window is counted as lost and
        its seq and end stay used.
        """
        body = wire.encode(report)
        with self._mutex:
            self._check_open()
            if report.seq <= self._last_seq:
                raise ValueError(f"seq {report.seq} is not after the last spooled seq {self._last_seq}")
            try:
                with self._write():
                    self._db.execute(
                        "INSERT INTO reports (seq, created, size, body) VALUES (?, ?, ?, ?)",
                        (report.seq, self._clock(), len(body), body),
                    )
                    self._set_meta("last_seq", report.seq)
                    self._set_meta("last_end", max(self._last_end, report.end))
                    self._set_meta("lost", self._lost)  # windows lost while the disk was full
                    self._count += 1
                    self._bytes += len(body)
                    self._enforce_bounds()
            except SpoolUnavailable:
                self._lost += 1
                self._last_seq = report.seq
                self._last_end = max(self._last_end, report.end)
                try:
                    self._write_counters()
                except OSError as exc:
                    log.debug("counters file %s not written either: %s", self.counters_path, exc)
                raise
            self._last_seq = report.seq
            self._last_end = max(self._last_end, report.end)
        with self._seq_mutex:
            self._next_seq = max(self._next_seq, report.seq + 1)

    def oldest(self, n: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Up to `n` of the oldest reports as `(seq, encoded report)`, in seq order, their bodies summing
        to at most `max_bytes` — but always at least one when the spool is not empty."""
        out: list[tuple[int, bytes]] = []
        total = 0
        with self._mutex:
            self._check_open()
            try:
                rows = self._db.execute(
                    "SELECT seq, body FROM reports ORDER BY seq LIMIT ?", (max(n, 1),)
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._failed(exc) from None
            for seq, body in rows:
                if out and total + len(body) > max_bytes:
                    break
                out.append((seq, bytes(body)))
                total += len(body)
        return out

    def sending(self, seqs: Iterable[int]) -> list[int]:
        """Mark reports as about to be sent (durably): from now on they may be stored, so the bounds
        keep them until `remove` or `not_delivered`. Returns the seqs this call marked."""
        with self._mutex:
            self._check_open()
            new = [seq for seq in seqs if seq not in self._sent]
            if new:
                with self._write():
                    self._update_sent(new, 1)
                self._sent.update(new)
            return new

    def not_delivered(self, seqs: Iterable[int]) -> None:
        """The collector's answer says these were not stored (refused, never reached): droppable again."""
        with self._mutex:
            self._check_open()
            seqs = [seq for seq in seqs if seq in self._sent]
            if seqs:
                with self._write():
                    self._update_sent(seqs, 0)
                self._sent.difference_update(seqs)

    def remove(self, seqs: Iterable[int]) -> None:
        """Forget delivered reports (durably). Unknown seqs are ignored."""
        seqs = list(seqs)
        if not seqs:
            return
        with self._mutex:
            self._check_open()
            with self._write():
                count, size = self._delete(seqs)
            self._count -= count
            self._bytes -= size
            self._sent.difference_update(seqs)

    def dead_letter(self, seq: int, reason: str) -> None:
        """Move report `seq` to `dead-letter.jsonl` with `reason` (e.g. the collector's 400 body), counted.

        The line is fsynced before the report leaves the spool: a crash in between leaves the report in
        both places (a duplicate line), never in neither.
        """
        with self._mutex:
            self._check_open()
            try:
                row = self._db.execute("SELECT body, created FROM reports WHERE seq = ?", (seq,)).fetchone()
            except sqlite3.Error as exc:
                raise self._failed(exc) from None
            if row is None:
                return
            body, created = row
            line = msgspec.json.encode(
                {
                    "time": datetime.fromtimestamp(self._clock(), timezone.utc).isoformat(),
                    "instance": self.instance,
                    "seq": seq,
                    "spooled": datetime.fromtimestamp(created, timezone.utc).isoformat(),
                    "reason": reason,
                    "report": msgspec.Raw(bytes(body)),
                }
            )
            try:
                self._write_dead_letter(line + b"\n")
            except OSError as exc:
                raise self._failed(exc) from None
            with self._write():
                count, size = self._delete([seq])
                self._dead_lettered += count
                self._set_meta("dead_lettered", self._dead_lettered)
            self._count -= count
            self._bytes -= size
            self._sent.discard(seq)
        log.error("report seq %d moved to %s: %s", seq, self.dead_letter_path, reason)

    def stats(self) -> dict[str, int]:
        """Counters named as in `wire.AgentStats`; non-blocking (cached in memory)."""
        return {
            "spool_reports": self._count,
            "spool_bytes": self._bytes,
            "dropped_reports": self._dropped,
            "lost_windows": self._lost,
            "dead_letter_reports": self._dead_lettered,
        }

    def close(self) -> None:
        """Checkpoint and close the database and release the lock. Idempotent."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.close()
            finally:
                os.close(self._lock_fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (called with self._mutex held) -------------------------------------------------------

    def _load_totals(self) -> None:
        self._count, self._bytes = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM reports"
        ).fetchone()

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """A transaction whose failure (disk full, I/O error) also rolls back the in-memory mirrors and
        raises `SpoolUnavailable`; the spool's health is logged once per change, not per write."""
        try:
            with _transaction(self._db):
                yield
        except (sqlite3.Error, OSError) as exc:
            with contextlib.suppress(sqlite3.Error):
                self._load_totals()
                self._dropped = self._meta("dropped")
                self._dead_lettered = self._meta("dead_lettered")
            raise self._failed(exc) from None
        if self._failing is not None:
            log.warning("spool %s is writable again; %d window(s) lost in all", self._dir, self._lost)
            self._failing = None

    def _failed(self, exc: BaseException) -> SpoolUnavailable:
        cause = _cause(exc)
        if self._failing != cause:
            log.error(
                "spool %s cannot be written (%s): new windows are counted as lost until it can; "
                "delivery waits",
                self._dir,
                cause,
            )
            self._failing = cause
        return SpoolUnavailable(f"spool {self._dir} cannot be written: {cause}")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("spool is closed")

    def _meta(self, key: str) -> int | str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0]

    def _set_meta(self, key: str, value: int | str) -> None:
        self._db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def _update_sent(self, seqs: list[int], value: int) -> None:
        for start in range(0, len(seqs), 500):  # SQLite caps bound parameters per statement
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            self._db.execute(f"UPDATE reports SET sent = ? WHERE seq IN ({marks})", [value, *chunk])

    def _delete(self, seqs: list[int]) -> tuple[int, int]:
        count = size = 0
        for start in range(0, len(seqs), 500):
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            c, s = self._db.execute(
                f"SELECT count(*), coalesce(sum(size), 0) FROM reports WHERE seq IN ({marks})", chunk
            ).fetchone()
            self._db.execute(f"DELETE FROM reports WHERE seq IN ({marks})", chunk)
            count += c
            size += s
        return count, size

    def _enforce_bounds(self) -> None:
        """Drop (and count) reports past `max_age_s`, then the oldest until within `max_bytes`.

        Reports that may have been stored (sent, no answer yet) are never dropped: counted as dropped,
        they might be in the store too. Runs inside the caller's transaction, so the drop and its
        count commit together.
        """
        dropped = 0
        cutoff = self._clock() - self.config.max_age_s
        c, s = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM reports WHERE created < ? AND sent = 0", (cutoff,)
        ).fetchone()
        if c:
            self._db.execute("DELETE FROM reports WHERE created < ? AND sent = 0", (cutoff,))
            self._count -= c
            self._bytes -= s
            dropped += c
        if self._bytes > self.config.max_bytes:
            excess = self._bytes - self.config.max_bytes
            freed = count = 0
            last = None
            for seq, size in self._db.execute("SELECT seq, size FROM reports WHERE sent = 0 ORDER BY seq"):
                freed += size
                count += 1
                last = seq
                if freed >= excess:
                    break
            if last is not None:
                self._db.execute("DELETE FROM reports WHERE seq <= ? AND sent = 0", (last,))
                self._count -= count
                self._bytes -= freed
                dropped += count
        if dropped:
            self._dropped += dropped
            self._set_meta("dropped", self._dropped)
            log.warning(
                "spool bound hit (max_bytes=%d, max_age_s=%g): dropped the %d oldest report(s), %d in total",
                self.config.max_bytes,
                self.config.max_age_s,
                dropped,
                self._dropped,
            )

    def _take_counters_file(self) -> None:
        """Take what the counters file knows beyond the database (written while it could not be)."""
        try:
            data = json.loads(self.counters_path.read_bytes().strip(b"\0 \n") or b"{}")
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.counters_path, exc)
            return
        if not isinstance(data, dict) or data.get("instance") != self.instance:
            return  # a spool moved aside as corrupt: its counters are not this one's
        try:
            self._last_seq = max(self._last_seq, int(data.get("last_seq", 0)))
            self._last_end = max(self._last_end, int(data.get("last_end", 0)))
            self._lost = max(self._lost, int(data.get("lost", 0)))
        except (TypeError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.counters_path, exc)

    def _write_counters(self) -> None:
        """Rewrite the counters file in place. It keeps one fixed size, so on a full disk the rewrite
        needs no new block (ext4, xfs, tmpfs); it is created at open, while the disk has room."""
        data = json.dumps(
            {
                "instance": self.instance,
                "last_seq": self._last_seq,
                "last_end": self._last_end,
                "lost": self._lost,
            }
        ).encode()
        created = not self.counters_path.exists()
        fd = os.open(self.counters_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, data.ljust(_COUNTERS_SIZE), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self._dir)

    def _write_dead_letter(self, line: bytes) -> None:
        path = self.dead_letter_path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(line) > self.config.dead_letter_max_bytes:
            os.replace(path, path.with_name(DEAD_LETTER_NAME + ".1"))
            size = 0
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if size == 0:
            _fsync_dir(self._dir)


def _cause(exc: BaseException) -> str:
    """An OS or SQLite error as a short reason: "Read-only file system", "database or disk is full"."""
    if isinstance(exc, OSError):
        return exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)
    return str(exc) or type(exc).__name__


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    """Damage SQLite cannot recover, as opposed to a spool that cannot be written or opened."""
    name = getattr(exc, "sqlite_errorname", None)  # Python >= 3.11
    if name is not None:
        return name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or isinstance(exc, _Damaged)
    text = str(exc)
    return isinstance(exc, _Damaged) or "malformed" in text or "not a database" in text


class _Damaged(sqlite3.DatabaseError):
    """`quick_check` found damage, or the database cannot be put in WAL mode."""


def _connect(path: Path) -> sqlite3.Connection:
    """Open the database, recovering a crashed WAL, and make sure it is readable and initialised."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA busy_timeout = 5000")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise _Damaged(f"cannot switch to WAL journal mode (got {mode})")
        # FULL: the WAL is fsynced at every commit, so a committed report survives power loss (NORMAL
        # would only survive a process crash).
        db.execute("PRAGMA synchronous = FULL")
        # Truncate the WAL after checkpoints rather than let it keep its largest size.
        db.execute("PRAGMA journal_size_limit = 8388608")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise _Damaged(f"quick_check: {check}")
        with _transaction(db):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            columns = {row[1] for row in db.execute("PRAGMA table_info(reports)")}
            if "sent" not in columns:  # a spool written by an older agent
                db.execute("ALTER TABLE reports ADD COLUMN sent INTEGER NOT NULL DEFAULT 0")
            defaults = {
                "instance": uuid.uuid4().hex,
                "last_seq": 0,
                "last_end": 0,
                "dropped": 0,
                "dead_lettered": 0,
                "lost": 0,
            }
            for key, value in defaults.items():
                db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
    except BaseException:
        db.close()
        raise
    return db


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (the connection is in autocommit mode): all of it commits, or none."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (disk full): the error that matters is the first one.
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def _fsync_dir(directory: Path) -> None:
    """Make a created or renamed file's directory entry durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
