"""The Textual app: a collector worker reads the source off the UI thread and posts Snapshots.

Threads never touch widgets: the worker calls source.tick() and posts SnapshotReady; the app stores
the Snapshot and asks the visible screens to redraw from it. The next tick is scheduled only after
the previous one has been applied, so a slow tick never piles up.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.timer import Timer

from memtop.config import Config
from memtop.errors import MemtopError
from memtop.sources import Source
from memtop.store import ProcessKey, Snapshot, SortKey

INTERVALS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
TAIL_MIN_MAX = 1 << 22


class SnapshotReady(Message):
    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class CollectFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class MemtopApp(App[None]):
    CSS_PATH = "memtop.tcss"
    TITLE = "memtop"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Help"),
        Binding("p", "toggle_pause", "Pause"),
        Binding("plus", "interval(1)", "Slower", show=False),
        Binding("minus", "interval(-1)", "Faster", show=False),
        Binding("e", "export", "Export"),
    ]

    def __init__(self, source: Source, config: Config, export_dir: Path | None = None) -> None:
        super().__init__()
        self.source = source
        self.config = config
        self.export_dir = export_dir or Path.cwd()
        self.snapshot: Snapshot | None = None
        self.paused = not source.live
        self.interval_s = config.interval_s
        self.tail_min_bytes = config.tail_min_bytes
        self.sort = SortKey("kmalloc_bytes_per_s", reverse=True)
        self._timer: Timer | None = None
        self.ticks = 0

    # -- lifecycle ------------------------------------------------------------------------------------

    def on_mount(self) -> None:
        from memtop.screens.main import MainScreen

        try:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, self.exit)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
            pass
        self.push_screen(MainScreen())
        self.collect()

    def schedule_next(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if not self.paused:
            self._timer = self.set_timer(self.interval_s, self.collect)

    @work(thread=True, exclusive=True, group="collect", exit_on_error=False)
    def collect(self) -> None:
        try:
            snap = self.source.tick()
        except Exception as exc:  # keep the UI alive and say what went wrong
            self.post_message(CollectFailed(f"{exc.__class__.__name__}: {exc}"))
            return
        self.post_message(SnapshotReady(snap))

    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        self.snapshot = message.snapshot
        self.ticks += 1
        self.redraw()
        self.schedule_next()

    def on_collect_failed(self, message: CollectFailed) -> None:
        self.notify(message.error, title="reading the probes failed", severity="error")
        self.schedule_next()

    def redraw(self) -> None:
        for screen in self.screen_stack:
            refresh = getattr(screen, "refresh_view", None)
            if refresh is not None and screen.is_mounted:
                refresh()

    # -- actions ---------------------------------------------------------------------------------------

    def action_help(self) -> None:
        from memtop.screens.help import HelpScreen, describe_bindings
        from memtop.screens.main import PROCESS_COLUMNS, MainScreen
        from memtop.screens.process import ProcessScreen

        sort_keys = [
            (str(i + 1), f"sort by {c.label} (again: reverse)") for i, c in enumerate(PROCESS_COLUMNS)
        ]
        sections = [
            (
                "Everywhere",
                [row for row in describe_bindings(self.BINDINGS) if row[0] != "Ctrl+C"]
                + [("Ctrl+C", "quit")],
            ),
            ("Processes", describe_bindings(MainScreen.BINDINGS) + sort_keys),
            ("Process details", describe_bindings(ProcessScreen.BINDINGS)),
        ]
        self.push_screen(HelpScreen(sections))

    def action_toggle_pause(self) -> None:
        if not self.source.live:
            self.notify("replay: the data is a recording and does not update")
            return
        self.paused = not self.paused
        self.redraw()
        if not self.paused:
            self.collect()
        else:
            self.schedule_next()

    def action_interval(self, direction: int) -> None:
        faster_or_equal = [i for i in INTERVALS if i <= self.interval_s]
        index = INTERVALS.index(faster_or_equal[-1]) if faster_or_equal else 0
        index = max(0, min(len(INTERVALS) - 1, index + direction))
        self.interval_s = INTERVALS[index]
        self.source.set_interval(self.interval_s)
        self.redraw()
        self.schedule_next()

    def action_sort(self, index: int) -> None:
        from memtop.screens.main import PROCESS_COLUMNS

        column = PROCESS_COLUMNS[index]
        if self.sort.column == column.field:
            self.sort = SortKey(column.field, not self.sort.reverse)
        else:  # numbers start biggest-first, names alphabetically
            self.sort = SortKey(column.field, reverse=column.numeric)
        self.redraw()

    def action_sort_shift(self, step: int) -> None:
        from memtop.screens.main import PROCESS_COLUMNS

        fields = [c.field for c in PROCESS_COLUMNS]
        index = (fields.index(self.sort.column) + step) % len(fields) if self.sort.column in fields else 0
        self.action_sort(index)

    def action_sort_reverse(self) -> None:
        self.sort = SortKey(self.sort.column, not self.sort.reverse)
        self.redraw()

    def open_process(self, key: ProcessKey) -> None:
        from memtop.screens.process import ProcessScreen

        self.source.set_focus(key)
        self.push_screen(ProcessScreen(key), callback=lambda _: self._focus_closed())
        # Fetch the focused data now (a paused live view stays frozen until resumed).
        if not (self.source.live and self.paused):
            self.collect()

    def _focus_closed(self) -> None:
        self.source.set_focus(None)

    def change_tail_min(self, direction: int) -> None:
        current = self.tail_min_bytes
        if direction > 0:
            self.tail_min_bytes = min(TAIL_MIN_MAX, current * 2 if current else 8)
        else:
            self.tail_min_bytes = current // 2 if current > 8 else 0
        self.source.set_tail_min_bytes(self.tail_min_bytes)

    def action_export(self) -> None:
        self.export_snapshot()

    @work(thread=True, exclusive=True, group="export", exit_on_error=False)
    def export_snapshot(self) -> None:
        from memtop.export import write_snapshot

        path = self.export_dir / time.strftime("memtop-%Y%m%d-%H%M%S.json")
        try:
            snap = self.source.tick(include_histories=True) if self.source.live else self.snapshot
            if snap is None:
                return
            written = write_snapshot(path, snap)
        except MemtopError as exc:
            self.call_from_thread(self.notify, str(exc), title="export failed", severity="error")
            return
        self.call_from_thread(self.notify, f"wrote {written}", title="snapshot exported")
