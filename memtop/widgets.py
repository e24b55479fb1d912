"""Widgets shared by the screens: the header bar and the sortable, diffing table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable, Static

from memtop import format as fmt
from memtop.store import Snapshot


class HeaderBar(Static):
    """Host, kernel, uptime, total kmalloc rate, interval, mode, probe status and drop counters."""

    DEFAULT_CSS = """
    HeaderBar { height: 2; background: $primary-background; color: $text; padding: 0 1; }
    """

    def show(
        self,
        snap: Snapshot | None,
        paused: bool,
        interval_s: float,
        exports: int = 0,
        timeline: str = "",
        span: str = "",
    ) -> None:
        """`timeline`: where a recording is (time travel), shown instead of "taken ..."; `span`: what
        the recording holds, on the second line."""
        if snap is None:
            self.update("memtop  starting…")
            return
        up = fmt.short_duration(snap.taken_at - snap.host.boot_time) if snap.host.boot_time else "-"
        mode = (
            Text(" REPLAY ", style="bold black on yellow")
            if snap.replay
            else (
                Text(" PAUSED ", style="bold black on bright_yellow")
                if paused
                else Text(" LIVE ", style="bold black on green")
            )
        )
        line1 = Text.assemble(
            ("memtop ", "bold"),
            (snap.host.hostname, "bold cyan"),
            f"  kernel {snap.host.kernel}  up {up}  │ ",
            ("kmalloc ", "bold"),
            (fmt.size_rate(snap.kmalloc_bytes_per_s), "bold"),
            f" {fmt.count_rate(snap.kmalloc_calls_per_s)} calls  │ ",
            f"every {interval_s:g}s"
            if not snap.replay
            else (timeline or f"taken {fmt.datetime(snap.taken_at)}"),
            "  ",
            mode,
        )
        if snap.sample_every > 1:
            line1.append(f"  sampled 1/{snap.sample_every}: estimates", style="bold yellow")
        line2 = Text()
        if snap.oom_kills_seen:
            line2.append(f" OOM kills: {snap.oom_kills_seen} ", style="bold white on red")
            line2.append(" │ ")
        line2.append("probes: ")
        for name, p in snap.probes.items():
            if p.status in ("running", "replay"):
                line2.append(f"{name} ✓ ", style="green")
            else:
                line2.append(f"{name} {p.status}", style="bold red" if p.status == "error" else "yellow")
                line2.append(
                    f" ({p.detail}) " if p.detail else " ", style="red" if p.status == "error" else ""
                )
        if not snap.probes:
            line2.append("none ")
        drops = snap.drops
        # data lost (unlike the tail's rate cap, which is a budget): maps full, ring buffers full
        lost = sum(v for k, v in drops.items() if k.endswith(("_full", "_lost")) or k == "tail_lost")
        line2.append("│ ")
        line2.append(f"drops {fmt.count(lost)}", style="bold red" if lost else "")
        line2.append(f" │ {len(snap.processes)} processes over {fmt.short_duration(snap.duration_s)}")
        if span:
            line2.append(f" │ {span}")
        self.update(Text("\n").join([line1, line2]))


@dataclass(frozen=True)
class Column:
    """A table column: the field it shows (also its sort key), its label and how it is drawn."""

    field: str
    label: str
    render: Callable[[Any], str | Text]
    numeric: bool = True
    width: int | None = None


SORT_DIGITS = "1234567890"  # the key for column i (the tenth column is 0)


class SortedTable(DataTable[Any]):
    """A DataTable whose rows are (key, record) pairs re-rendered each tick.

    Rows are diffed by key: when the order is unchanged only changed cells are updated, otherwise the
    table is rebuilt and the cursor stays on the same record. A table with a `sort_group` sorts with the
    digit keys (one per column, again reverses), r (reverse) and < > (previous/next column); the sort
    order itself lives in the app, so it survives the table being rebuilt.
    """

    BINDINGS = [
        *(Binding(d, f"sort_column({i})", show=False) for i, d in enumerate(SORT_DIGITS)),
        Binding("r", "sort_reverse", "Reverse", show=False),
        Binding("less_than_sign", "sort_shift(-1)", "Sort ←", show=False),
        Binding("greater_than_sign", "sort_shift(1)", "Sort →", show=False),
    ]

    def __init__(self, columns: Sequence[Column], sort_group: str | None = None, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.columns_spec = list(columns)
        self.sort_group = sort_group
        self._keys: list[str] = []
        self._cells: dict[str, tuple[Any, ...]] = {}

    def on_mount(self) -> None:
        for col in self.columns_spec:
            self.add_column(col.label, key=col.field, width=col.width)

    def set_header_marks(self, sort_field: str, reverse: bool) -> None:
        for col in self.columns_spec:
            mark = (" ▼" if reverse else " ▲") if col.field == sort_field else ""
            label = Text(col.label + mark, style="bold reverse" if mark else "bold")
            column = self.columns.get(col.field)  # type: ignore[call-overload]
            if column is not None:
                column.label = label
        self.refresh()

    def show_rows(self, rows: Sequence[tuple[str, Sequence[Any]]]) -> None:
        # Plain strings become Text, never markup: names come from processes, cgroups and state files.
        rows = [(k, [Text(c) if isinstance(c, str) else c for c in cells]) for k, cells in rows]
        keys = [k for k, _ in rows]
        cursor_key = self.cursor_key()
        if keys == self._keys:
            for key, cells in rows:
                old = self._cells.get(key)
                if old != tuple(cells):
                    for col, value, previous in zip(
                        self.columns_spec, cells, old or (None,) * len(cells), strict=True
                    ):
                        if value != previous:
                            self.update_cell(key, col.field, value)
                    self._cells[key] = tuple(cells)
            return
        scroll_y = self.scroll_y
        self.clear()
        for key, cells in rows:
            self.add_row(*cells, key=key)
        self._keys = keys
        self._cells = {k: tuple(c) for k, c in rows}
        if cursor_key in self._cells:
            self.move_cursor(row=keys.index(cursor_key), animate=False, scroll=False)
        self.scroll_to(y=scroll_y, animate=False)

    def action_sort_column(self, index: int) -> None:
        if self.sort_group is not None and index < len(self.columns_spec):
            self.app.sort_table(self.sort_group, self.columns_spec, index)  # type: ignore[attr-defined]

    def action_sort_reverse(self) -> None:
        if self.sort_group is not None:
            self.app.sort_table_reverse(self.sort_group)  # type: ignore[attr-defined]

    def action_sort_shift(self, step: int) -> None:
        if self.sort_group is not None:
            self.app.sort_table_shift(self.sort_group, self.columns_spec, step)  # type: ignore[attr-defined]

    def cursor_key(self) -> str | None:
        if not self._keys or self.cursor_row < 0 or self.cursor_row >= len(self._keys):
            return None
        return self._keys[self.cursor_row]


def right(text: str, style: str = "") -> Text:
    return Text(text, justify="right", style=style)
