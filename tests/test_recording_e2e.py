"""End to end on the real kernel: `memtop record` (the real CLI, real probes) records a workload of known
kmalloc rate and a real OOM kill in memory cgroups of the test's own; then the recording is replayed
through Pilot: jumping to the kill shows the victim, its container and the rising minute before it, and
stepping shows the workload's recorded rates. A SIGKILLed recorder's database opens."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from memtop.app import MemtopApp
from memtop.config import Config
from memtop.recording import RecordingReader, RecordingSource
from memtop.store import ProcessKey

from .cgroup_util import test_cgroup, unique_name
from .conftest import REPO
from .test_bpf_e2e import _kmalloc_attached, loaded_prog_ids, wait_for
from .test_oom_e2e import LIMIT, checked_limit
from .test_pilot import SIZE, press, widget_text
from .tui_pty import TuiInPty

pytestmark = pytest.mark.bpf

CALLS_PER_S = 4000  # listxattr calls a second: one 256-byte kmalloc each
# Paced: 1/10 of the calls every 0.1 s (catching up when it fell behind) until a line arrives on stdin.
PACED = f"""
import os, select, sys, tempfile, time
path = tempfile.mkstemp()[1]
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
start = time.monotonic()
tick = 0
while not select.select([sys.stdin], [], [], 0)[0]:
    for _ in range({CALLS_PER_S // 10}):
        os.listxattr(path)
    tick += 1
    time.sleep(max(0.0, start + tick / 10 - time.monotonic()))
os.unlink(path)
"""
STAGE_MIB = 6
# Grows by STAGE_MIB at each line on stdin, so the recording sees it rise whatever the tick's speed.
STAGED = f"""
import sys
held = []
sys.stdout.write("ready\\n"); sys.stdout.flush()
for line in sys.stdin:
    for _ in range({STAGE_MIB}):
        held.append(bytearray(1 << 20))
    sys.stdout.write("grown\\n"); sys.stdout.flush()
"""
WAIT_S = 600.0  # a loaded shared machine has taken 25 s for one tick of 10,000 processes


@pytest.fixture(autouse=True)
def _memcg_oom_is_safe() -> None:
    if Path("/proc/sys/vm/panic_on_oom").read_text().strip() == "2":
        pytest.skip("vm.panic_on_oom=2: a cgroup OOM would panic the machine")


class Recorder:
    def __init__(self, db: Path, interval: float = 1.0) -> None:
        self.db = db
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memtop", "record", "--db", str(db), "--interval", str(interval)],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert "recording to" in line, line + self.proc.stderr.read()
        self.prog_ids = wait_for(
            lambda: _kmalloc_attached(self.proc.pid), timeout=WAIT_S, what="the recorder's probes"
        )

    def samples(self) -> int:
        try:
            reader = RecordingReader(self.db)
        except Exception:
            return 0
        n = len(reader)
        reader.close()
        return n

    def wait_samples(self, more: int) -> None:
        target = self.samples() + more
        wait_for(lambda: self.samples() >= target, timeout=WAIT_S, what=f"{more} more samples")

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err

    def kill_if_running(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.timeout(1800)  # several minutes when a loaded host makes each tick slow
def test_record_a_known_rate_and_an_oom_kill_then_travel_to_them(tmp_path: Path) -> None:
    db = tmp_path / "var" / "memtop.db"
    recorder = Recorder(db)
    container_id = uuid.uuid4().hex + uuid.uuid4().hex
    pod_uid = str(uuid.uuid4())
    try:
        with test_cgroup(unique_name()) as cg:
            work = subprocess.Popen(
                [sys.executable, "-c", PACED],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=cg.enter,
            )
            try:
                assert work.stdout is not None and work.stdin is not None
                assert work.stdout.readline() == "ready\n"
                import psutil

                work_key = ProcessKey(work.pid, psutil.Process(work.pid).create_time())
                work.stdin.write("go\n")
                work.stdin.flush()
                work_start = time.time()
                recorder.wait_samples(4)  # at least 3 whole intervals inside the paced run
                work_stop = time.time()
                work.stdin.write("stop\n")
                work.stdin.flush()
                work.wait(timeout=60)
            finally:
                work.kill()
                work.wait()
        relpath = f"{unique_name()}/kubepods/burstable/pod{pod_uid}/{container_id}"
        with test_cgroup(relpath, memory_limit_bytes=LIMIT) as oom_cg:
            checked_limit(oom_cg)
            victim = subprocess.Popen(
                [sys.executable, "-c", STAGED],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=oom_cg.enter,
            )
            assert victim.stdout is not None and victim.stdin is not None
            assert victim.stdout.readline() == "ready\n"
            for _ in range(4 * LIMIT // (STAGE_MIB << 20)):
                try:
                    victim.stdin.write("grow\n")
                    victim.stdin.flush()
                except BrokenPipeError:
                    break
                if victim.stdout.readline() != "grown\n":
                    break  # killed
                recorder.wait_samples(1)
            assert victim.wait(timeout=60) == -9, "expected an OOM kill"
            recorder.wait_samples(2)
        code, err = recorder.stop()
    finally:
        recorder.kill_if_running()
    assert code == 0, err
    assert "Traceback" not in err and "stopped:" in err
    assert not (recorder.prog_ids & loaded_prog_ids()), "a BPF program stayed attached"
    assert db.stat().st_mode & 0o777 == 0o600 and db.parent.stat().st_mode & 0o777 == 0o700

    # The samples whose whole interval lies inside the paced run recorded about CALLS_PER_S calls/s.
    reader = RecordingReader(db)
    recorded: dict[int, float] = {}  # sample index -> the workload's calls/s
    inside = []
    for i in range(1, len(reader)):
        row = reader.snapshot(i).process(work_key)
        if row is None:
            continue
        recorded[i] = row.kmalloc_calls_per_s
        if work_start <= reader.times[i - 1] and reader.times[i] <= work_stop:
            inside.append((i, row.kmalloc_calls_per_s, row.kmalloc_bytes_per_s))
    reader.close()
    assert len(inside) >= 2, (inside, recorded)
    for _, calls, bytes_per_s in inside:
        assert 0.6 * CALLS_PER_S <= calls <= 1.5 * CALLS_PER_S, inside
        assert bytes_per_s >= 200 * calls, inside  # 256-byte kmallocs (and a few smaller ones beside)

    source = RecordingSource(db)
    first, last = min(recorded), max(recorded)
    source.index = first
    app = MemtopApp(source, Config())

    async def travel() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await press(pilot)
            assert app.snapshot is not None
            shown: dict[int, float] = {}
            for index in range(first, last + 1):  # one sample forward at a time
                assert source.index == index
                row = app.snapshot.process(work_key)
                if row is not None:
                    shown[index] = row.kmalloc_calls_per_s
                await press(pilot, "full_stop")
            assert shown == recorded
            await press(pilot, "B")  # the oldest sample, before the kill
            assert not any(e.container_id == container_id for e in app.snapshot.oom_events)
            for _ in range(len(source.reader.kills)):  # other tests on this host may have killed too
                await press(pilot, "n")
                if any(e.container_id == container_id for e in app.snapshot.oom_events):
                    break
            kill = next(e for e in app.snapshot.oom_events if e.container_id == container_id)
            shown_before = source.reader.times[source.index - 1]
            assert shown_before < kill.time <= app.snapshot.taken_at  # the first sample after it
            assert kill.victim_pid == victim.pid and kill.pod_uid == pod_uid
            assert app.screen.active_tab == "oom"  # type: ignore[attr-defined]
            assert str(victim.pid) in widget_text(app, "#oom-table")
            assert kill.history_of == "container" and kill.history
            app.open_container(container_id)  # its graph: the recorded samples before the kill
            await press(pilot)
            history = app.snapshot.container_histories.get(container_id, ())
            usage = [p.memory_bytes for p in history if p.memory_bytes is not None and p.t <= kill.time]
            assert len(usage) >= 3, history
            assert usage[-1] >= usage[0] + 2 * (STAGE_MIB << 20), usage  # rising to the kill

    asyncio.run(travel())
    source.close()


@pytest.mark.timeout(1200)
def test_a_sigkilled_recorder_leaves_a_database_that_opens(tmp_path: Path) -> None:
    db = tmp_path / "memtop.db"
    recorder = Recorder(db, interval=0.5)
    try:
        recorder.wait_samples(3)
        recorder.stop(signal.SIGKILL)
    finally:
        recorder.kill_if_running()
    assert recorder.proc.returncode == -9
    time.sleep(0.2)
    source = RecordingSource(db)
    assert len(source.reader) >= 3
    for i in range(len(source.reader)):
        source.reader.snapshot(i)
    assert source.tick().processes
    source.close()
    again = Recorder(db, interval=0.5)  # a new recorder carries on with the same database
    try:
        again.wait_samples(1)
        code, err = again.stop()
    finally:
        again.kill_if_running()
    assert code == 0, err


@pytest.mark.timeout(1200)
def test_the_live_tui_records_with_record_and_detaches_on_quit(tmp_path: Path) -> None:
    """`memtop --record DB`: the live TUI writes a sample every 5 s from its recorder thread; after q the
    database holds them and no probe stays attached."""

    db = tmp_path / "tui.db"
    tui = TuiInPty(["--interval", "0.5", "--record", str(db)])
    try:
        ids = wait_for(lambda: _kmalloc_attached(tui.pid), timeout=WAIT_S, what="the TUI's probes")
        wait_for(lambda: b"KMALLOC" in tui.output, timeout=WAIT_S, what="the process table to draw")

        def samples() -> int:
            try:
                reader = RecordingReader(db)
            except Exception:
                return 0
            n = len(reader)
            reader.close()
            return n

        wait_for(lambda: samples() >= 2, timeout=WAIT_S, what="two recorded samples")
        tui.write(b"q")
        tui.proc.wait(timeout=120)
    finally:
        tui.cleanup()
    assert tui.proc.returncode == 0, tui.tail()
    assert b"Traceback" not in tui.output
    assert not (ids & loaded_prog_ids()), "BPF programs left loaded after the TUI exited"
    reader = RecordingReader(db)
    assert len(reader) >= 2
    assert all(b - a >= 5.0 * 0.95 for a, b in zip(reader.times, reader.times[1:], strict=False))
    assert reader.snapshot(len(reader) - 1).processes
    reader.close()
