"""What every recorded source answers the same way: a snapshot file (sources.ReplaySource) and a recording
database (recording.RecordingSource) show data that was collected before, so nothing they are asked can
change what a kernel collects."""

from __future__ import annotations

from memtop.errors import MemtopError
from memtop.store import ProcessKey


class ReadOnlySource:
    """The Source methods a recording answers without a kernel: focus and the age filter are views of the
    recorded data; the interval, the tail and user-space tracking cannot change a recording."""

    live = False

    def __init__(self) -> None:
        self._focus: ProcessKey | None = None
        self._older_s = 0.0

    def set_focus(self, key: ProcessKey | None) -> None:
        self._focus = key

    def set_focus_container(self, container_id: str | None) -> None:
        pass  # a snapshot file holds the histories it was written with

    def set_interval(self, interval_s: float) -> None:
        pass

    def set_tail_min_bytes(self, min_bytes: int) -> None:
        pass  # a recording's tail is what it is

    def start_user_leaks(self, pid: int) -> None:
        raise MemtopError("replay: a recording cannot start tracking a process")

    def stop_user_leaks(self) -> None:
        pass

    def set_leak_older(self, older_s: float) -> None:
        self._older_s = older_s

    def set_leaks_visible(self, visible: bool) -> None:
        pass  # recorded rows are all there

    def close(self, exiting: bool = False) -> None:
        pass
