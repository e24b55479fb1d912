"""End-to-end: the kmalloc counters' per-CPU slots (CPU_SLOT in kmalloc.c) lose and delay nothing.

A process's run of kmallocs on a CPU is counted in that CPU's slot and reaches pid_stats only when another
process kmallocs there or when the probe's read runs km_flush on every CPU. The workload here is pinned to
one CPU and this test to another, so after the workload stops nothing else is likely to move its counts:
only the read's flush can. Each read must show exactly what the workload did by then.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from memtop.probes import kmalloc as kmalloc_module
from memtop.probes.kmalloc import KmallocProbe

pytestmark = pytest.mark.bpf

CALLS = 20_000
WORKLOAD = f"""
import os, sys
path = sys.argv[1]
open(path, "w").close()
sys.stdout.write("ready\\n"); sys.stdout.flush()
for line in sys.stdin:
    for _ in range({CALLS}):
        os.listxattr(path)
    sys.stdout.write("done\\n"); sys.stdout.flush()
"""


@pytest.fixture
def cpus() -> Iterator[tuple[int, int]]:
    """(the workload's CPU, this test's CPU); this process is pinned for the test and set free after."""
    online = kmalloc_module.online_cpus()
    if len(online) < 2:
        pytest.skip("needs two online CPUs")
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {online[0]})
    try:
        yield online[-1], online[0]
    finally:
        os.sched_setaffinity(0, before)


def _calls(probe: KmallocProbe, pid: int) -> int:
    counters = probe.read().per_tgid.get(pid)
    return counters.calls if counters is not None else 0


@pytest.mark.parametrize("mode", ["slots", "no slots (km_flush cannot run)"])
def test_every_kmalloc_of_a_pinned_process_is_in_the_next_read(
    mode: str,
    cpus: tuple[int, int],
    tmp_path,
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    if mode != "slots":

        def refuse(fd: int, cpu: int) -> int:
            raise OSError(22, "BPF_PROG_TEST_RUN: Invalid argument")

        monkeypatch.setattr(kmalloc_module, "run_on_cpu", refuse)
    probe = KmallocProbe()
    probe.start()
    work_cpu, _ = cpus
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD, str(tmp_path / "target")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {work_cpu}),
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        assert probe.cpu_slot == (mode == "slots")
        if mode != "slots":
            assert "no per-CPU slots (BPF_PROG_TEST_RUN: Invalid argument)" in probe.status.detail
        before = _calls(probe, proc.pid)
        for round_no in range(3):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "done\n"
            after = _calls(probe, proc.pid)
            # one kmalloc per listxattr, plus a few for the pipe writes
            assert CALLS <= after - before <= CALLS + 50, (round_no, after - before)
            before = after
        assert probe.flushes_deferred == 0
    finally:
        proc.kill()
        proc.wait()
        probe.close()
