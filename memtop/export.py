"""JSON snapshots: written by the `e` key and `memtop snapshot`, read back by `memtop --replay`.

The schema is versioned (`memtop.snapshot/1`, documented in docs/snapshot-schema.md and declared once,
as msgspec records, in memtop/schema.py); fields are only ever added within a version. This module maps
those records to and from the store's dataclasses (same field names). Files are written atomically
(temp file + rename), mode 0600, and never through a symlink.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from memtop import format as fmt
from memtop import schema
from memtop.errors import MemtopError
from memtop.leaks import LeakRow
from memtop.model import CallSite, FocusReading, ProbeStatus, TailEvent
from memtop.oom import OomEvent
from memtop.schema import SCHEMA
from memtop.store import (
    ContainerRow,
    FocusDetail,
    HistoryPoint,
    HostInfo,
    ProcessKey,
    ProcessRow,
    Snapshot,
)
from memtop.tcp import SlowConnect, TcpRow

MAX_REPLAY_BYTES = 256 * 1024 * 1024


def _fields(record_type: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(record_type))


_PROCESS = _fields(ProcessRow)
# The wire record declares ProcessRow's fields in its order: a row is built from the tuple (thousands a
# sample; the fastest way).
assert schema.Process.__struct_fields__[: len(_PROCESS)] == _PROCESS
PROCESS_COLUMNS = _PROCESS  # `memtop dump --format csv`
CONTAINER_COLUMNS = _fields(ContainerRow)
_CONTAINER = tuple(f for f in _fields(ContainerRow) if f != "pids")
_OOM = tuple(f for f in _fields(OomEvent) if f not in ("history", "victim_history"))
_LEAK = _fields(LeakRow)
_TCP = tuple(f for f in _fields(TcpRow) if f not in ("histogram", "interval_histogram"))
_SLOW = _fields(SlowConnect)


def _points(points: Iterable[HistoryPoint]) -> list[schema.Point]:
    return [schema.Point(p.t, p.kmalloc_bytes_per_s, p.kmalloc_calls_per_s, p.memory_bytes) for p in points]


def _history(points: Iterable[schema.Point]) -> tuple[HistoryPoint, ...]:
    return tuple(
        HistoryPoint(p.t, p.kmalloc_bytes_per_s, p.kmalloc_calls_per_s, p.memory_bytes) for p in points
    )


def _leak_docs(rows: Iterable[LeakRow]) -> list[schema.Leak]:
    return [
        schema.Leak(**{**{f: getattr(r, f) for f in _LEAK}, "stack": list(r.stack), "pids": list(r.pids)})
        for r in rows
    ]


def _leak_rows(docs: Iterable[schema.Leak]) -> tuple[LeakRow, ...]:
    return tuple(
        LeakRow(
            **{f: getattr(d, f) for f in _LEAK if f not in ("stack", "pids")},
            stack=tuple(d.stack),
            pids=tuple(d.pids or ()),
        )
        for d in docs
    )


def snapshot_to_doc(snapshot: Snapshot, histories: bool = True) -> schema.Snapshot:
    """The wire record of a snapshot; `histories=False` leaves out the per-process and per-container
    histories (a recording rebuilds them from its neighbouring samples)."""
    processes = []
    for row in snapshot.processes:
        item = schema.Process(**{f: getattr(row, f) for f in _PROCESS})
        history = snapshot.histories.get(row.key) if histories else None
        if history:
            item.kmalloc_history = _points(history)
        processes.append(item)
    containers = []
    for crow in snapshot.containers:
        citem = schema.Container(**{f: getattr(crow, f) for f in _CONTAINER}, pids=list(crow.pids))
        chistory = snapshot.container_histories.get(crow.id) if histories else None
        if chistory:
            citem.history = _points(chistory)
        containers.append(citem)
    doc = schema.Snapshot(
        schema=SCHEMA,
        taken_at=fmt.iso_utc(snapshot.taken_at),
        taken_at_epoch=snapshot.taken_at,
        duration_s=snapshot.duration_s,
        interval_s=snapshot.interval_s,
        host=schema.Host(snapshot.host.hostname, snapshot.host.kernel, snapshot.host.boot_time),
        probes={name: schema.Probe(p.status, p.detail, p.since) for name, p in snapshot.probes.items()},
        sample_every=snapshot.sample_every,
        kmalloc_bytes_per_s=snapshot.kmalloc_bytes_per_s,
        kmalloc_calls_per_s=snapshot.kmalloc_calls_per_s,
        drops=dict(snapshot.drops),
        processes=processes,
        containers=containers,
        oom_events=[
            schema.OomKill(
                **{f: getattr(e, f) for f in _OOM},
                time_iso=fmt.iso_utc(e.time),
                history=_points(e.history),
                victim_history=_points(e.victim_history),
            )
            for e in snapshot.oom_events
        ],
        oom_kills_seen=snapshot.oom_kills_seen,
        tcp_slow_ms=snapshot.tcp_slow_ms,
        tcp_in_flight=snapshot.tcp_in_flight,
        sample_rate=snapshot.leak_sample_rate,
        leak_sample_rates=dict(snapshot.leak_sample_rates),
        leak_older_s=snapshot.leak_older_s,
        leak_user_pid=snapshot.leak_user_pid,
        leaks=_leak_docs(snapshot.leaks),
        tcp_connect=[
            schema.TcpConnect(
                **{f: getattr(t, f) for f in _TCP},
                histogram=dict(t.histogram),
                interval_histogram=dict(t.interval_histogram),
            )
            for t in snapshot.tcp_connect
        ],
        tcp_slow_connects=[
            schema.SlowConnect(**{f: getattr(s, f) for f in _SLOW}) for s in snapshot.tcp_slow_connects
        ],
    )
    if snapshot.focus is not None:
        doc.focus = _focus_to_doc(snapshot.focus)
    return doc


def _focus_to_doc(focus: FocusDetail) -> schema.Focus:
    reading = focus.reading
    doc = schema.Focus(
        pid=focus.key.pid,
        start_time=focus.key.start_time,
        history=_points(focus.history),
        call_sites=[
            schema.CallSite(
                symbol=s.symbol,
                address=s.address,
                calls=s.calls,
                bytes_alloc=s.bytes_alloc,
                bytes_req=s.bytes_req,
            )
            for s in (reading.call_sites if reading else ())
        ],
        size_log2_counts=list(reading.size_log2_counts) if reading else [],
        tail=[
            schema.TailItem(
                time=e.time,
                tid=e.tid,
                call_site=e.call_site,
                bytes_req=e.bytes_req,
                bytes_alloc=e.bytes_alloc,
                gfp_flags=e.gfp_flags,
                gfp_text=e.gfp_text,
                node=e.node,
            )
            for e in (reading.tail if reading else ())
        ],
    )
    if focus.leaks is not None:
        doc.leaks = _leak_docs(focus.leaks)
    return doc


def snapshot_to_dict(snapshot: Snapshot) -> dict[str, Any]:
    """The snapshot as plain JSON-ready Python objects (what the file holds)."""
    return msgspec.to_builtins(snapshot_to_doc(snapshot))  # type: ignore[no-any-return]


def encode_json(snapshot: Snapshot, histories: bool = True) -> bytes:
    """One snapshot as compact JSON (one line, as `memtop dump` writes it)."""
    return schema.json_encoder.encode(snapshot_to_doc(snapshot, histories))


def write_snapshot(path: str | os.PathLike[str], snapshot: Snapshot) -> Path:
    """Write atomically with mode 0600; refuse to write through a symlink. Returns the path written."""
    target = Path(path)
    if target.is_symlink():
        raise MemtopError(f"refusing to write snapshot through a symlink: {target}")
    if target.exists() and not target.is_file():
        raise MemtopError(f"snapshot path exists and is not a regular file: {target}")
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise MemtopError(f"snapshot directory does not exist: {directory}")
    text = msgspec.json.format(schema.json_encoder.encode(snapshot_to_doc(snapshot)), indent=1)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)  # mode 0600
    except OSError as exc:
        raise MemtopError(f"cannot write snapshot in {directory}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)  # rename replaces a link itself, never writes through it
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise MemtopError(f"cannot write snapshot {target}: {exc.strerror}") from None
    return target


# -- reading ---------------------------------------------------------------------------------------


def read_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Load a snapshot file for replay; every problem becomes a one-line MemtopError."""
    source = Path(path)
    try:
        if source.stat().st_size > MAX_REPLAY_BYTES:
            raise MemtopError(f"replay file is too large (over {MAX_REPLAY_BYTES >> 20} MiB): {source}")
        data = source.read_bytes()
    except FileNotFoundError:
        raise MemtopError(f"replay file not found: {source}") from None
    except IsADirectoryError:
        raise MemtopError(f"replay file is a directory: {source}") from None
    except PermissionError:
        raise MemtopError(f"replay file is not readable (permission denied): {source}") from None
    except OSError as exc:
        raise MemtopError(f"cannot read replay file {source}: {exc.strerror}") from None
    try:
        return decode_json(data)
    except SnapshotFormatError as exc:
        raise MemtopError(f"replay file {source} {exc}") from None


class SnapshotFormatError(ValueError):
    """A document that is not a `memtop.snapshot/1` snapshot; the message is one line."""


def decode_json(data: bytes) -> Snapshot:
    """A snapshot from JSON text; SnapshotFormatError ("is not valid JSON (...)" or "does not match
    memtop.snapshot/1: <reason at $.path>") on anything else."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise SnapshotFormatError("is not UTF-8 JSON") from None
    try:
        head = schema.head_decoder.decode(data)
    except msgspec.ValidationError:
        raise SnapshotFormatError(f"does not match {SCHEMA}: top level is not a JSON object") from None
    except msgspec.DecodeError as exc:
        raise SnapshotFormatError(f"is not valid JSON ({exc})") from None
    if head.schema != SCHEMA:
        raise SnapshotFormatError(f"does not match {SCHEMA}: schema is {head.schema!r}, expected {SCHEMA!r}")
    try:
        return snapshot_from_doc(schema.json_decoder.decode(data))
    except (msgspec.DecodeError, ValueError) as exc:
        raise SnapshotFormatError(f"does not match {SCHEMA}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    text = str(exc).replace("Object missing required field", "missing field")
    return " ".join(text.split())


def snapshot_from_dict(doc: Any) -> Snapshot:
    """A snapshot from already-parsed JSON objects; ValueError (one line, naming the field) if it is
    not one."""
    if not isinstance(doc, Mapping):
        raise ValueError("top level is not a JSON object")
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    try:
        return snapshot_from_doc(msgspec.convert(doc, schema.Snapshot))
    except msgspec.ValidationError as exc:
        raise ValueError(_reason(exc)) from None


def snapshot_from_doc(doc: schema.Snapshot, replay: bool = True) -> Snapshot:
    """The store's Snapshot of a decoded (so validated) wire record."""
    taken_at = doc.taken_at_epoch
    if taken_at is None:
        taken_at = _parse_iso(doc.taken_at)
    rows = []
    histories: dict[ProcessKey, tuple[HistoryPoint, ...]] = {}
    width = len(_PROCESS)
    for item in doc.processes:
        row = ProcessRow(*msgspec.structs.astuple(item)[:width])
        rows.append(row)
        if item.kmalloc_history:
            histories[row.key] = _history(item.kmalloc_history)
    containers = []
    container_histories: dict[str, tuple[HistoryPoint, ...]] = {}
    for citem in doc.containers:
        crow = ContainerRow(**{f: getattr(citem, f) for f in _CONTAINER}, pids=tuple(citem.pids))
        containers.append(crow)
        if citem.history:
            container_histories[crow.id] = _history(citem.history)
    focus = _focus_from_doc(doc.focus) if doc.focus else None
    return Snapshot(
        taken_at=float(taken_at),
        duration_s=doc.duration_s,
        interval_s=doc.interval_s,
        host=HostInfo(doc.host.hostname, doc.host.kernel, doc.host.boot_time),
        probes={name: ProbeStatus(p.status, p.detail, p.since) for name, p in doc.probes.items()},
        processes=tuple(rows),
        kmalloc_bytes_per_s=doc.kmalloc_bytes_per_s,
        kmalloc_calls_per_s=doc.kmalloc_calls_per_s,
        sample_every=doc.sample_every,
        drops=dict(doc.drops),
        focus=focus,
        histories=histories,
        replay=replay,
        containers=tuple(containers),
        container_histories=container_histories,
        oom_events=tuple(
            OomEvent(
                **{f: getattr(e, f) for f in _OOM},
                history=_history(e.history),
                victim_history=_history(e.victim_history),
            )
            for e in doc.oom_events
        ),
        oom_kills_seen=doc.oom_kills_seen,
        leaks=_leak_rows(doc.leaks),
        leak_sample_rate=doc.sample_rate,
        leak_sample_rates=dict(doc.leak_sample_rates),
        leak_older_s=doc.leak_older_s,
        leak_user_pid=doc.leak_user_pid,
        tcp_connect=tuple(
            TcpRow(
                **{f: getattr(t, f) for f in _TCP},
                histogram=_pairs(t.histogram),
                interval_histogram=_pairs(t.interval_histogram),
            )
            for t in doc.tcp_connect
        ),
        tcp_slow_connects=tuple(
            SlowConnect(**{f: getattr(s, f) for f in _SLOW}) for s in doc.tcp_slow_connects
        ),
        tcp_in_flight=doc.tcp_in_flight,
        tcp_slow_ms=doc.tcp_slow_ms,
    )


def _pairs(histogram: Mapping[int, int]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((bound, count) for bound, count in histogram.items() if count))


def _focus_from_doc(doc: schema.Focus) -> FocusDetail:
    key = ProcessKey(doc.pid, doc.start_time)
    sites = tuple(CallSite(s.address, s.symbol, s.calls, s.bytes_alloc, s.bytes_req) for s in doc.call_sites)
    tail = tuple(
        TailEvent(e.time, e.tid, e.call_site, e.bytes_req, e.bytes_alloc, e.gfp_flags, e.gfp_text, e.node)
        for e in doc.tail
    )
    reading = FocusReading(key.pid, sites, tuple(doc.size_log2_counts), tail)
    own = _leak_rows(doc.leaks) if doc.leaks else None
    return FocusDetail(key, _history(doc.history), reading, own)


def _parse_iso(text: str) -> float:
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ValueError(f"field 'taken_at' is not an ISO 8601 time: {text!r}") from None
