"""Recordings: a bounded history of Snapshots in SQLite, written by `memtop record`, read by `--replay`.

Layout (format `memtop.recording/1`):

- `samples(id, t, key_id, size, data)`: one row per sample, indexed by `t` (the snapshot's taken_at,
  seconds since the epoch). `data` is the snapshot's wire record (memtop/schema.py, without the
  per-process histories, which replay rebuilds from neighbouring samples) encoded as MessagePack and
  compressed with zstd. As in below's store, every KEY_EVERY-th sample is a key frame compressed on its
  own (`key_id == id`); the samples after it are compressed with the key frame's raw bytes as the zstd
  dictionary, so what did not change since the key frame costs next to nothing. Opening any sample is
  two decompressions.
- `oom_kills(t, sample_id, victim_pid, victim_comm, container_id)`: each kill once, for jumping to it.
- `meta(key, value)`: format, schema, host, interval.

Retention drops whole key-frame groups, oldest first, by age and by size (the pages in use; freed
pages go back to the file system through incremental vacuum). The database is in WAL mode with
synchronous=FULL: a crash or power loss loses at most the sample being written. The writer holds an
exclusive flock on the database file for its whole life, so a second recorder is refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import os
import queue
import re
import sqlite3
import stat
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import msgspec
import zstandard

from memtop import schema
from memtop.errors import MemtopError
from memtop.export import snapshot_from_doc, snapshot_to_doc
from memtop.leaks import LeakRow
from memtop.readonly import ReadOnlySource
from memtop.store import HISTORY_S, FocusDetail, HistoryPoint, ProcessKey, Snapshot

FORMAT = "memtop.recording/1"
DEFAULT_DB = Path("/var/lib/memtop/memtop.db")
DEFAULT_INTERVAL_S = 5.0
DEFAULT_RETENTION_S = 3 * 86400.0
DEFAULT_MAX_BYTES = 2 << 30
MIN_MAX_BYTES = 64 << 10
KEY_EVERY = 12  # a key frame a minute at the default interval
ZSTD_LEVEL = 3
MAX_HISTORY_SAMPLES = 240  # a replayed graph is rebuilt from at most this many samples (the window's newest)
SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples(
    id INTEGER PRIMARY KEY, t REAL NOT NULL, key_id INTEGER NOT NULL, size INTEGER NOT NULL,
    data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS samples_t ON samples(t, key_id);  -- covers the index read at open
CREATE TABLE IF NOT EXISTS oom_kills(
    t REAL NOT NULL, sample_id INTEGER NOT NULL, victim_pid INTEGER NOT NULL, victim_comm TEXT NOT NULL,
    container_id TEXT);
CREATE INDEX IF NOT EXISTS oom_kills_t ON oom_kills(t);
"""


class Sink(Protocol):
    """Something that receives every Snapshot the collector makes (recorder, metrics exporter).

    on_snapshot is called on the collector's thread right after each tick: it must return at once
    (queue the work, never block on I/O). close() is called once, after the last snapshot."""

    def on_snapshot(self, snap: Snapshot) -> None: ...

    def close(self) -> None: ...


def log(message: str) -> None:
    print(f"memtop: {message}", file=sys.stderr, flush=True)


# -- parsing user input: times, durations, sizes ---------------------------------------------------------

_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|secs|m|min|mins|h|hr|hrs|d|day|days|w|weeks?)?\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """'90s', '10m', '12h', '3d', '1w' or plain seconds -> seconds; ValueError otherwise."""
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration (like 90s, 10m, 12h, 3d)")
    return float(match.group(1)) * _UNITS_S[(match.group(2) or "s")[0]]


def parse_size(text: str) -> int:
    """'2GiB', '500M', '64k', '1048576' -> bytes (K/M/G/T are powers of 1024); ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (like 500M, 2GiB or a number of bytes)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * (1024**power))


def parse_time(text: str, now: float | None = None) -> float:
    """A point in time -> seconds since the epoch. Accepts ISO 8601 ('2026-11-30T03:00:00Z', a naive one
    is local time), 'HH:MM[:SS]' (today, local; yesterday if that is still to come), 'now', and
    '<duration> ago' ('10m ago', '2h ago', '1d ago'). ValueError (one line) otherwise."""
    now = time.time() if now is None else now
    value = text.strip().lower()
    if value == "now":
        return now
    if value.endswith(" ago") or value.endswith("ago"):
        return now - parse_duration(value[: -len("ago")].strip())
    clock = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", value)
    if clock:
        hour, minute, second = int(clock.group(1)), int(clock.group(2)), int(clock.group(3) or 0)
        if hour > 23 or minute > 59 or second > 59:
            raise ValueError(f"{text!r} is not a time of day")
        today = dt.datetime.fromtimestamp(now).replace(hour=hour, minute=minute, second=second, microsecond=0)
        at = today.timestamp()
        return at - 86400 if at > now else at
    try:
        parsed = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"cannot read {text!r} as a time (use ISO 8601, HH:MM, or a relative time like '10m ago')"
        ) from None
    return parsed.timestamp()


# -- opening the database safely -------------------------------------------------------------------------


def is_sqlite(path: Path) -> bool:
    """Whether the file starts with SQLite's header (how --replay tells a recording from a JSON file)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def _db_error(path: Path, exc: sqlite3.Error) -> MemtopError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return MemtopError(f"recording {path} is locked by another process ({text})")
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return MemtopError(f"{path} is not a readable memtop recording: {text}")
    return MemtopError(f"cannot use recording {path}: {text}")


def _check_siblings(path: Path) -> None:
    for suffix in ("-wal", "-shm", "-journal"):
        sibling = Path(f"{path}{suffix}")
        if sibling.is_symlink():
            raise MemtopError(f"refusing to record through a symlink: {sibling}")


def _open_locked(path: Path) -> int:
    """The database file, created 0600 in a 0700 directory, opened without following a symlink and
    flocked exclusively; MemtopError (one line) when any of that cannot be."""
    directory = path.parent
    if not directory.exists():
        try:
            directory.mkdir(mode=0o700, parents=True)
            os.chmod(directory, 0o700)
        except OSError as exc:
            raise MemtopError(f"cannot create directory {directory}: {exc.strerror}") from None
    elif not directory.is_dir():
        raise MemtopError(f"not a directory: {directory}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MemtopError(f"refusing to record through a symlink: {path}") from None
        raise MemtopError(f"cannot open recording {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MemtopError(f"recording path is not a regular file: {path}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MemtopError(f"another memtop record is already writing {path}") from None
        head = os.pread(fd, len(SQLITE_MAGIC), 0)
        if head and head != SQLITE_MAGIC:
            raise MemtopError(f"{path} exists and is not an SQLite database: refusing to overwrite it")
        os.fchmod(fd, 0o600)
        _check_siblings(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_format(conn: sqlite3.Connection, path: Path, writing: bool) -> None:
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables and writing:
        return
    if "meta" not in tables or "samples" not in tables:
        raise MemtopError(f"{path} is an SQLite database but not a memtop recording")
    row = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
    if row is None or row[0] != FORMAT:
        found = row[0] if row else "none"
        raise MemtopError(f"{path} is a recording of format {found!r}, expected {FORMAT!r}")


# -- writing -----------------------------------------------------------------------------------------------


def _dict_for(raw_key: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(raw_key, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


class RecordingWriter:
    """Appends samples to a recording and applies retention. Not thread-safe: one thread writes."""

    def __init__(
        self,
        path: Path,
        retention_s: float = DEFAULT_RETENTION_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        interval_s: float = DEFAULT_INTERVAL_S,
        key_every: int = KEY_EVERY,
    ) -> None:
        self.path = path
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.key_every = key_every
        self._kills: set[tuple[float, int]] = set()  # kills already indexed (read back when continuing)
        self._fd = _open_locked(path)
        try:
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=1.0)
            self._setup(interval_s)
        except sqlite3.Error as exc:
            self.close()
            raise _db_error(path, exc) from None
        except BaseException:
            self.close()
            raise
        self._plain = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._delta: zstandard.ZstdCompressor | None = None
        self._key_id = 0
        self._key_size = 0
        self._since_key = 0
        self.samples_written = 0
        self.bytes_written = 0

    def _setup(self, interval_s: float) -> None:
        conn = self.conn
        _check_format(conn, self.path, writing=True)
        fresh = not conn.execute("SELECT name FROM sqlite_master WHERE name='meta'").fetchone()
        if fresh:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table: freed pages can go
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA journal_size_limit=8388608")
        conn.executescript(_SCHEMA_SQL)
        conn.execute("BEGIN")
        for key, value in (("format", FORMAT), ("schema", schema.SCHEMA)):
            conn.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, value))
        conn.execute("INSERT OR REPLACE INTO meta VALUES('interval_s', ?)", (f"{interval_s:g}",))
        conn.execute("COMMIT")
        _check_siblings(self.path)
        row = conn.execute("SELECT max(id) FROM samples").fetchone()
        self._next_id = (row[0] or 0) + 1
        for t, pid in conn.execute("SELECT t, victim_pid FROM oom_kills"):
            self._kills.add((t, pid))

    def encode(self, snap: Snapshot) -> bytes:
        return schema.msgpack_encoder.encode(snapshot_to_doc(snap, histories=False))

    def write(self, snap: Snapshot) -> int:
        """Store one sample; returns its compressed size. sqlite3.Error / OSError propagate."""
        raw = self.encode(snap)
        sample_id = self._next_id
        if (
            self._delta is None
            or self._since_key >= self.key_every
            or not self._key_size * 2 // 3 <= len(raw) <= self._key_size * 3 // 2
        ):  # a new key frame every key_every samples, or sooner when the host changed a lot since
            data = self._plain.compress(raw)
            self._delta = zstandard.ZstdCompressor(level=ZSTD_LEVEL, dict_data=_dict_for(raw))
            self._key_id, self._since_key, self._key_size = sample_id, 0, len(raw)
        else:
            data = self._delta.compress(raw)
        self._since_key += 1
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO samples(id, t, key_id, size, data) VALUES(?, ?, ?, ?, ?)",
                (sample_id, snap.taken_at, self._key_id, len(data), data),
            )
            for event in snap.oom_events:
                if event.key not in self._kills:
                    self._kills.add(event.key)
                    conn.execute(
                        "INSERT INTO oom_kills VALUES(?, ?, ?, ?, ?)",
                        (event.time, sample_id, event.victim_pid, event.victim_comm, event.container_id),
                    )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._next_id += 1
        self.samples_written += 1
        self.bytes_written += len(data)
        self.apply_retention(snap.taken_at)
        return len(data)

    def used_bytes(self) -> int:
        page_size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def apply_retention(self, now: float) -> int:
        """Drop the oldest key-frame groups older than the retention or over the size cap; returns the
        number of samples dropped. The group being written is never dropped."""
        conn = self.conn
        dropped = 0
        first = conn.execute(
            "SELECT key_id FROM samples WHERE t >= ? ORDER BY t LIMIT 1", (now - self.retention_s,)
        ).fetchone()
        if first is not None:
            dropped += self._drop_before(min(first[0], self._key_id))
        used = self.used_bytes()
        if used > self.max_bytes:
            target = used - int(self.max_bytes * 0.9)  # free a tenth at once, not a group per sample
            freed = 0
            cut = self._key_id  # at most: every group but the one being written
            for sample_id, key_id, size in conn.execute("SELECT id, key_id, size FROM samples ORDER BY id"):
                if key_id >= self._key_id or (sample_id == key_id and freed >= target):
                    cut = min(key_id, self._key_id)
                    break
                freed += size
            dropped += self._drop_before(cut)
        return dropped

    def _drop_before(self, sample_id: int) -> int:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        cursor = conn.execute("DELETE FROM samples WHERE id < ?", (sample_id,))
        conn.execute("DELETE FROM oom_kills WHERE sample_id < ?", (sample_id,))
        conn.execute("COMMIT")
        if cursor.rowcount:
            conn.execute("PRAGMA incremental_vacuum")
        return max(0, cursor.rowcount)

    def close(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            self.conn = None  # type: ignore[assignment]
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
            self._fd = -1


class RecordingSink:
    """Records Snapshots from a thread of its own: on_snapshot only queues, so a slow disk never delays
    the collector. Samples closer together than `min_interval_s` are skipped (the live TUI ticks
    faster than a recording needs). A full queue drops the sample and counts it."""

    def __init__(
        self,
        path: Path,
        retention_s: float = DEFAULT_RETENTION_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        min_interval_s: float = 0.0,
        report: Callable[[str], None] = log,
    ) -> None:
        self.writer = RecordingWriter(path, retention_s, max_bytes, interval_s=min_interval_s or 1.0)
        self.path = path
        self.min_interval_s = min_interval_s
        self.report = report
        self.dropped = 0
        self.errors = 0
        self._last_error = ""
        self._last_t = float("-inf")
        self._queue: queue.Queue[Snapshot | None] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, name="memtop-record", daemon=True)
        self._thread.start()

    @property
    def samples_written(self) -> int:
        return self.writer.samples_written

    def on_snapshot(self, snap: Snapshot) -> None:
        if snap.taken_at - self._last_t < self.min_interval_s * 0.95:
            return
        self._last_t = snap.taken_at
        try:
            self._queue.put_nowait(snap)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            snap = self._queue.get()
            if snap is None:
                return
            try:
                self.writer.write(snap)
            except (sqlite3.Error, OSError, ValueError, msgspec.EncodeError) as exc:
                self.errors += 1
                text = f"recording a sample to {self.path} failed: {exc.__class__.__name__}: {exc}"
                if text != self._last_error:  # a full disk says so once, not every interval
                    self.report(text)
                    self._last_error = text

    def close(self) -> None:
        """Write what is queued, then close the database (safe to call more than once)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.writer.close()


# -- reading -----------------------------------------------------------------------------------------------


class _LightProcess(msgspec.Struct):
    pid: int
    kmalloc_bytes_per_s: float
    kmalloc_calls_per_s: float
    start_time: float = 0.0
    rss_bytes: int | None = None


class _LightContainer(msgspec.Struct):
    id: str
    kmalloc_bytes_per_s: float = 0.0
    kmalloc_calls_per_s: float = 0.0
    memory_bytes: int | None = None


class _Light(msgspec.Struct):
    """What a history point needs from a neighbouring sample (decoded without the rest)."""

    processes: list[_LightProcess]
    containers: list[_LightContainer] = []


_light_decoder = msgspec.msgpack.Decoder(_Light)


@dataclass(frozen=True)
class Kill:
    t: float
    victim_pid: int
    victim_comm: str
    container_id: str | None


class RecordingReader:
    """Random access to a recording's samples by position or time; every failure is a MemtopError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            raise MemtopError(f"recording not found: {path}")
        if not is_sqlite(path):
            raise MemtopError(f"{path} is not an SQLite database (nor a memtop recording)")
        try:
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=1.0)
            _check_format(self.conn, path, writing=False)
            self.reload()
        except sqlite3.Error as exc:
            raise _db_error(path, exc) from None
        self._dicts: OrderedDict[int, zstandard.ZstdDecompressor] = OrderedDict()
        self._plain = zstandard.ZstdDecompressor()
        self._light: OrderedDict[int, _Light] = OrderedDict()
        self._lock = threading.Lock()

    def reload(self) -> None:
        """Re-read the index (a recorder may still be appending)."""
        rows = self.conn.execute("SELECT id, t, key_id FROM samples ORDER BY t").fetchall()
        self.ids = [r[0] for r in rows]
        self.times = [r[1] for r in rows]
        self.key_ids = [r[2] for r in rows]
        self.kills = [
            Kill(*r)
            for r in self.conn.execute(
                "SELECT t, victim_pid, victim_comm, container_id FROM oom_kills ORDER BY t"
            ).fetchall()
        ]

    def __len__(self) -> int:
        return len(self.ids)

    def index_at(self, t: float) -> int:
        """The position of the newest sample taken at or before `t` (the first one if `t` is earlier)."""
        import bisect

        return max(0, bisect.bisect_right(self.times, t) - 1)

    def index_after(self, t: float) -> int:
        """The position of the first sample taken at or after `t` (the last one if none)."""
        import bisect

        return min(len(self.times) - 1, bisect.bisect_left(self.times, t))

    def raw(self, index: int) -> bytes:
        sample_id, key_id = self.ids[index], self.key_ids[index]
        try:
            row = self.conn.execute("SELECT data FROM samples WHERE id=?", (sample_id,)).fetchone()
            if row is None:
                raise MemtopError(f"sample {sample_id} is no longer in {self.path} (retention dropped it)")
            if key_id == sample_id:
                return self._plain.decompress(row[0])
            return self._decompressor(key_id).decompress(row[0])
        except sqlite3.Error as exc:
            raise _db_error(self.path, exc) from None
        except zstandard.ZstdError as exc:
            raise MemtopError(f"sample {sample_id} of {self.path} is damaged: {exc}") from None

    def _decompressor(self, key_id: int) -> zstandard.ZstdDecompressor:
        found = self._dicts.get(key_id)
        if found is not None:
            self._dicts.move_to_end(key_id)
            return found
        row = self.conn.execute("SELECT data FROM samples WHERE id=? AND key_id=id", (key_id,)).fetchone()
        if row is None:
            raise MemtopError(f"the key frame {key_id} of {self.path} is missing")
        key_raw = self._plain.decompress(row[0])
        found = zstandard.ZstdDecompressor(dict_data=_dict_for(key_raw))
        self._dicts[key_id] = found
        while len(self._dicts) > 8:
            self._dicts.popitem(last=False)
        return found

    def snapshot(self, index: int) -> Snapshot:
        with self._lock:
            raw = self.raw(index)
        try:
            doc = schema.msgpack_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise MemtopError(f"sample at {self.times[index]} of {self.path} does not match: {exc}") from None
        return snapshot_from_doc(doc)

    def light(self, index: int) -> _Light:
        sample_id = self.ids[index]
        found = self._light.get(sample_id)
        if found is None:
            with self._lock:
                raw = self.raw(index)
            try:
                found = _light_decoder.decode(raw)
            except msgspec.DecodeError:
                found = _Light([])
            self._light[sample_id] = found
            while len(self._light) > 512:
                self._light.popitem(last=False)
        return found

    def histories(
        self,
        index: int,
        keys: set[ProcessKey] | None,
        containers: set[str] | None,
        window_s: float = HISTORY_S,
    ) -> tuple[dict[ProcessKey, list[HistoryPoint]], dict[str, list[HistoryPoint]]]:
        """History points rebuilt from the samples in the `window_s` up to `index` (None: all keys), from
        at most MAX_HISTORY_SAMPLES of them, evenly spaced, ending with the sample at `index`."""
        end_t = self.times[index]
        start = self.index_after(end_t - window_s)
        procs: dict[ProcessKey, list[HistoryPoint]] = {}
        conts: dict[str, list[HistoryPoint]] = {}
        pids = None if keys is None else {k.pid for k in keys}  # ints first: thousands of rows a sample
        stride = -(-(index + 1 - start) // MAX_HISTORY_SAMPLES)  # a short interval: every n-th sample
        for i in reversed(range(index, start - 1, -stride)):
            t = self.times[i]
            sample = self.light(i)
            for p in sample.processes:
                if pids is not None and p.pid not in pids:
                    continue
                key = ProcessKey(p.pid, p.start_time)
                if keys is None or key in keys:
                    point = HistoryPoint(t, p.kmalloc_bytes_per_s, p.kmalloc_calls_per_s, p.rss_bytes)
                    procs.setdefault(key, []).append(point)
            for c in sample.containers:
                if containers is None or c.id in containers:
                    point = HistoryPoint(t, c.kmalloc_bytes_per_s, c.kmalloc_calls_per_s, c.memory_bytes)
                    conts.setdefault(c.id, []).append(point)
        return procs, conts

    def between(self, start: float, end: float) -> Iterator[Snapshot]:
        import bisect

        first = bisect.bisect_left(self.times, start)
        last = bisect.bisect_right(self.times, end)
        for index in range(first, last):
            yield self.snapshot(index)

    def close(self) -> None:
        self.conn.close()


class RecordingSource(ReadOnlySource):
    """A recording shown one sample at a time, with the live view's code (the Source interface), plus
    the time-travel moves: step, seek, jump to a kill. Histories are rebuilt from neighbouring samples."""

    def __init__(self, path: Path, at: float | None = None) -> None:
        super().__init__()
        self.reader = RecordingReader(path)
        if not len(self.reader):
            self.reader.close()
            raise MemtopError(f"recording {path} holds no samples yet")
        self.index = len(self.reader) - 1 if at is None else self.reader.index_at(at)
        self._focus_container: str | None = None
        self._cached: tuple[int, Snapshot] | None = None

    # -- time travel ----------------------------------------------------------------------------------

    @property
    def span(self) -> tuple[float, float]:
        return self.reader.times[0], self.reader.times[-1]

    @property
    def position(self) -> float:
        return self.reader.times[self.index]

    def step(self, samples: int) -> bool:
        """Move by whole samples; False at either end. Past the newest, looks for samples a running
        recorder has added since."""
        if samples > 0 and self.index + samples >= len(self.reader):
            self._reload()
        index = max(0, min(len(self.reader) - 1, self.index + samples))
        moved = index != self.index
        self.index = index
        return moved

    def _reload(self) -> None:
        try:
            self.reader.reload()
        except sqlite3.Error as exc:
            raise _db_error(self.reader.path, exc) from None

    def seek(self, t: float) -> None:
        self.index = self.reader.index_at(t)

    def jump(self, seconds: float) -> bool:
        """Move by a span of time: to the newest sample at or before position+seconds going back, the
        first at or after it going forward."""
        before = self.index
        target = self.position + seconds
        if seconds > 0 and target > self.span[1]:
            self._reload()
        self.index = self.reader.index_at(target) if seconds < 0 else self.reader.index_after(target)
        return self.index != before

    def jump_kill(self, direction: int) -> Kill | None:
        """To the first sample at or after the next (1) or previous (-1) OOM kill; None if there is none."""
        here = self.position
        kills = self.reader.kills
        if direction > 0:
            kill = next((k for k in kills if k.t > here), None)
        else:
            # The kill this sample shows (taken since the sample before) is not the previous one.
            earlier = self.reader.times[self.index - 1] if self.index else float("-inf")
            kill = next((k for k in reversed(kills) if k.t <= earlier), None)
        if kill is not None:
            self.index = self.reader.index_after(kill.t)
        return kill

    def timeline_text(self) -> str:
        """The header's: the sample's time and place."""
        from memtop import format as fmt

        return f"at {fmt.datetime(self.position)} ({self.index + 1}/{len(self.reader)})"

    def span_text(self) -> str:
        """The header's: what the recording holds."""
        from memtop import format as fmt

        first, last = self.span
        return f"recorded {fmt.datetime(first)} → {fmt.datetime(last)}"

    # -- the Source interface ------------------------------------------------------------------------

    def tick(self, include_histories: bool = False) -> Snapshot:
        index = self.index
        if self._cached is not None and self._cached[0] == index:
            snap = self._cached[1]
        else:
            snap = self.reader.snapshot(index)
            self._cached = (index, snap)
        keys = None if include_histories else ({self._focus} if self._focus else set())
        containers = (
            None if include_histories else ({self._focus_container} if self._focus_container else set())
        )
        histories: dict[ProcessKey, tuple[HistoryPoint, ...]] = {}
        container_histories: dict[str, tuple[HistoryPoint, ...]] = {}
        if keys is None or keys or containers is None or containers:
            procs, conts = self.reader.histories(index, keys, containers)
            histories = {k: tuple(v) for k, v in procs.items()}
            container_histories = {k: tuple(v) for k, v in conts.items()}
        focus = None
        if self._focus is not None:
            own_leaks = tuple(r for r in snap.leaks if self._focus.pid in r.pids) or None
            focus = FocusDetail(self._focus, histories.get(self._focus, ()), None, own_leaks)
            if own_leaks is not None:
                focus = replace(focus, leaks=self._old_enough(own_leaks))
        return replace(
            snap,
            replay=True,
            histories=histories,
            container_histories=container_histories,
            focus=focus,
            leaks=self._old_enough(snap.leaks),
            leak_older_s=self._older_s or snap.leak_older_s,
        )

    def _old_enough(self, rows: tuple[LeakRow, ...]) -> tuple[LeakRow, ...]:
        if not self._older_s:
            return rows
        return tuple(r for r in rows if r.oldest_age_s is not None and r.oldest_age_s >= self._older_s)

    def set_focus_container(self, container_id: str | None) -> None:
        self._focus_container = container_id

    def close(self, exiting: bool = False) -> None:
        self.reader.close()


# -- the service -------------------------------------------------------------------------------------------

UNIT_PATH = Path("/etc/systemd/system/memtop-record.service")
UNIT_TEMPLATE = """\
# memtop-record.service: keeps a bounded history of kernel memory on disk (`memtop record`).
# Install: `sudo memtop record --install` (writes this file with the memtop it was run from), then
#   systemctl daemon-reload && systemctl enable --now memtop-record
# Replay: `sudo memtop --replay {db} --at '10m ago'`; logs: `journalctl -u memtop-record`.
[Unit]
Description=memtop recorder: kernel memory allocations, OOM kills and leaks to {db}
After=local-fs.target

[Service]
Type=simple
ExecStart={exec_start}
# the database directory, 0700 (root only)
StateDirectory=memtop
StateDirectoryMode=0700
UMask=0077
# SIGTERM stops it within a second with every BPF program detached
KillSignal=SIGTERM
TimeoutStopSec=15
Restart=on-failure
RestartSec=10
Nice=10
StandardOutput=journal
StandardError=journal

[Install]
WantedBy=multi-user.target
"""


def unit_text(memtop: str = "/usr/local/bin/memtop", options: tuple[str, ...] = ()) -> str:
    db = DEFAULT_DB
    for i, option in enumerate(options[:-1]):
        if option == "--db":
            db = Path(options[i + 1])
    exec_start = " ".join([memtop, "record", *options]) if options else f"{memtop} record --db {DEFAULT_DB}"
    return UNIT_TEMPLATE.format(db=db, exec_start=exec_start)


def install_unit(args: object, target: Path = UNIT_PATH) -> Path:
    """Write the unit for `memtop record` with the options given (--db, --interval, --retention,
    --max-size), running the memtop executable this was started as."""
    import shlex
    import shutil

    memtop = shutil.which("memtop") or sys.argv[0]
    memtop = str(Path(memtop).resolve())
    options: list[str] = ["--db", str(Path(getattr(args, "db", DEFAULT_DB)).absolute())]
    interval = getattr(args, "interval", DEFAULT_INTERVAL_S)
    if interval != DEFAULT_INTERVAL_S:
        options += ["--interval", f"{interval:g}"]
    retention = getattr(args, "retention", DEFAULT_RETENTION_S)
    if retention != DEFAULT_RETENTION_S:
        options += ["--retention", f"{retention:g}s"]
    max_bytes = getattr(args, "max_size", DEFAULT_MAX_BYTES)
    if max_bytes != DEFAULT_MAX_BYTES:
        options += ["--max-size", str(max_bytes)]
    text = unit_text(shlex.quote(memtop), tuple(shlex.quote(o) for o in options))
    if target.is_symlink():
        raise MemtopError(f"refusing to write through a symlink: {target}")
    if not target.parent.is_dir():
        raise MemtopError(f"{target.parent} does not exist: is this a systemd host?")
    try:
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(target)
    except OSError as exc:
        raise MemtopError(f"cannot write {target}: {exc.strerror}") from None
    return target
