"""End-to-end: a process's row follows its exec (name and command line), with the real probes."""

from __future__ import annotations

import subprocess
import time

import pytest

from memtop.config import Config
from memtop.sources import LiveSource

pytestmark = pytest.mark.bpf

EXEC_LATER = (
    "read line; exec /usr/bin/python3 -c 'import os, time\nwhile True: os.listxattr(\"/\"); time.sleep(0.01)'"
)


def test_a_row_shows_the_new_name_and_command_line_after_exec() -> None:
    source = LiveSource(Config(interval_s=0.5))
    proc = subprocess.Popen(["bash", "-c", EXEC_LATER], stdin=subprocess.PIPE, text=True)
    try:
        source.start()
        before = next(r for r in source.tick().processes if r.pid == proc.pid)
        assert before.comm == "bash" and before.cmdline.startswith("bash -c")
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while True:
            time.sleep(0.3)
            rows = [r for r in source.tick().processes if r.pid == proc.pid]
            if rows and rows[0].comm == "python3" or time.monotonic() > deadline:
                break
    finally:
        source.close()
        proc.kill()
        proc.wait()
    assert len(rows) == 1  # the same process: one row, not a new one
    row = rows[0]
    assert (row.comm, row.start_time) == ("python3", before.start_time)
    assert row.cmdline.startswith("/usr/bin/python3 -c import os, time")
    assert row.kmalloc_calls > 0


def test_a_quiet_process_that_becomes_a_zombie_is_marked_exited_at_the_next_tick() -> None:
    """A quiet process is read only every few ticks; its main thread's exit (sched:sched_process_exit,
    seen by the kmalloc probe) makes the next tick read it, so a zombie its parent has not reaped yet is not
    shown live for those ticks (it was, for up to QUIET_MAX_SKIP ticks)."""
    source = LiveSource(Config(interval_s=0.5))
    child = subprocess.Popen(["sleep", "600"])  # not waited for until the end: a zombie once killed
    try:
        source.start()
        for _ in range(30):  # until quiet: the scan would skip it next tick
            assert any(r.pid == child.pid and not r.exited for r in source.tick().processes)
            if source.procs._procs[child.pid].skip >= 1:
                break
            time.sleep(0.05)
        assert source.procs._procs[child.pid].skip >= 1
        child.kill()
        time.sleep(0.2)
        with open(f"/proc/{child.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie, still listed in /proc
        row = next(r for r in source.tick().processes if r.pid == child.pid)
    finally:
        source.close()
        child.kill()
        child.wait()
    assert row.exited
