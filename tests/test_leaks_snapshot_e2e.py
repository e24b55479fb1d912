"""End-to-end through the live pipeline: outstanding kernel objects of a process holding pipes open, and a
process's own leaks once user-space tracking is started on it (as the drill-down's m key does), as the
snapshot's `leaks` list reports them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from memtop.config import Config
from memtop.export import snapshot_to_dict
from memtop.sources import LiveSource

from .test_leaks_e2e import LEAK_BLOCKS, LEAK_SIZE, PIPE_HOLDER, PIPES, Driven, leaky_binary  # noqa: F401

pytestmark = pytest.mark.bpf


def rows_through(doc: dict, function: str, pid: int) -> list[dict]:  # type: ignore[type-arg]
    return [r for r in doc["leaks"] if pid in r["pids"] and any(f.startswith(function) for f in r["stack"])]


def test_kernel_objects_held_and_released_and_a_process_own_leaks(leaky_binary: Path) -> None:  # noqa: F811
    holder = Driven([sys.executable, "-c", PIPE_HOLDER])
    leaky = Driven([str(leaky_binary)])
    source = LiveSource(Config(interval_s=0.5, leak_sample=1))
    source.start()
    source.set_leaks_visible(True)  # as the Leaks tab does: read every tick, not every 5 s
    try:
        source.tick()
        assert holder.send("open") == "opened"
        source.start_user_leaks(leaky.pid)
        assert leaky.send("run") == "ran"
        time.sleep(0.2)
        held = snapshot_to_dict(source.tick())
        assert holder.send("close") == "closed"
        time.sleep(0.2)
        released = snapshot_to_dict(source.tick())
        source.stop_user_leaks()
        stopped = snapshot_to_dict(source.tick())
    finally:
        source.close()
        holder.stop()
        leaky.stop()

    assert held["sample_rate"] == 1
    pipes = rows_through(held, "alloc_pipe_info", holder.pid)
    assert pipes, [r["top_frame"] for r in held["leaks"]][:20]
    assert sum(r["allocations"] for r in pipes) >= PIPES
    assert all(r["kind"] == "kernel" for r in pipes)
    assert not any(r["outstanding_bytes"] >= 0.5 * sum(p["outstanding_bytes"] for p in pipes)
                   for r in rows_through(released, "alloc_pipe_info", holder.pid))  # fmt: skip

    mine = rows_through(held, "memtop_test_leak_here", leaky.pid)
    assert len(mine) == 1 and mine[0]["kind"] == "user" and mine[0]["pid"] == leaky.pid
    assert mine[0]["outstanding_bytes"] >= 0.9 * LEAK_BLOCKS * LEAK_SIZE
    assert mine[0]["top_frame"].startswith("memtop_test_leak_here")
    assert held["leak_user_pid"] == leaky.pid and held["probes"]["leaks-user"]["status"] == "running"
    assert not rows_through(held, "memtop_test_churn", leaky.pid)  # allocated and freed: not outstanding
    assert stopped["leak_user_pid"] is None and "leaks-user" not in stopped["probes"]
    assert not [r for r in stopped["leaks"] if r["kind"] == "user"]
