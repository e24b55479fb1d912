"""The Leaks note's user-mode part: estimates are said to be estimates, and why tracking failed is shown."""

from __future__ import annotations

from memtop.leaks import KIND_USER, LeakReading
from memtop.model import ProbeStatus
from memtop.screens.leaks import sampling_text
from memtop.store import HostInfo, Store


def store() -> Store:
    return Store(HostInfo("h", "6.18"), started_at=1000.0)


def test_user_rows_are_called_estimates_when_sampled() -> None:
    s = store()
    s.leak_user_pid = 42
    s.ingest_leaks(1001.0, LeakReading(kind=KIND_USER, stacks=(), sample_rate=64, now_ns=1))
    assert "user PID 42: 1 in 64 (estimates)" in sampling_text(s.snapshot(1001.0))
    s.ingest_leaks(1002.0, LeakReading(kind=KIND_USER, stacks=(), sample_rate=1, now_ns=2))
    text = sampling_text(s.snapshot(1002.0))
    assert "user PID 42: 1 in 1" in text and "estimates" not in text.split("user")[1]


def test_why_user_tracking_failed_is_shown() -> None:
    s = store()
    reason = "PID 7: no object exports malloc (a static executable without symbols): not followed"
    s.probes["leaks-user"] = ProbeStatus("error", reason)
    assert reason in sampling_text(s.snapshot(1001.0))
