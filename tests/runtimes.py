"""Real container runtimes for the end-to-end tests: Docker, Podman, containerd (`ctr`) and LXC.

Session fixtures (made visible to every test module by tests/conftest.py):

- `docker_engine`: a working Docker Engine of the tests' own. Yields a `DockerEngine` whose `.cli` is
  `("/usr/bin/docker", "-H", "unix:///run/memtop-test-rt-<pid>/docker.sock")` (Debian's CLI, never another
  `docker` on PATH) and `.host` the `-H` value; `engine.run("ps", "-q")` runs the CLI and returns stdout
  (raises `CommandError`, a `subprocess.CalledProcessError` whose message has stderr). Any test module
  can use it, e.g. to build an image with `engine.run("build", "-t", "x:1", dir)` (no registry is
  reachable: use `FROM scratch` or `engine.run("import", tarball, "x:1")`; the `runtimes` fixture's
  `memtop-test:1` image has busybox). Its dockerd runs on the cgroupfs driver with no bridge and no
  iptables changes; containers need `--network none`.
- `runtimes`: everything: `.docker` (the `docker_engine`), `.podman(...)`, `.ctr(...)`, `.lxc_*`, the image
  `memtop-test:1` in all of them (busybox-static plus the static programs in PROGRAMS, compiled here), and
  `.runtime_roots`, the `--runtime-root` pairs memtop needs to find their state.

The daemons are started by scripts/test-runtimes.sh with their own sockets, data and state directories
(per pytest session), so a runtime the host already runs is never touched, and are stopped at the end of the
session together with every container, image and cgroup they left. Installing the packages is
`make test`'s job (`scripts/test-runtimes.sh install`); here a missing runtime skips,
or fails under MEMTOP_REQUIRE_BPF=1.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "test-runtimes.sh"
DOCKER = "/usr/bin/docker"
IMAGE = "memtop-test:1"
PODMAN_IMAGE = "localhost/memtop-test:1"
NEEDED = ("containerd", "dockerd", DOCKER, "ctr", "podman", "lxc-create", "busybox", "runc", "gcc")
TIMEOUT = 120
CTR_NAMESPACES = ("default", "k8s.io")  # plain `ctr run`'s, and the CRI plugin's (driven by hand: no kubelet)

# Static test programs put in the image's /bin (C, compiled with gcc -static).
PROGRAMS = {
    # kload CALLS_PER_10MS: one 256-byte kmalloc per listxattr, forever.
    "kload": r"""
#include <sys/xattr.h>
#include <stdlib.h>
#include <time.h>
static char b[256];
int main(int c, char **v) { long r = c > 1 ? atol(v[1]) : 100; struct timespec t = {0, 10000000};
  for (;;) { for (long i = 0; i < r; i++) listxattr("/", b, sizeof b); nanosleep(&t, 0); } }
""",
    # kburst CALLS: that many listxattr calls, then exit (a short-lived process).
    "kburst": r"""
#include <sys/xattr.h>
#include <stdlib.h>
static char b[256];
int main(int c, char **v) { long n = c > 1 ? atol(v[1]) : 1000;
  for (long i = 0; i < n; i++) listxattr("/", b, sizeof b);
  return 0; }
""",
    # memhog MIB: touch that many MiB of anonymous memory, one MiB at a time, then sleep (an OOM victim).
    "memhog": r"""
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int c, char **v) { long n = c > 1 ? atol(v[1]) : 1 << 20;
  for (long i = 0; i < n; i++) { char *p = malloc(1 << 20); if (p) memset(p, 1, 1 << 20); }
  for (;;) pause(); }
""",
}


def _unavailable(reason: str) -> None:
    """Skip, or under MEMTOP_REQUIRE_BPF=1 (CI) fail: CI must never pass without the real runtimes."""
    if os.environ.get("MEMTOP_REQUIRE_BPF") == "1":
        pytest.fail(f"MEMTOP_REQUIRE_BPF=1 but {reason}", pytrace=False)
    pytest.skip(reason)


class CommandError(subprocess.CalledProcessError):
    """A runtime command failed; its message has the command's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}: {(self.stderr or '').strip()[-1000:]}"


def _run(
    cmd: list[str] | tuple[str, ...], env: dict[str, str] | None = None, timeout: float = TIMEOUT
) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise CommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc.stdout


@dataclass(frozen=True)
class DockerEngine:
    """The tests' own dockerd: `.cli` = /usr/bin/docker -H <its socket>; `.run(*args)` -> stdout."""

    host: str  # unix:///run/memtop-test-rt-<pid>/docker.sock
    containers_dir: str  # its <data-root>/containers (for memtop's --runtime-root docker=)

    @property
    def cli(self) -> tuple[str, ...]:
        return (DOCKER, "-H", self.host)

    def run(self, *args: str, timeout: float = TIMEOUT) -> str:
        return _run((*self.cli, *args), timeout=timeout)


@dataclass
class Daemons:
    """What scripts/test-runtimes.sh start printed (sockets, state directories), and the env it ran with."""

    env: dict[str, str]
    info: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="session")
def runtime_daemons() -> Iterator[Daemons]:
    if os.geteuid() != 0:
        _unavailable("the container runtime tests need root")
    missing = [b for b in NEEDED if shutil.which(b) is None]
    if missing:
        _unavailable(f"{', '.join(missing)} missing: run 'sudo bash scripts/test-runtimes.sh install'")
    tag = f"{os.getpid()}"
    env = {
        **os.environ,
        "MEMTOP_RT_RUN": f"/run/memtop-test-rt-{tag}",
        "MEMTOP_RT_DATA": f"/var/lib/memtop-test-rt-{tag}",
    }
    try:
        try:
            out = _run(["bash", str(SCRIPT), "start"], env=env, timeout=300)
        except subprocess.CalledProcessError as exc:
            _unavailable(f"scripts/test-runtimes.sh start failed: {exc.stderr.strip()[-500:]}")
        info = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        yield Daemons(env=env, info=info)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def docker_engine(runtime_daemons: Daemons) -> DockerEngine:
    """A working Docker Engine of the tests' own (see the module docstring); stopped after the session."""
    return DockerEngine(runtime_daemons.info["docker_host"], runtime_daemons.info["docker_containers"])


@dataclass
class Runtimes:
    daemons: Daemons
    docker: DockerEngine
    workdir: Path
    rootfs: Path
    v2_memory: bool  # the memory controller is on cgroup2 (LXC then needs lxc.cgroup2.* keys)

    @property
    def info(self) -> dict[str, str]:
        return self.daemons.info

    @property
    def podman_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONTAINERS_CONF": self.info["containers_conf"],
            "CONTAINERS_STORAGE_CONF": self.info["containers_storage_conf"],
        }

    def podman(self, *args: str, timeout: float = TIMEOUT) -> str:
        return _run(("podman", *args), env=self.podman_env, timeout=timeout)

    def ctr(self, *args: str, namespace: str = "default", timeout: float = TIMEOUT) -> str:
        return _run(
            ("ctr", "--address", self.info["containerd_socket"], "-n", namespace, *args), timeout=timeout
        )

    @property
    def lxc_path(self) -> str:
        return self.info["lxc_path"]

    def lxc(self, tool: str, name: str, *args: str, timeout: float = TIMEOUT) -> str:
        return _run((f"lxc-{tool}", "-P", self.lxc_path, "-n", name, *args), timeout=timeout)

    def lxc_create(self, name: str, command: str, memory_limit: int | None = None) -> None:
        """A busybox LXC container whose init is `command` (our programs copied into its rootfs)."""
        conf = self.workdir / "lxc.conf"
        conf.write_text("lxc.net.0.type = empty\nlxc.apparmor.profile = unconfined\n")
        self.lxc("create", name, "-t", "busybox", "-f", str(conf))
        container = Path(self.lxc_path) / name
        for program in PROGRAMS:
            shutil.copy2(self.rootfs / "bin" / program, container / "rootfs" / "bin" / program)
        extra = [f"lxc.init.cmd = {command}"]
        if memory_limit is not None:
            key = "lxc.cgroup2.memory.max" if self.v2_memory else "lxc.cgroup.memory.limit_in_bytes"
            extra.append(f"{key} = {memory_limit}")
        with open(container / "config", "a") as f:
            f.write("\n".join(extra) + "\n")

    @property
    def runtime_roots(self) -> tuple[tuple[str, str], ...]:
        """memtop's --runtime-root pairs for these daemons' state (added to memtop's defaults)."""
        return (
            ("docker", self.info["docker_containers"]),
            ("containerd", self.info["containerd_state"]),
            ("podman", self.info["podman_storage"]),
            ("lxc", self.lxc_path),
        )

    def runtime_root_args(self) -> list[str]:
        return [f"--runtime-root={name}={path}" for name, path in self.runtime_roots]


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def build_rootfs(workdir: Path) -> Path:
    """busybox-static and PROGRAMS (compiled static) in a root filesystem directory."""
    rootfs = workdir / "rootfs"
    for d in ("bin", "tmp", "proc", "sys", "dev", "etc"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    assert busybox is not None
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for applet in ("sh", "sleep", "cat", "dd", "ls", "rm", "sync", "true", "echo"):
        link = rootfs / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    for name, source in PROGRAMS.items():
        c = workdir / f"{name}.c"
        c.write_text(source)
        _run(["gcc", "-O2", "-static", "-o", str(rootfs / "bin" / name), str(c)])
    return rootfs


@pytest.fixture(scope="session")
def runtimes(
    runtime_daemons: Daemons, docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory
) -> Runtimes:
    """Docker, Podman, containerd and LXC of the tests' own, each with the image memtop-test:1."""
    from memtop.cgroups import current_layout

    workdir = tmp_path_factory.mktemp("runtimes")
    rootfs = build_rootfs(workdir)
    tarball = workdir / "rootfs.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(rootfs, arcname=".")
    layout = current_layout()
    rt = Runtimes(runtime_daemons, docker_engine, workdir, rootfs, layout.v1_memory_root is None)
    docker_engine.run("import", "-c", 'CMD ["/bin/sh"]', str(tarball), IMAGE)
    rt.podman("import", "--change", 'CMD ["/bin/sh"]', str(tarball), PODMAN_IMAGE)
    oci = workdir / "oci.tar"
    rt.podman("save", "-q", "--format", "oci-archive", "-o", str(oci), PODMAN_IMAGE)
    for namespace in CTR_NAMESPACES:
        rt.ctr("image", "import", str(oci), namespace=namespace)
    return rt
