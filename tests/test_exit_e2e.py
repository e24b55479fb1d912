"""End-to-end: a TUI whose terminal goes away (an ssh connection drops, a tmux server is killed) on a busy
host exits and detaches every program, every time. Its UI library's shutdown hung on such a terminal
(the writer thread's queue full, nothing draining it): memtop must not depend on it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_bpf_e2e import _kmalloc_attached, loaded_prog_ids, wait_for
from .tui_pty import TuiInPty

pytestmark = pytest.mark.bpf

BUSY_SOURCE = Path(__file__).parent / "data" / "busy_children.c"
BUSY_PROCESSES = 300  # each makes a kmalloc every 100 ms: 3,000 kmallocs/s and a long process table
EXIT_BOUND_S = 5.0  # the bound: gone, with its programs unloaded, within 5 s


@pytest.fixture(scope="module")
def busy_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    exe = tmp_path_factory.mktemp("busy") / "busy_children"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(BUSY_SOURCE)], check=True)
    load = subprocess.Popen([str(exe), str(BUSY_PROCESSES), "100"], stdout=subprocess.PIPE, text=True)
    try:
        assert load.stdout is not None and load.stdout.readline().startswith("ready")
        yield
    finally:
        load.kill()
        load.wait()


@pytest.mark.parametrize(
    ("round_", "drain"),
    [(i, drain) for drain in (True, False) for i in range(3)],
    ids=[f"{'draining' if d else 'stalled'}-{i}" for d in (True, False) for i in range(3)],
)
def test_a_lost_terminal_under_load_detaches_and_exits(busy_host: None, round_: int, drain: bool) -> None:
    """The pty's master is closed while the TUI runs: the kernel hangs the terminal up (SIGHUP, then EIO
    on every read and write). `stalled`: nobody read the terminal for a while first, so the UI's writes
    were blocked and its writer queue full, as over a stalled ssh connection."""
    tui = TuiInPty(["--interval", "0.25"], size=(200, 50), controlling=True)
    try:
        ids = wait_for(lambda: _kmalloc_attached(tui.pid), what="the TUI's probes to attach")
        wait_for(lambda: b"KMALLOC" in tui.output, what="the process table to draw")
        if not drain:
            tui.stop_reading()
            time.sleep(1.0 + 0.3 * round_)  # ticks keep drawing into a terminal nobody reads
        else:
            time.sleep(0.3 * round_)
        tui.close_terminal()  # the terminal goes away
        tui.proc.wait(timeout=EXIT_BOUND_S)
        assert not (ids & loaded_prog_ids()), "BPF programs left loaded after the terminal went away"
    finally:
        tui.cleanup()
