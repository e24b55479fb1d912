"""JSON snapshots: written by the `e` key and `memtop snapshot`, read back by `memtop --replay`.

The schema is versioned (`memtop.snapshot/1`, documented in docs/snapshot-schema.md); fields are only
ever added within a version. Files are written atomically (temp file + rename), mode 0600, and never
through a symlink.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memtop import format as fmt
from memtop import leaks, tcp
from memtop.errors import MemtopError
from memtop.model import CallSite, FocusReading, ProbeStatus, TailEvent
from memtop.oom import OomEvent
from memtop.store import (
    ContainerRow,
    FocusDetail,
    HistoryPoint,
    HostInfo,
    ProcessKey,
    ProcessRow,
    Snapshot,
)

SCHEMA = "memtop.snapshot/1"
MAX_REPLAY_BYTES = 256 * 1024 * 1024

# ProcessRow fields written for every process, in this order (the required ones first).
PROCESS_FIELDS = (
    "pid",
    "comm",
    "cmdline",
    "cgroup_path",
    "container_id",
    "container",
    "unit",
    "kmalloc_bytes_per_s",
    "kmalloc_calls_per_s",
    "kmalloc_bytes",
    "kmalloc_calls",
    "rss_bytes",
    "start_time",
    "user",
    "state",
    "kmalloc_bytes_req",
    "vms_bytes",
    "threads",
    "exited",
    "exited_at",
)


# ContainerRow fields written for every container (the required ones first).
CONTAINER_FIELDS = (
    "id",
    "name",
    "runtime",
    "pod_uid",
    "pod_name",
    "namespace",
    "qos",
    "cgroup_path",
    "pids",
    "kmalloc_bytes_per_s",
    "kmalloc_calls_per_s",
    "memory_bytes",
    "memory_limit_bytes",
    "image",
    "kmalloc_bytes",
    "kmalloc_calls",
    "oom_kills",
    "memory_usage_bytes",
)


# OomEvent fields, in this order (the required ones first); the histories are written separately.
OOM_FIELDS = (
    "time",
    "source",
    "victim_pid",
    "victim_comm",
    "trigger_pid",
    "trigger_comm",
    "total_vm_bytes",
    "anon_rss_bytes",
    "file_rss_bytes",
    "shmem_rss_bytes",
    "oom_score_adj",
    "constraint",
    "cgroup_path",
    "container_id",
    "pod_uid",
    "pod_name",
    "namespace",
    "memcg_limit_bytes",
    "memcg_usage_bytes",
    "memcg_path",
    "pgtables_bytes",
    "uid",
    "reaped_at",
    "history_of",
    "container_name",
    "runtime",
)
_OOM_INT_FIELDS = {
    "victim_pid",
    "trigger_pid",
    "total_vm_bytes",
    "anon_rss_bytes",
    "file_rss_bytes",
    "shmem_rss_bytes",
    "oom_score_adj",
    "memcg_limit_bytes",
    "memcg_usage_bytes",
    "pgtables_bytes",
    "uid",
}


def _history_list(points: tuple[HistoryPoint, ...]) -> list[list[Any]]:
    return [[p.t, p.kmalloc_bytes_per_s, p.kmalloc_calls_per_s, p.memory_bytes] for p in points]


def snapshot_to_dict(snapshot: Snapshot) -> dict[str, Any]:
    processes = []
    for row in snapshot.processes:
        item = {name: getattr(row, name) for name in PROCESS_FIELDS}
        history = snapshot.histories.get(row.key)
        if history:
            item["kmalloc_history"] = _history_list(history)
        processes.append(item)
    containers = []
    for crow in snapshot.containers:
        citem: dict[str, Any] = {name: getattr(crow, name) for name in CONTAINER_FIELDS}
        citem["pids"] = list(crow.pids)
        chistory = snapshot.container_histories.get(crow.id)
        if chistory:
            citem["history"] = _history_list(chistory)
        containers.append(citem)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "taken_at": fmt.iso_utc(snapshot.taken_at),
        "taken_at_epoch": snapshot.taken_at,
        "duration_s": snapshot.duration_s,
        "interval_s": snapshot.interval_s,
        "host": {
            "hostname": snapshot.host.hostname,
            "kernel": snapshot.host.kernel,
            "boot_time": snapshot.host.boot_time,
        },
        "probes": {name: {"status": p.status, "detail": p.detail} for name, p in snapshot.probes.items()},
        "sample_every": snapshot.sample_every,
        "kmalloc_bytes_per_s": snapshot.kmalloc_bytes_per_s,
        "kmalloc_calls_per_s": snapshot.kmalloc_calls_per_s,
        "drops": dict(snapshot.drops),
        "processes": processes,
        "containers": containers,
        "oom_events": [_oom_to_dict(e) for e in snapshot.oom_events],
        "oom_kills_seen": snapshot.oom_kills_seen,
        "tcp_slow_ms": snapshot.tcp_slow_ms,
        "tcp_in_flight": snapshot.tcp_in_flight,
        "sample_rate": snapshot.leak_sample_rate,
        "leak_sample_rates": dict(snapshot.leak_sample_rates),
        "leak_older_s": snapshot.leak_older_s,
        "leak_user_pid": snapshot.leak_user_pid,
        "leaks": leaks.rows_to_json(snapshot.leaks),
        "tcp_connect": tcp.rows_to_json(snapshot.tcp_connect),
        "tcp_slow_connects": tcp.slow_connects_to_json(snapshot.tcp_slow_connects),
    }
    if snapshot.focus is not None:
        doc["focus"] = _focus_to_dict(snapshot.focus)
    return doc


def _oom_to_dict(event: OomEvent) -> dict[str, Any]:
    item: dict[str, Any] = {name: getattr(event, name) for name in OOM_FIELDS}
    item["time_iso"] = fmt.iso_utc(event.time)
    item["history"] = _history_list(event.history)
    item["victim_history"] = _history_list(event.victim_history)
    return item


def _oom_from_dict(item: Any, i: int) -> OomEvent:
    where = f"oom_events[{i}]"
    if not isinstance(item, Mapping):
        raise ValueError(f"{where} is not an object")
    values: dict[str, Any] = {}
    for name in OOM_FIELDS:
        if name not in item:
            continue
        value = item[name]
        if name in ("time",):
            values[name] = float(_num(value, f"{where}.{name}") or 0.0)
        elif name == "reaped_at":
            values[name] = _num(value, f"{where}.{name}", optional=True)
        elif name in _OOM_INT_FIELDS:
            values[name] = _int(value, f"{where}.{name}", optional=True)
        elif name == "container_id":
            values[name] = _str(value, f"{where}.{name}", optional=True)
        else:
            values[name] = _str(value, f"{where}.{name}", optional=True) or ""
    if "victim_pid" not in values or values["victim_pid"] is None or "time" not in values:
        raise ValueError(f"{where} needs time and victim_pid")
    values["history"] = _history(item.get("history", []), f"{where}.history")
    values["victim_history"] = _history(item.get("victim_history", []), f"{where}.victim_history")
    return OomEvent(**values)


def _focus_to_dict(focus: FocusDetail) -> dict[str, Any]:
    reading = focus.reading
    return {
        "pid": focus.key.pid,
        "start_time": focus.key.start_time,
        "history": _history_list(focus.history),
        "call_sites": [
            {
                "symbol": s.symbol,
                "address": s.address,
                "calls": s.calls,
                "bytes_alloc": s.bytes_alloc,
                "bytes_req": s.bytes_req,
            }
            for s in (reading.call_sites if reading else ())
        ],
        "size_log2_counts": list(reading.size_log2_counts) if reading else [],
        "tail": [
            {
                "time": e.time,
                "tid": e.tid,
                "call_site": e.call_site,
                "bytes_req": e.bytes_req,
                "bytes_alloc": e.bytes_alloc,
                "gfp_flags": e.gfp_flags,
                "gfp_text": e.gfp_text,
                "node": e.node,
            }
            for e in (reading.tail if reading else ())
        ],
        **({"leaks": leaks.rows_to_json(focus.leaks)} if focus.leaks is not None else {}),
    }


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
    text = json.dumps(snapshot_to_dict(snapshot), indent=1, allow_nan=False, default=_json_default)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)  # mode 0600
    except OSError as exc:
        raise MemtopError(f"cannot write snapshot in {directory}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)  # rename replaces a link itself, never writes through it
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise MemtopError(f"cannot write snapshot {target}: {exc.strerror}") from None
    return target


def _json_default(value: Any) -> Any:
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


# -- reading ---------------------------------------------------------------------------------------


def read_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Load a snapshot file for replay; every problem becomes a one-line MemtopError."""
    source = Path(path)
    try:
        if source.stat().st_size > MAX_REPLAY_BYTES:
            raise MemtopError(f"replay file is too large (over {MAX_REPLAY_BYTES >> 20} MiB): {source}")
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MemtopError(f"replay file not found: {source}") from None
    except IsADirectoryError:
        raise MemtopError(f"replay file is a directory: {source}") from None
    except PermissionError:
        raise MemtopError(f"replay file is not readable (permission denied): {source}") from None
    except UnicodeDecodeError:
        raise MemtopError(f"replay file is not UTF-8 JSON: {source}") from None
    except OSError as exc:
        raise MemtopError(f"cannot read replay file {source}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MemtopError(
            f"replay file is not valid JSON ({exc.msg} at line {exc.lineno}): {source}"
        ) from None
    try:
        return snapshot_from_dict(doc)
    except (KeyError, TypeError, ValueError) as exc:
        raise MemtopError(f"replay file {source} does not match {SCHEMA}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc)


def _num(value: Any, name: str, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"field {name!r} must be a number, got {value!r}")
    return value


def _int(value: Any, name: str, optional: bool = False) -> int | None:
    number = _num(value, name, optional)
    return None if number is None else int(number)


def _mapping(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"field {name!r} must be an object")
    return value


def _str(value: Any, name: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {value!r}")
    return value


def snapshot_from_dict(doc: Any) -> Snapshot:
    if not isinstance(doc, Mapping):
        raise ValueError("top level is not a JSON object")
    schema = doc.get("schema")
    if schema != SCHEMA:
        raise ValueError(f"schema is {schema!r}, expected {SCHEMA!r}")
    host = doc["host"]
    if not isinstance(host, Mapping):
        raise ValueError("field 'host' must be an object")
    taken_at = _num(doc.get("taken_at_epoch"), "taken_at_epoch", optional=True)
    if taken_at is None:
        taken_at = _parse_iso(_str(doc["taken_at"], "taken_at") or "")
    processes = doc["processes"]
    if not isinstance(processes, list):
        raise ValueError("field 'processes' must be a list")
    rows = []
    histories: dict[ProcessKey, tuple[HistoryPoint, ...]] = {}
    for i, item in enumerate(processes):
        if not isinstance(item, Mapping):
            raise ValueError(f"processes[{i}] is not an object")
        row = _row_from_dict(item, i)
        rows.append(row)
        if "kmalloc_history" in item:
            histories[row.key] = _history(item["kmalloc_history"], f"processes[{i}].kmalloc_history")
    probes_doc = doc.get("probes", {})
    if not isinstance(probes_doc, Mapping):
        raise ValueError("field 'probes' must be an object")
    probes = {
        str(name): ProbeStatus(str(p.get("status", "")), str(p.get("detail", "")))
        for name, p in probes_doc.items()
        if isinstance(p, Mapping)
    }
    drops = doc.get("drops", {})
    containers_doc = doc.get("containers", [])
    if not isinstance(containers_doc, list):
        raise ValueError("field 'containers' must be a list")
    containers = []
    container_histories: dict[str, tuple[HistoryPoint, ...]] = {}
    for i, item in enumerate(containers_doc):
        if not isinstance(item, Mapping):
            raise ValueError(f"containers[{i}] is not an object")
        crow = _container_from_dict(item, i)
        containers.append(crow)
        if "history" in item:
            container_histories[crow.id] = _history(item["history"], f"containers[{i}].history")
    oom_doc = doc.get("oom_events", [])
    if not isinstance(oom_doc, list):
        raise ValueError("field 'oom_events' must be a list")
    oom_events = tuple(_oom_from_dict(item, i) for i, item in enumerate(oom_doc))
    return Snapshot(
        taken_at=float(taken_at),
        duration_s=float(_num(doc["duration_s"], "duration_s") or 0.0),
        interval_s=float(_num(doc.get("interval_s", 1.0), "interval_s") or 1.0),
        host=HostInfo(
            hostname=_str(host["hostname"], "host.hostname") or "",
            kernel=_str(host["kernel"], "host.kernel") or "",
            boot_time=_num(host.get("boot_time"), "host.boot_time", optional=True),
        ),
        probes=probes,
        processes=tuple(rows),
        kmalloc_bytes_per_s=float(_num(doc.get("kmalloc_bytes_per_s", 0), "kmalloc_bytes_per_s") or 0.0),
        kmalloc_calls_per_s=float(_num(doc.get("kmalloc_calls_per_s", 0), "kmalloc_calls_per_s") or 0.0),
        sample_every=_int(doc.get("sample_every", 1), "sample_every") or 1,
        drops={str(k): _int(v, f"drops.{k}") or 0 for k, v in drops.items()}
        if isinstance(drops, Mapping)
        else {},
        focus=_focus_from_dict(doc["focus"]) if isinstance(doc.get("focus"), Mapping) else None,
        histories=histories,
        replay=True,
        containers=tuple(containers),
        container_histories=container_histories,
        oom_events=oom_events,
        oom_kills_seen=_int(doc.get("oom_kills_seen", 0), "oom_kills_seen") or 0,
        leaks=leaks.rows_from_json(doc.get("leaks", [])),
        leak_sample_rate=_int(doc.get("sample_rate", 1), "sample_rate") or 1,
        leak_sample_rates={
            str(k): _int(v, "leak_sample_rates") or 1 for k, v in _mapping(doc, "leak_sample_rates").items()
        },
        leak_older_s=float(_num(doc.get("leak_older_s", 0.0), "leak_older_s") or 0.0),
        leak_user_pid=_int(doc.get("leak_user_pid"), "leak_user_pid", optional=True),
        tcp_connect=tcp.rows_from_json(doc.get("tcp_connect", [])),
        tcp_slow_connects=tcp.slow_connects_from_json(doc.get("tcp_slow_connects", [])),
        tcp_in_flight=_int(doc.get("tcp_in_flight", 0), "tcp_in_flight") or 0,
        tcp_slow_ms=_int(doc.get("tcp_slow_ms"), "tcp_slow_ms", optional=True),
    )


def _container_from_dict(item: Mapping[str, Any], i: int) -> ContainerRow:
    where = f"containers[{i}]"

    def text(name: str) -> str:
        return _str(item.get(name, ""), f"{where}.{name}", optional=True) or ""

    pids = item.get("pids", [])
    if not isinstance(pids, list):
        raise ValueError(f"field {where}.pids must be a list")
    return ContainerRow(
        id=_str(item["id"], f"{where}.id") or "",
        runtime=text("runtime"),
        cgroup_path=text("cgroup_path"),
        name=text("name"),
        pod_uid=text("pod_uid"),
        pod_name=text("pod_name"),
        namespace=text("namespace"),
        qos=text("qos"),
        image=text("image"),
        pids=tuple(_int(p, f"{where}.pids") or 0 for p in pids),
        kmalloc_bytes_per_s=float(
            _num(item.get("kmalloc_bytes_per_s", 0), f"{where}.kmalloc_bytes_per_s") or 0
        ),
        kmalloc_calls_per_s=float(
            _num(item.get("kmalloc_calls_per_s", 0), f"{where}.kmalloc_calls_per_s") or 0
        ),
        kmalloc_bytes=_int(item.get("kmalloc_bytes", 0), f"{where}.kmalloc_bytes") or 0,
        kmalloc_calls=_int(item.get("kmalloc_calls", 0), f"{where}.kmalloc_calls") or 0,
        memory_bytes=_int(item.get("memory_bytes"), f"{where}.memory_bytes", optional=True),
        memory_limit_bytes=_int(item.get("memory_limit_bytes"), f"{where}.memory_limit_bytes", optional=True),
        oom_kills=_int(item.get("oom_kills", 0), f"{where}.oom_kills") or 0,
        memory_usage_bytes=_int(item.get("memory_usage_bytes"), f"{where}.memory_usage_bytes", optional=True),
    )


def _row_from_dict(item: Mapping[str, Any], i: int) -> ProcessRow:
    where = f"processes[{i}]"
    return ProcessRow(
        pid=_int(item["pid"], f"{where}.pid") or 0,
        start_time=float(_num(item.get("start_time", 0.0), f"{where}.start_time") or 0.0),
        comm=_str(item["comm"], f"{where}.comm") or "",
        cmdline=_str(item.get("cmdline", ""), f"{where}.cmdline") or "",
        user=_str(item.get("user", ""), f"{where}.user") or "",
        state=_str(item.get("state", ""), f"{where}.state") or "",
        cgroup_path=_str(item.get("cgroup_path", ""), f"{where}.cgroup_path") or "",
        container_id=_str(item.get("container_id"), f"{where}.container_id", optional=True),
        container=_str(item.get("container", ""), f"{where}.container", optional=True) or "",
        unit=_str(item.get("unit", ""), f"{where}.unit", optional=True) or "",
        kmalloc_bytes_per_s=float(_num(item["kmalloc_bytes_per_s"], f"{where}.kmalloc_bytes_per_s") or 0.0),
        kmalloc_calls_per_s=float(_num(item["kmalloc_calls_per_s"], f"{where}.kmalloc_calls_per_s") or 0.0),
        kmalloc_bytes=_int(item["kmalloc_bytes"], f"{where}.kmalloc_bytes") or 0,
        kmalloc_calls=_int(item["kmalloc_calls"], f"{where}.kmalloc_calls") or 0,
        kmalloc_bytes_req=_int(item.get("kmalloc_bytes_req", 0), f"{where}.kmalloc_bytes_req") or 0,
        rss_bytes=_int(item.get("rss_bytes"), f"{where}.rss_bytes", optional=True),
        vms_bytes=_int(item.get("vms_bytes"), f"{where}.vms_bytes", optional=True),
        threads=_int(item.get("threads"), f"{where}.threads", optional=True),
        exited=bool(item.get("exited", False)),
        exited_at=_num(item.get("exited_at"), f"{where}.exited_at", optional=True),
    )


def _history(value: Any, where: str) -> tuple[HistoryPoint, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list")
    points = []
    for point in value:
        if not isinstance(point, list) or len(point) not in (3, 4):
            raise ValueError(f"{where} entries must be [time, bytes_per_s, calls_per_s, memory_bytes]")
        t, b, c = (float(_num(x, where) or 0.0) for x in point[:3])
        memory = _int(point[3], where, optional=True) if len(point) == 4 else None
        points.append(HistoryPoint(t, b, c, memory))
    return tuple(points)


def _focus_from_dict(doc: Mapping[str, Any]) -> FocusDetail:
    key = ProcessKey(
        _int(doc["pid"], "focus.pid") or 0, float(_num(doc.get("start_time", 0.0), "focus") or 0)
    )
    sites = tuple(
        CallSite(
            address=_int(s.get("address", 0), "focus.call_sites.address") or 0,
            symbol=_str(s["symbol"], "focus.call_sites.symbol") or "",
            calls=_int(s["calls"], "focus.call_sites.calls") or 0,
            bytes_alloc=_int(s["bytes_alloc"], "focus.call_sites.bytes_alloc") or 0,
            bytes_req=_int(s.get("bytes_req", 0), "focus.call_sites.bytes_req") or 0,
        )
        for s in doc.get("call_sites", [])
    )
    tail = tuple(
        TailEvent(
            time=float(_num(e["time"], "focus.tail.time") or 0.0),
            tid=_int(e.get("tid", 0), "focus.tail.tid") or 0,
            call_site=_str(e.get("call_site", ""), "focus.tail.call_site") or "",
            bytes_req=_int(e["bytes_req"], "focus.tail.bytes_req") or 0,
            bytes_alloc=_int(e["bytes_alloc"], "focus.tail.bytes_alloc") or 0,
            gfp_flags=_int(e.get("gfp_flags", 0), "focus.tail.gfp_flags") or 0,
            gfp_text=_str(e.get("gfp_text", ""), "focus.tail.gfp_text") or "",
            node=_int(e.get("node", -1), "focus.tail.node") or 0,
        )
        for e in doc.get("tail", [])
    )
    sizes = tuple(_int(c, "focus.size_log2_counts") or 0 for c in doc.get("size_log2_counts", []))
    reading = FocusReading(key.pid, sites, sizes, tail)
    own = leaks.rows_from_json(doc["leaks"]) if "leaks" in doc else None
    return FocusDetail(key, _history(doc.get("history", []), "focus.history"), reading, own)


def _parse_iso(text: str) -> float:
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ValueError(f"field 'taken_at' is not an ISO 8601 time: {text!r}") from None
