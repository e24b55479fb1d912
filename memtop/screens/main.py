"""The main screen: header, one tab per panel (Processes, Containers, ...), and the filter box."""

from __future__ import annotations

from operator import attrgetter
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, Input, Static, TabbedContent, TabPane

from memtop.screens import MemtopScreen
from memtop.screens.leaks import OLDER_STEPS, LeakScreen, LeakTable, leak_note
from memtop.screens.oom import OomTable, oom_rows, where
from memtop.screens.tables import CONTAINER_COLUMNS, PROCESS_COLUMNS, process_row_key
from memtop.screens.tcp import (
    GROUPINGS,
    RESOLUTION_NOTE,
    TcpScreen,
    TcpTable,
    container_names,
    tcp_views,
)
from memtop.store import ContainerRow, ProcessRow, Snapshot, filter_containers, filter_rows, sort_rows
from memtop.tcp import filter_tcp_rows
from memtop.widgets import HeaderBar, VirtualTable

__all__ = ["PROCESS_COLUMNS", "MainScreen", "ProcessTable", "ContainerTable", "row_key"]

row_key = process_row_key
container_key = attrgetter("id")
PID = attrgetter("pid")  # the processes' tiebreak, as sort_rows's default but without a Python call a row

# (tab id, title, the key that jumps to it)
TABS: tuple[tuple[str, str, str], ...] = (
    ("processes", "Processes", "P"),
    ("containers", "Containers", "C"),
    ("leaks", "Leaks", "L"),
    ("oom", "OOM", "O"),
    ("tcp", "TCP", "T"),
)


def probe_problem(snap: Snapshot, name: str) -> str:
    """Why a panel's probe is not delivering ("" when it is, or in a replay that recorded it)."""
    probe = snap.probes.get(name)
    if probe is None:
        return "" if snap.replay else f"{name} probe not started"
    if probe.status in ("running", "replay"):
        return ""
    return f"{name} probe {probe.status}" + (f": {probe.detail}" if probe.detail else "")


class ProcessTable(VirtualTable):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(PROCESS_COLUMNS, sort_group="processes", row_key=row_key, **kwargs)


class ContainerTable(VirtualTable):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(CONTAINER_COLUMNS, sort_group="containers", row_key=container_key, **kwargs)


class MainScreen(MemtopScreen):
    BINDINGS = [
        Binding("enter", "drill", "Details", show=True),
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("tab", "next_tab(1)", "Next tab", show=False, priority=True),
        Binding("shift+tab", "next_tab(-1)", "Previous tab", show=False, priority=True),
        Binding("g", "tcp_grouping", "TCP: group by destination/process/container", show=False),
        Binding("o", "leak_older", "Leaks: hide younger than 10s/1m/5m/30m", show=False),
        *(Binding(key, f"show_tab('{tab}')", f"{title} tab", show=False) for tab, title, key in TABS),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filter_text = ""
        self._stale: set[str] = set()  # tabs not drawn from the latest snapshot (drawn when shown)
        self._labels: dict[str, str] = {}
        self.tcp_grouping = 0  # index into GROUPINGS

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        with TabbedContent(id="tabs"):
            with TabPane("Processes", id="processes"):
                yield ProcessTable(id="process-table")
            with TabPane("Containers", id="containers"):
                yield ContainerTable(id="container-table")
            with TabPane("Leaks", id="leaks"):
                yield Static(id="leaks-note")
                yield LeakTable(id="leak-table")
            with TabPane("OOM", id="oom"):
                yield Static(id="oom-note")
                yield OomTable(id="oom-table")
            with TabPane("TCP", id="tcp"):
                yield Static(id="tcp-note")
                yield TcpTable(id="tcp-table")
        yield Input(placeholder="filter — Enter keeps it, Esc clears", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(ProcessTable).focus()
        self.refresh_view()

    @property
    def active_tab(self) -> str:
        return self.query_one("#tabs", TabbedContent).active or "processes"

    @property
    def shows_leaks(self) -> bool:
        return self.is_mounted and self.active_tab == "leaks"

    def show_snapshot(self, snap: Snapshot) -> None:
        """Draw the shown tab from `snap`; the other tabs are drawn when they are shown (a tick costs one
        tab's filter and sort on raw values, and the tables format only the rows on screen)."""
        self._stale = {tab for tab, _, _ in TABS}
        self._show_tab(self.active_tab, snap)
        self._show_labels(snap)

    def _show_tab(self, tab: str, snap: Snapshot) -> None:
        self._stale.discard(tab)
        {
            "processes": self._show_processes,
            "containers": self._show_containers,
            "leaks": self._show_leaks,
            "oom": self._show_oom,
            "tcp": self._show_tcp,
        }[tab](snap)

    def _show_labels(self, snap: Snapshot) -> None:
        suffix = f" [filter: {self.filter_text}]" if self.filter_text else ""
        hidden = " [containers only]" if self.memtop.hide_host else ""
        labels = {
            "processes": f"Processes{hidden}{suffix}",
            "containers": f"Containers ({len(snap.containers)}){suffix}",
            "leaks": f"Leaks ({len(snap.leaks)})",
            "oom": f"OOM ({len(snap.oom_events)}){suffix}",
            "tcp": f"TCP ({len(snap.tcp_connect)}){suffix}",
        }
        if labels == self._labels:
            return
        tabs = self.query_one("#tabs", TabbedContent)
        for tab, label in labels.items():
            if self._labels.get(tab) != label:
                tabs.get_tab(tab).label = label  # type: ignore[assignment]
        self._labels = labels

    def _show_processes(self, snap: Snapshot) -> None:
        app = self.memtop
        processes = filter_rows(snap.processes, self.filter_text)
        if app.hide_host:
            processes = [r for r in processes if r.container_id is not None]
        sort = app.sort_for("processes")
        table = self.query_one(ProcessTable)
        table.set_rows(sort_rows(processes, sort, tiebreak=PID))
        table.set_header_marks(sort.column, sort.reverse)

    def _show_containers(self, snap: Snapshot) -> None:
        csort = self.memtop.sort_for("containers")
        containers = sort_rows(
            filter_containers(snap.containers, self.filter_text), csort, tiebreak=lambda c: c.id
        )
        ctable = self.query_one(ContainerTable)
        ctable.set_rows(containers)
        ctable.set_header_marks(csort.column, csort.reverse)

    def _show_oom(self, snap: Snapshot) -> None:
        osort = self.memtop.sort_for("oom")
        events = [
            (k, v)
            for k, v in oom_rows(snap)
            if not self.filter_text
            or self.filter_text.lower() in f"{v.victim_comm} {v.victim_pid} {where(v.event)}".lower()
        ]
        ordered = sort_rows([v for _, v in events], osort, tiebreak=lambda v: (v.time, v.victim_pid))
        otable = self.query_one(OomTable)
        otable.set_rows(ordered)
        otable.set_header_marks(osort.column, osort.reverse)
        problem = probe_problem(snap, "oom")
        kills = f"{snap.oom_kills_seen} kills seen live; " if not snap.replay else ""
        self.query_one("#oom-note", Static).update(
            Text.assemble(
                f"{kills}{len(snap.oom_events)} in the log",
                ' ("log": from the kernel log, before memtop started)',
                "  │ Enter: details and the minute before the kill",
                (f"  [{problem}]" if problem else "", "bold red"),
            ),
            layout=False,  # one line: no layout
        )

    def _show_leaks(self, snap: Snapshot) -> None:
        needle = self.filter_text.strip().lower()
        rows = [
            r
            for r in snap.leaks
            if not needle
            or needle in r.comm.lower()
            or needle in " ".join(r.stack).lower()
            or any(needle == str(p) for p in r.pids)
        ]
        lsort = self.memtop.sort_for("leaks")
        ordered = sort_rows(rows, lsort, tiebreak=lambda r: (r.kind, r.stack_id))
        table = self.query_one(LeakTable)
        table.set_rows(ordered)
        table.set_header_marks(lsort.column, lsort.reverse)
        note = leak_note(snap)
        problem = probe_problem(snap, "leaks")
        if problem:
            note.append(f"  [{problem}]", style="bold red")
        self.query_one("#leaks-note", Static).update(note, layout=False)  # one line: no layout

    def action_leak_older(self) -> None:
        app = self.memtop
        current = app.snapshot.leak_older_s if app.snapshot else 0.0
        later = [s for s in OLDER_STEPS if s > current]
        app.source.set_leak_older(later[0] if later else 0.0)
        app.refresh_now()

    def _show_tcp(self, snap: Snapshot) -> None:
        grouping, grouping_label = GROUPINGS[self.tcp_grouping]
        rows = filter_tcp_rows(snap.tcp_connect, self.filter_text, container_names(snap))
        views = tcp_views(snap, grouping, rows)
        tsort = self.memtop.sort_for("tcp")
        ordered = sort_rows(views, tsort, tiebreak=lambda v: (v.pid, v.daddr, v.dport))
        table = self.query_one(TcpTable)
        table.set_rows(ordered)
        table.set_header_marks(tsort.column, tsort.reverse)
        probe = snap.probes.get("tcp")
        status = (
            ""
            if probe is None or probe.status in ("running", "replay")
            else f"  [{probe.status}: {probe.detail}]"
        )
        slow = f"slow ≥ {snap.tcp_slow_ms} ms" if snap.tcp_slow_ms is not None else ""
        self.query_one("#tcp-note", Static).update(
            Text.assemble(
                ("grouping: ", "bold"),
                f"{grouping_label} (g)  │ {len(snap.tcp_slow_connects)} slow/failed, {slow}  │ "
                f"{snap.tcp_in_flight} in flight{_outcomes_lost(snap)}  │ ",
                (RESOLUTION_NOTE, "dim"),
                (f"  [{status}]" if status else "", "bold red"),
            ),
            layout=False,  # one line: no layout
        )

    def selected_process(self) -> ProcessRow | None:
        row: ProcessRow | None = self.query_one(ProcessTable).cursor_record()
        return row

    def selected_container(self) -> ContainerRow | None:
        row: ContainerRow | None = self.query_one(ContainerTable).cursor_record()
        return row

    # -- actions ----------------------------------------------------------------------------------

    def on_virtual_table_row_selected(self, event: VirtualTable.RowSelected) -> None:
        event.stop()
        self.action_drill()

    def action_tcp_grouping(self) -> None:
        if self.active_tab != "tcp":
            return
        self.tcp_grouping = (self.tcp_grouping + 1) % len(GROUPINGS)
        self.refresh_view()

    def action_drill(self) -> None:
        if self.active_tab == "leaks":
            key = self.query_one(LeakTable).cursor_key()
            if key is not None:
                self.app.push_screen(LeakScreen(key))
            return
        if self.active_tab == "tcp":
            key = self.query_one(TcpTable).cursor_key()
            if key is not None:
                self.app.push_screen(TcpScreen(key, GROUPINGS[self.tcp_grouping][0]))
            return
        if self.active_tab == "oom":
            key = self.query_one(OomTable).cursor_key()
            if key is not None:
                from memtop.screens.oom import OomScreen

                self.app.push_screen(OomScreen(key))
            return
        if self.active_tab == "containers":
            container = self.selected_container()
            if container is not None:
                self.memtop.open_container(container.id)
            return
        row = self.selected_process()
        if row is not None:
            self.memtop.open_process(row.key)

    def action_show_tab(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = tab
        self._show_if_stale(tab)
        self._focus_active_table()

    def action_next_tab(self, step: int) -> None:
        ids = [tab for tab, _, _ in TABS]
        current = self.active_tab
        index = (ids.index(current) + step) % len(ids) if current in ids else 0
        self.action_show_tab(ids[index])

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.memtop.sync_leaks_visible()
        self._show_if_stale(self.active_tab)
        self._focus_active_table()

    def _show_if_stale(self, tab: str) -> None:
        snap = self.memtop.snapshot
        if tab in self._stale and snap is not None:
            self._show_tab(tab, snap)

    def _focus_active_table(self) -> None:
        pane = self.query_one("#tabs", TabbedContent).active_pane
        if pane is not None:
            tables = pane.query(VirtualTable)
            if tables:
                tables.first().focus()

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
        self._focus_active_table()
        self.refresh_view()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self.refresh_view()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.filter_text = event.value
        if not self.filter_text:
            event.input.remove_class("visible")
        self._focus_active_table()
        self.refresh_view()

    def on_key(self, event: Any) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_focus:
            event.stop()
            self.action_clear_filter()


def _outcomes_lost(snap: Snapshot) -> str:
    """Connects whose outcome never reached memtop (closed out, not left in flight), when there are any."""
    lost = snap.drops.get("tcp_outcome_lost", 0)
    return f", {lost:,} outcome lost" if lost else ""
