"""SVG snapshot tests of the layout, from the recorded replay fixture.

Update after an intended change with: .venv/bin/python -m pytest tests/test_snapshots.py --snapshot-update
(then look at the SVGs under tests/__snapshots__ before committing them).
"""

from memtop.app import MemtopApp
from memtop.config import Config
from memtop.sources import ReplaySource

from .conftest import REPLAY

SIZE = (150, 40)


def app() -> MemtopApp:
    return MemtopApp(ReplaySource(REPLAY), Config())


def test_main_screen(snap_compare) -> None:
    assert snap_compare(app(), terminal_size=SIZE)


def test_process_drilldown(snap_compare) -> None:
    import json

    pid = json.loads(REPLAY.read_text())["focus"]["pid"]
    keys = ["slash", *str(pid), "enter", "escape", "enter"]
    assert snap_compare(app(), terminal_size=SIZE, press=keys)


def test_help_screen(snap_compare) -> None:
    assert snap_compare(app(), terminal_size=SIZE, press=["question_mark"])


def test_containers_tab(snap_compare) -> None:
    assert snap_compare(app(), terminal_size=SIZE, press=["C"])


def test_container_drilldown(snap_compare) -> None:
    assert snap_compare(app(), terminal_size=SIZE, press=["C", "enter"])


def test_oom_tab(snap_compare) -> None:
    assert snap_compare(app(), terminal_size=SIZE, press=["O"])


def test_oom_detail(snap_compare) -> None:
    assert snap_compare(app(), terminal_size=SIZE, press=["O", "enter"])


def test_tcp_tab(snap_compare) -> None:
    assert snap_compare(app(), terminal_size=SIZE, press=["T"])


def test_tcp_detail(snap_compare) -> None:
    import json

    slow = max(json.loads(REPLAY.read_text())["tcp_connect"], key=lambda t: t["max_us"])
    assert snap_compare(
        app(), terminal_size=SIZE, press=["T", "slash", *f"port:{slow['dport']}", "enter", "enter"]
    )


def test_leaks_tab(snap_compare) -> None:
    assert snap_compare(app(), terminal_size=SIZE, press=["L"])


def test_leak_stack(snap_compare) -> None:
    assert snap_compare(app(), terminal_size=SIZE, press=["L", "enter"])


def test_oom_notification(snap_compare) -> None:
    """A kill arriving while another tab is shown: a toast naming the victim, and the header counter."""
    from dataclasses import replace

    from memtop.app import SnapshotReady

    async def a_new_kill(pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.pause()
        snap = pilot.app.snapshot
        pilot.app.post_message(SnapshotReady(replace(snap, oom_kills_seen=snap.oom_kills_seen + 1)))
        await pilot.pause()

    assert snap_compare(app(), terminal_size=SIZE, run_before=a_new_kill)
