"""The virtual table: the right rows in the right order after sort, filter, scroll and page keys, on a
replay of thousands of processes (Pilot), and only the visible rows formatted (no timing asserted)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from textual import events
from textual.app import App, ComposeResult
from textual.pilot import Pilot

from memtop.app import MemtopApp
from memtop.config import Config
from memtop.screens.main import PROCESS_COLUMNS, MainScreen, ProcessTable
from memtop.screens.process import ProcessScreen
from memtop.sources import ReplaySource
from memtop.widgets import Column, VirtualTable, right

from .conftest import REPLAY

SIZE = (200, 50)
MANY = 3000


def many_processes(tmp_path: Path, n: int = MANY) -> tuple[Path, list[dict[str, Any]]]:
    """The recorded replay with its processes multiplied to `n`: distinct pids, rates and RSS (some
    unknown, as for exited processes), names of mixed case; returns the file and its processes."""
    doc = json.loads(REPLAY.read_text())
    base = doc["processes"]
    rng = random.Random(10)
    rates = rng.sample(range(1, 50 * n), n)
    procs = []
    for i in range(n):
        p = dict(base[i % len(base)])
        p.pop("kmalloc_history", None)
        p["pid"] = 200_000 + 7 * i
        p["start_time"] = p["start_time"] + i
        p["comm"] = ("Worker" if i % 3 == 0 else "worker") + f"-{rng.randrange(10_000):04d}"
        p["cmdline"] = f"/usr/bin/{p['comm']} --shard {i}"
        p["kmalloc_bytes_per_s"] = float(rates[i])
        p["rss_bytes"] = None if i % 11 == 0 else rng.randrange(1 << 20, 1 << 32)
        procs.append(p)
    rng.shuffle(procs)  # the file's order is not the table's
    doc["processes"] = procs
    doc.pop("focus", None)
    path = tmp_path / f"many-{n}.json"
    path.write_text(json.dumps(doc))
    return path, procs


def expected_pids(procs: list[dict[str, Any]], field: str, reverse: bool) -> list[int]:
    """The order the table must show, worked out independently: by the raw value (names without
    case), unknown values below every known one, ties by pid."""
    by_pid = sorted(procs, key=lambda p: p["pid"])
    known = [p for p in by_pid if p[field] is not None]
    unknown = [p for p in by_pid if p[field] is None]

    def value(p: dict[str, Any]) -> Any:
        return p[field].lower() if isinstance(p[field], str) else p[field]

    ordered = sorted(known, key=value, reverse=reverse)
    return [p["pid"] for p in (ordered + unknown if reverse else unknown + ordered)]


async def press(pilot: Pilot, *keys: str) -> None:
    await pilot.press(*keys)
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def table(app: App[Any]) -> ProcessTable:
    return app.screen.query_one(ProcessTable)


def table_pids(app: App[Any]) -> list[int]:
    return [pid for pid, _ in table(app).keys]


def screen_rows(widget: VirtualTable) -> list[str]:
    """The table's lines as drawn on screen: the header, then one line per visible row."""
    lines = [strip.text for strip in widget.render_lines(widget.content_region.reset_offset)]
    return [line.rstrip() for line in lines]


def shown_pids(widget: VirtualTable) -> list[int]:
    """The PIDs of the rows drawn on screen, top to bottom (the first cell of each line)."""
    header, *rows = screen_rows(widget)
    assert header.split()[0] == "PID", header
    return [int(line.split()[0]) for line in rows if line.strip()]


def page(widget: VirtualTable) -> int:
    return widget.scrollable_content_region.height - 1  # the header takes a line


async def test_thousands_of_processes_sorted_by_rate_and_only_the_first_screen_drawn(tmp_path: Path) -> None:
    path, procs = many_processes(tmp_path)
    app = MemtopApp(ReplaySource(path), Config())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        t = table(app)
        expected = expected_pids(procs, "kmalloc_bytes_per_s", reverse=True)
        assert table_pids(app) == expected and t.row_count == MANY
        shown = shown_pids(t)
        assert shown == expected[: page(t)] and len(shown) > 20
        assert "KMALLOC/s ▼" in screen_rows(t)[0]
        assert t.cursor_key() == (
            expected[0],
            next(p["start_time"] for p in procs if p["pid"] == expected[0]),
        )


async def test_sort_keys_order_all_rows_by_raw_values_and_again_reverses(tmp_path: Path) -> None:
    path, procs = many_processes(tmp_path)
    app = MemtopApp(ReplaySource(path), Config())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        t = table(app)
        for key, field, reverse, mark in (
            ("1", "pid", True, "PID ▼"),  # numbers: biggest first
            ("1", "pid", False, "PID ▲"),  # again: reversed
            ("0", "rss_bytes", True, "RSS ▼"),  # unknown RSS below every known one
            ("r", "rss_bytes", False, "RSS ▲"),
            ("3", "comm", False, "COMMAND ▲"),  # names: alphabetical, whatever their case
            ("3", "comm", True, "COMMAND ▼"),
            ("5", "kmalloc_bytes_per_s", True, "KMALLOC/s ▼"),
        ):
            await press(pilot, key)
            expected = expected_pids(procs, field, reverse)
            assert table_pids(app) == expected, (key, field, reverse)
            assert shown_pids(t) == expected[: page(t)], (key, field, reverse)
            assert mark in screen_rows(t)[0]
        # the RSS column of unknowns says so, at the bottom when biggest first
        await press(pilot, "0", "end")
        assert screen_rows(t)[-1].split()[-1] == "-"
        # a click on a column's header sorts by it, as its key does
        x = sum(c.width + 2 for c in PROCESS_COLUMNS[:3]) + 1  # in CONTAINER, the fourth column
        await pilot.click(ProcessTable, offset=(x, 0))
        await pilot.pause()
        assert app.sort.column == "container" and "CONTAINER ▲" in screen_rows(t)[0]


async def test_filter_keeps_the_matching_rows_in_order(tmp_path: Path) -> None:
    path, procs = many_processes(tmp_path)
    app = MemtopApp(ReplaySource(path), Config())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await press(pilot, "end")  # scrolled to the bottom of 3,000: the few left must show
        await press(pilot, "slash", *"--shard 12", "enter")
        matching = [p for p in procs if "--shard 12" in p["cmdline"]]
        assert 1 < len(matching) < 200
        expected = expected_pids(matching, "kmalloc_bytes_per_s", reverse=True)
        assert table_pids(app) == expected
        # still at the bottom, of the rows left; the cursor (its process filtered out) on the last
        assert shown_pids(table(app)) == expected[-page(table(app)) :]
        assert table(app).cursor_key()[0] == expected[-1]
        await press(pilot, "home")
        assert shown_pids(table(app)) == expected[: page(table(app))]
        await press(pilot, "escape")
        assert len(table_pids(app)) == MANY


async def test_page_end_and_home_keys_scroll_the_window_with_the_cursor(tmp_path: Path) -> None:
    path, procs = many_processes(tmp_path)
    app = MemtopApp(ReplaySource(path), Config())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        t = table(app)
        order = expected_pids(procs, "kmalloc_bytes_per_s", reverse=True)
        rows = page(t)
        await press(pilot, "pagedown")
        assert t.cursor_row == rows and t.cursor_key()[0] == order[rows]
        assert shown_pids(t) == order[1 : rows + 1]  # the cursor's row is the last on screen
        await press(pilot, "pagedown", "pagedown")
        assert t.cursor_key()[0] == order[3 * rows]
        assert shown_pids(t)[-1] == order[3 * rows]
        await press(pilot, "pageup")
        assert t.cursor_key()[0] == order[2 * rows]
        assert order[2 * rows] in shown_pids(t)
        await press(pilot, "end")
        assert t.cursor_row == MANY - 1
        assert shown_pids(t) == order[-rows:]
        await press(pilot, "up", "up")
        assert t.cursor_key()[0] == order[-3] and shown_pids(t) == order[-rows:]
        await press(pilot, "home")
        assert t.cursor_row == 0 and shown_pids(t) == order[:rows]
        await press(pilot, "down", "down", "down")
        assert t.cursor_key()[0] == order[3] and shown_pids(t) == order[:rows]
        # the mouse wheel scrolls the window without moving the cursor
        t.post_message(events.MouseScrollDown(t, 5, 5, 0, 1, 0, False, False, False))
        await pilot.pause()
        assert shown_pids(t)[0] != order[0] and t.cursor_key()[0] == order[3]


async def test_cursor_stays_on_its_process_across_a_resort_and_a_new_tick(tmp_path: Path) -> None:
    from dataclasses import replace

    from memtop.app import SnapshotReady

    path, procs = many_processes(tmp_path)
    app = MemtopApp(ReplaySource(path), Config())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        t = table(app)
        await press(pilot, "pagedown", "down", "down")
        chosen = t.cursor_key()
        assert chosen is not None and t.cursor_row > 2
        for key, field, reverse in (("0", "rss_bytes", True), ("3", "comm", False), ("r", "comm", True)):
            await press(pilot, key)
            order = expected_pids(procs, field, reverse)
            assert t.cursor_key() == chosen, key
            assert t.cursor_row == order.index(chosen[0])
            assert t.cursor_record().pid == chosen[0]
        # a new tick in which the process moved (now the busiest): the cursor goes with it
        await press(pilot, "5")
        snap = app.snapshot
        assert snap is not None
        moved = tuple(
            replace(r, kmalloc_bytes_per_s=1e12) if (r.pid, r.start_time) == chosen else r
            for r in snap.processes
        )
        app.post_message(SnapshotReady(replace(snap, processes=moved)))
        await pilot.pause()
        assert t.cursor_key() == chosen and t.cursor_row == 0
        # and Enter opens the process under the cursor
        await press(pilot, "end", "enter")
        assert isinstance(app.screen, ProcessScreen)
        last = expected_pids(procs, "kmalloc_bytes_per_s", reverse=True)[-1]
        assert app.screen.key.pid == last
        await press(pilot, "escape")
        assert isinstance(app.screen, MainScreen)


async def test_a_process_that_left_the_data_leaves_the_cursor_where_it_was(tmp_path: Path) -> None:
    from dataclasses import replace

    from memtop.app import SnapshotReady

    path, _ = many_processes(tmp_path)
    app = MemtopApp(ReplaySource(path), Config())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        t = table(app)
        await press(pilot, "down", "down", "down", "down", "down")
        gone = t.cursor_key()
        snap = app.snapshot
        assert snap is not None
        rest = tuple(r for r in snap.processes if (r.pid, r.start_time) != gone)
        app.post_message(SnapshotReady(replace(snap, processes=rest)))
        await pilot.pause()
        assert t.cursor_row == 5 and t.cursor_key() != gone and t.row_count == MANY - 1


async def test_hidden_tabs_are_drawn_when_shown(tmp_path: Path) -> None:
    """A tick sorts only the shown tab; another tab shows the latest data as soon as it is shown."""
    from dataclasses import replace

    from memtop.app import SnapshotReady
    from memtop.screens.main import ContainerTable

    path, _ = many_processes(tmp_path, n=300)
    app = MemtopApp(ReplaySource(path), Config())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        containers = app.screen.query_one(ContainerTable)
        assert containers.row_count == 0  # never shown yet: never sorted
        snap = app.snapshot
        assert snap is not None
        app.post_message(SnapshotReady(replace(snap, containers=snap.containers[:1])))
        await pilot.pause()
        assert containers.row_count == 0
        await press(pilot, "C")
        assert containers.keys == [snap.containers[0].id]
        await press(pilot, "P")
        assert table(app).row_count == 300


# -- the widget alone --------------------------------------------------------------------------------------


class Row:
    def __init__(self, n: int) -> None:
        self.n = n
        self.name = f"row-{n:05d}"


class CountingTable(App[None]):
    """A VirtualTable of `rows` records whose columns count how often they are rendered."""

    def __init__(self, rows: int, columns: int = 8) -> None:
        super().__init__()
        self.calls = 0
        self.records = [Row(i) for i in range(rows)]
        self.selected: list[Row] = []

        def render(field: str) -> Any:
            def draw(row: Row) -> Any:
                self.calls += 1
                return right(str(getattr(row, field))) if field == "n" else getattr(row, field)

            return draw

        self.columns = [
            Column("n" if i % 2 == 0 else "name", f"COL{i}", render("n" if i % 2 == 0 else "name"), width=12)
            for i in range(columns)
        ]

    def compose(self) -> ComposeResult:
        yield VirtualTable(self.columns, row_key=lambda r: r.n)

    def on_mount(self) -> None:
        self.query_one(VirtualTable).set_rows(self.records)

    def on_virtual_table_row_selected(self, event: VirtualTable.RowSelected) -> None:
        self.selected.append(event.record)


async def test_only_the_visible_rows_are_formatted() -> None:
    app = CountingTable(5000)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        t = app.query_one(VirtualTable)
        visible = page(t)
        assert 40 <= visible < 50
        cells_per_screen = visible * len(app.columns)
        assert 0 < app.calls <= 2 * cells_per_screen  # one screen's rows, not 5,000
        for keys in (["pagedown"] * 3, ["end"], ["pageup"], ["home"]):
            before = app.calls
            await pilot.press(*keys)
            await pilot.pause()
            assert app.calls - before <= (len(keys) + 1) * cells_per_screen, keys
        # a new tick with the same records draws nothing new; new records only the visible ones
        before = app.calls
        t.set_rows(app.records)
        await pilot.pause()
        assert app.calls == before
        t.set_rows([Row(i) for i in range(5000)])
        await pilot.pause()
        assert 0 < app.calls - before <= cells_per_screen
        assert app.calls < 12 * cells_per_screen  # in all: a few screens' worth, of 40,000 cells


async def test_wide_tables_scroll_sideways_and_clicks_move_the_cursor() -> None:
    app = CountingTable(100, columns=10)  # 10 columns of 14 cells: wider than 80
    async with app.run_test(size=(80, 20)) as pilot:
        await pilot.pause()
        t = app.query_one(VirtualTable)
        t.focus()
        assert screen_rows(t)[0].split()[0] == "COL0"
        await pilot.press("right", "right", "right")
        await pilot.pause()
        assert t.scroll_x > 0 and screen_rows(t)[0].split()[0] != "COL0"
        await pilot.press("left", "left", "left")
        await pilot.pause()
        assert t.scroll_x == 0
        await pilot.click(VirtualTable, offset=(3, 4))  # the fourth row under the header
        await pilot.pause()
        assert t.cursor_row == 3
        assert app.selected == []
        await pilot.click(VirtualTable, offset=(3, 4))  # the cursor's row again: selects it
        await pilot.pause()
        assert [r.n for r in app.selected] == [3]


async def test_the_main_screen_under_a_drilldown_is_redrawn_when_shown_again(tmp_path: Path) -> None:
    from dataclasses import replace

    from memtop.app import SnapshotReady

    path, _ = many_processes(tmp_path, n=300)
    app = MemtopApp(ReplaySource(path), Config())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        main = app.screen
        t = table(app)
        await press(pilot, "enter")
        assert isinstance(app.screen, ProcessScreen)
        snap = app.snapshot
        assert snap is not None
        app.post_message(SnapshotReady(replace(snap, processes=snap.processes[:100])))
        await pilot.pause()
        assert t.row_count == 300  # not drawn while covered
        await press(pilot, "escape")
        assert app.screen is main and t.row_count == 100


async def test_a_changing_row_count_updates_the_scroll_range_without_laying_the_screen_out() -> None:
    """Thousands of rows, a few more or fewer every tick: the table's box cannot change, so the screen is
    not laid out again, yet the scrollbar, End and a window past the new end follow the new count."""
    app = CountingTable(5000)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        t = app.query_one(VirtualTable)
        t.focus()
        reflows = 0
        compositor = app.screen._compositor
        reflow = compositor.reflow

        def counting_reflow(*args: Any, **kwargs: Any) -> Any:
            nonlocal reflows
            reflows += 1
            return reflow(*args, **kwargs)

        compositor.reflow = counting_reflow  # type: ignore[method-assign]
        for rows in (5003, 4990, 5000):
            t.set_rows([Row(i) for i in range(rows)])
            await pilot.pause()
            assert t.virtual_size.height == rows + 1
            assert t.vertical_scrollbar.window_virtual_size == rows + 1
        assert reflows == 0
        await pilot.press("end")
        await pilot.pause()
        assert t.cursor_row == 4999 and screen_rows(t)[-1].split()[0] == "4999"
        # fewer rows while the window shows the end: it moves up, with no blank line at the bottom
        t.set_rows([Row(i) for i in range(4980)])
        await pilot.pause()
        assert t.scroll_y == t.max_scroll_y and screen_rows(t)[-1].split()[0] == "4979"
        assert t.cursor_row == 4979
        # a table that comes to fit its box is laid out again (its box shrinks)
        t.set_rows([Row(i) for i in range(5)])
        await pilot.pause()
        assert reflows > 0 and t.size.height == 6 and not t.show_vertical_scrollbar


async def test_a_row_is_a_few_segments_and_looks_the_same() -> None:
    """Neighbouring cells of the same style are drawn as one segment: the text and each cell's style are
    as the cells render them (padding unstyled, a styled cell styled, right and left alignment)."""
    from rich.style import Style
    from rich.text import Text

    columns = [
        Column("a", "A", lambda r: right(r[0]), width=6),
        Column("b", "B", lambda r: r[1], numeric=False, width=5),
        Column("c", "C", lambda r: Text(r[2], style="bold"), numeric=False, width=4),
        Column("d", "D", lambda r: Text.assemble("x", ("y", "italic")), numeric=False, width=3),
        Column("e", "E", lambda r: "toolongvalue", numeric=False, width=5),
    ]

    class One(App[None]):
        def compose(self) -> ComposeResult:
            yield VirtualTable(columns, row_key=lambda r: r)

    app = One()
    async with app.run_test(size=(60, 5)):
        t = app.query_one(VirtualTable)
        strip = t._line([c.render(("12", "ab", "cd")) for c in columns])
        assert strip.text == "     12  ab     cd    xy   tool… "
        assert strip.cell_length == t._table_width
        bold, italic = Style.parse("bold"), Style.parse("italic")
        assert [(s.text, s.style) for s in strip] == [
            ("     12  ab     ", None),
            ("cd", bold),
            ("    x", None),
            ("y", italic),
            ("   tool… ", None),
        ]


async def test_a_tick_repaints_only_the_lines_that_changed() -> None:
    app = CountingTable(5000)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        t = app.query_one(VirtualTable)
        painted: list[int] = []
        render_line = t.render_line

        def counting_render_line(y: int) -> Any:
            painted.append(y)
            return render_line(y)

        t.render_line = counting_render_line  # type: ignore[method-assign]
        records = list(app.records)
        records[3] = Row(3)
        records[3].name = "renamed"
        t.set_rows(records)
        await pilot.pause()
        assert painted == [4]  # row 3, under the header
        assert "renamed" in screen_rows(t)[4] and "row-00004" in screen_rows(t)[5]
        # a row gone: every line under it shows the next row; the cursor's record moved
        painted.clear()
        t.set_rows(records[:2] + records[3:])
        await pilot.pause()
        assert painted == list(range(3, page(t) + 1))
        assert [int(line.split()[0]) for line in screen_rows(t)[1:4]] == [0, 1, 3]
