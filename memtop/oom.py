"""OOM kills as plain records: the events, the kernel log (/dev/kmsg) parser, and the memory cgroup reader
that tells a cgroup limit from a system-wide OOM.

Pure: imports neither bcc nor textual. The probe (memtop/probes/oom.py) feeds it; the kernel log
backlog gives the kills from before memtop started.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from memtop.cgroups import proc_cgroup_paths

# -- records ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OomEvent:
    """One OOM victim: what it held, what caused the kill, and where it lived."""

    time: float  # wall clock, seconds since the epoch
    source: str  # "tracepoint" | "kmsg"
    victim_pid: int
    victim_comm: str = ""
    trigger_pid: int | None = None  # the task running when the victim was marked
    trigger_comm: str = ""
    total_vm_bytes: int | None = None  # None where the tracepoint/log line does not carry it
    anon_rss_bytes: int | None = None
    file_rss_bytes: int | None = None
    shmem_rss_bytes: int | None = None
    pgtables_bytes: int | None = None
    uid: int | None = None
    oom_score_adj: int | None = None
    # "memcg" | "global" | "cpuset" | "mempolicy" (the kernel's CONSTRAINT_*) | "" (unknown)
    constraint: str = ""
    cgroup_path: str = ""  # the victim's cgroup
    memcg_path: str = ""  # the memory cgroup whose limit was hit (memcg constraint)
    memcg_limit_bytes: int | None = None
    memcg_usage_bytes: int | None = None
    reaped_at: float | None = None  # oom:finish_task_reaping / "oom_reaper: reaped process", when seen
    # Filled in by the source when the kill is seen (kept with the event: the container may be gone soon).
    container_id: str | None = None
    pod_uid: str = ""
    pod_name: str = ""
    namespace: str = ""
    container_name: str = ""  # as `docker ps`/`podman ps`/`lxc-ls` name it ("" when it had none)
    runtime: str = ""  # the container's runtime ("" on the host)
    history: tuple = ()  # type: ignore[type-arg]  # the store's pre-kill samples (store.HistoryPoint)
    history_of: str = ""  # whose samples: "container" (cgroup memory usage) or "process" (RSS)
    victim_history: tuple = ()  # type: ignore[type-arg]  # the victim process's own (RSS), when held

    @property
    def key(self) -> tuple[float, int]:
        """Identifies one kill (a reaping update carries the same key)."""
        return (self.time, self.victim_pid)


@dataclass(frozen=True)
class OomReading:
    """What the OOM probe saw since its previous read."""

    events: tuple[OomEvent, ...]
    lost: int = 0  # cumulative: events dropped because the ring buffer was full
    task_map_full: int = 0  # cumulative: tasks whose cgroup could not be remembered (map full)
    cgroup_lost: int = 0  # cumulative: cgroup creations not seen (their ring buffer was full)
    reaped: tuple[OomEvent, ...] = ()  # events read earlier, now with reaped_at set (same `key`)
    recursion_misses: int = 0  # cumulative: runs of its programs the kernel skipped (recursion guard)


CONSTRAINTS = {
    "NONE": "global",
    "MEMCG": "memcg",
    "CPUSET": "cpuset",
    "MEMORY_POLICY": "mempolicy",
}

KB = 1024
# Page counters print "unlimited" as PAGE_COUNTER_MAX in kB (9007199254740988kB with 4 KiB pages).
_UNLIMITED_KB = 1 << 52
# v1 memory.limit_in_bytes reads 9223372036854771712 when unlimited.
_UNLIMITED_BYTES = 1 << 62


# -- kernel log parsing ----------------------------------------------------------------------------------

# /dev/kmsg: "prio,seq,usec,flags[,more];text" (text escapes non-printable bytes as \xNN).
_KMSG_RECORD = re.compile(r"^\d+,\d+,(\d+),[^;]*;(.*)$", re.S)
# dmesg / console / syslog: optional prefix ending in "kernel:" or "<level>", then "[ seconds.micros]".
_MONO_PREFIX = re.compile(r"^(?:.*?(?:kernel:|<\d+>)\s*)?\[\s*(\d+\.\d+)\]\s?(.*)$", re.S)
# dmesg -T: "[Thu Dec  7 00:05:14 2017] text" (local time).
_HUMAN_PREFIX = re.compile(r"^\[(\w{3} \w{3}\s+\d+ \d\d:\d\d:\d\d \d{4})\]\s?(.*)$", re.S)
_SYSLOG_PREFIX = re.compile(r"^.*?\bkernel: (.*)$", re.S)
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")

_INVOKED = re.compile(r"^(?P<comm>.+?) invoked oom-killer: (?P<rest>.*)$")
_CPU_LINE = re.compile(
    r"^CPU: \d+ (?:UID: \d+ )?PID: (?P<pid>\d+) Comm: (?P<comm>.+?)(?: (?:Not tainted|Tainted:).*)?$"
)
_TASK_IN = re.compile(r"^Task in (?P<task>.+) killed as a result of limit of (?P<memcg>.+)$")
_USAGE = re.compile(r"^(?P<what>memory|memory\+swap): usage (?P<usage>\d+)kB, limit (?P<limit>\d+)kB")
_GROUP = re.compile(r"^Tasks in (?P<memcg>.+) are going to be killed due to memory\.oom\.group set")
_OLD_KILL = re.compile(
    r"^(?P<msg>.+?): Kill process (?P<pid>\d+) \((?P<comm>.*)\) score -?\d+ or sacrifice child"
)
_KILLED = re.compile(r"^(?:(?P<msg>.+?): )?Killed process (?P<pid>\d+) \((?P<rest>.*)$")
_REAPED = re.compile(r"^oom_reaper: reaped process (?P<pid>\d+) \(")
_KILLED_FIELDS = {
    "total_vm_bytes": (re.compile(r"total-vm:(\d+)kB"), KB),
    "anon_rss_bytes": (re.compile(r"anon-rss:(\d+)kB"), KB),
    "file_rss_bytes": (re.compile(r"file-rss:(\d+)kB"), KB),
    "shmem_rss_bytes": (re.compile(r"shmem-rss:(\d+)kB"), KB),
    "pgtables_bytes": (re.compile(r"pgtables:(\d+)kB"), KB),
    "uid": (re.compile(r"UID:(\d+)"), 1),
    "oom_score_adj": (re.compile(r"oom_score_adj:(-?\d+)"), 1),
}


@dataclass
class _KillContext:
    """What the lines before a "Killed process" line said about that kill."""

    started: float | None  # log timestamp (seconds) of the "invoked oom-killer" line
    trigger_comm: str = ""
    trigger_pid: int | None = None
    lines: int = 0
    constraint: str = ""
    memcg_path: str = ""
    task_memcg: str = ""
    victim_pid: int | None = None  # from the oom-kill: summary line
    victim_comm: str = ""
    uid: int | None = None
    limit_kb: int | None = None
    usage_kb: int | None = None
    memsw_limit_kb: int | None = None
    memsw_usage_kb: int | None = None
    hint: str = ""  # constraint implied by an old "Kill process ... or sacrifice child" line
    sacrifice: bool = False  # a child may be killed instead of the process the summary named
    group: bool = False  # memory.oom.group: several victims share this context
    group_path: str = ""  # the cgroup all of whose tasks are killed
    used: bool = False

    def limit_and_usage(self) -> tuple[int | None, int | None]:
        limit, usage = self.limit_kb, self.usage_kb
        memsw_limited = self.memsw_limit_kb is not None and self.memsw_limit_kb < _UNLIMITED_KB
        if (limit is None or limit >= _UNLIMITED_KB) and memsw_limited:
            limit, usage = self.memsw_limit_kb, self.memsw_usage_kb
        if limit is not None and limit >= _UNLIMITED_KB:
            limit = None
        return (limit * KB if limit is not None else None, usage * KB if usage is not None else None)


@dataclass(frozen=True)
class KmsgKillContext:
    """What the kernel log said about a kill before marking its victim (the live probe's cross-check)."""

    victim_pid: int
    victim_comm: str
    constraint: str
    memcg_path: str
    cgroup_path: str
    memcg_limit_bytes: int | None
    memcg_usage_bytes: int | None
    trigger_pid: int | None
    trigger_comm: str
    uid: int | None


def _constraint_of_message(msg: str) -> str:
    if msg.startswith("Memory cgroup out of memory"):
        return "memcg"
    if msg.startswith("Out of memory"):
        return "global"
    return ""


def split_log_line(line: str) -> tuple[float | None, float | None, list[str]]:
    """(monotonic seconds, wall clock seconds, text lines) of one kernel log line in any common form.

    /dev/kmsg records, dmesg "[ 12.345678] text", dmesg -T "[Thu Dec  7 00:05:14 2017] text", syslog
    "... kernel: [ 12.3] text" and console "<6>[ 12.3] text". Unknown forms come back as bare text.
    """
    line = line.rstrip("\r\n")
    m = _KMSG_RECORD.match(line)
    if m:
        text = _ESCAPE.sub(lambda e: chr(int(e.group(1), 16)), m.group(2))
        return int(m.group(1)) / 1e6, None, text.split("\n")
    m = _MONO_PREFIX.match(line)
    if m:
        return float(m.group(1)), None, [m.group(2)]
    m = _HUMAN_PREFIX.match(line)
    if m:
        try:
            wall = time.mktime(time.strptime(m.group(1), "%a %b %d %H:%M:%S %Y"))
        except (ValueError, OverflowError):
            wall = None
        return None, wall, [m.group(2)]
    m = _SYSLOG_PREFIX.match(line)
    if m:
        return None, None, [m.group(1)]
    return None, None, [line]


class KmsgOomParser:
    """Turns kernel log lines into OomEvents, one per "Killed process" line, with the lines before it
    (trigger, constraint, cgroups, limit and usage) attached when they belong to the same kill.

    Incremental: the live probe feeds it new records as they arrive and asks `take_context(pid)`.
    """

    MAX_CONTEXTS = 64

    def __init__(self, boot_time: float) -> None:
        self.boot_time = boot_time
        self.events: list[OomEvent] = []
        self._ctx: _KillContext | None = None
        self._contexts: dict[int, KmsgKillContext] = {}

    def feed(self, line: str) -> None:
        try:
            mono, wall, texts = split_log_line(line)
        except Exception:  # never raise on garbage
            return
        for text in texts:
            try:
                self._feed_text(mono, wall, text.strip())
            except Exception:
                continue

    def take_context(self, pid: int, comm: str = "") -> KmsgKillContext | None:
        """The summary the log gave for victim `pid` (once: it is forgotten when taken). A different
        command name means a reused pid: no context."""
        ctx = self._contexts.pop(pid, None)
        if ctx is not None and comm and ctx.victim_comm and ctx.victim_comm != comm:
            return None
        return ctx

    def _time(self, mono: float | None, wall: float | None) -> float:
        if wall is not None:
            return wall
        return self.boot_time + (mono or 0.0)

    def _feed_text(self, mono: float | None, wall: float | None, text: str) -> None:
        if not text:
            return
        ctx = self._ctx
        if ctx is not None:
            ctx.lines += 1
        m = _INVOKED.match(text)
        if m:
            self._ctx = _KillContext(started=mono if mono is not None else wall, trigger_comm=m.group("comm"))
            return
        if text.startswith("oom-kill:"):
            self._summary(text)
            return
        m = _KILLED.match(text)
        if m:
            self._killed(mono, wall, m)
            return
        m = _REAPED.match(text)
        if m:
            self._reaped(int(m.group("pid")), self._time(mono, wall))
            return
        m = _OLD_KILL.match(text)
        if m:
            # Printed even when the header before it was rate-limited: it may start the kill's context.
            if ctx is None or (ctx.used and not ctx.group):
                ctx = self._ctx = _KillContext(started=mono if mono is not None else wall)
            ctx.hint = _constraint_of_message(m.group("msg"))
            ctx.sacrifice = True
            if ctx.victim_pid is None:
                ctx.victim_pid = int(m.group("pid"))
            return
        if ctx is None or (ctx.used and not ctx.group):
            return
        m = _CPU_LINE.match(text)
        if m and ctx.trigger_pid is None and ctx.lines <= 3:
            ctx.trigger_pid = int(m.group("pid"))
            return
        m = _USAGE.match(text)
        if m:
            if m.group("what") == "memory":
                ctx.usage_kb, ctx.limit_kb = int(m.group("usage")), int(m.group("limit"))
            else:
                ctx.memsw_usage_kb, ctx.memsw_limit_kb = int(m.group("usage")), int(m.group("limit"))
            return
        m = _TASK_IN.match(text)
        if m:
            ctx.task_memcg, ctx.memcg_path, ctx.constraint = m.group("task"), m.group("memcg"), "memcg"
            return
        m = _GROUP.match(text)
        if m:
            ctx.group = True
            ctx.group_path = m.group("memcg")

    def _summary(self, text: str) -> None:
        """oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,
        oom_memcg=/a,task_memcg=/a/b,task=comm,pid=123,uid=0 (values may contain commas)."""
        ctx = self._ctx
        if ctx is None or ctx.used:
            ctx = self._ctx = _KillContext(started=None)
        m = re.search(r"constraint=CONSTRAINT_(\w+)", text)
        if m:
            ctx.constraint = CONSTRAINTS.get(m.group(1), m.group(1).lower())
        # A value counts only when the key after it follows: a truncated line keeps what is whole.
        m = re.search(r",oom_memcg=(.*?),task_memcg=", text)
        if m:
            ctx.memcg_path = m.group(1)
        m = re.search(r",task_memcg=(.*?),task=", text)
        if m:
            ctx.task_memcg = m.group(1)
        m = re.search(r",task=(.*),pid=(\d+),uid=(\d+)\s*$", text)
        if m:
            ctx.victim_comm, ctx.victim_pid, ctx.uid = m.group(1), int(m.group(2)), int(m.group(3))
            limit, usage = ctx.limit_and_usage()
            self._contexts[ctx.victim_pid] = KmsgKillContext(
                victim_pid=ctx.victim_pid,
                victim_comm=ctx.victim_comm,
                constraint=ctx.constraint,
                memcg_path=ctx.memcg_path if ctx.constraint == "memcg" else "",
                cgroup_path=ctx.task_memcg,
                memcg_limit_bytes=limit if ctx.constraint == "memcg" else None,
                memcg_usage_bytes=usage if ctx.constraint == "memcg" else None,
                trigger_pid=ctx.trigger_pid,
                trigger_comm=ctx.trigger_comm,
                uid=ctx.uid,
            )
            while len(self._contexts) > self.MAX_CONTEXTS:
                del self._contexts[next(iter(self._contexts))]

    def _usable_context(self, pid: int, mono: float | None, wall: float | None) -> _KillContext | None:
        ctx = self._ctx
        if ctx is None or (ctx.used and not ctx.group):
            return None
        now = mono if mono is not None else wall
        if now is not None and ctx.started is not None and abs(now - ctx.started) > 30:
            return None  # a header without a kill long ago, then a rate-limited kill without header
        if ctx.victim_pid is not None and ctx.victim_pid != pid and not (ctx.sacrifice or ctx.group):
            return None
        return ctx

    def _killed(self, mono: float | None, wall: float | None, m: re.Match[str]) -> None:
        rest = m.group("rest")
        if rest.rstrip().endswith("sharing same memory"):
            return  # another process sharing the victim's mm, killed along with it
        pid = int(m.group("pid"))
        cut = rest.rfind(") total-vm:")
        if cut < 0:
            cut = rest.rfind(")")
        comm = rest[:cut] if cut >= 0 else rest
        details = rest[cut:] if cut >= 0 else ""
        fields: dict[str, int] = {}
        for name, (pattern, scale) in _KILLED_FIELDS.items():
            fm = pattern.search(details)
            if fm:
                fields[name] = int(fm.group(1)) * scale
        ctx = self._usable_context(pid, mono, wall)
        constraint = ""
        extra: dict[str, object] = {}
        if ctx is not None:
            ctx.used = True
            constraint = ctx.constraint or ctx.hint
            same_task = ctx.victim_pid in (None, pid)
            limit, usage = ctx.limit_and_usage()
            extra = {
                "trigger_pid": ctx.trigger_pid,
                "trigger_comm": ctx.trigger_comm,
                "cgroup_path": ctx.task_memcg if same_task or ctx.sacrifice else ctx.group_path,
                "memcg_path": ctx.memcg_path,
                "memcg_limit_bytes": limit,
                "memcg_usage_bytes": usage,
            }
            if ctx.uid is not None and same_task:
                extra["uid"] = ctx.uid
        constraint = constraint or _constraint_of_message(m.group("msg") or "")
        if not constraint and ctx is not None and (ctx.limit_kb is not None or ctx.memcg_path):
            constraint = "memcg"
        if constraint != "memcg":
            extra.pop("memcg_path", None)
            extra.pop("memcg_limit_bytes", None)
            extra.pop("memcg_usage_bytes", None)
        extra.update(fields)  # the kill line's own values win
        self.events.append(
            OomEvent(
                time=self._time(mono, wall),
                source="kmsg",
                victim_pid=pid,
                victim_comm=comm,
                constraint=constraint,
                **extra,  # type: ignore[arg-type]
            )
        )

    def _reaped(self, pid: int, when: float) -> None:
        for i in range(len(self.events) - 1, max(-1, len(self.events) - 64), -1):
            ev = self.events[i]
            if ev.victim_pid == pid and ev.reaped_at is None:
                self.events[i] = dataclasses.replace(ev, reaped_at=when)
                return


def parse_kmsg(lines: Iterable[str], boot_time: float) -> list[OomEvent]:
    """The OOM kills in kernel log lines (/dev/kmsg records or dmesg-style text), oldest first.

    Time = boot_time + the record's monotonic timestamp (dmesg -T lines carry wall time). Never raises.
    """
    parser = KmsgOomParser(boot_time)
    try:
        for line in lines:
            if isinstance(line, bytes):
                line = line.decode("utf-8", "replace")
            if isinstance(line, str):
                parser.feed(line)
    except Exception:
        pass
    return parser.events


def kmsg_boot_time() -> float:
    """Wall clock of boot as kernel log timestamps count it (they follow CLOCK_MONOTONIC)."""
    return time.time() - time.monotonic()


# -- reading /dev/kmsg -------------------------------------------------------------------------------------


class KmsgReader:
    """A non-blocking reader of /dev/kmsg records: the backlog first, then whatever arrives later."""

    RECORD_MAX = 16384  # larger than the kernel's largest record (CONSOLE_EXT_LOG_MAX)

    def __init__(self, path: str = "/dev/kmsg") -> None:
        self.path = path
        self.fd: int | None = None
        self.overwritten = 0  # records the kernel overwrote before we read them
        self.problem = ""
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self.problem = f"cannot read {path}: {exc.strerror or exc}" + (
                " (needs root or CAP_SYSLOG)" if exc.errno in (errno.EPERM, errno.EACCES) else ""
            )

    def read_available(self, max_records: int = 100_000) -> list[str]:
        """The records available now (up to max_records), each "prio,seq,usec,flags;text"."""
        records: list[str] = []
        if self.fd is None:
            return records
        while len(records) < max_records:
            try:
                raw = os.read(self.fd, self.RECORD_MAX)
            except BlockingIOError:
                break
            except BrokenPipeError:  # EPIPE: our next record was overwritten; the next read goes on
                self.overwritten += 1
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                self.problem = f"reading {self.path}: {exc.strerror or exc}"
                break
            if not raw:
                break
            text = raw.decode("utf-8", "replace")
            # A record is its header line, then optional " KEY=value" device property lines.
            records.append(text.split("\n", 1)[0])
        return records

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def read_kmsg_backlog(path: str = "/dev/kmsg", max_records: int = 100_000) -> tuple[list[str], str]:
    """What the kernel log holds now, without blocking: (records, problem). problem is "" when the log
    was read, else why not (the records are then []).
    """
    reader = KmsgReader(path)
    try:
        records = reader.read_available(max_records)
        return records, reader.problem
    finally:
        reader.close()


def kmsg_backlog_events(path: str = "/dev/kmsg") -> tuple[list[OomEvent], str]:
    """The kills still in the kernel log: (events, problem)."""
    records, problem = read_kmsg_backlog(path)
    return parse_kmsg(records, kmsg_boot_time()), problem


# -- memory cgroups: which limit was hit -------------------------------------------------------------------


@dataclass(frozen=True)
class MemcgState:
    """The counters and limit of one memory cgroup at one moment."""

    oom_kill: int | None = None  # v1 memory.oom_control / v2 memory.events "oom_kill"
    oom: int | None = None  # v2 memory.events "oom": OOMs at this cgroup's limit (or below it)
    failcnt: int | None = None  # v1 memory.failcnt + memory.memsw.failcnt (not counted by every kernel)
    limit_bytes: int | None = None  # None: unlimited
    usage_bytes: int | None = None
    peak_bytes: int | None = None  # v1 memory.max_usage_in_bytes (of the counter the limit is on)

    def reached_limit(self) -> bool:
        """Peak usage came within a charge batch (or a huge page) of the limit."""
        if self.limit_bytes is None or self.peak_bytes is None:
            return False
        return self.peak_bytes >= self.limit_bytes - max(4 << 20, self.limit_bytes // 64)


@dataclass(frozen=True)
class OomCause:
    constraint: str = ""  # "memcg" | "global" | "" (could not tell)
    memcg_path: str = ""
    memcg_limit_bytes: int | None = None
    memcg_usage_bytes: int | None = None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


def read_memcg_state(directory: Path, v1: bool) -> MemcgState | None:
    """The OOM counters and limit of the memory cgroup in `directory`; None if it is gone."""
    if v1:
        control = _read_keyed(directory / "memory.oom_control")
        if not control and not directory.is_dir():
            return None
        limit = _read_int(directory / "memory.limit_in_bytes")
        usage = _read_int(directory / "memory.usage_in_bytes")
        peak = _read_int(directory / "memory.max_usage_in_bytes")
        memsw_limit = _read_int(directory / "memory.memsw.limit_in_bytes")
        memsw_limited = memsw_limit is not None and memsw_limit < _UNLIMITED_BYTES
        if (limit is None or limit >= _UNLIMITED_BYTES) and memsw_limited:
            limit = memsw_limit
            usage = _read_int(directory / "memory.memsw.usage_in_bytes")
            peak = _read_int(directory / "memory.memsw.max_usage_in_bytes")
        failcnts = [_read_int(directory / f) for f in ("memory.failcnt", "memory.memsw.failcnt")]
        known = [f for f in failcnts if f is not None]
        return MemcgState(
            oom_kill=control.get("oom_kill"),
            failcnt=sum(known) if known else None,
            limit_bytes=limit if limit is not None and limit < _UNLIMITED_BYTES else None,
            usage_bytes=usage,
            peak_bytes=peak,
        )
    events = _read_keyed(directory / "memory.events")
    if not events and not directory.is_dir():
        return None
    return MemcgState(
        oom_kill=events.get("oom_kill"),
        oom=events.get("oom"),
        limit_bytes=_read_int(directory / "memory.max"),
        usage_bytes=_read_int(directory / "memory.current"),
    )


def _grew(now: int | None, before: int | None, seen: bool) -> bool:
    if now is None:
        return False
    if not seen:
        return now > 0  # a cgroup first seen now: any count is news
    return before is not None and now > before


def _ancestors(path: str) -> list[str]:
    """ "/a/b/c" -> ["/a/b/c", "/a/b", "/a"] (the root has no limit)."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:n]) for n in range(len(parts), 0, -1)]


class MemcgOomTracker:
    """Tells a cgroup-limit OOM from a system-wide one by which memory cgroup's counters grew.

    Walks from the victim's memory cgroup up to the root, looking for the cgroup whose limit was hit:
    - cgroup v2: the lowest cgroup with a limit whose "oom" event count grew (events propagate upwards
      from the cgroup whose limit was hit, never downwards);
    - cgroup v1 (nothing propagates, and recent kernels leave failcnt at 0): the lowest cgroup with a
      limit whose failcnt grew, else whose peak usage newly reached its limit, else the victim's own
      cgroup if it has a limit its peak reached and its oom_kill count grew.
    Counters are remembered between kills; a cgroup seen for the first time counts as grown when its
    counter is non-zero. No limit hit but the victim's oom_kill grew: a global OOM. Otherwise unknown.
    """

    MAX_REMEMBERED = 20_000
    GROUP_KILL_WINDOW_S = 2.0  # memory.oom.group kills several tasks for one OOM, counted once

    def __init__(self, memory_root: str | None, v1: bool) -> None:
        self.memory_root = Path(memory_root) if memory_root else None
        self.v1 = v1
        self._seen: dict[str, MemcgState] = {}
        self._last_memcg: tuple[float, OomCause] | None = None
        self._oom_kills: dict[str, int] = {}  # v1: each memory cgroup's own oom_kill count, last read

    def directory(self, path: str) -> Path | None:
        if self.memory_root is None:
            return None
        return self.memory_root / path.lstrip("/")

    def exists(self, path: str) -> bool:
        d = self.directory(path)
        return d is not None and d.is_dir()

    def prime(self, max_cgroups: int = MAX_REMEMBERED) -> int:
        """Remember every memory cgroup's counters now, so that later growth is told from old counts."""
        n = 0
        for path, directory in self._memcgs(max_cgroups):
            state = read_memcg_state(directory, self.v1)
            if state is not None:
                self._remember(path, state)
                n += 1
        return n

    def _memcgs(self, max_cgroups: int) -> Iterator[tuple[str, Path]]:
        """The memory cgroups below the hierarchy's root (at most `max_cgroups`, top-down): their paths
        ("/a/b") and directories."""
        if self.memory_root is None:
            return
        root = self.memory_root
        for n, (dirpath, _dirnames, _files) in enumerate(os.walk(root)):
            if n > max_cgroups:  # the root itself is the first, and not a child
                return
            if n:
                yield "/" + os.path.relpath(dirpath, root).replace(os.sep, "/"), Path(dirpath)

    def _remember(self, path: str, state: MemcgState) -> None:
        self._seen.pop(path, None)
        self._seen[path] = state
        while len(self._seen) > self.MAX_REMEMBERED:
            del self._seen[next(iter(self._seen))]
        if self.v1 and state.oom_kill is not None:
            self._oom_kills[path] = state.oom_kill

    def victim_by_counters(self, max_cgroups: int = MAX_REMEMBERED) -> str:
        """cgroup v1: the memory cgroup whose own oom_kill count grew since it was last read, "" if none.

        The kernel counts every OOM kill in the victim's own memory cgroup (memory.oom_control `oom_kill`;
        v1 does not propagate it upwards), whether or not its log line was printed. So when nothing else
        names the victim's cgroup (no log line past the log's rate limit, a victim gone from /proc, a
        cgroup2 path that is the root because the runtime used only v1 hierarchies), the cgroup whose count
        grew is the victim's. Grown from a known count beats first seen with kills; then the deepest. Walks
        the memory hierarchy (bounded): for the rare kill nothing else placed.
        """
        if self.memory_root is None or not self.v1:
            return ""
        grew: list[str] = []
        first_seen: list[str] = []
        for path, directory in self._memcgs(max_cgroups):
            count = _read_keyed(directory / "memory.oom_control").get("oom_kill")
            if count is None:
                continue
            before = self._oom_kills.get(path)
            if before is None and path in self._seen:
                before = self._seen[path].oom_kill
            self._oom_kills[path] = count
            if before is None:
                if count > 0:
                    first_seen.append(path)
            elif count > before:
                grew.append(path)
        while len(self._oom_kills) > self.MAX_REMEMBERED:
            del self._oom_kills[next(iter(self._oom_kills))]
        found = grew or first_seen
        return max(found, key=lambda p: p.count("/")) if found else ""

    def cause(self, victim_memcg: str, now: float | None = None) -> OomCause:
        """Why a victim in memory cgroup `victim_memcg` was killed (read right when the kill is seen).

        A victim inside the cgroup of a memcg OOM found just before (`now`: time.monotonic()) shares its
        cause: memory.oom.group kills every task of the cgroup for one OOM, counted once.
        """
        now = time.monotonic() if now is None else now
        cause = self._cause(victim_memcg)
        if cause.constraint == "memcg":
            self._last_memcg = (now, cause)
        elif self._last_memcg is not None and now - self._last_memcg[0] <= self.GROUP_KILL_WINDOW_S:
            group = self._last_memcg[1].memcg_path
            if victim_memcg == group or victim_memcg.startswith(group.rstrip("/") + "/"):
                return self._last_memcg[1]
        return cause

    def _cause(self, victim_memcg: str) -> OomCause:
        if self.memory_root is None or not victim_memcg:
            return OomCause()
        chain = _ancestors(victim_memcg)
        if not chain:
            return OomCause("global")  # the victim lived in the root cgroup, which has no limit
        # (path, now, before) for each cgroup of the chain that still exists, lowest first.
        walked: list[tuple[str, MemcgState, MemcgState | None]] = []
        for path in chain:
            d = self.directory(path)
            state = read_memcg_state(d, self.v1) if d is not None else None
            if state is not None:
                walked.append((path, state, self._seen.get(path)))
                self._remember(path, state)
        if not walked:
            return OomCause()

        def first(hit: Callable[[MemcgState, MemcgState | None], bool]) -> OomCause | None:
            for path, now, before in walked:
                if now.limit_bytes is not None and hit(now, before):
                    return OomCause("memcg", path, now.limit_bytes, now.usage_bytes)
            return None

        found: OomCause | None
        if self.v1:
            found = first(
                lambda now, before: _grew(now.failcnt, before.failcnt if before else None, bool(before))
            )
            found = found or first(
                lambda now, before: now.reached_limit() and not (before and before.reached_limit())
            )
        else:
            found = first(lambda now, before: _grew(now.oom, before.oom if before else None, bool(before)))
        victim_path, victim_now, victim_before = walked[0]
        victim_grew = victim_path == chain[0] and _grew(
            victim_now.oom_kill, victim_before.oom_kill if victim_before else None, victim_before is not None
        )
        if found is None and self.v1 and victim_grew and victim_now.reached_limit():
            found = OomCause("memcg", victim_path, victim_now.limit_bytes, victim_now.usage_bytes)
        if found is not None:
            return found
        return OomCause("global") if victim_grew else OomCause()


def memory_cgroup_of(pid: int, proc: str = "/proc") -> tuple[str, str]:
    """(memory controller path, cgroup2 path) of a process from /proc/PID/cgroup; "" where unknown."""
    try:
        text = Path(proc, str(pid), "cgroup").read_text()
    except OSError:
        return "", ""
    return proc_cgroup_paths(text)
