"""End-to-end: every rate is over the window it is divided by. The kmalloc probe counts from its own
attach, while later probes still compile; a rate that divided those counts by a window starting after
every probe attached read 65,449/s for a process making exactly 50,000 calls/s."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memtop.config import Config
from memtop.sources import LiveSource

from .conftest import REPO

pytestmark = pytest.mark.bpf

RATE = 5_000  # listxattr calls per second, paced: one 256-byte kmalloc each
PACED = f"""
import os, sys, tempfile, time
path = tempfile.mkstemp()[1]
sys.stdout.write("ready\\n"); sys.stdout.flush()
start, done = time.monotonic(), 0
while True:
    due = int((time.monotonic() - start) * {RATE})
    while done < due:
        os.listxattr(path)
        done += 1
    time.sleep(0.0005)
"""


@pytest.fixture
def paced() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", PACED], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_headless_snapshot_rate_is_over_its_window(paced: subprocess.Popen[str], tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    result = subprocess.run(
        [sys.executable, "-m", "memtop", "snapshot", "--duration", "2", "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    row = next(p for p in doc["processes"] if p["pid"] == paced.pid)
    rate = row["kmalloc_calls_per_s"]
    assert abs(rate - RATE) <= 0.1 * RATE, (rate, doc["duration_s"])
    # The totals and the window agree with each other too.
    assert abs(row["kmalloc_calls"] / doc["duration_s"] - rate) <= 0.01 * RATE


def test_first_tick_rate_is_over_the_time_since_attach(paced: subprocess.Popen[str]) -> None:
    source = LiveSource(Config(interval_s=1.0))
    try:
        source.start()  # compiles every probe: seconds, while the kmalloc probe already counts
        time.sleep(1.0)
        snap = source.tick()
    finally:
        source.close()
    row = next(p for p in snap.processes if p.pid == paced.pid)
    assert abs(row.kmalloc_calls_per_s - RATE) <= 0.1 * RATE, row
    assert row.kmalloc_calls <= 1.1 * RATE * snap.duration_s, (row.kmalloc_calls, snap.duration_s)
