"""Outstanding allocations by stack (a live memleak): the Leaks tab, and one stack in full."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, Static

from memtop import format as fmt
from memtop.leaks import KIND_USER, LeakRow, frame_function
from memtop.screens import MemtopScreen
from memtop.store import Snapshot
from memtop.widgets import Column, HeaderBar, VirtualTable, right

OLDER_STEPS = (0.0, 10.0, 60.0, 300.0, 1800.0)  # what the o key cycles through


def leak_key(row: LeakRow) -> str:
    return f"{row.kind}:{row.stack_id}"


def _growth(row: LeakRow) -> Text:
    g = row.growth_bytes_per_s
    if abs(g) < 0.5:
        return right("0", style="dim")
    text = right(("+" if g > 0 else "") + fmt.size_rate(g))
    if g > 0:
        text.stylize("bold red" if g >= 1024 else "yellow")
    return text


def processes(row: LeakRow) -> str:
    if row.pid is not None:
        return f"{row.comm} {row.pid}"
    return f"{row.comm} +{len(row.pids) - 1} more"


LEAK_COLUMNS: tuple[Column, ...] = (
    Column("outstanding_bytes", "OUTSTANDING", lambda r: right(fmt.size(r.outstanding_bytes)), width=12),
    Column("allocations", "ALLOCS", lambda r: right(fmt.count(r.allocations)), width=8),
    Column(
        "oldest_age_s",
        "OLDEST",
        lambda r: right(fmt.short_duration(r.oldest_age_s) if r.oldest_age_s is not None else "-"),
        width=8,
    ),
    Column("growth_bytes_per_s", "GROWTH/min avg", _growth, width=16),
    Column("comm", "PROCESS", processes, numeric=False, width=22),
    Column("kind", "KIND", lambda r: r.kind, numeric=False, width=12),
    Column("top_frame", "TOP FRAME", lambda r: r.top_frame, numeric=False, width=48),
)


class LeakTable(VirtualTable):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(LEAK_COLUMNS, sort_group="leaks", row_key=leak_key, **kwargs)


def sampling_text(snap: Snapshot) -> str:
    rates: Mapping[str, int] = snap.leak_sample_rates or {"kernel": snap.leak_sample_rate}
    parts = []
    for kind, rate in sorted(rates.items()):
        if kind == KIND_USER:
            parts.append(f"user PID {snap.leak_user_pid}: 1 in {rate}" + (" (estimates)" if rate > 1 else ""))
        else:
            parts.append(f"kernel: 1 in {rate}" + (" (estimates)" if rate > 1 else ""))
    user = snap.probes.get("leaks-user")
    if user is not None and user.status == "error":  # e.g. which object provides malloc, not followed
        parts.append(f"user: {user.detail}")
    return ", ".join(parts) or "no data"


def leak_note(snap: Snapshot) -> Text:
    drops = snap.drops
    lost = sum(v for k, v in drops.items() if k.startswith("leak") and k.endswith(("map_full", "lost")))
    missed = sum(v for k, v in drops.items() if k.startswith("leak") and k.endswith("missed_frees"))
    collisions = sum(v for k, v in drops.items() if k.startswith("leak") and k.endswith("stack_collisions"))
    older = f"older than {fmt.short_duration(snap.leak_older_s)}" if snap.leak_older_s else "all ages"
    return Text.assemble(
        ("tracked: ", "bold"),
        f"{sampling_text(snap)}  │ showing {older} (o)  │ ",
        (f"not tracked (maps full) {fmt.count(lost)}", "bold red" if lost else ""),
        f" · missed frees {fmt.count(missed)} · stack collisions {fmt.count(collisions)}",
        untraced_text(drops),
    )


def untraced_text(drops: Mapping[str, int]) -> str:
    """Allocations retired because their slab cache holds fewer live objects than were tracked (freed
    without a tracepoint), and the caches they were in, biggest first."""
    prefix = "leak_freed_untraced:"
    caches = sorted(((n, k[len(prefix) :]) for k, n in drops.items() if k.startswith(prefix)), reverse=True)
    if not caches:
        return ""
    total = sum(n for n, _ in caches)
    names = ", ".join(name for _, name in caches[:3]) + (", …" if len(caches) > 3 else "")
    return f" · freed untraced {fmt.count(total)} ({names})"


def stack_text(row: LeakRow) -> Text:
    text = Text()
    text.append(
        f"{fmt.size(row.outstanding_bytes)} outstanding in {fmt.count(row.allocations)} allocations, "
        f"oldest {fmt.short_duration(row.oldest_age_s) if row.oldest_age_s is not None else '-'}, "
        f"growth {fmt.size_rate(row.growth_bytes_per_s)} over the last minute\n",
        style="bold",
    )
    text.append(f"{row.kind} stack; allocated by {', '.join(str(p) for p in row.pids)} ({row.comm})\n\n")
    top = next((i for i, f in enumerate(row.stack) if frame_function(f) == row.top_frame), None)
    for i, frame in enumerate(row.stack):
        style = "" if top is None else ("bold cyan" if i == top else ("dim" if i < top else ""))
        text.append(f"#{i:<3} {frame}\n", style=style)
    return text


def rows_for(snap: Snapshot, pid: int | None = None) -> Sequence[LeakRow]:
    if pid is None:
        return snap.leaks
    return [r for r in snap.leaks if pid in r.pids]


class LeakScreen(MemtopScreen):
    """One stack in full, innermost frame first; allocator frames dimmed, the top meaningful one marked."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    shows_leaks = True

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        yield Static(id="leak-stack")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_view()

    def show_snapshot(self, snap: Snapshot) -> None:
        row = next((r for r in snap.leaks if leak_key(r) == self.key), None)
        widget = self.query_one("#leak-stack", Static)
        if row is None:
            widget.update(Text("nothing outstanding on this stack any more", style="dim"))
        else:
            widget.update(stack_text(row))
