"""Pilot (run_test) tests of the screens and keys, from a real recorded snapshot (no root needed)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from textual.pilot import Pilot

from memtop.app import INTERVALS, MemtopApp
from memtop.config import Config
from memtop.export import read_snapshot
from memtop.screens.help import HelpScreen
from memtop.screens.main import PROCESS_COLUMNS, MainScreen, ProcessTable
from memtop.screens.process import ProcessScreen
from memtop.screens.tables import CONTAINER_COLUMNS
from memtop.sources import ReplaySource
from memtop.widgets import SORT_DIGITS, VirtualTable

from .conftest import REPLAY

SIZE = (150, 40)


async def press(pilot: Pilot, *keys: str) -> None:
    """Press keys, then let every message they caused be handled: a loaded machine (CI) is slower to
    apply a filter or rebuild a table than the next line of the test is to look at it."""
    await pilot.press(*keys)
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()  # a refresh a key started (a thread worker)
    await pilot.pause()


def make_app(tmp_path: Path | None = None) -> MemtopApp:
    return MemtopApp(ReplaySource(REPLAY), Config(), export_dir=tmp_path)


def table_pids(app: MemtopApp) -> list[int]:
    return [pid for pid, _ in app.screen.query_one(ProcessTable).keys]


def widget_text(app: MemtopApp, selector: str) -> str:
    """What a Static shows, as plain text (its lines as rendered at the current size)."""
    widget = app.screen.query_one(selector)
    return "\n".join(strip.text for strip in widget.render_lines(widget.content_region.reset_offset))


def fixture_doc() -> dict:
    return json.loads(REPLAY.read_text())


async def test_main_screen_lists_every_process_sorted_by_kmalloc_rate() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, MainScreen)
        procs = fixture_doc()["processes"]
        expected = [p["pid"] for p in sorted(procs, key=lambda p: (-p["kmalloc_bytes_per_s"], p["pid"]))]
        assert table_pids(app) == expected
        assert app.paused  # replay is paused


async def test_a_key_per_column_sorts_and_again_reverses() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        pids = sorted(p["pid"] for p in fixture_doc()["processes"])
        await press(pilot, "1")  # PID, numeric: biggest first
        assert app.sort.column == "pid"
        assert table_pids(app) == pids[::-1]
        await press(pilot, "1")
        assert table_pids(app) == pids
        await press(pilot, "r")
        assert table_pids(app) == pids[::-1]
        await press(pilot, "3")  # COMMAND: alphabetical
        comms = [app.snapshot.process(k).comm.lower() for k in _keys(app)]
        assert comms == sorted(comms)
        await press(pilot, "4")  # CONTAINER: alphabetical
        assert app.sort.column == "container"
        await press(pilot, "0")  # the tenth column: RSS
        assert app.sort.column == "rss_bytes"
        await press(pilot, "greater_than_sign")  # wraps to the first column
        assert app.sort.column == PROCESS_COLUMNS[0].field


def _keys(app: MemtopApp):
    from memtop.store import ProcessKey

    return [ProcessKey(pid, start) for pid, start in app.screen.query_one(ProcessTable).keys]


async def test_filter_by_command_and_pid_then_escape_clears() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        total = len(table_pids(app))
        await press(pilot, "slash", *"python")
        await pilot.pause()
        shown = [app.snapshot.process(k) for k in _keys(app)]
        assert shown and all("python" in (r.comm + r.cmdline).lower() for r in shown)
        assert len(shown) < total
        await press(pilot, "enter")  # keep the filter, back to the table
        await pilot.pause()
        assert app.screen.query_one(ProcessTable).has_focus
        await press(pilot, "escape")
        await pilot.pause()
        assert len(table_pids(app)) == total
        focus_pid = str(fixture_doc()["focus"]["pid"])
        await press(pilot, "slash", *focus_pid, "enter")
        await pilot.pause()
        shown = [app.snapshot.process(k) for k in _keys(app)]
        assert int(focus_pid) in [r.pid for r in shown]
        # the recorder's own command line names the PID too (memtop snapshot --pid N)
        assert all(focus_pid in str(r.pid) or focus_pid in r.cmdline for r in shown)
        assert len(shown) < total


async def test_process_drilldown_shows_its_own_share_of_each_leak_stack(tmp_path: Path) -> None:
    """The drill-down's leak rows are the process's own share (focus.leaks), not the whole stack's."""
    doc = fixture_doc()
    pid = doc["focus"]["pid"]
    whole = dict(doc["leaks"][0], pids=[pid, 424242], pid=None, outstanding_bytes=9_000_000, allocations=900)
    whole["stack_id"] = 987_654  # a stack of its own
    whole["stack"] = ["memtop_share_marker+0x1", *whole["stack"][1:]]
    whole["top_frame"] = "memtop_share_marker"
    own = dict(whole, pids=[pid], pid=pid, outstanding_bytes=12_288, allocations=3)
    doc["leaks"] = [whole, *doc["leaks"]]
    doc["focus"]["leaks"] = [own]
    replay = tmp_path / "share.json"
    replay.write_text(json.dumps(doc))
    app = MemtopApp(ReplaySource(replay), Config())
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot, "slash", *str(pid), "enter")
        await press(pilot, "enter")
        assert isinstance(app.screen, ProcessScreen)
        table = app.screen.query_one("#process-leaks", VirtualTable)
        text = " ".join(str(cell) for key in table.keys for cell in table.row_cells(key))
        assert "memtop_share_marker" in text and "12.0 KiB" in text
        assert "8.6 MiB" not in text  # the whole stack's bytes belong to the Leaks tab


async def test_enter_drills_into_the_process_and_escape_returns() -> None:
    app = make_app()
    doc = fixture_doc()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await press(pilot, "slash", *str(doc["focus"]["pid"]), "enter")
        await press(pilot, "enter")
        await pilot.pause()
        assert isinstance(app.screen, ProcessScreen)
        assert app.screen.key.pid == doc["focus"]["pid"]
        sites = app.screen.query_one("#call-sites", VirtualTable)
        assert sites.row_count >= 1
        first_site = app.snapshot.focus.reading.call_sites[0]
        assert first_site.symbol.startswith("listxattr")
        details = widget_text(app, "#details")
        assert "python" in details and "cmdline" in details and "started" in details
        assert "listxattr" in widget_text(app, "#call-sites")
        assert "256 B" in widget_text(app, "#sizes")
        tail = widget_text(app, "#tail")
        assert "listxattr" in tail and "GFP_KERNEL" in tail
        await press(pilot, "escape")
        assert isinstance(app.screen, MainScreen)


async def test_help_lists_every_key() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await press(pilot, "question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = " ".join(f"{k} {d}" for _, rows in app.screen.sections for k, d in rows)
        for key in ("q", "?", "p", "+", "-", "e", "/", "r", "<", ">", "Enter", "Esc", "[", "]", "Ctrl+C"):
            assert key in text, key
        for columns in (PROCESS_COLUMNS, CONTAINER_COLUMNS):
            for i, column in enumerate(columns):
                assert f"sort by {column.label}" in text and SORT_DIGITS[i] in text
        await press(pilot, "escape")
        assert isinstance(app.screen, MainScreen)


async def test_pause_does_nothing_in_replay_and_interval_keys_step() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await press(pilot, "p")
        assert app.paused
        assert app.interval_s == 1.0
        await press(pilot, "plus")
        assert app.interval_s == INTERVALS[INTERVALS.index(1.0) + 1]
        await press(pilot, "minus", "minus")
        assert app.interval_s == INTERVALS[INTERVALS.index(1.0) - 1]


async def test_export_key_writes_a_snapshot_that_replays_the_same(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await press(pilot, "e")
        await app.workers.wait_for_complete()
        await pilot.pause()
    files = list(tmp_path.glob("memtop-*.json"))
    assert len(files) == 1
    again = read_snapshot(files[0])
    original = read_snapshot(REPLAY)
    assert [r.pid for r in again.processes] == [r.pid for r in original.processes]
    assert files[0].stat().st_mode & 0o777 == 0o600


async def test_q_quits() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await press(pilot, "q")
        await pilot.pause()
    assert app.return_code == 0 or app.return_code is None
    assert not app.is_running


# -- containers ----------------------------------------------------------------------------------------


async def test_containers_tab_lists_containers_sorts_and_drills_into_one() -> None:
    from memtop.screens.container import ContainerScreen
    from memtop.screens.main import ContainerTable

    app = make_app()
    doc = fixture_doc()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await press(pilot, "C")
        await pilot.pause()
        table = app.screen.query_one(ContainerTable)
        assert table.has_focus
        by_rate = sorted(doc["containers"], key=lambda c: -c["kmalloc_bytes_per_s"])
        assert table.keys == [c["id"] for c in by_rate]
        text = widget_text(app, "#container-table")
        assert "web-frontend" in text and "checkout-7d9f8" in text and "shop" in text
        assert "256.0 MiB" in text  # the docker container's limit
        await press(pilot, "9")  # LIMIT: biggest first, unlimited last
        assert app.sort_for("containers").column == "memory_limit_bytes"
        web = next(c for c in doc["containers"] if c["name"] == "web-frontend")
        assert table.keys[0] == web["id"]
        await press(pilot, *["up"] * len(table.keys))  # the cursor stayed on its container; go to the top
        await press(pilot, "enter")
        await pilot.pause()
        assert isinstance(app.screen, ContainerScreen) and app.screen.container_id == web["id"]
        details = widget_text(app, "#container-details")
        assert "web-frontend" in details and web["id"][:24] in details and "docker" in details
        procs = app.screen.query_one("#container-processes", VirtualTable)
        attributed = {p["pid"] for p in doc["processes"] if p["container_id"] == web["id"]}
        assert set(web["pids"]) <= attributed  # live ones, and those that exited
        assert {pid for pid, _ in procs.keys} == attributed
        await press(pilot, "enter")
        await pilot.pause()
        assert isinstance(app.screen, ProcessScreen) and app.screen.key.pid == web["pids"][0]
        assert web["id"] in widget_text(app, "#details") or "web-frontend" in widget_text(app, "#details")
        await press(pilot, "escape", "escape")
        assert isinstance(app.screen, MainScreen)


async def test_c_hides_host_processes_and_the_container_column_names_them() -> None:
    app = make_app()
    doc = fixture_doc()
    in_containers = {p["pid"] for p in doc["processes"] if p["container_id"]}
    assert in_containers and len(in_containers) < len(doc["processes"])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "web-frontend" in widget_text(app, "#process-table")
        await press(pilot, "c")
        await pilot.pause()
        assert set(table_pids(app)) == in_containers
        await press(pilot, "c")
        assert len(table_pids(app)) == len(doc["processes"])


# -- OOM log -------------------------------------------------------------------------------------------


async def test_oom_tab_lists_kills_and_enter_shows_the_kill_with_its_pre_kill_history() -> None:
    from memtop.screens.oom import OomScreen, OomTable

    app = make_app()
    doc = fixture_doc()
    kill = doc["oom_events"][0]
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await press(pilot, "O")
        await pilot.pause()
        table = app.screen.query_one(OomTable)
        assert table.has_focus and len(table.keys) == len(doc["oom_events"])
        text = widget_text(app, "#oom-table")
        assert str(kill["victim_pid"]) in text and "cgroup limit" in text
        assert f"{kill['namespace']}/{kill['pod_name']}" in text
        await press(pilot, "enter")
        await pilot.pause()
        assert isinstance(app.screen, OomScreen)
        details = widget_text(app, "#oom-details")
        assert kill["pod_name"] in details and kill["container_id"][:20] in details
        assert "48.0 MiB" in details  # the limit that was hit
        label = widget_text(app, "#oom-memory-label")
        assert "container's cgroup" in label and f"{len(kill['history'])} samples" in label
        await press(pilot, "escape")
        assert isinstance(app.screen, MainScreen)


async def test_a_new_kill_raises_a_notification_unless_the_oom_tab_is_shown() -> None:
    from dataclasses import replace

    from memtop.app import SnapshotReady

    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        snap = app.snapshot
        assert snap is not None
        app.post_message(SnapshotReady(replace(snap, oom_kills_seen=snap.oom_kills_seen + 1)))
        await pilot.pause()
        notes = list(app._notifications)
        assert len(notes) == 1 and notes[0].title == "OOM kill"
        assert str(snap.oom_events[0].victim_pid) in notes[0].message
        assert "OOM kills:" in widget_text(app, "#header")
        await press(pilot, "O")
        app.post_message(SnapshotReady(replace(snap, oom_kills_seen=snap.oom_kills_seen + 2)))
        await pilot.pause()
        assert len(list(app._notifications)) == 1  # the OOM tab is shown: no second notification


# -- TCP -----------------------------------------------------------------------------------------------


async def test_tcp_tab_groups_filters_and_drills_into_a_destination() -> None:
    from memtop.screens.tcp import TcpScreen, TcpTable

    app = make_app()
    doc = fixture_doc()
    failed = next(t for t in doc["tcp_connect"] if t["failed"])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await press(pilot, "T")
        await pilot.pause()
        table = app.screen.query_one(TcpTable)
        assert table.has_focus and len(table.keys) == len(doc["tcp_connect"])
        assert "process × destination" in widget_text(app, "#tcp-note")
        assert "within ×2" in widget_text(app, "#tcp-note")
        await press(pilot, "g")  # by destination: one row per (address, port)
        destinations = {(t["daddr"], t["dport"]) for t in doc["tcp_connect"]}
        assert len(table.keys) == len(destinations)
        await press(pilot, "g", "g", "g")  # by process, by container, back to process × destination
        assert len(table.keys) == len(doc["tcp_connect"])
        await press(pilot, "slash", *f"port:{failed['dport']}", "enter")
        await pilot.pause()
        assert len(table.keys) == 1
        assert "web-frontend" in widget_text(app, "#tcp-table")
        assert "LAST SLOW" in widget_text(app, "#tcp-table")  # the failed connect's time (TZ=UTC here)
        assert time.strftime("%H:%M:%S", time.gmtime(failed["last_slow_at"])) in widget_text(
            app, "#tcp-table"
        )
        await press(pilot, "enter")
        await pilot.pause()
        assert isinstance(app.screen, TcpScreen)
        assert "refused" in widget_text(app, "#tcp-slow")
        assert re.search(r"last interval p50 .* p90 .* p99 .* max ", widget_text(app, "#tcp-summary"))
        assert f"{failed['failed']} failed" in widget_text(app, "#tcp-summary")
        await press(pilot, "escape")
        assert isinstance(app.screen, MainScreen)


# -- leaks ---------------------------------------------------------------------------------------------


async def test_leaks_tab_sorts_by_growth_shows_the_stack_and_hides_young_allocations() -> None:
    from memtop.screens.leaks import LeakScreen, LeakTable

    app = make_app()
    doc = fixture_doc()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await press(pilot, "L")
        await pilot.pause()
        table = app.screen.query_one(LeakTable)
        assert table.has_focus and len(table.keys) == len(doc["leaks"])
        fastest = max(doc["leaks"], key=lambda r: r["growth_bytes_per_s"])
        assert table.keys[0] == f"{fastest['kind']}:{fastest['stack_id']}"
        note = widget_text(app, "#leaks-note")
        assert f"kernel: 1 in {doc['leak_sample_rates']['kernel']}" in note
        assert f"user PID {doc['leak_user_pid']}" in note
        leak = next(r for r in doc["leaks"] if r["top_frame"].startswith("memtop_test_leak_here"))
        assert table.keys[0] == f"user:{leak['stack_id']}"  # the leak grows fastest
        await press(pilot, "enter")
        await pilot.pause()
        assert isinstance(app.screen, LeakScreen)
        stack = widget_text(app, "#leak-stack")
        assert "memtop_test_leak_here" in stack and "run+" in stack and "main+" in stack
        await press(pilot, "escape")
        older = min(r["oldest_age_s"] for r in doc["leaks"]) + 1
        app.source.set_leak_older(older)  # (o steps through 10s, 1m, 5m, 30m)
        app.refresh_now()
        await app.workers.wait_for_complete()
        await pilot.pause()
        expected = [r for r in doc["leaks"] if r["oldest_age_s"] >= older]
        assert len(table.keys) == len(expected) < len(doc["leaks"])


async def test_process_drilldown_lists_that_process_leaks() -> None:
    app = make_app()
    doc = fixture_doc()
    pid = doc["leak_user_pid"]
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        row = next(r for r in app.snapshot.processes if r.pid == pid)
        app.open_process(row.key)  # (the recorder's own command line names the PID too)
        await pilot.pause()
        assert isinstance(app.screen, ProcessScreen) and app.screen.key.pid == pid
        rows = app.screen.query_one("#process-leaks", VirtualTable)
        assert len(rows.keys) == sum(1 for r in doc["leaks"] if pid in r["pids"])
        assert "memtop_test_leak_here" in widget_text(app, "#process-leaks")


class LeakViewSource(ReplaySource):
    """The replay, remembering what the UI told it about kernel leak rows being on screen."""

    def __init__(self) -> None:
        super().__init__(REPLAY)
        self.visible_calls: list[bool] = []

    def set_leaks_visible(self, visible: bool) -> None:
        self.visible_calls.append(visible)


async def test_the_source_is_told_while_kernel_leak_rows_are_on_screen() -> None:
    """The Leaks tab, a leak stack and a process's details show kernel leak rows: the source reads them
    every tick only while one of those is shown (the help over the Leaks tab still shows it)."""
    from memtop.screens.leaks import LeakScreen

    source = LeakViewSource()
    app = MemtopApp(source, Config())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert source.visible_calls == [False]
        await press(pilot, "L")
        assert source.visible_calls[-1] is True
        await press(pilot, "P")
        assert source.visible_calls[-1] is False
        await press(pilot, "tab", "tab")  # Processes -> Containers -> Leaks
        assert source.visible_calls[-1] is True
        await press(pilot, "question_mark")
        assert isinstance(app.screen, HelpScreen) and source.visible_calls[-1] is True
        await press(pilot, "escape")
        await press(pilot, "enter")
        assert isinstance(app.screen, LeakScreen) and source.visible_calls[-1] is True
        await press(pilot, "escape", "O")
        assert isinstance(app.screen, MainScreen) and source.visible_calls[-1] is False
        await press(pilot, "P", "enter")
        assert isinstance(app.screen, ProcessScreen) and source.visible_calls[-1] is True
        await press(pilot, "escape")
        assert isinstance(app.screen, MainScreen) and source.visible_calls[-1] is False
        # told only when it changes
        assert all(a != b for a, b in zip(source.visible_calls, source.visible_calls[1:], strict=False))
