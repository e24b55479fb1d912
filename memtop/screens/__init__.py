"""Textual screens. They receive Snapshots (apply through refresh_view) and never do I/O themselves."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.screen import Screen

from memtop.store import Snapshot
from memtop.widgets import HeaderBar

if TYPE_CHECKING:
    from memtop.app import MemtopApp


class MemtopScreen(Screen[None]):
    """A full screen with memtop's header: redrawn from the app's latest Snapshot on every tick."""

    @property
    def memtop(self) -> MemtopApp:
        return self.app  # type: ignore[return-value]

    def refresh_view(self) -> None:
        app = self.memtop
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
