"""Every table's columns in one place: the field each shows (also its sort key), its label and how
it is drawn. Sort keys are the records' own field names, the same as the snapshot's."""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter

from rich.text import Text

from memtop import format as fmt
from memtop.screens.leaks import LEAK_COLUMNS
from memtop.screens.oom import OOM_COLUMNS
from memtop.screens.tcp import TCP_COLUMNS
from memtop.store import ContainerRow, ProcessRow, SortKey
from memtop.widgets import Column, right


def _comm(row: ProcessRow) -> Text:
    text = Text(row.comm or "?")
    if row.is_irq:
        text.stylize("bold magenta")
    if row.exited:
        text.append(" (exited)", style="dim italic")
    return text


def _container_of(row: ProcessRow) -> Text:
    if row.container_id is None:
        return Text("-" if row.is_irq else (row.unit or "host"), style="dim")
    return Text(row.container or row.container_id[:12], style="cyan")


PROCESS_COLUMNS: tuple[Column, ...] = (
    Column("pid", "PID", lambda r: right("-" if r.is_irq else str(r.pid)), width=8),
    Column("user", "USER", lambda r: r.user or "-", numeric=False, width=9),
    Column("comm", "COMMAND", _comm, numeric=False, width=18),
    Column("container", "CONTAINER", _container_of, numeric=False, width=16),
    Column(
        "kmalloc_bytes_per_s", "KMALLOC/s", lambda r: right(fmt.size_rate(r.kmalloc_bytes_per_s)), width=12
    ),
    Column(
        "kmalloc_calls_per_s", "CALLS/s", lambda r: right(fmt.count_rate(r.kmalloc_calls_per_s)), width=10
    ),
    Column("kmalloc_avg_bytes", "AVG", lambda r: right(fmt.size(r.kmalloc_avg_bytes)), width=9),
    Column("kmalloc_waste_pct", "WASTE", lambda r: right(fmt.percent(r.kmalloc_waste_pct)), width=7),
    Column("kmalloc_bytes", "TOTAL", lambda r: right(fmt.size(r.kmalloc_bytes)), width=10),
    Column("rss_bytes", "RSS", lambda r: right(fmt.size(r.rss_bytes)), width=10),
)


def _limit(row: ContainerRow) -> Text:
    if row.memory_limit_bytes is None:
        return right("none" if row.memory_bytes is not None else "-")
    return right(fmt.size(row.memory_limit_bytes))


def _mem_pct(row: ContainerRow) -> Text:
    pct = row.memory_pct
    text = right(fmt.percent(pct))
    if pct is not None and pct >= 90:
        text.stylize("bold red")
    elif pct is not None and pct >= 75:
        text.stylize("yellow")
    return text


def _pod(row: ContainerRow) -> str:
    if row.pod_name:
        return f"{row.namespace}/{row.pod_name}" if row.namespace else row.pod_name
    return f"pod {row.pod_uid[:8]}…" if row.pod_uid else "-"


def _oom_kills(row: ContainerRow) -> Text:
    return right(str(row.oom_kills), style="bold red") if row.oom_kills else right("0", style="dim")


CONTAINER_COLUMNS: tuple[Column, ...] = (
    Column("label", "CONTAINER", lambda c: Text(c.label, style="cyan"), numeric=False, width=22),
    Column("pod_name", "NAMESPACE/POD", _pod, numeric=False, width=28),
    Column("oom_kills", "OOM", _oom_kills, width=5),
    Column("runtime", "RUNTIME", lambda c: c.runtime, numeric=False, width=10),
    Column("processes", "PROCS", lambda c: right(str(c.processes)), width=6),
    Column(
        "kmalloc_bytes_per_s", "KMALLOC/s", lambda c: right(fmt.size_rate(c.kmalloc_bytes_per_s)), width=12
    ),
    Column(
        "kmalloc_calls_per_s", "CALLS/s", lambda c: right(fmt.count_rate(c.kmalloc_calls_per_s)), width=10
    ),
    Column("memory_bytes", "MEMORY", lambda c: right(fmt.size(c.memory_bytes)), width=10),
    Column("memory_limit_bytes", "LIMIT", _limit, width=10),
    Column("memory_pct", "MEM%", _mem_pct, width=7),
)

DEFAULT_SORTS: dict[str, SortKey] = {
    "processes": SortKey("kmalloc_bytes_per_s", reverse=True),
    "containers": SortKey("kmalloc_bytes_per_s", reverse=True),
    "oom": SortKey("time", reverse=True),
    "tcp": SortKey("connects", reverse=True),
    "leaks": SortKey("growth_bytes_per_s", reverse=True),
}

# The tables a user can sort, for the help screen: (group, title, columns).
SORTABLE_TABLES: list[tuple[str, str, tuple[Column, ...]]] = [
    ("processes", "Processes", PROCESS_COLUMNS),
    ("containers", "Containers", CONTAINER_COLUMNS),
    ("oom", "OOM log", OOM_COLUMNS),
    ("tcp", "TCP connects", TCP_COLUMNS),
    ("leaks", "Leaks", LEAK_COLUMNS),
]


# A process's row key in the tables: (pid, start time), its identity across PID reuse.
process_row_key: Callable[[ProcessRow], tuple[int, float]] = attrgetter("pid", "start_time")
