"""The bounded exit (memtop.lifecycle.ExitGuard), in child processes whose main thread hangs the way
Textual's did when its terminal went away (blocked on a full queue that nothing drains)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import REPO

HANGING_MAIN = """
import queue, sys, threading
from memtop.lifecycle import ExitGuard

def detach():
    with open(sys.argv[1], "a") as f:
        f.write("detached\\n")

guard = ExitGuard(detach, grace_s=float(sys.argv[2]))
guard.install_signals()
guard.install_thread_hook()
if sys.argv[3] == "thread-exception":
    threading.Thread(target=lambda: 1 / 0).start()
print("ready", flush=True)
q = queue.Queue(1)
q.put(1)
q.put(2)  # blocks forever: nothing drains the queue
"""


def start(tmp_path: Path, grace_s: float, mode: str = "") -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / "detach.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_MAIN, str(log), str(grace_s), mode or "-"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc, log


def test_a_signal_detaches_at_once_and_the_grace_period_ends_a_hung_main_thread(tmp_path: Path) -> None:
    proc, log = start(tmp_path, grace_s=1.0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert log.read_text() == "detached\n"  # once, though the watchdog detaches too


def test_a_second_signal_ends_it_at_once(tmp_path: Path) -> None:
    proc, log = start(tmp_path, grace_s=600.0)  # only the second signal can end it in time
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGHUP  # the first signal's code
    assert log.read_text() == "detached\n"


def test_an_exception_in_any_thread_detaches_and_exits(tmp_path: Path) -> None:
    proc, log = start(tmp_path, grace_s=0.5, mode="thread-exception")
    proc.wait(timeout=30)
    assert proc.returncode == 1
    assert log.read_text() == "detached\n"
    assert proc.stderr is not None and "ZeroDivisionError" in proc.stderr.read()
