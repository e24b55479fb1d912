"""The main screen: header, tabs (Processes now; containers, leaks, OOM and TCP join later), filter."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Footer, Input, TabbedContent, TabPane

from memtop import format as fmt
from memtop.screens import MemtopScreen
from memtop.store import ProcessKey, ProcessRow, Snapshot, SortKey, filter_rows, sort_rows
from memtop.widgets import Column, HeaderBar, SortedTable, right


def _comm(row: ProcessRow) -> Text:
    text = Text(row.comm or "?")
    if row.is_irq:
        text.stylize("bold magenta")
    if row.exited:
        text.append(" (exited)", style="dim italic")
    return text


PROCESS_COLUMNS: tuple[Column, ...] = (
    Column("pid", "PID", lambda r: right("-" if r.is_irq else str(r.pid)), width=8),
    Column("user", "USER", lambda r: r.user or "-", numeric=False, width=10),
    Column("comm", "COMMAND", _comm, numeric=False, width=20),
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
DEFAULT_SORT = SortKey("kmalloc_bytes_per_s", reverse=True)


def row_key(key: ProcessKey) -> str:
    return f"{key.pid}:{key.start_time!r}"


class ProcessTable(SortedTable):
    BINDINGS = [Binding(str(i + 1), f"app.sort({i})", show=False) for i in range(len(PROCESS_COLUMNS))]


class MainScreen(MemtopScreen):
    BINDINGS = [
        Binding("enter", "drill", "Details", show=True),
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("less_than_sign", "app.sort_shift(-1)", "Sort ←", show=False),
        Binding("greater_than_sign", "app.sort_shift(1)", "Sort →", show=False),
        Binding("r", "app.sort_reverse", "Reverse"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filter_text = ""
        self._rows: dict[str, ProcessRow] = {}

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        with TabbedContent(id="tabs"), TabPane("Processes", id="processes"), Vertical():
            yield ProcessTable(PROCESS_COLUMNS, id="process-table")
        yield Input(placeholder="filter by command or PID — Enter keeps it, Esc clears", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(ProcessTable).focus()
        self.refresh_view()

    def show_snapshot(self, snap: Snapshot) -> None:
        table = self.query_one(ProcessTable)
        sort = self.memtop.sort
        rows = sort_rows(filter_rows(snap.processes, self.filter_text), sort)
        self._rows = {row_key(r.key): r for r in rows}
        table.show_rows([(row_key(r.key), [c.render(r) for c in PROCESS_COLUMNS]) for r in rows])
        table.set_header_marks(sort.column, sort.reverse)
        pane = self.query_one("#tabs", TabbedContent)
        label = "Processes" + (f" [filter: {self.filter_text}]" if self.filter_text else "")
        pane.get_tab("processes").label = label  # type: ignore[assignment]

    def selected_process(self) -> ProcessRow | None:
        key = self.query_one(ProcessTable).cursor_key()
        return self._rows.get(key) if key else None

    # -- actions ----------------------------------------------------------------------------------

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_drill()

    def action_drill(self) -> None:
        row = self.selected_process()
        if row is not None:
            self.memtop.open_process(row.key)

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("visible")
        box.value = self.filter_text
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.remove_class("visible")
        self.filter_text = ""
        self.query_one(ProcessTable).focus()
        self.refresh_view()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self.refresh_view()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.filter_text = event.value
        if not self.filter_text:
            event.input.remove_class("visible")
        self.query_one(ProcessTable).focus()
        self.refresh_view()

    def on_key(self, event: Any) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_focus:
            event.stop()
            self.action_clear_filter()
