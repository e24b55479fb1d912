"""Record tests/data/replay.json: a real `memtop snapshot` of known workloads, trimmed for the tests.

Run as root:  .venv/bin/python scripts/record_fixture.py
Everything in the file comes from the real probes on this machine:
- a host Python loop of os.listxattr() (one 256-byte kmalloc per call, call site listxattr), drilled
  into with --pid (call sites, sizes, tail);
- the same loop in cgroups of the script's own shaped like a Docker container and a Kubernetes pod's
  container (systemd driver), named through runtime state directories shaped like Docker's and
  containerd's (passed with --runtime-root), with a memory limit on the Docker one;
- a real OOM kill: a process growing past the 48 MiB limit of a third, kubepods-shaped container;
- TCP connects from the Docker-shaped container: fast ones to a local listener, refused ones to a closed
  port, and one made slow for real (its SYN dropped by a full accept queue, retransmitted after ~1 s).
- outstanding allocations: a process in the pod's container holding 500 pipes open (kernel objects), and
  tests/data/leaky.c (built here, with symbols) leaking from memtop_test_leak_here, tracked in user
  mode with --leaks-pid.
The cgroups and state directories are removed afterwards. The file keeps the busiest processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.cgroup_util import TestCgroup, unique_name  # noqa: E402

OUT = ROOT / "tests" / "data" / "replay.json"
WORKLOAD = "import os, time\nend = time.time() + {secs}\nwhile time.time() < end:\n    os.listxattr('/')\n"
KEEP_PROCESSES = 30
MiB = 1 << 20
OOM_LIMIT = 48 * MiB
GROWER = f"""
import sys, time
held = []
for _ in range({4 * OOM_LIMIT // MiB}):
    held.append(bytearray({MiB}))
    time.sleep(0.05)
sys.exit(3)
"""
PIPE_HOLDER = """
import os, sys
fds = [fd for _ in range(500) for fd in os.pipe()]
sys.stdout.write("opened\\n"); sys.stdout.flush()
sys.stdin.read()
"""
TCP_CLIENT = """
import socket, sys, time
port, closed, slow_port = (int(a) for a in sys.argv[1:4])
for i in range(300):
    s = socket.create_connection(("127.0.0.1", port)); s.close()
    if i % 50 == 0:
        time.sleep(0.2)
for _ in range(20):
    try:
        socket.create_connection(("127.0.0.1", closed))
    except ConnectionRefusedError:
        pass
s = socket.create_connection(("127.0.0.1", slow_port), timeout=10); s.close()
"""


@contextlib.contextmanager
def cgroup(relpath: str, limit: int | None = None) -> Iterator[TestCgroup]:
    cg = TestCgroup(relpath, limit)
    try:
        yield cg
    finally:
        cg.remove()


def spawn(secs: float, cg: TestCgroup | None = None, argv0: str | None = None) -> subprocess.Popen[bytes]:
    code = WORKLOAD.format(secs=secs)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        preexec_fn=cg.enter if cg is not None else None,
        executable=sys.executable,
    )


def docker_state(root: Path, container_id: str, name: str, image: str) -> None:
    (root / container_id).mkdir(parents=True)
    doc = {"ID": container_id, "Name": f"/{name}", "Config": {"Image": image, "Labels": {}}}
    (root / container_id / "config.v2.json").write_text(json.dumps(doc))


def containerd_state(root: Path, container_id: str, pod: str, namespace: str, name: str, image: str) -> None:
    task = root / "k8s.io" / container_id
    task.mkdir(parents=True)
    annotations = {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-name": pod,
        "io.kubernetes.cri.sandbox-namespace": namespace,
        "io.kubernetes.cri.container-name": name,
        "io.kubernetes.cri.image-name": image,
    }
    (task / "config.json").write_text(json.dumps({"ociVersion": "1.1.0", "annotations": annotations}))


def serve(listener: socket.socket, stop: threading.Event) -> None:
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.close()


def tcp_workload(cg: TestCgroup, stop: threading.Event) -> subprocess.Popen[bytes]:
    """Fast, refused and one slow connect from inside the container's cgroup."""
    fast = socket.socket()
    fast.bind(("127.0.0.1", 0))
    fast.listen(512)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
    slow = socket.socket()
    slow.bind(("127.0.0.1", 0))
    slow.listen(0)
    filler = socket.create_connection(slow.getsockname())  # fills the one accept-queue slot
    threading.Thread(target=serve, args=(fast, stop), daemon=True).start()
    client = subprocess.Popen(
        [sys.executable, "-c", TCP_CLIENT, *(str(s.getsockname()[1]) for s in (fast, closed, slow))],
        preexec_fn=cg.enter,
    )

    def make_room() -> None:
        time.sleep(4.0)  # by now the client's first SYN to `slow` has been dropped
        conn, _ = slow.accept()
        conn.close()
        filler.close()
        slow.accept()[0].close()

    threading.Thread(target=make_room, daemon=True).start()
    return client


def main() -> int:
    if os.geteuid() != 0:
        print("record_fixture: run as root (it loads the probes and makes cgroups)", file=sys.stderr)
        return 1
    prefix = unique_name("memtop-fixture")
    web_id, api_id = secrets.token_hex(32), secrets.token_hex(32)
    pod_uid = str(uuid.uuid4())
    kube = (
        f"{prefix}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        f"{pod_uid.replace('-', '_')}.slice/cri-containerd-{api_id}.scope"
    )
    job_id = secrets.token_hex(32)
    job_pod = str(uuid.uuid4())
    job = f"{prefix}/kubepods/burstable/pod{job_pod}/{job_id}"
    workers: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    with (
        tempfile.TemporaryDirectory() as tmp,
        cgroup(f"{prefix}/docker/{web_id}", limit=256 << 20) as web,
        cgroup(kube) as api,
        cgroup(job, limit=OOM_LIMIT) as batch,
    ):
        state = Path(tmp)
        docker_state(state / "docker", web_id, "web-frontend", "nginx:1.27")
        containerd_state(state / "containerd", api_id, "checkout-7d9f8", "shop", "api", "shop/api:2.3")
        containerd_state(state / "containerd", job_id, "report-28f4c", "batch", "render", "batch/render:1.0")
        raw = state / "raw.json"
        try:
            host = spawn(20)
            workers += [host, spawn(20, web), spawn(20, api)]
            leaky_bin = state / "leaky"
            subprocess.run(
                ["gcc", "-g", "-O0", "-fno-omit-frame-pointer", "-fno-inline", "-o", str(leaky_bin),
                 str(ROOT / "tests" / "data" / "leaky.c")],
                check=True,
            )  # fmt: skip
            leaky = subprocess.Popen(
                [str(leaky_bin)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            assert leaky.stdout is not None and leaky.stdin is not None
            assert leaky.stdout.readline().strip() == "ready"
            memtop = subprocess.Popen(
                [
                    sys.executable, "-m", "memtop", "snapshot",
                    "--duration", "7", "--interval", "0.5", "--tail-min-bytes", "256",
                    "--pid", str(host.pid),
                    "--leaks-pid", str(leaky.pid),
                    "--runtime-root", f"docker={state / 'docker'}",
                    "--runtime-root", f"containerd={state / 'containerd'}",
                    "--output", str(raw),
                ],
                cwd=ROOT,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            assert memtop.stderr is not None
            line = memtop.stderr.readline()
            assert line.startswith("memtop: collecting"), line
            time.sleep(0.5)
            grower = subprocess.Popen([sys.executable, "-c", GROWER], preexec_fn=batch.enter)
            client = tcp_workload(web, stop)
            pipes = subprocess.Popen(
                [sys.executable, "-c", PIPE_HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                preexec_fn=api.enter, text=True,
            )  # fmt: skip
            leaky.stdin.write("run\n")
            leaky.stdin.flush()
            assert leaky.stdout.readline().strip() == "ran"
            workers += [grower, client, pipes, leaky]
            _, err = memtop.communicate(timeout=120)
            assert memtop.returncode == 0, err
            assert grower.wait(timeout=30) == -9, "the grower was not OOM-killed"
            doc = json.loads(raw.read_text())
        finally:
            stop.set()
            for w in workers:
                with contextlib.suppress(ProcessLookupError):
                    w.send_signal(signal.SIGKILL)
                w.wait()
            time.sleep(0.2)
    procs = sorted(doc["processes"], key=lambda p: p["kmalloc_bytes"], reverse=True)
    keep = procs[:KEEP_PROCESSES]
    for w in workers:
        if not any(p["pid"] == w.pid for p in keep):
            keep.extend(p for p in procs if p["pid"] == w.pid)
    kept = {p["pid"] for p in keep}
    doc["tcp_connect"] = [t for t in doc["tcp_connect"] if t["pid"] in kept][:20]
    doc["tcp_slow_connects"] = [t for t in doc["tcp_slow_connects"] if t["pid"] in kept][:40]
    assert any(e["victim_pid"] == workers[3].pid for e in doc["oom_events"]), "no OOM event recorded"
    doc["oom_events"] = [e for e in doc["oom_events"] if e["source"] == "tracepoint"][:10]
    ours = {w.pid for w in workers}
    leaks = sorted(doc["leaks"], key=lambda r: r["outstanding_bytes"], reverse=True)
    doc["leaks"] = [r for r in leaks if set(r["pids"]) & ours] + [
        r for r in leaks if not set(r["pids"]) & ours
    ][:25]
    assert any(r["kind"] == "user" and "memtop_test_leak_here" in r["top_frame"] for r in doc["leaks"])
    doc["processes"] = keep
    doc["focus"]["tail"] = doc["focus"]["tail"][-60:]
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT}: {len(keep)} processes, {len(doc['containers'])} containers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
