"""Textual screens. They receive Snapshots (apply through refresh_view) and never do I/O themselves."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.screen import Screen

from memtop.store import Snapshot
from memtop.widgets import HeaderBar

if TYPE_CHECKING:
    from memtop.app import MemtopApp


class MemtopScreen(Screen[None]):
    """A full screen with memtop's header: redrawn from the app's latest Snapshot on every tick while it
    is shown; a screen under another (a drill-down's parent) is redrawn when it is shown again."""

    _behind = False  # a tick arrived while another screen covered this one

    @property
    def memtop(self) -> MemtopApp:
        return self.app  # type: ignore[return-value]

    @property
    def shows_leaks(self) -> bool:
        """Whether this screen draws kernel leak rows: while one is shown, the source reads the leak
        aggregates every tick (otherwise only every few seconds)."""
        return False

    @property
    def shown(self) -> bool:
        """Whether this screen is on top, or just under a modal one (the help) that lets it show."""
        stack = self.app.screen_stack
        return bool(stack) and (
            stack[-1] is self or (stack[-1].is_modal and len(stack) > 1 and stack[-2] is self)
        )

    def on_screen_resume(self) -> None:
        self.memtop.sync_leaks_visible()
        if self._behind:
            self.refresh_view()

    def on_screen_suspend(self) -> None:
        self.memtop.sync_leaks_visible()

    def refresh_view(self) -> None:
        app = self.memtop
        self._behind = not self.shown
        if self._behind:
            return
        timeline = getattr(app.source, "timeline_text", None)  # a recording (time travel)
        span = getattr(app.source, "span_text", None)
        self.query_one(HeaderBar).show(
            app.snapshot,
            app.paused,
            app.interval_s,
            timeline=timeline() if timeline else "",
            span=span() if span else "",
        )
        if app.snapshot is not None:
            self.show_snapshot(app.snapshot)

    def show_snapshot(self, snap: Snapshot) -> None:
        raise NotImplementedError
