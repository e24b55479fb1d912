"""The Textual app: a collector worker reads the source off the UI thread and posts Snapshots.

Threads never touch widgets: the worker calls source.tick() and posts SnapshotReady; the app stores
the Snapshot and asks the visible screens to redraw from it. The next tick is scheduled only after
the previous one has been applied, so a slow tick never piles up.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.timer import Timer

from memtop.config import Config
from memtop.errors import MemtopError
from memtop.leaks import UPROBE_COST_NOTE
from memtop.recording import Sink
from memtop.screens.timetravel import BINDINGS as TIME_TRAVEL_BINDINGS
from memtop.sources import Source
from memtop.store import ProcessKey, Snapshot, SortKey
from memtop.widgets import Column

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
        Binding("c", "toggle_host", "Containers only"),
        Binding("R", "toggle_record", "Record to /var/lib/memtop/memtop.db (again: stop)", show=False),
        *TIME_TRAVEL_BINDINGS,
    ]

    def __init__(
        self,
        source: Source,
        config: Config,
        export_dir: Path | None = None,
        on_exit: Callable[[int], None] | None = None,
        sinks: Sequence[Sink] = (),
    ) -> None:
        super().__init__()
        self.source = source
        # Called with the exit code before the UI shuts down: the CLI's ExitGuard detaches the probes
        # there, so no UI shutdown, however it ends, can leave them attached.
        self.on_exit = on_exit
        self.sinks = list(sinks)  # each new Snapshot goes to them too (--record); they only queue
        self.config = config
        self.export_dir = export_dir or Path.cwd()
        self.snapshot: Snapshot | None = None
        self.paused = not source.live
        self.interval_s = config.interval_s
        self.tail_min_bytes = config.tail_min_bytes
        # The sort order of each kind of table, kept here so it survives screens and tables being rebuilt.
        self.sorts: dict[str, SortKey] = {}
        self.hide_host = config.hide_host
        self._timer: Timer | None = None
        self.ticks = 0
        self._leaks_visible: bool | None = None  # as last told to the source (None: not yet)

    # -- lifecycle ------------------------------------------------------------------------------------

    def on_mount(self) -> None:
        from memtop.screens.main import MainScreen

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
        previous = self.snapshot
        self.snapshot = message.snapshot
        if self.source.live:
            for sink in self.sinks:
                sink.on_snapshot(message.snapshot)
        self.ticks += 1
        if self.ticks == 1:
            # What exists now (modules, widgets, the first rows) lives as long as the app: keep it out of
            # the collector's full passes, which otherwise rescan it every few ticks.
            gc.freeze()
        if previous is not None and message.snapshot.oom_kills_seen > previous.oom_kills_seen:
            self.announce_kills(message.snapshot, message.snapshot.oom_kills_seen - previous.oom_kills_seen)
        self.redraw()
        self.schedule_next()

    def announce_kills(self, snap: Snapshot, new: int) -> None:
        """A kill arriving while another panel is shown raises a notification (the header counts them)."""
        from memtop.screens.main import MainScreen
        from memtop.screens.oom import where

        if isinstance(self.screen, MainScreen) and self.screen.active_tab == "oom":
            return
        latest = next((e for e in snap.oom_events if e.source == "tracepoint"), None)
        if latest is None:
            return
        more = f" (+{new - 1} more)" if new > 1 else ""
        self.notify(
            f"{latest.victim_comm or '?'} (PID {latest.victim_pid}) in {where(latest)}{more}: press O",
            title="OOM kill",
            severity="warning",
            timeout=10,
        )

    def on_collect_failed(self, message: CollectFailed) -> None:
        self.notify(message.error, title="reading the probes failed", severity="error")
        self.schedule_next()

    def refresh_now(self) -> None:
        """Re-read the source now (a setting changed); a paused live view stays frozen."""
        if not (self.source.live and self.paused):
            self.collect()
        else:
            self.redraw()

    def redraw(self) -> None:
        for screen in self.screen_stack:
            refresh = getattr(screen, "refresh_view", None)
            if refresh is not None and screen.is_mounted:
                refresh()

    def sync_leaks_visible(self) -> None:
        """Tell the source whether kernel leak rows are on screen (the Leaks tab, a leak stack, a process's
        details): it reads the leak aggregates every tick only then. Called when a tab or a screen is
        shown or covered; told only on a change."""
        from memtop.screens import MemtopScreen

        visible = any(
            isinstance(screen, MemtopScreen) and screen.shows_leaks and screen.shown
            for screen in self.screen_stack
        )
        if visible != self._leaks_visible:
            self._leaks_visible = visible
            set_visible = getattr(self.source, "set_leaks_visible", None)  # test fakes may not have it
            if set_visible is not None:
                set_visible(visible)

    # -- actions ---------------------------------------------------------------------------------------

    async def action_quit(self) -> None:
        """q and Ctrl+C: detach first (on_exit), then leave."""
        if self.on_exit is not None:
            self.on_exit(0)
        self.exit(return_code=0)

    def action_help(self) -> None:
        from memtop.screens.container import ContainerScreen
        from memtop.screens.help import HelpScreen, describe_bindings
        from memtop.screens.main import MainScreen
        from memtop.screens.process import ProcessScreen
        from memtop.screens.tables import SORTABLE_TABLES
        from memtop.widgets import SORT_DIGITS, SortedTable

        sections = [
            (
                "Everywhere",
                [
                    row
                    for row in describe_bindings(self.BINDINGS)
                    if row[0] != "Ctrl+C" and not row[1].startswith("Recording:")
                ]
                + [("Ctrl+C", "quit")],
            ),
            (
                "Time travel (--replay of a recording made by memtop record)",
                [
                    (key, text.removeprefix("Recording: "))
                    for key, text in describe_bindings(TIME_TRAVEL_BINDINGS)
                ],
            ),
            (
                "Main screen",
                describe_bindings(MainScreen.BINDINGS),
            ),
            (
                "Any table",
                [row for row in describe_bindings(SortedTable.BINDINGS) if row[0] not in SORT_DIGITS],
            ),
        ]
        for _group, title, columns in SORTABLE_TABLES:
            sections.append(
                (
                    f"{title}: sort keys",
                    [
                        (SORT_DIGITS[i], f"sort by {c.label} (again: reverse)")
                        for i, c in enumerate(columns[:10])
                    ]
                    + [("< >", f"sort by {c.label} (no digit key)") for c in columns[10:]],
                )
            )
        sections += [
            ("Container details", describe_bindings(ContainerScreen.BINDINGS)),
            ("Process details", describe_bindings(ProcessScreen.BINDINGS)),
            ("Leak stack, OOM kill, TCP row details", [("Esc", "back")]),
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

    def action_toggle_record(self) -> None:
        """Start recording the live view into the default database (a sample every 5 s), or stop."""
        from memtop.recording import DEFAULT_DB, DEFAULT_INTERVAL_S, RecordingSink

        if not self.source.live:
            self.notify("replay: only the live view can be recorded")
            return
        recorders = [s for s in self.sinks if isinstance(s, RecordingSink)]
        if recorders:
            for sink in recorders:
                self.sinks.remove(sink)
                self._close_sink(sink)
            self.notify(f"recording stopped: {recorders[0].path}")
            return
        try:
            sink = RecordingSink(DEFAULT_DB, min_interval_s=DEFAULT_INTERVAL_S, report=self._sink_failed)
        except MemtopError as exc:
            self.notify(str(exc), title="cannot record", severity="error")
            return
        self.sinks.append(sink)
        self.notify(f"recording every {DEFAULT_INTERVAL_S:g}s to {DEFAULT_DB} (R again stops)")

    def _sink_failed(self, message: str) -> None:  # called from the writer thread
        with contextlib.suppress(RuntimeError):  # the app has stopped
            self.call_from_thread(self.notify, message, title="recording", severity="error")

    @work(thread=True, group="close-sink", exit_on_error=False)
    def _close_sink(self, sink: Sink) -> None:
        sink.close()  # writes what is queued: off the UI thread

    # -- time travel (a recording) ----------------------------------------------------------------------

    def action_travel_step(self, samples: int) -> None:
        from memtop.screens import timetravel

        timetravel.step(self, samples)

    def action_travel_jump(self, seconds: float) -> None:
        from memtop.screens import timetravel

        timetravel.jump(self, seconds)

    def action_travel_kill(self, direction: int) -> None:
        from memtop.screens import timetravel

        timetravel.kill(self, direction)

    def action_travel_goto(self) -> None:
        from memtop.screens import timetravel

        if timetravel.recording(self) is None:
            return

        def chosen(text: str | None) -> None:
            if text:
                timetravel.goto(self, text)

        self.push_screen(timetravel.JumpScreen(), callback=chosen)

    def action_interval(self, direction: int) -> None:
        faster_or_equal = [i for i in INTERVALS if i <= self.interval_s]
        index = INTERVALS.index(faster_or_equal[-1]) if faster_or_equal else 0
        index = max(0, min(len(INTERVALS) - 1, index + direction))
        self.interval_s = INTERVALS[index]
        self.source.set_interval(self.interval_s)
        self.redraw()
        self.schedule_next()

    @property
    def sort(self) -> SortKey:
        """The Processes table's order."""
        return self.sort_for("processes")

    def sort_for(self, group: str) -> SortKey:
        from memtop.screens.tables import DEFAULT_SORTS

        return self.sorts.get(group) or DEFAULT_SORTS.get(group, SortKey("kmalloc_bytes_per_s"))

    def sort_table(self, group: str, columns: Sequence[Column], index: int) -> None:
        column = columns[index]
        current = self.sort_for(group)
        if current.column == column.field:
            self.sorts[group] = SortKey(column.field, not current.reverse)
        else:  # numbers start biggest-first, names alphabetically
            self.sorts[group] = SortKey(column.field, reverse=column.numeric)
        self.redraw()

    def sort_table_shift(self, group: str, columns: Sequence[Column], step: int) -> None:
        fields = [c.field for c in columns]
        current = self.sort_for(group).column
        index = (fields.index(current) + step) % len(fields) if current in fields else 0
        self.sort_table(group, columns, index)

    def sort_table_reverse(self, group: str) -> None:
        current = self.sort_for(group)
        self.sorts[group] = SortKey(current.column, not current.reverse)
        self.redraw()

    def action_toggle_host(self) -> None:
        self.hide_host = not self.hide_host
        self.notify("host processes hidden" if self.hide_host else "host processes shown", timeout=2)
        self.redraw()

    def open_container(self, container_id: str) -> None:
        from memtop.screens.container import ContainerScreen

        self.source.set_focus_container(container_id)
        self.push_screen(ContainerScreen(container_id), callback=lambda _: self._container_closed())
        self.refresh_now()

    def _container_closed(self) -> None:
        self.source.set_focus_container(None)

    def open_process(self, key: ProcessKey) -> None:
        from memtop.screens.process import ProcessScreen

        self.source.set_focus(key)
        self.push_screen(ProcessScreen(key), callback=lambda _: self._focus_closed())
        self.refresh_now()  # the focused data now (a paused live view stays frozen until resumed)

    def _focus_closed(self) -> None:
        self.source.set_focus(None)

    def change_tail_min(self, direction: int) -> None:
        current = self.tail_min_bytes
        if direction > 0:
            self.tail_min_bytes = min(TAIL_MIN_MAX, current * 2 if current else 8)
        else:
            self.tail_min_bytes = current // 2 if current > 8 else 0
        self.source.set_tail_min_bytes(self.tail_min_bytes)

    def toggle_user_leaks(self, pid: int) -> None:
        """Start (or stop) tracking a process's user-space allocations; compiling runs off the UI thread."""
        snap = self.snapshot
        if snap is not None and snap.leak_user_pid == pid:
            self.source.stop_user_leaks()
            self.notify(f"stopped tracking PID {pid}'s allocations")
            self.refresh_now()
            return
        self.notify(f"attaching to PID {pid}'s allocator… ({UPROBE_COST_NOTE})", timeout=5)
        self._start_user_leaks(pid)

    @work(thread=True, exclusive=True, group="user-leaks", exit_on_error=False)
    def _start_user_leaks(self, pid: int) -> None:
        try:
            self.source.start_user_leaks(pid)
        except MemtopError as exc:
            self.call_from_thread(self.notify, str(exc), title="leak tracking failed", severity="error")
            return
        self.call_from_thread(self.notify, f"tracking PID {pid}'s malloc/free: see the Leaks rows below")
        self.call_from_thread(self.refresh_now)

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
