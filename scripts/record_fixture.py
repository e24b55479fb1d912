"""Record tests/data/replay.json: a real `memtop snapshot` of known workloads, trimmed for the tests.

Run as root:  .venv/bin/python scripts/record_fixture.py
Everything in the file comes from the real probes on this machine:
- a host Python loop of os.listxattr() (one 256-byte kmalloc per call, call site listxattr), drilled
  into with --pid (call sites, sizes, tail);
- the same loop in cgroups of the script's own shaped like a Docker container and a Kubernetes pod's
  container (systemd driver), named through runtime state directories shaped like Docker's and
  containerd's (passed with --runtime-root), with a memory limit on the Docker one.
The cgroups and state directories are removed afterwards. The file keeps the busiest processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
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
    workers: list[subprocess.Popen[bytes]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        cgroup(f"{prefix}/docker/{web_id}", limit=256 << 20) as web,
        cgroup(kube) as api,
    ):
        state = Path(tmp)
        docker_state(state / "docker", web_id, "web-frontend", "nginx:1.27")
        containerd_state(state / "containerd", api_id, "checkout-7d9f8", "shop", "api", "shop/api:2.3")
        raw = state / "raw.json"
        try:
            host = spawn(20)
            workers += [host, spawn(20, web), spawn(20, api)]
            subprocess.run(
                [
                    sys.executable, "-m", "memtop", "snapshot",
                    "--duration", "5", "--interval", "0.5", "--tail-min-bytes", "256",
                    "--pid", str(host.pid),
                    "--runtime-root", f"docker={state / 'docker'}",
                    "--runtime-root", f"containerd={state / 'containerd'}",
                    "--output", str(raw),
                ],
                check=True,
                cwd=ROOT,
            )  # fmt: skip
            doc = json.loads(raw.read_text())
        finally:
            for w in workers:
                with contextlib.suppress(ProcessLookupError):
                    w.send_signal(signal.SIGKILL)
                w.wait()
            time.sleep(0.2)
    procs = sorted(doc["processes"], key=lambda p: p["kmalloc_bytes"], reverse=True)
    keep = procs[:KEEP_PROCESSES]
    for w in workers:
        if not any(p["pid"] == w.pid for p in keep):
            keep.append(next(p for p in procs if p["pid"] == w.pid))
    doc["processes"] = keep
    doc["focus"]["tail"] = doc["focus"]["tail"][-60:]
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT}: {len(keep)} processes, {len(doc['containers'])} containers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
