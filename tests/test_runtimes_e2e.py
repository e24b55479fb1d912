"""End-to-end against real runtimes: Docker, Podman, containerd (plain `ctr run`) and LXC, each running the
tests' own busybox image (tests/runtimes.py), and what memtop's live pipeline reports for them: name, id,
runtime, limit, working set, process count, exec'd and short-lived processes, OOM kills with the
container's name (also past the kernel log's rate limit, and after the container is removed), `docker
rename`, and the runtimes' daemons (dockerd, containerd, shims, conmon) never shown as containers.

One live source serves the module (the probes compile once); a thread ticks it every half second and the
tests wait for what they expect to appear, with generous deadlines (the CPU is shared).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from memtop.config import Config
from memtop.export import snapshot_to_dict
from memtop.oom import read_kmsg_backlog
from memtop.sources import LiveSource
from memtop.store import ContainerRow, Snapshot, filter_containers, filter_rows

from .runtimes import IMAGE, PODMAN_IMAGE, REPO, Runtimes, unique

pytestmark = pytest.mark.bpf

MiB = 1 << 20
LIMIT = 64 * MiB
OOM_LIMIT = 32 * MiB
RUNTIME_NAMES = ("docker", "podman", "containerd", "lxc")
# The container's init: a shell with two kmalloc loops; so three processes while nothing is exec'd in.
WORKLOAD = "/bin/sh -c 'kload 20 & kload 20 & wait'"
BURSTS = 5
BURST_CALLS = 3000


@dataclass
class Started:
    runtime: str
    id: str  # what memtop must call its id
    name: str  # what `docker ps` / `podman ps` / `ctr c ls` / `lxc-ls` call it


def start_container(rt: Runtimes, runtime: str, command: str, limit: int) -> Started:
    """A container of `runtime` running `command` (a shell line) under a memory (and memory+swap) limit."""
    name = unique(f"rt-{runtime}")
    if runtime == "docker":
        cid = rt.docker.run(
            "run",
            "-d",
            "--name",
            name,
            "--memory",
            str(limit),
            "--memory-swap",
            str(limit),
            "--network",
            "none",
            IMAGE,
            "/bin/sh",
            "-c",
            command,
        ).strip()
        return Started(runtime, cid, name)
    if runtime == "podman":
        cid = rt.podman(
            "run",
            "-d",
            "--name",
            name,
            "--memory",
            str(limit),
            "--memory-swap",
            str(limit),
            "--network",
            "none",
            PODMAN_IMAGE,
            "/bin/sh",
            "-c",
            command,
        ).strip()
        return Started(runtime, cid, name)
    if runtime == "containerd":
        rt.ctr(
            "run",
            "-d",
            "--null-io",
            "--memory-limit",
            str(limit),
            "localhost/memtop-test:1",
            name,
            "/bin/sh",
            "-c",
            command,
        )
        return Started(runtime, name, name)
    assert runtime == "lxc"
    script = Path(rt.lxc_path) / f"{name}.init"
    rt.lxc_create(name, "/bin/memtop-init", memory_limit=limit)
    script = Path(rt.lxc_path) / name / "rootfs" / "bin" / "memtop-init"
    script.write_text(f"#!/bin/sh\nexec {command}\n")
    script.chmod(0o755)
    rt.lxc("start", name, "-d")
    return Started(runtime, name, name)


def exec_in(rt: Runtimes, c: Started, command: str) -> None:
    """Run a shell line inside the running container (docker/podman exec, ctr task exec, lxc-attach)."""
    argv = ("/bin/sh", "-c", command)
    if c.runtime == "docker":
        rt.docker.run("exec", c.id, *argv)
    elif c.runtime == "podman":
        rt.podman("exec", c.id, *argv)
    elif c.runtime == "containerd":
        rt.ctr("task", "exec", "--exec-id", unique("x"), c.id, *argv)
    else:
        rt.lxc("attach", c.id, "--", *argv)


def remove(rt: Runtimes, c: Started, namespace: str = "default") -> None:
    if c.runtime == "docker":
        subprocess.run([*rt.docker.cli, "rm", "-f", c.id], capture_output=True, timeout=120)
    elif c.runtime == "podman":
        subprocess.run(
            ["podman", "rm", "-f", "-t", "0", c.id], env=rt.podman_env, capture_output=True, timeout=120
        )
    elif c.runtime == "containerd":
        ctr = ["ctr", "--address", rt.info["containerd_socket"], "-n", namespace]
        subprocess.run([*ctr, "task", "kill", "-s", "KILL", c.id], capture_output=True, timeout=60)
        for _ in range(50):
            if (
                subprocess.run([*ctr, "task", "rm", "-f", c.id], capture_output=True, timeout=60).returncode
                == 0
            ):
                break
            time.sleep(0.1)
        subprocess.run([*ctr, "container", "rm", c.id], capture_output=True, timeout=60)
    else:
        for tool in (["stop", "-k"], ["destroy"]):
            subprocess.run(
                [f"lxc-{tool[0]}", "-P", rt.lxc_path, "-n", c.id, *tool[1:]], capture_output=True, timeout=60
            )


@dataclass
class Live:
    """A LiveSource ticked by a thread; `latest` is the newest snapshot."""

    source: LiveSource
    latest: Snapshot | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.latest = self.source.tick()
            except BaseException as exc:  # pragma: no cover - surfaced by wait_for
                self.error = exc
                return
            self.stop.wait(0.5)

    def wait_for(self, what: str, check: Callable[[Snapshot], object], timeout: float = 45.0) -> Snapshot:
        """The first snapshot for which `check` is truthy (a failed assert is checked again until timeout)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            assert self.error is None, self.error
            snap = self.latest
            if snap is not None:
                try:
                    if check(snap):
                        return snap
                except (AssertionError, LookupError, StopIteration) as exc:
                    last = exc
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}: {last!r}")


@pytest.fixture(scope="module")
def containers(runtimes: Runtimes) -> Iterator[dict[str, Started]]:
    started: dict[str, Started] = {}
    try:
        for runtime in RUNTIME_NAMES:
            started[runtime] = start_container(runtimes, runtime, WORKLOAD, LIMIT)
        yield started
    finally:
        for c in started.values():
            remove(runtimes, c)


@pytest.fixture(scope="module")
def live(runtimes: Runtimes, containers: dict[str, Started]) -> Iterator[Live]:
    source = LiveSource(Config(interval_s=0.5, runtime_roots=runtimes.runtime_roots))
    source.start()
    live = Live(source)
    thread = threading.Thread(target=live.run, daemon=True)
    thread.start()
    try:
        yield live
    finally:
        live.stop.set()
        thread.join(timeout=30)
        source.close()


def row_of(snap: Snapshot, c: Started) -> ContainerRow:
    row = snap.container(c.id)
    assert row is not None, (
        f"{c.runtime} container {c.id} not in {[(r.id[:12], r.runtime) for r in snap.containers]}"
    )
    return row


def workload_pids(pids: tuple[int, ...]) -> list[str]:
    comms = []
    for pid in pids:
        try:
            comms.append(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:
            comms.append("?")
    return sorted(comms)


@pytest.mark.parametrize("runtime", RUNTIME_NAMES)
def test_container_name_id_runtime_limit_and_processes(
    runtime: str, live: Live, containers: dict[str, Started]
) -> None:
    c = containers[runtime]

    def check(snap: Snapshot) -> bool:
        row = row_of(snap, c)
        assert row.name == c.name and row.runtime == runtime, (row.name, row.runtime)
        assert row.memory_limit_bytes == LIMIT, row.memory_limit_bytes
        assert workload_pids(row.pids) == ["kload", "kload", "sh"], workload_pids(row.pids)
        assert row.kmalloc_calls > 0
        assert row.memory_usage_bytes is not None and row.memory_bytes is not None
        assert 0 < row.memory_bytes <= row.memory_usage_bytes < LIMIT
        procs = [p for p in snap.processes if p.pid in row.pids and p.comm == "kload"]
        assert procs and all(p.container_id == c.id and p.container == c.name for p in procs), procs
        return True

    snap = live.wait_for(f"{runtime} container with its name, limit and processes", check)
    label = row_of(snap, c).label
    assert label == c.name
    # the filters find it by the name its runtime's own CLI shows
    assert [r.id for r in filter_containers(snap.containers, c.name)] == [c.id]
    assert "kload" in {p.comm for p in filter_rows(snap.processes, c.name) if not p.exited}
    if runtime == "containerd":  # plain `ctr run`: a cgroup path with no runtime marker (/default/<id>)
        assert row_of(snap, c).cgroup_path == f"/default/{c.id}"


@pytest.mark.parametrize("runtime", RUNTIME_NAMES)
def test_execd_short_lived_processes_count_for_the_container(
    runtime: str, runtimes: Runtimes, live: Live, containers: dict[str, Started]
) -> None:
    c = containers[runtime]
    live.wait_for(f"{runtime} container", lambda s: row_of(s, c))
    before = row_of(live.wait_for("a snapshot", lambda s: True), c).kmalloc_calls
    exec_in(runtimes, c, f"for i in $(seq {BURSTS}); do kburst {BURST_CALLS}; done")

    def check(snap: Snapshot) -> bool:
        bursts = [p for p in snap.processes if p.comm == "kburst" and p.container_id == c.id]
        assert len(bursts) >= BURSTS, [(p.pid, p.container_id) for p in snap.processes if p.comm == "kburst"]
        assert all(p.container == c.name for p in bursts)
        assert row_of(snap, c).kmalloc_calls - before >= BURSTS * BURST_CALLS
        return True

    live.wait_for(f"exec'd short-lived processes in {runtime}", check)


def daemon_pids(runtimes: Runtimes) -> dict[int, str]:
    """dockerd, containerd, their shims and podman's conmon: this session's own."""
    out: dict[int, str] = {}
    run_dir = str(Path(runtimes.info["containerd_socket"]).parent)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        exe = Path(argv[0].decode(errors="replace")).name
        args = b" ".join(argv).decode(errors="replace")
        if exe in ("dockerd", "containerd", "containerd-shim-runc-v2", "conmon") and (
            run_dir in args or "memtop-test-rt" in args
        ):
            out[int(proc.name)] = exe
    return out


def test_runtime_daemons_are_never_containers(
    runtimes: Runtimes, live: Live, containers: dict[str, Started]
) -> None:
    daemons = daemon_pids(runtimes)
    assert {"dockerd", "containerd", "containerd-shim-runc-v2", "conmon"} <= set(daemons.values()), daemons

    def check(snap: Snapshot) -> bool:
        for c in containers.values():
            row_of(snap, c)
        for row in snap.containers:
            held = set(row.pids) & set(daemons)
            assert not held, (
                f"container {row.label} ({row.runtime}) holds daemons {[daemons[p] for p in held]}"
            )
            assert "conmon" not in row.cgroup_path and "lxc.monitor" not in row.cgroup_path, row.cgroup_path
        for p in snap.processes:
            if p.pid in daemons:
                assert p.container_id is None, (daemons[p.pid], p.container_id)
        return True

    live.wait_for("every container, none of them a daemon", check)


def test_working_set_leaves_out_the_page_cache(
    runtimes: Runtimes, live: Live, containers: dict[str, Started]
) -> None:
    """After a 40 MiB file write in the container, MEMORY (working set) stays small while raw usage has the
    cache, as `docker stats` reports it (issue #13, fault 7)."""
    c = containers["docker"]
    runtimes.docker.run("exec", c.id, "/bin/sh", "-c", "dd if=/dev/zero of=/tmp/f bs=1M count=40 && sync")

    def check(snap: Snapshot) -> bool:
        row = row_of(snap, c)
        assert row.memory_usage_bytes is not None and row.memory_bytes is not None
        assert row.memory_usage_bytes >= 40 * MiB, row.memory_usage_bytes
        assert row.memory_bytes < row.memory_usage_bytes - 30 * MiB, (
            row.memory_bytes,
            row.memory_usage_bytes,
        )
        assert row.memory_pct is not None and row.memory_pct == pytest.approx(100 * row.memory_bytes / LIMIT)
        return True

    snap = live.wait_for("a working set without the page cache", check)
    stats = runtimes.docker.run("stats", "--no-stream", "--format", "{{json .}}", c.id)
    shown = json.loads(stats)["MemUsage"].split("/")[0].strip()  # e.g. "1.42MiB"
    value, unit = float(shown.rstrip("KMGiB")), shown.lstrip("0123456789.")
    docker_bytes = value * {"B": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30}[unit]
    assert abs(docker_bytes - (row_of(snap, c).memory_bytes or 0)) < 10 * MiB, (shown, row_of(snap, c))
    runtimes.docker.run("exec", c.id, "rm", "-f", "/tmp/f")


def test_docker_rename_is_seen_without_restart(
    runtimes: Runtimes, live: Live, containers: dict[str, Started]
) -> None:
    c = containers["docker"]
    live.wait_for("docker container", lambda s: row_of(s, c).name == c.name)
    new = unique("rt-renamed")
    runtimes.docker.run("rename", c.name, new)
    try:

        def check(snap: Snapshot) -> bool:
            assert row_of(snap, c).name == new, row_of(snap, c).name
            kload = [
                p for p in snap.processes if p.container_id == c.id and p.comm == "kload" and not p.exited
            ]
            assert kload and all(p.container == new for p in kload)
            return True

        live.wait_for("the new name", check, timeout=30)
    finally:
        runtimes.docker.run("rename", new, c.name)


# Each kill: memhog touches 1 MiB at a time up to 4x the limit (it stops there even if the limit failed).
OOM_COMMAND = f"memhog {4 * OOM_LIMIT // MiB}; sleep 1000"


@pytest.fixture(scope="module", autouse=True)
def _memcg_oom_is_safe() -> None:
    with open("/proc/sys/vm/panic_on_oom") as f:
        if f.read().strip() == "2":
            pytest.skip("vm.panic_on_oom=2: a cgroup OOM would panic the machine")


@pytest.mark.parametrize("runtime", RUNTIME_NAMES)
def test_oom_kill_names_the_container_even_after_it_is_removed(
    runtime: str, runtimes: Runtimes, live: Live
) -> None:
    c = start_container(runtimes, runtime, OOM_COMMAND, OOM_LIMIT)
    removed = False
    try:

        def killed(snap: Snapshot) -> bool:
            hogs = [e for e in snap.oom_events if e.victim_comm == "memhog"]
            event = next((e for e in hogs if e.container_id == c.id), None)
            assert event is not None, [(e.container_id, e.cgroup_path, e.constraint) for e in hogs]
            assert event.container_name == c.name and event.runtime == runtime, event
            assert event.constraint == "memcg" and event.memcg_limit_bytes == OOM_LIMIT, event
            return True

        live.wait_for(f"the OOM kill in {runtime}", killed)
        remove(runtimes, c)
        removed = True
        time.sleep(1.5)
        snap = live.wait_for("the OOM kill after removal", killed)
        doc = snapshot_to_dict(snap)
        item = next(e for e in doc["oom_events"] if e["container_id"] == c.id)
        assert item["container_name"] == c.name and item["runtime"] == runtime
    finally:
        if not removed:
            remove(runtimes, c)


KILLS = 14  # more than the kernel log prints in 5 s (10)


def test_oom_kills_past_the_kernel_log_rate_limit_stay_with_the_container(
    runtimes: Runtimes, live: Live
) -> None:
    """The kernel stops printing oom-kill lines after 10 in 5 s; every kill is still the container's, from
    the tracepoint's and the memory cgroups' own facts (issue #13, fault 6)."""
    command = f"for i in $(seq {KILLS}); do memhog {4 * OOM_LIMIT // MiB}; done; sleep 1000"
    c = start_container(runtimes, "docker", command, OOM_LIMIT)
    try:

        def all_killed(snap: Snapshot) -> bool:
            mine = [e for e in snap.oom_events if e.victim_comm == "memhog" and e.time >= started]
            ours = [e for e in mine if e.container_id == c.id]
            assert len(ours) >= KILLS, [(e.container_id, e.constraint, e.cgroup_path) for e in mine]
            for e in ours:
                assert e.container_name == c.name and e.constraint == "memcg", e
                assert e.memcg_limit_bytes == OOM_LIMIT, e
            return True

        started = time.time() - 5
        snap = live.wait_for(f"{KILLS} OOM kills in the container", all_killed, timeout=90)
        pids = {e.victim_pid for e in snap.oom_events if e.container_id == c.id}
        lines, problem = read_kmsg_backlog()
        assert not problem, problem
        printed = {pid for pid in pids for line in lines if "oom-kill:" in line and f",pid={pid}," in line}
        assert len(printed) < len(pids), "the kernel log printed every kill: its rate limit was not reached"
    finally:
        remove(runtimes, c)


def test_memtop_snapshot_cli_with_runtime_roots(
    runtimes: Runtimes, containers: dict[str, Started], tmp_path: Path
) -> None:
    """`memtop snapshot --runtime-root ...` (added to the defaults) names every runtime's container."""
    out = tmp_path / "snap.json"
    proc = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "memtop"),
            "snapshot",
            "--duration",
            "3",
            "--output",
            str(out),
            *runtimes.runtime_root_args(),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    got = {item["id"]: item for item in doc["containers"]}
    for runtime, c in containers.items():
        item = got.get(c.id)
        assert item is not None, (runtime, sorted(got))
        assert (item["name"], item["runtime"], item["memory_limit_bytes"]) == (c.name, runtime, LIMIT), item
        assert item["kmalloc_calls"] > 0 and item["memory_usage_bytes"] >= item["memory_bytes"] > 0


RM_RUNS = 12  # more than the kernel log prints in 5 s


def test_oom_kills_of_containers_run_with_rm_keep_their_names(runtimes: Runtimes, live: Live) -> None:
    """`docker run --rm` whose process is OOM-killed: the container (and its cgroup and state) is gone a
    moment later, likely before the next refresh. Each kill still names its own container, also past the
    kernel log's rate limit."""
    names = [unique("rt-rm") for _ in range(RM_RUNS)]
    started = time.time() - 5
    for name in names:
        subprocess.run(
            [
                *runtimes.docker.cli,
                "run",
                "--rm",
                "--name",
                name,
                "--memory",
                str(OOM_LIMIT),
                "--memory-swap",
                str(OOM_LIMIT),
                "--network",
                "none",
                IMAGE,
                "/bin/memhog",
                str(4 * OOM_LIMIT // MiB),
            ],
            capture_output=True,
            timeout=120,
        )

    def check(snap: Snapshot) -> bool:
        mine = [e for e in snap.oom_events if e.victim_comm == "memhog" and e.time >= started]
        got = {e.container_name for e in mine}
        assert set(names) <= got, [
            (e.container_name, e.container_id, e.constraint, e.cgroup_path) for e in mine
        ]
        for e in mine:
            if e.container_name in names:
                assert (
                    e.constraint == "memcg" and e.runtime == "docker" and e.memcg_limit_bytes == OOM_LIMIT
                ), e
        return True

    live.wait_for(f"{RM_RUNS} OOM kills, each with its container's name", check, timeout=60)


def test_cri_container_through_ctr_with_a_pod_limit(runtimes: Runtimes, live: Live) -> None:
    """No kubelet here: a container made the way the CRI plugin makes one (namespace k8s.io, a kubepods
    cgroupfs path, CRI annotations), with the memory limit on its pod's cgroup only. memtop names the
    container and pod from containerd's state, and shows the pod's limit as the container's (the effective,
    hierarchical limit; issue #13, fault 7)."""
    from memtop.cgroups import current_layout

    layout = current_layout()
    memory_root = Path(layout.v1_memory_root or layout.v2_root or "")
    pod_uid = str(uuid.uuid4())
    cid = secrets.token_hex(32)
    pod = f"kubepods/burstable/pod{pod_uid}"
    made = [p for p in ("kubepods", "kubepods/burstable") if not (memory_root / p).exists()]
    (memory_root / pod).mkdir(parents=True)
    limit_file = "memory.limit_in_bytes" if layout.v1_memory_root else "memory.max"
    (memory_root / pod / limit_file).write_text(str(48 * MiB))
    notes = {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.sandbox-name": "web-1",
        "io.kubernetes.cri.sandbox-namespace": "shop",
    }
    c = Started("containerd", cid, "app")
    try:
        runtimes.ctr(
            "run",
            "-d",
            "--null-io",
            "--cgroup",
            f"/{pod}/{cid}",
            *[f"--annotation={k}={v}" for k, v in notes.items()],
            "localhost/memtop-test:1",
            cid,
            "/bin/sh",
            "-c",
            WORKLOAD,
            namespace="k8s.io",
        )

        def check(snap: Snapshot) -> bool:
            row = row_of(snap, c)
            assert (row.runtime, row.name, row.pod_name, row.namespace) == (
                "containerd",
                "app",
                "web-1",
                "shop",
            ), row
            assert (row.pod_uid, row.qos) == (pod_uid, "burstable"), row
            assert row.memory_limit_bytes == 48 * MiB, row.memory_limit_bytes
            assert workload_pids(row.pids) == ["kload", "kload", "sh"]
            procs = [p for p in snap.processes if p.container_id == cid and p.comm == "kload"]
            assert procs and all(p.container == "app" for p in procs)
            return True

        live.wait_for("the CRI-made container with its pod", check)
    finally:
        remove(runtimes, c, namespace="k8s.io")
        for hierarchy in [memory_root.parent / h for h in os.listdir(memory_root.parent)] + [memory_root]:
            for rel in (f"{pod}/{cid}", pod, *reversed(made)):
                with contextlib.suppress(OSError):
                    (hierarchy / rel).rmdir()


def test_oom_kill_in_a_ctr_run_rm_container_keeps_its_name(runtimes: Runtimes, live: Live) -> None:
    """`ctr run --rm`: no runtime marker in its cgroup path, and its task state is gone a moment after the
    kill; the kill still belongs to the container, by name."""
    name = unique("rt-ctr-rm")
    started = time.time() - 5
    subprocess.run(
        [
            "ctr",
            "--address",
            runtimes.info["containerd_socket"],
            "-n",
            "default",
            "run",
            "--rm",
            "--null-io",
            "--memory-limit",
            str(OOM_LIMIT),
            "localhost/memtop-test:1",
            name,
            "/bin/memhog",
            str(4 * OOM_LIMIT // MiB),
        ],
        capture_output=True,
        timeout=120,
    )

    def check(snap: Snapshot) -> bool:
        mine = [e for e in snap.oom_events if e.victim_comm == "memhog" and e.time >= started]
        event = next((e for e in mine if e.container_id == name), None)
        assert event is not None, [(e.container_id, e.container_name, e.cgroup_path) for e in mine]
        assert (event.container_name, event.runtime, event.constraint) == (name, "containerd", "memcg"), event
        return True

    live.wait_for("the kill in the removed ctr container", check)
