"""Time travel through a recording (`memtop --replay FILE.db`): step a sample, jump a minute or an
hour, jump to a typed time, jump to the previous or next OOM kill.

The keys are the app's (they work on every screen); the moves are the RecordingSource's, which only
changes which sample the next tick() returns, so every panel, sort, filter and drill-down redraws from
the recorded sample exactly as from a live one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label

from memtop import format as fmt
from memtop.recording import RecordingSource, parse_time

if TYPE_CHECKING:
    from memtop.app import MemtopApp

BINDINGS = [
    Binding("comma", "travel_step(-1)", "Recording: one sample back", show=False),
    Binding("full_stop", "travel_step(1)", "Recording: one sample forward", show=False),
    Binding("b", "travel_jump(-60)", "Recording: a minute back", show=False),
    Binding("f", "travel_jump(60)", "Recording: a minute forward", show=False),
    Binding("B", "travel_jump(-3600)", "Recording: an hour back", show=False),
    Binding("F", "travel_jump(3600)", "Recording: an hour forward", show=False),
    Binding("j", "travel_goto", "Recording: jump to a time (ISO 8601, HH:MM, 10m ago)", show=False),
    Binding("N", "travel_kill(-1)", "Recording: previous OOM kill", show=False),
    Binding("n", "travel_kill(1)", "Recording: next OOM kill", show=False),
]


def recording(app: MemtopApp) -> RecordingSource | None:
    source = app.source
    if isinstance(source, RecordingSource):
        return source
    app.notify("time travel needs a recording: memtop --replay FILE.db (made by memtop record)", timeout=4)
    return None


def _moved(app: MemtopApp, source: RecordingSource, moved: bool, end: str) -> None:
    if not moved:
        app.notify(end, timeout=2)
    app.refresh_now()


def step(app: MemtopApp, samples: int) -> None:
    source = recording(app)
    if source is not None:
        end = "the newest sample" if samples > 0 else "the oldest sample"
        _moved(app, source, source.step(samples), f"already at {end}")


def jump(app: MemtopApp, seconds: float) -> None:
    source = recording(app)
    if source is not None:
        end = "the newest sample" if seconds > 0 else "the oldest sample"
        _moved(app, source, source.jump(seconds), f"already at {end}")


def goto(app: MemtopApp, text: str) -> None:
    source = recording(app)
    if source is None:
        return
    try:
        when = parse_time(text)
    except ValueError as exc:
        app.notify(str(exc), title="jump", severity="error")
        return
    source.seek(when)
    first, last = source.span
    if not first <= when <= last + source_interval(source):
        app.notify(f"{fmt.datetime(when)} is outside the recording: showing the nearest sample", timeout=4)
    app.refresh_now()


def source_interval(source: RecordingSource) -> float:
    times = source.reader.times
    return times[-1] - times[-2] if len(times) > 1 else 0.0


def kill(app: MemtopApp, direction: int) -> None:
    source = recording(app)
    if source is None:
        return
    found = source.jump_kill(direction)
    if found is None:
        app.notify(f"no {'later' if direction > 0 else 'earlier'} OOM kill in this recording", timeout=3)
        return
    where = found.container_id[:12] if found.container_id else "the host"
    app.notify(
        f"{found.victim_comm or '?'} (PID {found.victim_pid}) in {where} at {fmt.datetime(found.t)}",
        title="OOM kill",
        timeout=6,
    )
    from memtop.screens.main import MainScreen

    if isinstance(app.screen, MainScreen):
        app.screen.action_show_tab("oom")
    app.refresh_now()


class JumpScreen(ModalScreen[str | None]):
    """Asks for the time to jump to."""

    DEFAULT_CSS = """
    JumpScreen { align: center middle; }
    JumpScreen > Vertical {
        width: 64; height: auto; border: round $accent; background: $surface; padding: 0 1;
    }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Jump to (ISO 8601, HH:MM, '10m ago'); Esc cancels")
            yield Input(placeholder="10m ago", id="jump-time")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
