"""Widgets shared by the screens: the header bar and the sortable virtual table."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.cells import cell_len
from rich.console import Console
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.scrollbar import ScrollBar, ScrollBarRender
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Static

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
            self.update("memtop  starting…", layout=False)
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
        # Counts first: a long probe error is what gets cut at the right edge, never them.
        drops = snap.drops
        # data lost (unlike the tail's rate cap, which is a budget): maps full, ring buffers full
        lost = sum(
            v
            for k, v in drops.items()
            if k.endswith(("_full", "_lost", "_recursion_misses")) or k == "tail_lost"
        )
        line2.append(f"{len(snap.processes)} processes over {fmt.short_duration(snap.duration_s)} │ ")
        if span:  # a recording's span (time travel)
            line2.append(f"{span} │ ")
        line2.append(f"drops {fmt.count(lost)}", style="bold red" if lost else "")
        line2.append(" │ probes: ")
        for name, p in snap.probes.items():
            if p.status in ("running", "replay"):
                line2.append(f"{name} ✓ ", style="green")
            elif p.status == "starting":  # still compiling and attaching (in the background)
                line2.append(f"{name} … ", style="yellow")
            else:
                line2.append(f"{name} {p.status}", style="bold red" if p.status == "error" else "yellow")
                line2.append(
                    f" ({p.detail}) " if p.detail else " ", style="red" if p.status == "error" else ""
                )
        if not snap.probes:
            line2.append("none ")
        if any(p.status == "starting" for p in snap.probes.values()):
            line2.append("(… starting)", style="yellow")
        self.update(Text("\n").join([line1, line2]), layout=False)  # a fixed height: no layout per tick


@dataclass(frozen=True)
class Column:
    """A table column: the field it shows (also its sort key), its label and how it is drawn."""

    field: str
    label: str
    render: Callable[[Any], str | Text]
    numeric: bool = True
    width: int | None = None


SORT_DIGITS = "1234567890"  # the key for column i (the tenth column is 0)
CELL_PADDING = 1  # blank cells on each side of a column, as DataTable draws them
LINE_CACHE_MAX = 512  # formatted rows kept for scrolling back (only ever rows that were visible)


def cell_segments(value: str | Text, width: int, console: Console) -> list[Segment]:
    """One cell as segments exactly `width` cells wide: plain strings are text (never markup), one line
    (line breaks shown as ↵), too long ends in …, `Text(justify="right")` is right-aligned."""
    if isinstance(value, str):
        if "\n" not in value:  # the common case, a short plain string: one segment, no Text
            pad = width - cell_len(value)
            if pad >= 0:
                return [Segment(value + " " * pad)]
        text = Text(value)
    else:
        text = value
    plain = text.plain
    if not text.spans and "\n" not in plain:  # one style for the whole cell (right(), a styled name)
        pad = width - cell_len(plain)
        if pad >= 0:
            style = console.get_style(text.style) if text.style else None
            if not pad:
                return [Segment(plain, style)]
            if text.justify == "right":
                return [Segment(" " * pad), Segment(plain, style)]
            if text.justify == "center":
                return [Segment(" " * (pad // 2)), Segment(plain, style), Segment(" " * (pad - pad // 2))]
            return [Segment(plain, style), Segment(" " * pad)]
    if "\n" in plain:
        text = Text("↵").join(text.split("\n", allow_blank=True))
    length = text.cell_len
    if length > width:
        text = text.copy()
        text.truncate(width, overflow="ellipsis")
        length = text.cell_len
    segments = list(text.render(console))  # the spans' styles; the Text's own style goes under them
    if text.style:
        segments = list(Segment.apply_style(segments, console.get_style(text.style)))
    pad = width - length
    if pad > 0:
        if text.justify == "right":
            segments.insert(0, Segment(" " * pad))
        elif text.justify == "center":
            segments.insert(0, Segment(" " * (pad // 2)))
            segments.append(Segment(" " * (pad - pad // 2)))
        else:
            segments.append(Segment(" " * pad))
    return segments


class _TableNavigation(ScrollView, can_focus=True):
    """The cursor keys of a VirtualTable (kept apart so the help screen lists only the sort keys)."""

    BINDINGS = [
        Binding("enter", "select_cursor", "Select", show=False),
        Binding("up", "cursor_up", "Up", show=False),
        Binding("down", "cursor_down", "Down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("home,ctrl+home", "cursor_home", "Top", show=False),
        Binding("end,ctrl+end", "cursor_end", "Bottom", show=False),
        Binding("left", "scroll_columns(-1)", "Scroll left", show=False),
        Binding("right", "scroll_columns(1)", "Scroll right", show=False),
    ]


class VirtualTable(_TableNavigation):
    """A table of records that formats only the rows on screen (Textual's Line API).

    The screen hands over every record, already filtered and sorted on raw values (`set_rows`); the
    table keeps the list and, when Textual asks for a line, formats that one row with the columns'
    `render` functions (cached per row key while the record is the same). `row_key` gives a record's
    identity (a process's pid and start time), by which the cursor and the cache follow it. A tick
    therefore costs about the same at 30 rows as at 5,000. The header stays on top, the sorted column
    is marked ▲/▼ (`set_header_marks`), and the cursor follows its record across ticks and re-sorts (a
    record that left the data leaves the cursor at the same position). Enter, or a click on the
    cursor's row, posts `VirtualTable.RowSelected`; a click on the header sorts by that column.

    A table with a `sort_group` sorts with the digit keys (one per column, again reverses), r (reverse)
    and < > (previous/next column); the sort order itself lives in the app, so it survives the table
    being rebuilt.
    """

    BINDINGS = [
        *(Binding(d, f"sort_column({i})", show=False) for i, d in enumerate(SORT_DIGITS)),
        Binding("r", "sort_reverse", "Reverse", show=False),
        Binding("less_than_sign", "sort_shift(-1)", "Sort ←", show=False),
        Binding("greater_than_sign", "sort_shift(1)", "Sort →", show=False),
    ]

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "virtual-table--header",
        "virtual-table--cursor",
        "virtual-table--even-row",
        "virtual-table--odd-row",
    }

    DEFAULT_CSS = """
    VirtualTable {
        background: $surface;
        color: $foreground;
        height: auto;
        max-height: 100%;
        &:focus {
            background-tint: $foreground 5%;
            & > .virtual-table--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
            & > .virtual-table--header {
                background-tint: $foreground 5%;
            }
        }
        &:dark > .virtual-table--even-row {
            background: $surface-darken-1 40%;
        }
        & > .virtual-table--header {
            text-style: bold;
            background: $panel;
            color: $foreground;
        }
        &:ansi > .virtual-table--header {
            background: ansi_bright_blue;
            color: ansi_default;
        }
        & > .virtual-table--even-row {
            background: $surface-lighten-1 50%;
        }
        & > .virtual-table--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
    }
    """

    class RowSelected(Message):
        """Enter (or a click on the cursor's row): `key` and `record` of the row under the cursor."""

        def __init__(self, table: VirtualTable, key: Hashable, record: Any) -> None:
            super().__init__()
            self.table = table
            self.key = key
            self.record = record

        @property
        def control(self) -> VirtualTable:
            return self.table

    def __init__(
        self,
        columns: Sequence[Column],
        sort_group: str | None = None,
        *,
        row_key: Callable[[Any], Hashable] = id,
        name: str | None = None,
        id: str | None = None,  # noqa: A002 (Textual's name)
        classes: str | None = None,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.columns_spec = list(columns)
        self.sort_group = sort_group
        self.row_key = row_key
        self.cursor_row = 0
        self._records: Sequence[Any] = ()
        self._index: dict[Hashable, int] | None = None  # key -> row, built when asked for
        self._widths = [c.width if c.width is not None else max(8, len(c.label) + 2) for c in columns]
        self._table_width = sum(w + 2 * CELL_PADDING for w in self._widths)
        self._marks: tuple[str, bool] | None = None
        self._header: Strip | None = None
        self._lines: dict[Hashable, tuple[Any, Strip]] = {}  # key -> (the record it was drawn from, its line)
        self._styles: dict[str, Style] = {}
        self._base_style = Style()
        self._frame = (0, 0, 0)  # scroll x, scroll y and width, set by render_lines
        # What each screen line was last drawn from: (scroll y, width, the row's line or None, cursor).
        self._drawn: dict[int, tuple[int, int, Strip | None, bool]] = {}
        self.virtual_size = Size(self._table_width, 1)

    # -- the data ----------------------------------------------------------------------------------------

    def set_rows(self, records: Sequence[Any]) -> None:
        """Show these records in this order: every row of the table, of which only the visible ones get
        formatted. The table keeps the sequence as it is (no copy, no per-row work here but finding the
        cursor's record again), so a tick costs about the same at 5,000 rows as at 30."""
        cursor_key = self.cursor_key()
        self._records = records
        self._index = None
        self.cursor_row = self._find(cursor_key, self.cursor_row)
        if len(self._lines) > LINE_CACHE_MAX:
            self._lines.clear()
        self._set_row_count(len(records))
        self._refresh_changed_lines()

    def _refresh_changed_lines(self) -> None:
        """Repaint only the lines on screen that now draw differently (another row, other text, the
        cursor come or gone): an unchanged line costs Textual nothing then (styling, the compositor,
        the terminal write). The rows on screen are formatted here, as they would be when drawn."""
        scroll_y = self.scroll_offset.y
        width, height = self.size
        drawn = self._drawn
        if not drawn or not height:
            self.refresh()
            return
        records, cursor_row = self._records, self.cursor_row
        region_width = max(self._table_width, width)
        changed = []
        for y in range(1, height):
            index = scroll_y + y - 1
            line = self._row_line(index) if index < len(records) else None
            if drawn.get(y) != (scroll_y, width, line, index == cursor_row):
                changed.append(Region(0, y, region_width, 1))
        if changed:
            self.refresh(*changed)

    def _set_row_count(self, rows: int) -> None:
        """The table's virtual height (the rows and the header). Textual lays the whole screen out again
        when a virtual size changes, and then repaints the scrollbar and a second frame; while the table
        fills its box before and after (thousands of processes, a few coming or going every tick), its box
        cannot change, so only the scroll range is updated: the scrollbar, and a scroll position past the
        new end."""
        size = Size(self._table_width, rows + 1)
        old = self.virtual_size
        if size == old:
            return
        height = self.size.height
        if self.is_mounted and height and old.height > height and size.height > height:
            self.set_reactive(Widget.virtual_size, size)
            if self.show_vertical_scrollbar:
                bar = self.vertical_scrollbar
                if _thumb(bar, old.height) == _thumb(bar, size.height):
                    bar.set_reactive(ScrollBar.window_virtual_size, size.height)
                else:
                    bar.window_virtual_size = size.height
            self.scroll_y = self.validate_scroll_y(self.scroll_y)
        else:
            self.virtual_size = size

    def _find(self, key: Hashable | None, near: int) -> int:
        """Where the record of `key` is now (scanning only when it moved), else `near` within the rows."""
        records, row_key = self._records, self.row_key
        if key is not None:
            if near < len(records) and row_key(records[near]) == key:
                return near
            for i, record in enumerate(records):
                if row_key(record) == key:
                    return i
        return max(0, min(near, len(records) - 1))

    @property
    def row_count(self) -> int:
        return len(self._records)

    @property
    def keys(self) -> list[Hashable]:
        """Every row's key, in the order shown."""
        return [self.row_key(r) for r in self._records]

    def record(self, key: Hashable) -> Any:
        """The record shown under `key` (KeyError if none)."""
        if self._index is None:
            self._index = {self.row_key(r): i for i, r in enumerate(self._records)}
        return self._records[self._index[key]]

    def row_cells(self, key: Hashable) -> list[Text]:
        """The cells of one row as its columns render them (for tests and tools; drawing does not use it)."""
        record = self.record(key)
        return [self._as_text(c.render(record)) for c in self.columns_spec]

    def cursor_key(self) -> Any:
        """The key of the record under the cursor (None when the table is empty)."""
        if not 0 <= self.cursor_row < len(self._records):
            return None
        return self.row_key(self._records[self.cursor_row])

    def cursor_record(self) -> Any:
        """The record under the cursor (None when the table is empty)."""
        if not 0 <= self.cursor_row < len(self._records):
            return None
        return self._records[self.cursor_row]

    def set_header_marks(self, sort_field: str, reverse: bool) -> None:
        if self._marks != (sort_field, reverse):
            self._marks = (sort_field, reverse)
            self._header = None
            self.refresh()

    # -- drawing ----------------------------------------------------------------------------------------

    @staticmethod
    def _as_text(value: str | Text) -> Text:
        return Text(value) if isinstance(value, str) else value

    def _line(self, cells: Sequence[str | Text]) -> Strip:
        """One row: its cells, padded, with neighbouring text of the same style in one segment (the cells
        look the same; a row of mostly unstyled cells becomes a few segments instead of four a cell, and
        every later step of drawing it, styling, cropping, the compositor's cuts and the terminal write,
        costs per segment)."""
        console = self.app.console
        pad = " " * CELL_PADDING
        pad_segment = Segment(pad)
        segments: list[Segment] = []
        run, run_style = "", None  # text not yet made a segment, and its style
        for value, width in zip(cells, self._widths, strict=True):
            if isinstance(value, str) and "\n" not in value:
                room = width - cell_len(value)
                if room >= 0:  # most cells: a short plain string
                    if run_style is not None:
                        segments.append(Segment(run, run_style))
                        run, run_style = "", None
                    run += pad + value + " " * room + pad
                    continue
            for text, style, _control in (pad_segment, *cell_segments(value, width, console), pad_segment):
                if not text:
                    continue
                style = style or None  # a null style draws as none
                if style == run_style:
                    run += text
                    continue
                if run:
                    segments.append(Segment(run, run_style))
                run, run_style = text, style
        if run:
            segments.append(Segment(run, run_style))
        return Strip(segments, self._table_width)

    def _header_line(self) -> Strip:
        if self._header is None:
            field, reverse = self._marks or ("", False)
            labels = []
            for col, width in zip(self.columns_spec, self._widths, strict=True):
                if col.field != field:
                    labels.append(Text(col.label, style="bold"))
                    continue
                label = Text(col.label)  # shortened if need be, so that the mark always shows
                label.truncate(width - 2, overflow="ellipsis")
                labels.append(Text.assemble(label, " ▼" if reverse else " ▲", style="bold reverse"))
            self._header = self._line(labels)
        return self._header

    def _row_line(self, index: int) -> Strip:
        record = self._records[index]
        key = self.row_key(record)
        cached = self._lines.get(key)
        if cached is not None and (cached[0] is record or cached[0] == record):
            return cached[1]
        line = self._line([c.render(record) for c in self.columns_spec])
        self._lines[key] = (record, line)
        return line

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._styles.clear()

    def _style(self, component: str) -> Style:
        style = self._styles.get(component)
        if style is None:
            style = self._styles[component] = self.get_component_styles(component).rich_style
        return style

    def render_lines(self, crop: Region) -> list[Strip]:
        # The widget's style, scroll position and width, worked out once per redraw, not per line.
        self._base_style = self.rich_style
        self._frame = (*self.scroll_offset, self.size.width)
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y, width = self._frame
        base = self._base_style
        if y == 0:
            style = base + self._style("virtual-table--header")
            line = Strip(Segment.apply_style(self._header_line(), style))
            return line.crop_extend(scroll_x, scroll_x + width, style)
        index = scroll_y + y - 1
        if index >= len(self._records):
            self._drawn[y] = (scroll_y, width, None, index == self.cursor_row)
            return Strip.blank(width, base)
        row = self._row_line(index)
        self._drawn[y] = (scroll_y, width, row, index == self.cursor_row)
        if index == self.cursor_row:
            cursor = self._style("virtual-table--cursor")
            style = base + cursor
            post = Style.from_color(cursor.color, cursor.bgcolor)
            segments = Segment.apply_style(row, style, post)
        else:
            zebra = "virtual-table--odd-row" if index % 2 else "virtual-table--even-row"
            style = base + self._style(zebra)
            segments = Segment.apply_style(row, style)
        return Strip(segments).crop_extend(scroll_x, scroll_x + width, style)

    # -- moving -----------------------------------------------------------------------------------------

    @property
    def _page(self) -> int:
        """Rows that fit under the header."""
        return max(1, self.scrollable_content_region.height - 1)

    def move_cursor(self, row: int) -> None:
        """Put the cursor on row `row` (clamped) and scroll it into view."""
        if not self._records:
            return
        self.cursor_row = max(0, min(row, len(self._records) - 1))
        top = round(self.scroll_y)
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False)
        elif self.cursor_row >= top + self._page:
            self.scroll_to(y=self.cursor_row - self._page + 1, animate=False)
        self.refresh()

    def action_cursor_up(self) -> None:
        self.move_cursor(self.cursor_row - 1)

    def action_cursor_down(self) -> None:
        self.move_cursor(self.cursor_row + 1)

    def action_page_up(self) -> None:
        self.move_cursor(self.cursor_row - self._page)

    def action_page_down(self) -> None:
        self.move_cursor(self.cursor_row + self._page)

    def action_cursor_home(self) -> None:
        self.move_cursor(0)

    def action_cursor_end(self) -> None:
        self.move_cursor(len(self._records) - 1)

    def action_scroll_columns(self, step: int) -> None:
        self.scroll_to(x=self.scroll_x + step * 8, animate=False)

    def action_select_cursor(self) -> None:
        key = self.cursor_key()
        if key is not None:
            self.post_message(self.RowSelected(self, key, self._records[self.cursor_row]))

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        if offset.y == 0:  # the header: sort by the column clicked
            x = offset.x + round(self.scroll_x)
            for i, width in enumerate(self._widths):
                x -= width + 2 * CELL_PADDING
                if x < 0:
                    self.action_sort_column(i)
                    break
            return
        row = round(self.scroll_y) + offset.y - 1
        if row >= len(self._records):
            return
        if row == self.cursor_row:
            self.action_select_cursor()
        else:
            self.move_cursor(row)

    # -- sorting ----------------------------------------------------------------------------------------

    def action_sort_column(self, index: int) -> None:
        if self.sort_group is not None and index < len(self.columns_spec):
            self.app.sort_table(self.sort_group, self.columns_spec, index)  # type: ignore[attr-defined]

    def action_sort_reverse(self) -> None:
        if self.sort_group is not None:
            self.app.sort_table_reverse(self.sort_group)  # type: ignore[attr-defined]

    def action_sort_shift(self, step: int) -> None:
        if self.sort_group is not None:
            self.app.sort_table_shift(self.sort_group, self.columns_spec, step)  # type: ignore[attr-defined]


def _thumb(bar: ScrollBar, virtual_height: int) -> list[Segment]:
    """How a vertical scrollbar's thumb is drawn for a virtual height (Textual's own drawing of it)."""
    return ScrollBarRender.render_bar(
        size=bar.size.height, virtual_size=virtual_height, window_size=bar.window_size, position=bar.position
    ).segments


# The name the app's help screen (and older code) uses for the sortable table.
SortedTable = VirtualTable


def right(text: str, style: str = "") -> Text:
    return Text(text, justify="right", style=style)
