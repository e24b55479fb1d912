"""Recordings without root: writer, reader, retention, locking, bad databases, dump, the time-travel keys.

Samples are the real fixture snapshot moved through time, with one process at a known kmalloc rate
(1000 * i bytes/s in sample i) and one OOM kill at sample KILL_AT."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from memtop.app import MemtopApp
from memtop.config import Config
from memtop.errors import MemtopError
from memtop.export import decode_json, read_snapshot
from memtop.oom import OomEvent
from memtop.recording import (
    FORMAT,
    KEY_EVERY,
    RecordingReader,
    RecordingSink,
    RecordingSource,
    RecordingWriter,
    parse_duration,
    parse_size,
    parse_time,
    unit_text,
)
from memtop.store import HistoryPoint, Snapshot

from .conftest import REPLAY, REPO
from .test_cli import assert_one_line_error, run
from .test_pilot import SIZE, press, widget_text

T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z
STEP = 5.0
KILL_AT = 30
BASE = read_snapshot(REPLAY)
MARKED = BASE.processes[1]  # a process in a container: its rate is 1000 * i in sample i
VICTIM_CONTAINER = BASE.containers[0]


def sample(i: int) -> Snapshot:
    t = T0 + i * STEP
    rows = tuple(
        replace(p, kmalloc_bytes_per_s=1000.0 * i, kmalloc_bytes=p.kmalloc_bytes + 5000 * i)
        if p.key == MARKED.key
        else p
        for p in BASE.processes
    )
    containers = tuple(
        replace(c, memory_bytes=(10 << 20) + i * (1 << 20)) if c.id == VICTIM_CONTAINER.id else c
        for c in BASE.containers
    )
    kills: tuple[OomEvent, ...] = ()
    if i >= KILL_AT:
        kill_t = T0 + (KILL_AT - 0.5) * STEP
        kills = (
            replace(
                BASE.oom_events[0],
                time=kill_t,
                victim_pid=4242,
                victim_comm="hog",
                container_id=VICTIM_CONTAINER.id,
                cgroup_path=VICTIM_CONTAINER.cgroup_path,
                pod_uid="",
                pod_name="",
                namespace="",
                history=tuple(
                    HistoryPoint(kill_t - 60 + s, 0.0, 0.0, (10 << 20) + s * (1 << 20))
                    for s in range(0, 60, 5)
                ),
            ),
        )
    return replace(
        BASE,
        taken_at=t,
        duration_s=i * STEP,
        processes=rows,
        containers=containers,
        oom_events=kills,
        oom_kills_seen=len(kills),
        histories={},
        container_histories={},
        focus=None,
        replay=False,
    )


def record(path: Path, count: int = 60, **options: float) -> Path:
    writer = RecordingWriter(path, **options)  # type: ignore[arg-type]
    try:
        for i in range(count):
            writer.write(sample(i))
    finally:
        writer.close()
    return path


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record(tmp_path_factory.mktemp("rec") / "r.db")


# -- writer and reader ---------------------------------------------------------------------------------


def test_every_sample_reads_back_as_written(recording: Path) -> None:
    reader = RecordingReader(recording)
    assert len(reader) == 60 and reader.times[0] == T0
    for i in (0, 1, KEY_EVERY - 1, KEY_EVERY, KEY_EVERY + 1, 59):
        got = reader.snapshot(i)
        want = sample(i)
        assert got.taken_at == want.taken_at
        assert got.processes == want.processes
        assert got.containers == want.containers and got.oom_events == want.oom_events
        assert got.leaks == want.leaks and got.tcp_connect == want.tcp_connect
    # key frames every KEY_EVERY samples; the others are compressed against their key frame
    assert reader.key_ids == [1 + KEY_EVERY * (i // KEY_EVERY) for i in range(60)]
    sizes = [r[0] for r in reader.conn.execute("SELECT size FROM samples ORDER BY id")]
    assert max(sizes[1:KEY_EVERY]) * 4 < sizes[0]
    reader.close()


def test_a_new_writer_continues_a_recording_and_indexes_each_kill_once(tmp_path: Path) -> None:
    path = record(tmp_path / "r.db", count=KILL_AT + 5)
    writer = RecordingWriter(path)
    for i in range(KILL_AT + 5, KILL_AT + 20):
        writer.write(sample(i))
    writer.close()
    reader = RecordingReader(path)
    assert reader.times == [T0 + i * STEP for i in range(KILL_AT + 20)]
    assert [(k.victim_pid, k.t) for k in reader.kills] == [(4242, T0 + (KILL_AT - 0.5) * STEP)]
    assert reader.snapshot(KILL_AT + 6).taken_at == T0 + (KILL_AT + 6) * STEP  # a new key frame group
    reader.close()


def test_files_are_private_and_the_database_is_wal(recording: Path) -> None:
    assert recording.stat().st_mode & 0o777 == 0o600
    assert recording.parent.stat().st_mode & 0o777 in (0o700, 0o755, 0o775)  # pytest made this one
    conn = sqlite3.connect(recording)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()[0] == FORMAT
    conn.close()


def test_a_new_directory_is_0700(tmp_path: Path) -> None:
    writer = RecordingWriter(tmp_path / "new" / "deeper" / "r.db")
    writer.close()
    assert (tmp_path / "new" / "deeper").stat().st_mode & 0o777 == 0o700


def test_retention_by_age_drops_the_oldest_groups(tmp_path: Path) -> None:
    path = record(tmp_path / "r.db", count=120, retention_s=200.0)  # 120 samples = 600 s
    reader = RecordingReader(path)
    assert reader.times[-1] == T0 + 119 * STEP
    assert reader.times[0] > T0 + 119 * STEP - 200 - KEY_EVERY * STEP  # whole groups, at most one extra
    assert reader.times[0] <= T0 + 119 * STEP - 200
    for i in range(len(reader)):  # every kept sample still has its key frame
        reader.snapshot(i)
    reader.close()


def test_retention_by_size_keeps_the_file_near_the_cap_and_drops_the_oldest(tmp_path: Path) -> None:
    cap = 256 << 10
    path = record(tmp_path / "r.db", count=300, max_bytes=cap)
    assert path.stat().st_size < cap * 1.5
    reader = RecordingReader(path)
    assert reader.times[-1] == T0 + 299 * STEP
    assert reader.times[0] > T0
    assert reader.times == sorted(reader.times)
    for i in range(len(reader)):
        reader.snapshot(i)
    reader.close()


def test_a_second_writer_is_refused(recording: Path, tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    writer = RecordingWriter(path)
    try:
        with pytest.raises(MemtopError, match="another memtop record is already writing") as info:
            RecordingWriter(path)
        assert "\n" not in str(info.value)
    finally:
        writer.close()
    RecordingWriter(path).close()  # free again once the first one closed


def test_never_writes_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"")
    link = tmp_path / "r.db"
    link.symlink_to(target)
    with pytest.raises(MemtopError, match="symlink"):
        RecordingWriter(link)
    (tmp_path / "s.db-wal").symlink_to(target)
    with pytest.raises(MemtopError, match="symlink"):
        RecordingWriter(tmp_path / "s.db")


def test_refuses_to_write_into_other_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    with pytest.raises(MemtopError, match="not an SQLite database"):
        RecordingWriter(text)
    assert text.read_text() == "not a database\n"
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE t(x)")
    conn.commit()
    conn.close()
    with pytest.raises(MemtopError, match="not a memtop recording"):
        RecordingWriter(foreign)


def test_sink_writes_from_its_own_thread_and_skips_samples_closer_than_its_interval(tmp_path: Path) -> None:
    sink = RecordingSink(tmp_path / "r.db", min_interval_s=10.0, report=lambda _m: None)
    for i in range(10):  # every 5 s: every other one is kept
        sink.on_snapshot(sample(i))
    sink.close()
    reader = RecordingReader(tmp_path / "r.db")
    assert reader.times == [T0 + i * STEP for i in range(0, 10, 2)]
    reader.close()


KILLED_WRITER = textwrap.dedent(
    """
    import sys, os
    sys.path.insert(0, {repo!r})
    from tests.test_recording import sample
    from memtop.recording import RecordingWriter
    writer = RecordingWriter(__import__("pathlib").Path({path!r}))
    i = 0
    while True:
        writer.write(sample(i % 60))
        i += 1
        if i == 20:
            print("written", flush=True)
    """
)


def test_a_killed_writer_leaves_a_database_that_opens(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER.format(repo=str(REPO), path=str(path))],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "written\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    source = RecordingSource(path)
    assert len(source.reader) >= 20
    for i in range(len(source.reader)):
        source.reader.snapshot(i)
    assert source.tick().replay
    source.close()
    RecordingWriter(path).close()  # and a new recorder can carry on with it


# -- bad databases: one line each ------------------------------------------------------------------------


def _bad(tmp_path: Path, recording: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.db"
    data = recording.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif kind == "corrupt":
        path.write_bytes(data[:100] + os.urandom(len(data) - 100))
    elif kind == "foreign":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE users(name TEXT)")
        conn.commit()
        conn.close()
    elif kind == "not-sqlite":
        path.write_bytes(b"SQLite format 2\x00" + b"\x00" * 200)
    elif kind == "empty":
        record(path, count=0)
    return path


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("truncated", "not a readable memtop recording"),
        ("corrupt", "memtop recording"),
        ("foreign", "is an SQLite database but not a memtop recording"),
        ("not-sqlite", "replay file"),
        ("empty", "holds no samples"),
    ],
)
def test_bad_databases_give_one_line_errors(
    tmp_path: Path, recording: Path, kind: str, fragment: str
) -> None:
    path = _bad(tmp_path, recording, kind)
    assert_one_line_error(run("--replay", str(path)), fragment)


def test_a_locked_database_gives_one_line(tmp_path: Path, recording: Path) -> None:
    path = tmp_path / "locked.db"
    path.write_bytes(recording.read_bytes())
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('PRAGMA locking_mode=EXCLUSIVE')\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            "c.execute('DELETE FROM meta WHERE key=\"nothing\"')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert_one_line_error(run("--replay", str(path)), "locked")
    finally:
        holder.kill()
        holder.wait()


def test_record_refuses_a_database_another_recorder_holds(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("memtop record checks for root first")
    path = tmp_path / "r.db"
    writer = RecordingWriter(path)
    try:
        assert_one_line_error(run("record", "--db", str(path)), "another memtop record is already writing")
    finally:
        writer.close()


def test_flock_is_on_the_database_file_itself(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    writer = RecordingWriter(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        writer.close()


# -- user input: times, durations, sizes -----------------------------------------------------------------


def test_parse_time_forms() -> None:
    now = T0
    assert parse_time("now", now) == now
    assert parse_time("10m ago", now) == now - 600
    assert parse_time("2h ago", now) == now - 7200
    assert parse_time("90s ago", now) == now - 90
    assert parse_time("2026-09-21T14:13:20Z", now) == T0
    assert parse_time("2026-09-21T14:13:20+00:00", now) == T0
    assert parse_time("14:10", now) == T0 - 200  # TZ=UTC in tests: today at 14:10
    assert parse_time("14:20", now) == T0 + 400 - 86400  # still to come today: yesterday's
    for bad in ("yesterday-ish", "25:00", "10 parsecs ago", ""):
        with pytest.raises(ValueError):
            parse_time(bad, now)


def test_parse_duration_and_size() -> None:
    assert parse_duration("3d") == 3 * 86400 and parse_duration("12h") == 43200 and parse_duration("45") == 45
    assert parse_size("2GiB") == 2 << 30 and parse_size("500M") == 500 << 20 and parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_duration("soon")
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--at", "whenever"], "--at"),
        (["record", "--retention", "forever"], "--retention"),
        (["record", "--max-size", "huge"], "--max-size"),
        (["dump"], "required: --db"),
        (["dump", "--db", "x.db", "--format", "xml"], "invalid choice"),
    ],
)
def test_bad_flags_are_one_line(args: list[str], fragment: str, recording: Path) -> None:
    if args[0] == "--at":
        args = ["--replay", str(recording), *args]
    result = run(*args)
    assert result.returncode == 2
    assert_one_line_error(result, fragment)


def test_at_with_a_snapshot_file_is_one_line() -> None:
    assert_one_line_error(run("--replay", str(REPLAY), "--at", "10m ago"), "--at needs a recording")


# -- dump ------------------------------------------------------------------------------------------------


def test_dump_json_lines_over_a_range(recording: Path) -> None:
    result = run(
        "dump", "--db", str(recording), "--from", "2026-09-21T14:14:00Z", "--to", "2026-09-21T14:15:00Z"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    snaps = [decode_json(line.encode()) for line in lines]
    assert [s.taken_at for s in snaps] == [T0 + i * STEP for i in range(8, 21)]
    assert json.loads(lines[0])["schema"] == "memtop.snapshot/1"
    marked = next(p for p in snaps[0].processes if p.key == MARKED.key)
    assert marked.kmalloc_bytes_per_s == 8000.0


def test_dump_csv_of_processes_and_containers(recording: Path) -> None:
    result = run("dump", "--db", str(recording), "--format", "csv", "--to", "2026-09-21T14:13:25Z")
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0][:4] == ["taken_at", "pid", "start_time", "comm"]
    assert len(rows) == 1 + 2 * len(BASE.processes)  # samples 0 and 1
    marked = [r for r in rows[1:] if r[1] == str(MARKED.pid)]
    assert [float(r[rows[0].index("kmalloc_bytes_per_s")]) for r in marked] == [0.0, 1000.0]
    result = run("dump", "--db", str(recording), "--format", "csv", "--table", "containers")
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0][:3] == ["taken_at", "id", "runtime"] and len(rows) == 1 + 60 * len(BASE.containers)


# -- the service -----------------------------------------------------------------------------------------


def test_the_unit_file_in_the_repo_is_the_one_install_writes() -> None:
    assert (REPO / "deploy" / "systemd" / "memtop-record.service").read_text() == unit_text()


def test_install_writes_the_unit_with_the_options(tmp_path: Path) -> None:
    from argparse import Namespace

    from memtop.recording import install_unit

    target = tmp_path / "memtop-record.service"
    install_unit(Namespace(db=Path("/srv/m.db"), interval=10.0, retention=86400.0, max_size=1 << 30), target)
    text = target.read_text()
    line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    assert line.endswith("record --db /srv/m.db --interval 10 --retention 86400s --max-size 1073741824")
    assert "StateDirectoryMode=0700" in text and "WantedBy=multi-user.target" in text


# -- time travel in the TUI ------------------------------------------------------------------------------


def _marked_rate(app: MemtopApp) -> float:
    assert app.snapshot is not None
    row = app.snapshot.process(MARKED.key)
    assert row is not None
    return row.kmalloc_bytes_per_s


async def test_replay_opens_the_newest_sample_and_steps_through_time(recording: Path) -> None:
    source = RecordingSource(recording)
    app = MemtopApp(source, Config())
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot)
        assert app.snapshot is not None and app.snapshot.taken_at == T0 + 59 * STEP
        header = widget_text(app, "#header")
        assert "60/60" in header and "2026-09-21 14:13:20" in header and "REPLAY" in header
        assert _marked_rate(app) == 59000.0
        await press(pilot, "comma")
        assert _marked_rate(app) == 58000.0 and "59/60" in widget_text(app, "#header")
        await press(pilot, "comma", "comma", "full_stop")
        assert _marked_rate(app) == 57000.0
        await press(pilot, "b")  # a minute back: 12 samples
        assert app.snapshot.taken_at == T0 + 45 * STEP
        await press(pilot, "f")
        assert app.snapshot.taken_at == T0 + 57 * STEP
        await press(pilot, "B")  # an hour back: the oldest sample
        assert app.snapshot.taken_at == T0
        await press(pilot, "comma")  # already at the oldest: stays, says so
        assert app.snapshot.taken_at == T0
        await press(pilot, "F")
        assert app.snapshot.taken_at == T0 + 59 * STEP


async def test_at_and_jump_to_a_typed_time(recording: Path) -> None:
    source = RecordingSource(recording, at=T0 + 10 * STEP + 1)
    app = MemtopApp(source, Config())
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot)
        assert app.snapshot is not None and app.snapshot.taken_at == T0 + 10 * STEP
        await press(pilot, "j")
        await press(pilot, *"2026-09-21T14:15:00Z", "enter")
        assert app.snapshot.taken_at == T0 + 20 * STEP
        await press(pilot, "j")
        await press(pilot, *"not a time", "enter")
        assert app.snapshot.taken_at == T0 + 20 * STEP  # a bad time says why and stays
        assert any("cannot read" in n.message for n in app._notifications)


async def test_jump_to_the_kill_shows_the_victim_its_container_and_the_rising_minute(recording: Path) -> None:
    from memtop.screens.main import MainScreen
    from memtop.screens.oom import OomScreen

    source = RecordingSource(recording, at=T0)
    app = MemtopApp(source, Config())
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot)
        assert app.snapshot is not None and not app.snapshot.oom_events
        await press(pilot, "n")
        assert app.snapshot.taken_at == T0 + KILL_AT * STEP  # the first sample after the kill
        assert isinstance(app.screen, MainScreen) and app.screen.active_tab == "oom"
        assert any("hog (PID 4242)" in n.message for n in app._notifications)
        assert "4242" in widget_text(app, "#oom-table")
        await press(pilot, "enter")
        assert isinstance(app.screen, OomScreen)
        details = widget_text(app, "#oom-details")
        assert "4242" in details and VICTIM_CONTAINER.id[:20] in details
        memory = [p.memory_bytes for p in app.snapshot.oom_events[0].history]
        assert memory == sorted(memory) and memory[-1] > memory[0]  # the minute before it, rising
        await press(pilot, "escape")
        await press(pilot, "n")  # no later kill: stays
        assert app.snapshot.taken_at == T0 + KILL_AT * STEP
        await press(pilot, "F", "N")  # from the end back to the kill
        assert app.snapshot.taken_at == T0 + KILL_AT * STEP


async def test_drilldowns_draw_history_rebuilt_from_neighbouring_samples(recording: Path) -> None:
    from memtop.screens.process import ProcessScreen

    source = RecordingSource(recording, at=T0 + 40 * STEP)
    app = MemtopApp(source, Config())
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot)
        app.open_process(MARKED.key)
        await press(pilot)
        assert isinstance(app.screen, ProcessScreen)
        focus = app.snapshot.focus
        assert focus is not None and focus.key == MARKED.key
        assert [p.kmalloc_bytes_per_s for p in focus.history] == [1000.0 * i for i in range(0, 41)]
        await press(pilot, "full_stop")  # stepping moves the drill-down's history along
        assert app.snapshot.focus.history[-1].kmalloc_bytes_per_s == 41000.0
        await press(pilot, "escape")
        app.open_container(VICTIM_CONTAINER.id)
        await press(pilot)
        history = app.snapshot.container_histories[VICTIM_CONTAINER.id]
        assert [p.memory_bytes for p in history][-3:] == [(10 << 20) + i * (1 << 20) for i in (39, 40, 41)]


async def test_time_travel_keys_on_a_snapshot_file_say_they_need_a_recording() -> None:
    from memtop.sources import ReplaySource

    app = MemtopApp(ReplaySource(REPLAY), Config())
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot, "comma")
        assert any("needs a recording" in n.message for n in app._notifications)


async def test_help_lists_the_time_travel_keys(recording: Path) -> None:
    from memtop.screens.help import HelpScreen

    app = MemtopApp(RecordingSource(recording), Config())
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot, "question_mark")
        assert isinstance(app.screen, HelpScreen)
        section = dict(app.screen.sections)["Time travel (--replay of a recording made by memtop record)"]
        assert {k for k, _ in section} >= {",", ".", "b", "f", "B", "F", "j", "n", "N"}


class _FakeLive:
    """The fixture as a live source whose every tick is a new sample (5 s later)."""

    live = True

    def __init__(self) -> None:
        from memtop.sources import ReplaySource

        self.replay = ReplaySource(REPLAY)
        self.ticks = 0

    def tick(self, include_histories: bool = False) -> Snapshot:
        self.ticks += 1
        return replace(sample(self.ticks), replay=False)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.replay, name)


async def test_the_live_tui_records_through_its_sink(tmp_path: Path) -> None:
    path = tmp_path / "live.db"
    sink = RecordingSink(path, min_interval_s=10.0, report=lambda _m: None)
    source = _FakeLive()
    app = MemtopApp(source, Config(interval_s=0.1), sinks=[sink])  # type: ignore[arg-type]
    async with app.run_test(size=SIZE) as pilot:
        while source.ticks < 8:
            await pilot.pause(0.05)
        await press(pilot, "p")  # no tick in flight while the app shuts down
    sink.close()
    reader = RecordingReader(path)
    assert len(reader) >= 4 and reader.times[0] == T0 + STEP  # every other tick: 10 s apart
    assert all(b - a == 2 * STEP for a, b in zip(reader.times, reader.times[1:], strict=False))
    reader.close()


def test_record_bench_runs(tmp_path: Path) -> None:
    """The recorder benchmark still runs end to end (tiny; no figure is asserted)."""
    result = subprocess.run(
        [sys.executable, "bench/record_bench.py", "--samples", "15", "--processes", "50", "--stacks", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "on disk per sample" in result.stdout and "of a core" in result.stdout


async def test_r_starts_and_stops_recording_the_live_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memtop.recording

    path = tmp_path / "default" / "memtop.db"
    monkeypatch.setattr(memtop.recording, "DEFAULT_DB", path)
    monkeypatch.setattr(memtop.recording, "DEFAULT_INTERVAL_S", 0.0)
    source = _FakeLive()
    app = MemtopApp(source, Config(interval_s=0.1))  # type: ignore[arg-type]
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot, "R")
        assert len(app.sinks) == 1
        start = source.ticks
        while source.ticks < start + 4:
            await pilot.pause(0.05)
        await press(pilot, "R")
        assert not app.sinks
        await press(pilot, "p")  # no tick in flight while the app shuts down
    reader = RecordingReader(path)
    assert len(reader) >= 3
    reader.close()


async def test_r_in_replay_says_only_live_records(recording: Path) -> None:
    app = MemtopApp(RecordingSource(recording), Config())
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot, "R")
        assert not app.sinks and any("only the live view" in n.message for n in app._notifications)


def test_stepping_past_the_newest_sample_finds_what_a_running_recorder_added(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    writer = RecordingWriter(path)
    for i in range(3):
        writer.write(sample(i))
    source = RecordingSource(path)
    assert source.position == T0 + 2 * STEP
    assert not source.step(1)
    writer.write(sample(3))
    assert source.step(1) and source.position == T0 + 3 * STEP
    assert source.tick().taken_at == T0 + 3 * STEP
    writer.close()
    source.close()


async def test_filter_sort_and_drilldown_work_on_a_recorded_sample(recording: Path) -> None:
    from memtop.screens.main import MainScreen
    from memtop.screens.process import ProcessScreen

    app = MemtopApp(RecordingSource(recording, at=T0 + 20 * STEP), Config())
    others = [str(p.pid) for p in BASE.processes if p.pid != MARKED.pid]
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot)
        await press(pilot, "slash", *str(MARKED.pid), "enter")
        text = widget_text(app, "#process-table")
        assert str(MARKED.pid) in text and not any(pid in text for pid in others)
        await press(pilot, "comma")  # another sample: the filter stays
        text = widget_text(app, "#process-table")
        assert app.snapshot.taken_at == T0 + 19 * STEP
        assert str(MARKED.pid) in text and not any(pid in text for pid in others)
        await press(pilot, "2")  # sort by the second column
        assert app.sort.column != "kmalloc_bytes_per_s" and str(MARKED.pid) in widget_text(
            app, "#process-table"
        )
        await press(pilot, "enter")
        assert isinstance(app.screen, ProcessScreen) and app.screen.key == MARKED.key
        assert [p.kmalloc_bytes_per_s for p in app.snapshot.focus.history][-2:] == [18000.0, 19000.0]
        await press(pilot, "escape")
        assert isinstance(app.screen, MainScreen)


def test_a_recording_of_another_format_version_is_refused(tmp_path: Path, recording: Path) -> None:
    path = tmp_path / "future.db"
    path.write_bytes(recording.read_bytes())
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='memtop.recording/9' WHERE key='format'")
    conn.commit()
    conn.close()
    assert_one_line_error(run("--replay", str(path)), "format 'memtop.recording/9'")
    with pytest.raises(MemtopError, match="memtop.recording/9"):
        RecordingWriter(path)


def test_a_graph_of_a_short_interval_recording_is_rebuilt_from_at_most_240_samples(tmp_path: Path) -> None:
    from memtop.recording import MAX_HISTORY_SAMPLES

    path = tmp_path / "fast.db"
    writer = RecordingWriter(path)
    for i in range(700):  # one a second (a 10-minute window holds 600)
        writer.write(replace(sample(i % 60), taken_at=T0 + i))
    writer.close()
    reader = RecordingReader(path)
    procs, conts = reader.histories(699, {MARKED.key}, {VICTIM_CONTAINER.id})
    points = procs[MARKED.key]
    assert len(points) <= MAX_HISTORY_SAMPLES and points[-1].t == T0 + 699
    assert points[0].t <= T0 + 699 - 590  # still the whole window
    assert [p.t for p in points] == sorted(p.t for p in points)
    assert len(conts[VICTIM_CONTAINER.id]) == len(points)
    reader.close()


def test_a_host_that_changed_a_lot_since_the_key_frame_gets_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    writer = RecordingWriter(path)
    writer.write(sample(0))
    writer.write(sample(1))
    many = sample(2)
    clones = tuple(replace(p, pid=p.pid + 100_000) for p in many.processes)
    writer.write(replace(many, processes=many.processes + clones + clones))  # about twice the bytes
    writer.write(sample(3))  # back to the usual size: another one
    writer.close()
    reader = RecordingReader(path)
    assert reader.key_ids == [1, 1, 3, 4]
    assert reader.snapshot(2).processes[-1].pid == BASE.processes[-1].pid + 100_000
    reader.close()
