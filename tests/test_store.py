from dataclasses import replace

import pytest

from memtop.model import IRQ_TGID, KmallocCounters, KmallocReading, ProcInfo
from memtop.store import (
    COARSE_STEP_S,
    RECENT_S,
    HistoryTable,
    HostInfo,
    ProcessKey,
    ProcessRow,
    SortKey,
    Store,
    counter_delta,
    filter_rows,
    history_columns,
    sort_rows,
    whole_window_rates,
)


def reading(**per_pid: tuple[int, int, int]) -> KmallocReading:
    return KmallocReading({int(k[1:]): KmallocCounters(*v, comm="k") for k, v in per_pid.items()})


def info(pid: int, start: float = 100.0, comm: str = "proc") -> ProcInfo:
    return ProcInfo(pid=pid, start_time=start, comm=comm, cmdline=f"{comm} --x", user="root", rss_bytes=4096)


def new_store(**kw: float) -> Store:
    return Store(HostInfo("h", "6.18"), started_at=1000.0, **kw)


def test_counter_delta_handles_reset() -> None:
    assert counter_delta(10, 25) == 15
    assert counter_delta(10, 4) == 4


def test_rates_are_deltas_over_elapsed() -> None:
    store = new_store()
    store.ingest(1002.0, reading(p7=(10, 1000, 800)), {7: info(7)})
    row = store.snapshot(1002.0).processes[0]
    assert row.kmalloc_bytes_per_s == 500.0 and row.kmalloc_calls_per_s == 5.0
    store.ingest(1003.0, reading(p7=(40, 4000, 3000)), {7: info(7)})
    row = store.snapshot(1003.0).processes[0]
    assert row.kmalloc_bytes_per_s == 3000.0
    assert row.kmalloc_calls_per_s == 30.0
    assert row.kmalloc_bytes == 4000 and row.kmalloc_calls == 40
    assert row.kmalloc_avg_bytes == 100.0
    assert row.kmalloc_waste_pct == 25.0
    assert row.comm == "proc" and row.user == "root" and row.rss_bytes == 4096


def test_snapshot_totals_sum_processes() -> None:
    store = new_store()
    store.ingest(1001.0, reading(p1=(1, 100, 100), p2=(3, 300, 300)), {1: info(1), 2: info(2)})
    snap = store.snapshot(1001.0)
    assert snap.kmalloc_bytes_per_s == 400.0 and snap.kmalloc_calls_per_s == 4.0


def test_reused_pid_is_a_new_row_and_old_one_is_marked_exited() -> None:
    store = new_store()
    store.ingest(1001.0, reading(p5=(10, 100, 100)), {5: info(5, start=1.0, comm="old")})
    store.ingest(1002.0, reading(p5=(15, 150, 150)), {5: info(5, start=2.0, comm="new")})
    rows = {r.comm: r for r in store.snapshot(1002.0).processes}
    assert set(rows) == {"old", "new"}
    assert rows["old"].exited and rows["old"].kmalloc_bytes == 100
    assert not rows["new"].exited
    assert rows["new"].kmalloc_bytes == 50  # only what happened after the reuse
    assert rows["new"].key != rows["old"].key


def test_exited_process_is_marked_forgotten_in_kernel_then_dropped() -> None:
    store = new_store(exited_keep_s=10)
    store.ingest(1001.0, reading(p9=(1, 64, 60)), {9: info(9)})
    forget = store.ingest(1002.0, reading(p9=(2, 128, 120)), {9: None})
    assert forget == [9]
    row = store.snapshot(1002.0).processes[0]
    assert row.exited and row.exited_at == 1002.0 and row.kmalloc_bytes == 128
    store.ingest(1003.0, reading(), {})
    assert store.snapshot(1003.0).processes[0].kmalloc_bytes_per_s == 0.0
    store.ingest(1013.5, reading(), {})
    assert store.snapshot(1013.5).processes == ()


def test_process_that_exited_before_the_first_tick_keeps_its_kernel_name() -> None:
    store = new_store()
    forget = store.ingest(1001.0, KmallocReading({33: KmallocCounters(5, 500, 500, comm="ls")}), {33: None})
    row = store.snapshot(1001.0).processes[0]
    assert forget == [33] and row.comm == "ls" and row.exited and row.kmalloc_calls == 5


def test_irq_row_never_exits() -> None:
    store = new_store()
    forget = store.ingest(1001.0, KmallocReading({IRQ_TGID: KmallocCounters(3, 300, 300)}), {IRQ_TGID: None})
    row = store.snapshot(1001.0).processes[0]
    assert forget == [] and row.is_irq and row.comm == "[irq]" and not row.exited


def test_history_is_bounded_by_time() -> None:
    store = new_store(history_s=10.0)
    for t in range(1, 31):
        store.ingest(1000.0 + t, reading(p1=(t, t * 10, t * 10)), {1: info(1)})
    history = store.history(ProcessKey(1, 100.0))
    assert len(history) == 11
    assert history[0].t == 1020.0 and history[-1].kmalloc_bytes_per_s == 10.0


def test_ten_minutes_of_history_at_the_fastest_interval() -> None:
    store = new_store()
    for i in range(1, 2500):
        store.ingest(1000.0 + i * 0.25, reading(p1=(i, i, i)), {1: info(1)})
    history = store.history(ProcessKey(1, 100.0))
    assert history[-1].t - history[0].t >= 600.0 - 0.25


def test_history_table_keeps_every_tick_then_one_per_coarse_step() -> None:
    table = HistoryTable(history_s=600.0)
    slot = table.add_row()
    for t in range(1, 1001):
        b, c, m = table.start_tick(float(t))
        b[slot], c[slot], m[slot] = t * 2.0, t * 1.0, -1.0 if t % 2 else t * 4096.0
    points = table.points(slot)
    times = [p.t for p in points]
    assert times == sorted(times) and times[-1] == 1000.0
    assert times[0] <= 400.0 < times[1]  # one at or before the horizon, then nothing older
    recent = [t for t in times if t >= 1000.0 - RECENT_S]
    assert recent == [float(t) for t in range(int(1000 - RECENT_S), 1001)]
    coarse = [t for t in times if t < 1000.0 - RECENT_S]
    assert all(b - a >= COARSE_STEP_S for a, b in zip(coarse, coarse[1:], strict=False))
    last = points[-1]
    assert (last.kmalloc_bytes_per_s, last.kmalloc_calls_per_s, last.memory_bytes) == (
        2000.0,
        1000.0,
        4096000,
    )
    assert points[-2].memory_bytes is None  # -1 in the column: unknown


def test_history_table_reuses_its_columns() -> None:
    """A steady host allocates no new columns once the history is full (aged ones are reused)."""
    table = HistoryTable(history_s=600.0)
    slot = table.add_row()
    columns: dict[int, object] = {}  # the arrays themselves kept: a freed one's id could come back
    for t in range(1, 3001):
        b, c, m = table.start_tick(float(t))
        b[slot] = c[slot] = m[slot] = 0.0
        if t > 1000:
            columns[id(b)] = b
    assert len(columns) <= len(table.points(slot)) + 1


@pytest.mark.parametrize("interval", [0.25, 1.0, 3.0, 10.0, 30.0, 60.0])
def test_a_reserved_history_table_allocates_no_column_later(interval: float) -> None:
    """reserve(history_columns(...)) makes every column a full history at that interval needs: ticks after
    it only reuse them (the store's memory reaches its plateau in seconds, not over ten minutes)."""
    table = HistoryTable(history_s=600.0)
    slot = table.add_row()
    made: dict[int, object] = {}  # the arrays themselves kept: a freed one's id could come back
    ticks = int(1800 / interval)
    for i in range(1, ticks + 1):
        if i == 10:
            table.reserve(history_columns(interval, 600.0))
            made.update(
                (id(c.bytes_per_s), c.bytes_per_s) for c in (*table._recent, *table._coarse, *table._spare)
            )
        b, c, m = table.start_tick(i * interval)
        b[slot] = c[slot] = m[slot] = 0.0
        if i >= 10:
            assert made.get(id(b)) is b, f"a new column at tick {i}"
    points = table.points(slot)
    assert points[-1].t - points[0].t >= 600.0 - interval


@pytest.mark.parametrize("interval", [1.0, 10.0, 30.0, 60.0])
def test_history_columns_are_not_over_reserved(interval: float) -> None:
    """history_columns() asks for about what a full history uses at that interval (a tick every 30 s
    cannot give a coarse column every 10 s)."""
    table = HistoryTable(history_s=600.0)
    slot = table.add_row()
    most = 0
    for i in range(1, int(1800 / interval) + 1):
        b, c, m = table.start_tick(i * interval)
        b[slot] = c[slot] = m[slot] = 0.0
        most = max(most, len(table._recent) + len(table._coarse))
    assert most <= history_columns(interval, 600.0) <= most + 3


def test_a_longer_interval_frees_the_spare_columns() -> None:
    """The store reserves the history again when the interval changes: columns a shorter interval needed
    are freed when it grows."""
    store = new_store()
    store.interval_s = 0.25
    for i in range(1, 481):
        store.ingest(1000.0 + i * 0.25, reading(p1=(i, i, i)), {1: info(1)})
    table = store._histories
    assert len(table._recent) + len(table._coarse) + len(table._spare) >= history_columns(0.25, 600.0)
    for i in range(1, 200):  # at 0.25 s the first 2 minutes were 480 ticks: they age out at 5 s
        store.interval_s = 5.0
        store.ingest(1120.0 + i * 5.0, reading(p1=(1000 + i, 1000 + i, 1000 + i)), {1: info(1)})
    assert len(table._recent) + len(table._coarse) + len(table._spare) <= history_columns(5.0, 600.0)
    history = store.history(ProcessKey(1, 100.0))
    assert history[-1].t == 1120.0 + 199 * 5.0 and history[-1].t - history[0].t >= 600.0


def test_history_table_slot_reuse_and_growth() -> None:
    """A slot given to a new row after its row went shows none of the old row's samples; growing past
    the capacity keeps every row's samples."""
    table = HistoryTable(history_s=600.0, capacity=4)
    first = [table.add_row() for _ in range(4)]
    for t in (1.0, 2.0):
        b, c, m = table.start_tick(t)
        for slot in first:
            b[slot], c[slot], m[slot] = slot + t, 0.0, -1.0
    table.drop_row(first[0])
    b, c, m = table.start_tick(3.0)
    more = [table.add_row() for _ in range(100)]  # the first reuses first[0]'s slot, then it grows
    assert more[0] == first[0]
    for slot in first[1:] + more:
        b[slot], c[slot], m[slot] = 1000.0 + slot, 0.0, -1.0
    assert [p.t for p in table.points(more[0])] == [3.0]
    assert [p.kmalloc_bytes_per_s for p in table.points(first[1])] == [
        first[1] + 1.0,
        first[1] + 2.0,
        1000.0 + first[1],
    ]
    assert [p.kmalloc_bytes_per_s for p in table.points(more[-1])] == [1000.0 + more[-1]]


def test_pid_churn_keeps_histories_apart() -> None:
    """Processes that come and go (slots reused) each show only their own samples."""
    store = new_store(exited_keep_s=2.0)
    for t in range(1, 40):
        pid = 10 + t // 5  # a new process every 5 ticks, the old one exits
        store.ingest(
            1000.0 + t, reading(**{f"p{pid}": (t, t * 100, t * 100)}), {pid: info(pid, start=float(pid))}
        )
    history = store.history(ProcessKey(17, 17.0))
    assert [p.t for p in history] == [1035.0, 1036.0, 1037.0, 1038.0, 1039.0]


def test_sort_on_raw_values_with_unknowns_last() -> None:
    rows = [
        ProcessRow(pid=1, start_time=0, comm="b", kmalloc_bytes_per_s=1024.0, rss_bytes=None),
        ProcessRow(pid=2, start_time=0, comm="A", kmalloc_bytes_per_s=999.0, rss_bytes=10),
        ProcessRow(pid=3, start_time=0, comm="c", kmalloc_bytes_per_s=1e6, rss_bytes=5),
    ]
    assert [r.pid for r in sort_rows(rows, SortKey("kmalloc_bytes_per_s"))] == [3, 1, 2]
    assert [r.pid for r in sort_rows(rows, SortKey("comm", reverse=False))] == [2, 1, 3]
    assert [r.pid for r in sort_rows(rows, SortKey("rss_bytes"))] == [2, 3, 1]
    assert [r.pid for r in sort_rows(rows, SortKey("kmalloc_waste_pct"))] == [1, 2, 3]  # all None: by pid


def test_filter_matches_command_cmdline_and_pid() -> None:
    rows = [
        ProcessRow(pid=123, start_time=0, comm="nginx", cmdline="nginx: worker"),
        ProcessRow(pid=456, start_time=0, comm="python3", cmdline="python3 app.py"),
        ProcessRow(pid=IRQ_TGID, start_time=0, comm="[irq]"),
    ]
    assert [r.pid for r in filter_rows(rows, "NGI")] == [123]
    assert [r.pid for r in filter_rows(rows, "app.py")] == [456]
    assert [r.pid for r in filter_rows(rows, "45")] == [456]
    assert [r.pid for r in filter_rows(rows, "429")] == []  # the irq key's digits are not a PID
    assert len(filter_rows(rows, "  ")) == 3


def test_whole_window_rates() -> None:
    store = new_store()
    store.ingest(1001.0, reading(p1=(10, 1000, 1000)), {1: info(1)})
    store.ingest(1004.0, reading(p1=(12, 1200, 1200)), {1: info(1)})
    snap = whole_window_rates(store.snapshot(1004.0))
    assert snap.duration_s == 4.0
    assert snap.processes[0].kmalloc_bytes_per_s == 300.0
    assert snap.kmalloc_calls_per_s == 3.0


# -- containers ---------------------------------------------------------------------------------------

DOCKER_ID = "a" * 64
OTHER_ID = "b" * 64


def in_cgroup(pid: int, comm: str, path: str) -> ProcInfo:
    from memtop.containers import container_of_proc_cgroup

    text = f"4:memory:{path}\n0::{path}\n"
    return ProcInfo(
        pid=pid, start_time=1.0, comm=comm, cgroup_path=path, container=container_of_proc_cgroup(text)
    )


def test_processes_are_attributed_to_containers_and_containers_sum_them() -> None:
    from memtop.containers import ContainerMeta, parse_cgroup_path
    from memtop.store import ContainerState

    store = new_store()
    procs = {
        1: in_cgroup(1, "web", f"/docker/{DOCKER_ID}"),
        2: in_cgroup(2, "worker", f"/docker/{DOCKER_ID}/sub"),
        3: in_cgroup(3, "sshd", "/system.slice/ssh.service"),
    }
    store.ingest(1001.0, reading(p1=(1, 100, 100), p2=(3, 300, 300), p3=(5, 500, 500)), procs)
    ref = parse_cgroup_path(f"/docker/{DOCKER_ID}")
    assert ref is not None
    assert set(store.container_refs()) == {DOCKER_ID}
    store.set_containers(
        {
            DOCKER_ID: ContainerState(ref, ContainerMeta(name="web-1"), 2048, 4096, (1, 2)),
            OTHER_ID: ContainerState(parse_cgroup_path(f"/docker/{OTHER_ID}"), ContainerMeta(), 10, None, ()),
        }
    )
    snap = store.snapshot(1001.0)
    rows = {r.pid: r for r in snap.processes}
    assert rows[1].container_id == rows[2].container_id == DOCKER_ID and rows[3].container_id is None
    assert rows[1].container == "web-1"
    assert rows[3].unit == "ssh.service" and rows[1].unit == ""  # the host grouped by systemd unit
    web = snap.container(DOCKER_ID)
    assert web is not None
    assert web.kmalloc_bytes_per_s == 400.0 and web.kmalloc_calls == 4 and web.pids == (1, 2)
    assert web.memory_pct == 50.0 and web.label == "web-1"
    idle = snap.container(OTHER_ID)
    assert idle is not None and idle.kmalloc_bytes == 0 and idle.memory_limit_bytes is None
    assert idle.label == OTHER_ID[:12]


def test_container_totals_survive_the_exit_of_its_processes() -> None:
    store = new_store(exited_keep_s=1.0)
    cg = f"/kubepods/besteffort/pod0a1b2c3d-0000-4000-8000-000000000001/{DOCKER_ID}"
    # exited before memtop could look: only the kernel's name and cgroup
    counters = KmallocCounters(10, 1000, 1000, comm="short", cgroup_id=42, cgroup_path=cg)
    store.ingest(1001.0, KmallocReading({9: counters}), {9: None})
    snap = store.snapshot(1001.0)
    row = snap.processes[0]
    assert row.exited and row.container_id == DOCKER_ID and row.cgroup_path == cg
    container = snap.container(DOCKER_ID)
    assert container is not None and container.kmalloc_bytes == 1000
    assert container.pod_uid == "0a1b2c3d-0000-4000-8000-000000000001" and container.qos == "besteffort"
    store.ingest(1005.0, KmallocReading({}), {})
    snap = store.snapshot(1005.0)
    assert not snap.processes  # the exited row is gone
    container = snap.container(DOCKER_ID)
    assert container is not None and container.kmalloc_bytes == 1000 and container.kmalloc_bytes_per_s == 0
    whole = whole_window_rates(snap).container(DOCKER_ID)
    assert whole is not None and whole.kmalloc_bytes_per_s == 1000 / 5.0  # over the 5 s since start


def test_a_container_only_the_unified_hierarchy_names_is_still_attributed() -> None:
    """Hybrid host: the runtime left the v1 memory path at "/", the cgroup2 line names the container."""
    from memtop.containers import container_of_proc_cgroup

    text = f"4:memory:/\n0::/system.slice/docker-{DOCKER_ID}.scope\n"
    proc = ProcInfo(
        pid=5, start_time=1.0, comm="app", cgroup_path="/", container=container_of_proc_cgroup(text)
    )
    store = new_store()
    store.ingest(1001.0, reading(p5=(1, 100, 100)), {5: proc})
    snap = store.snapshot(1001.0)
    assert snap.processes[0].container_id == DOCKER_ID
    container = snap.container(DOCKER_ID)
    assert container is not None and container.kmalloc_bytes == 100


def test_the_drilled_in_process_gets_its_own_share_of_each_leak_stack_and_it_survives_export() -> None:
    from memtop.export import snapshot_from_dict, snapshot_to_dict

    from .test_leaks import reading as leak_reading
    from .test_leaks import stack

    store = new_store()
    store.ingest(1001.0, reading(p100=(1, 100, 100), p200=(1, 100, 100)), {100: info(100), 200: info(200)})
    store.ingest_leaks(
        1001.0, leak_reading(stack(pid=100, outstanding=1000), stack(pid=200, outstanding=5000))
    )
    key = ProcessKey(100, 100.0)
    store.set_focus(key)
    snap = store.snapshot(1001.0)
    (whole,) = snap.leaks
    assert whole.outstanding_bytes == 6000 and set(whole.pids) == {100, 200}
    assert snap.focus is not None and snap.focus.leaks is not None
    (own,) = snap.focus.leaks
    assert own.outstanding_bytes == 1000 and own.pids == (100,)
    again = snapshot_from_dict(snapshot_to_dict(snap))
    assert again.focus is not None and again.focus.leaks == snap.focus.leaks
    doc = snapshot_to_dict(snap)
    del doc["focus"]["leaks"]  # a file written before the field existed: not known, not empty
    old = snapshot_from_dict(doc)
    assert old.focus is not None and old.focus.leaks is None


# -- one attribution for every panel (issue #13, fault 9) ------------------------------------------------

OUTER = "a" * 64
INNER = "b" * 64


def test_outer_container_counts_its_nested_containers_kmalloc() -> None:
    """docker-in-docker: the outer container's process count and memory include the inner one's (its
    cgroup subtree); so must its kmalloc."""
    from memtop.containers import parse_cgroup_path

    store = new_store()
    outer_path, inner_path = f"/docker/{OUTER}", f"/docker/{OUTER}/docker/{INNER}"
    outer_proc = replace(
        info(1, comm="dockerd"), cgroup_path=outer_path, container=parse_cgroup_path(outer_path)
    )
    inner_proc = replace(info(2, comm="app"), cgroup_path=inner_path, container=parse_cgroup_path(inner_path))
    store.ingest(1001.0, reading(p1=(10, 1000, 1000), p2=(30, 3000, 3000)), {1: outer_proc, 2: inner_proc})
    snap = store.snapshot(1001.0)
    outer, inner = snap.container(OUTER), snap.container(INNER)
    assert outer is not None and inner is not None
    assert inner.kmalloc_calls == 30
    assert outer.kmalloc_calls == 40 and outer.kmalloc_bytes == 4000


def test_tcp_rows_take_the_processs_container_and_name() -> None:
    """A process placed only in a v1 memory cgroup (its cgroup2 path is the root) shows its container in
    TCP as in Processes; a TCP row's command is the process's name, not the connecting thread's."""
    from memtop.containers import parse_cgroup_path
    from memtop.tcp import TcpCounters, TcpKey, TcpReading

    store = new_store()
    path = f"/docker/{OUTER}"
    proc = replace(info(7, comm="java"), cgroup_path=path, container=parse_cgroup_path(path))
    store.ingest(1001.0, reading(p7=(1, 100, 100)), {7: proc})
    key = TcpKey(7, 4, "10.0.0.1", 443)
    store.ingest_tcp(1001.0, TcpReading({key: TcpCounters("http-worker-3", 55, 1, 0, 10, (0, 1))}))
    store.set_cgroup_paths({55: "/"})
    row = store.snapshot(1001.0).tcp_connect[0]
    assert row.container_id == OUTER and row.comm == "java" and row.cgroup_path == path


def test_filter_finds_host_processes_by_their_systemd_unit() -> None:
    rows = [
        ProcessRow(pid=1, start_time=0.0, comm="sshd", unit="ssh.service"),
        ProcessRow(pid=2, start_time=0.0, comm="cron", unit="cron.service"),
    ]
    assert [r.pid for r in filter_rows(rows, "ssh.serv")] == [1]


def test_the_drilled_in_process_gets_its_own_leak_growth_from_its_second_reading_on() -> None:
    """Per-process leak growth is kept for the focused process only: the drill-down shows its growth once
    two readings were taken with it in focus; another process in focus starts again from none."""
    from .test_leaks import reading as leak_reading
    from .test_leaks import stack

    store = new_store()
    store.ingest(1001.0, reading(p100=(1, 100, 100), p200=(1, 100, 100)), {100: info(100), 200: info(200)})

    def leaks_at(t: float, own_100: int, own_200: int) -> None:
        store.ingest_leaks(
            t, leak_reading(stack(pid=100, outstanding=own_100), stack(pid=200, outstanding=own_200))
        )

    def focus_growth(t: float) -> float:
        snap = store.snapshot(t)
        assert snap.focus is not None and snap.focus.leaks is not None
        (own,) = snap.focus.leaks
        return own.growth_bytes_per_s

    store.set_focus(ProcessKey(100, 100.0))
    leaks_at(1001.0, 1000, 5000)
    assert focus_growth(1001.0) == 0.0  # one reading: nothing to compare yet
    leaks_at(1011.0, 2000, 5000)
    assert focus_growth(1011.0) == pytest.approx(100.0)
    store.set_focus(ProcessKey(200, 100.0))
    leaks_at(1021.0, 3000, 6000)
    assert focus_growth(1021.0) == 0.0  # 200's history starts now
    leaks_at(1031.0, 4000, 8000)
    assert focus_growth(1031.0) == pytest.approx(200.0)
    store.set_focus(None)
    assert store.leaks.watched_pid is None and not store.leaks._pid_history
