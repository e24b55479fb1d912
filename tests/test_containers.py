"""Container resolution: every cgroup path form, runtime state files (fixture trees under
tests/data/runtimes shaped like the real ones), cgroup memory files and cgroup2 id -> path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from memtop.cgroups import CgroupLayout
from memtop.containers import (
    RUNTIMES,
    CgroupIdResolver,
    CgroupMemory,
    ContainerMeta,
    ContainerRef,
    MetadataReader,
    RuntimeCgroupIndex,
    RuntimeRoots,
    container_of_proc_cgroup,
    host_unit,
    is_container_id,
    kernel_cgroup_path,
    parse_cgroup_path,
    parse_k8s_name,
    read_cgroup_memory,
    scan_cgroup_ids,
    set_runtime_cgroups,
)
from memtop.errors import MemtopError

from .cgroup_util import V1_MEMORY, test_cgroup, unique_name, v2_root

ID = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"
ID2 = "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"
UID = "2fc932ce-fdcc-454b-97bd-aadfdeb4c340"
UID_ = UID.replace("-", "_")
STATIC_UID = "187bff14cccb94f179e943eacce55bb3"  # static (mirror) pods: a 32-hex hash, no dashes

RUNTIMES_DATA = Path(__file__).parent / "data" / "runtimes"


# -- parse_cgroup_path: every form --------------------------------------------------------------------

CONTAINER_PATHS: list[tuple[str, ContainerRef]] = [
    # Docker, cgroupfs and systemd drivers
    (f"/docker/{ID}", ContainerRef("docker", ID, f"/docker/{ID}")),
    (f"/system.slice/docker-{ID}.scope", ContainerRef("docker", ID, f"/system.slice/docker-{ID}.scope")),
    # rootless Docker under the user's systemd
    (
        f"/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{ID}.scope",
        ContainerRef(
            "docker", ID, f"/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{ID}.scope"
        ),
    ),
    # Kubernetes, cgroupfs driver: the path alone cannot tell the runtime
    (
        f"/kubepods/burstable/pod{UID}/{ID}",
        ContainerRef("cri", ID, f"/kubepods/burstable/pod{UID}/{ID}", UID, "burstable"),
    ),
    (
        f"/kubepods/besteffort/pod{UID}/{ID}",
        ContainerRef("cri", ID, f"/kubepods/besteffort/pod{UID}/{ID}", UID, "besteffort"),
    ),
    (f"/kubepods/pod{UID}/{ID}", ContainerRef("cri", ID, f"/kubepods/pod{UID}/{ID}", UID, "guaranteed")),
    # kubelet --cgroup-root=/kubelet
    (
        f"/kubelet/kubepods/burstable/pod{UID}/{ID}",
        ContainerRef("cri", ID, f"/kubelet/kubepods/burstable/pod{UID}/{ID}", UID, "burstable"),
    ),
    # CRI-O, cgroupfs driver
    (
        f"/kubepods/burstable/pod{UID}/crio-{ID}",
        ContainerRef("cri-o", ID, f"/kubepods/burstable/pod{UID}/crio-{ID}", UID, "burstable"),
    ),
    # Kubernetes, systemd driver: containerd, CRI-O, dockershim; guaranteed has no qos level
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope",
        ContainerRef(
            "containerd",
            ID,
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope",
            UID,
            "burstable",
        ),
    ),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope",
        ContainerRef(
            "cri-o",
            ID,
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope",
            UID,
            "besteffort",
        ),
    ),
    (
        f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope",
        ContainerRef(
            "containerd",
            ID,
            f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope",
            UID,
            "guaranteed",
        ),
    ),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{ID}.scope",
        ContainerRef(
            "docker",
            ID,
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{ID}.scope",
            UID,
            "besteffort",
        ),
    ),
    # static pod: the UID is a 32-hex hash
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/crio-{ID}.scope",
        ContainerRef(
            "cri-o",
            ID,
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/crio-{ID}.scope",
            STATIC_UID,
            "burstable",
        ),
    ),
    # kind: kubelet's slices carry a "kubelet-" prefix
    (
        f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope",
        ContainerRef(
            "containerd",
            ID,
            f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope",
            UID,
            "besteffort",
        ),
    ),
    # a systemd cgroupsPath created literally by a runtime on the cgroupfs driver
    (
        f"/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{ID}",
        ContainerRef(
            "containerd",
            ID,
            f"/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{ID}",
            UID,
            "burstable",
        ),
    ),
    # Podman: machine.slice, inside a podman pod, the payload's own "container" subgroup, rootless, cgroupfs
    (f"/machine.slice/libpod-{ID}.scope", ContainerRef("podman", ID, f"/machine.slice/libpod-{ID}.scope")),
    (
        f"/machine.slice/machine-libpod_pod_{ID2}.slice/libpod-{ID}.scope",
        ContainerRef("podman", ID, f"/machine.slice/machine-libpod_pod_{ID2}.slice/libpod-{ID}.scope"),
    ),
    (
        f"/machine.slice/libpod-{ID}.scope/container",
        ContainerRef("podman", ID, f"/machine.slice/libpod-{ID}.scope"),
    ),
    (
        f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope",
        ContainerRef(
            "podman", ID, f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
        ),
    ),
    (f"/libpod_parent/libpod-{ID}", ContainerRef("podman", ID, f"/libpod_parent/libpod-{ID}")),
    # nerdctl (containerd without Kubernetes), systemd driver
    (
        f"/nerdctl.slice/nerdctl-{ID}.scope",
        ContainerRef("containerd", ID, f"/nerdctl.slice/nerdctl-{ID}.scope"),
    ),
    # LXC >= 4 / LXD, LXC 3.1-3.2, older LXC
    ("/lxc.payload.web1", ContainerRef("lxc", "web1", "/lxc.payload.web1")),
    ("/lxc.payload.web1/system.slice/ssh.service", ContainerRef("lxc", "web1", "/lxc.payload.web1")),
    ("/lxc.payload.web1/.lxc", ContainerRef("lxc", "web1", "/lxc.payload.web1")),
    ("/lxc.payload.default_web-2", ContainerRef("lxc", "default_web-2", "/lxc.payload.default_web-2")),
    ("/lxc.payload/web1/init.scope", ContainerRef("lxc", "web1", "/lxc.payload/web1")),
    ("/lxc/web1", ContainerRef("lxc", "web1", "/lxc/web1")),
    ("/lxc/web1/user.slice/user-0.slice", ContainerRef("lxc", "web1", "/lxc/web1")),
    # nested leaves below a container's own cgroup resolve to the container
    (f"/docker/{ID}/init.scope", ContainerRef("docker", ID, f"/docker/{ID}")),
    (f"/docker/{ID}/sub/deeper", ContainerRef("docker", ID, f"/docker/{ID}")),
    (
        f"/system.slice/docker-{ID}.scope/init.scope",
        ContainerRef("docker", ID, f"/system.slice/docker-{ID}.scope"),
    ),
    # innermost container wins: kind / docker-in-docker
    (
        f"/docker/{ID2}/kubepods/besteffort/pod{UID}/{ID}",
        ContainerRef("cri", ID, f"/docker/{ID2}/kubepods/besteffort/pod{UID}/{ID}", UID, "besteffort"),
    ),
    (
        f"/system.slice/docker-{ID2}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/"
        f"cri-containerd-{ID}.scope",
        ContainerRef(
            "containerd",
            ID,
            f"/system.slice/docker-{ID2}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/"
            f"cri-containerd-{ID}.scope",
            UID,
            "guaranteed",
        ),
    ),
    (f"/docker/{ID2}/docker/{ID}", ContainerRef("docker", ID, f"/docker/{ID2}/docker/{ID}")),
    # conmon / LXC monitor inside a container belong to the outer container
    (
        f"/docker/{ID2}/machine.slice/libpod-conmon-{ID}.scope",
        ContainerRef("docker", ID2, f"/docker/{ID2}"),
    ),
    # a cgroup2 path of a removed cgroup, as /proc/PID/cgroup shows it for a zombie
    (f"/docker/{ID} (deleted)", ContainerRef("docker", ID, f"/docker/{ID}")),
    # tolerated sloppiness: no leading slash, doubled and trailing slashes
    (f"docker/{ID}", ContainerRef("docker", ID, f"/docker/{ID}")),
    (f"//system.slice//docker-{ID}.scope/", ContainerRef("docker", ID, f"/system.slice/docker-{ID}.scope")),
]


@pytest.mark.parametrize(("path", "expected"), CONTAINER_PATHS, ids=[p for p, _ in CONTAINER_PATHS])
def test_container_path_forms(path: str, expected: ContainerRef) -> None:
    assert parse_cgroup_path(path) == expected
    assert expected.runtime in RUNTIMES


HOST_PATHS = [
    "/",
    "",
    "/init.scope",
    "/system.slice/ssh.service",
    "/user.slice/user-0.slice/session-3.scope",
    "/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-firefox-1234.scope",
    "/process_api/4c4fe583f02fdc9b7ec8c4e110398f0e",  # 32 hex: not a container id
    "/system.slice/docker.service",
    "/system.slice/containerd.service",
    "/system.slice/crio.service",
    # infrastructure next to containers, not in one
    f"/machine.slice/libpod-conmon-{ID}.scope",
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope",
    f"/kubepods/burstable/pod{UID}/crio-conmon-{ID}",
    "/libpod_parent/conmon",
    "/lxc.monitor.web1",
    "/lxc.monitor/web1",
    "/lxc.pivot",
    # the pod's own cgroup, outside any container: host (grouped by its slice)
    "/kubepods.slice",
    "/kubepods.slice/kubepods-burstable.slice",
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice",
    f"/kubepods/burstable/pod{UID}",
    "/kubepods/besteffort",
    # malformed ids
    f"/docker/{ID[:-1]}",
    f"/docker/{ID}0",
    f"/docker/{ID.upper()}",
    f"/docker/{ID[:-1]}g",
    f"/system.slice/docker-{ID[:-1]}.scope",
    f"/system.slice/docker-{ID}",  # the systemd driver always names a scope
    f"/system.slice/docker-{ID}.service",
    "/system.slice/docker-.scope",
    f"/system.slice/cri-containerd-{ID}x.scope",
    f"/{ID}",  # a bare id with nothing saying whose
    f"/something/{ID}",
    f"/kubepods/burstable/podnot-a-uid/{ID}",  # a bare id under a non-pod
    f"/pods/burstable/pod{UID}/{ID}",  # no kubepods above the pod
    f"/kubepods/gold/pod{UID}/{ID}",  # unknown QoS class
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice:cri-containerd:{ID[:10]}",
    f"/x/a:cri-containerd:{ID}:extra",
    f"/x/slice:unknown-runtime:{ID}",
    "/lxc.payload.",
    "/lxc",
    "/lxc.payload",
    # path traversal and garbage
    f"/docker/../docker/{ID}",
    f"/docker/./{ID}",
    "/\x00/docker",
    "/ü/ñ/日本/🙂",
    "/\udcff\udcfe",
    ":::",
    "////",
    "/" + "a/" * 10_000,
    "x" * 100_000,
]


@pytest.mark.parametrize("path", HOST_PATHS, ids=[repr(p[:60]) for p in HOST_PATHS])
def test_host_and_malformed_paths_resolve_to_host(path: str) -> None:
    assert parse_cgroup_path(path) is None


def test_pod_uid_in_a_malformed_slice_still_finds_the_container() -> None:
    # The container scope is unmistakable even when its parent slice's uid is not a uid.
    path = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podzzz.slice/crio-{ID}.scope"
    assert parse_cgroup_path(path) == ContainerRef("cri-o", ID, path)


def test_parse_never_raises_on_random_input() -> None:
    import random

    rng = random.Random(1234)
    alphabet = [
        "/",
        ".",
        "-",
        "_",
        ":",
        "a",
        "f",
        "0",
        "9",
        "pod",
        "kubepods",
        ".slice",
        ".scope",
        "docker",
        "lxc",
    ]
    alphabet += [
        "crio-",
        "libpod-",
        "cri-containerd-",
        "lxc.payload.",
        "\x00",
        "é",
        "\n",
        " (deleted)",
        ID,
        UID_,
    ]
    for _ in range(3000):
        path = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        ref = parse_cgroup_path(path)
        assert ref is None or (ref.runtime in RUNTIMES and ref.cgroup_path.startswith("/"))
        host_unit(path)
    assert parse_cgroup_path(None) is None  # type: ignore[arg-type]
    assert host_unit(b"/docker") == ""  # type: ignore[arg-type]


def test_short_id() -> None:
    assert ContainerRef("docker", ID, f"/docker/{ID}").short_id == ID[:12]
    assert ContainerRef("lxc", "a-rather-long-container-name", "/lxc.payload.x").short_id == (
        "a-rather-long-container-name"
    )


def test_parse_is_cached_and_returns_equal_refs() -> None:
    path = f"/system.slice/docker-{ID}.scope"
    assert parse_cgroup_path(path) is parse_cgroup_path(path)


# -- host_unit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "unit"),
    [
        ("/system.slice/ssh.service", "ssh.service"),
        ("/user.slice/user-0.slice/session-3.scope", "session-3.scope"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/app-x-1.scope", "app-x-1.scope"),
        ("/user.slice/user-1000.slice/user@1000.service", "user@1000.service"),
        ("/system.slice/foo.service/delegated/leaf", "foo.service"),
        ("/init.scope", "init.scope"),
        ("/system.slice", "system.slice"),
        (f"/kubepods.slice/kubepods-pod{UID_}.slice", f"kubepods-pod{UID_}.slice"),
        ("/system.slice/ssh.service (deleted)", "ssh.service"),
        ("/", ""),
        ("", ""),
        ("/process_api/4c4fe583f02fdc9b7ec8c4e110398f0e", ""),
        ("/.service", ""),
        ("/a/../b.service", ""),
    ],
)
def test_host_unit(path: str, unit: str) -> None:
    assert host_unit(path) == unit


# -- /proc/PID/cgroup ---------------------------------------------------------------------------------


def test_proc_cgroup_hybrid_prefers_the_memory_line() -> None:
    text = (
        "12:pids:/system.slice/containerd.service\n"
        f"4:memory:/kubepods/burstable/pod{UID}/{ID}\n"
        "1:name=systemd:/system.slice/containerd.service\n"
        "0::/system.slice/containerd.service\n"
    )
    assert container_of_proc_cgroup(text) == ContainerRef(
        "cri", ID, f"/kubepods/burstable/pod{UID}/{ID}", UID, "burstable"
    )


def test_proc_cgroup_v2_only() -> None:
    text = f"0::/system.slice/docker-{ID}.scope\n"
    assert container_of_proc_cgroup(text) == ContainerRef("docker", ID, f"/system.slice/docker-{ID}.scope")


def test_proc_cgroup_falls_back_to_unified_then_systemd_then_others() -> None:
    unified = f"4:memory:/\n0::/machine.slice/libpod-{ID}.scope\n1:name=systemd:/docker/{ID2}\n"
    assert container_of_proc_cgroup(unified) == ContainerRef(
        "podman", ID, f"/machine.slice/libpod-{ID}.scope"
    )
    systemd = f"4:memory:/\n1:name=systemd:/docker/{ID2}\n3:cpu,cpuacct:/docker/{ID}\n0::/\n"
    assert container_of_proc_cgroup(systemd) == ContainerRef("docker", ID2, f"/docker/{ID2}")
    other = f"4:memory:/\n1:name=systemd:/init.scope\n3:cpu,cpuacct:/docker/{ID}\n"
    assert container_of_proc_cgroup(other) == ContainerRef("docker", ID, f"/docker/{ID}")


def test_proc_cgroup_host_and_garbage() -> None:
    assert container_of_proc_cgroup("9:name=systemd:/\n4:memory:/\n0::/\n") is None
    assert container_of_proc_cgroup("") is None
    assert container_of_proc_cgroup(None) is None  # type: ignore[arg-type]
    assert container_of_proc_cgroup("garbage\n\n::\nno colons at all\n") is None
    # a path containing ':' (the literal systemd cgroupsPath form) survives the line split
    text = f"4:memory:/system.slice/containerd.service/kubepods-pod{UID_}.slice:cri-containerd:{ID}\n"
    ref = container_of_proc_cgroup(text)
    assert ref is not None and (ref.runtime, ref.container_id, ref.pod_uid, ref.qos) == (
        "containerd",
        ID,
        UID,
        "guaranteed",
    )


def test_proc_cgroup_of_this_process_does_not_raise() -> None:
    text = Path("/proc/self/cgroup").read_text()
    container_of_proc_cgroup(text)


def test_misc_helpers() -> None:
    assert is_container_id(ID) and not is_container_id(ID.upper()) and not is_container_id(ID + "0")
    assert parse_k8s_name(f"/k8s_app_web-1_shop_{UID}_0") == ("app", "web-1", "shop")
    assert parse_k8s_name("k8s_app_web") is None
    assert parse_k8s_name("plain") is None


# -- runtime roots ------------------------------------------------------------------------------------


def test_runtime_root_adds_to_the_defaults_and_comes_first(tmp_path: Path) -> None:
    """--runtime-root docker=DIR searched before the default, not instead of it (issue #13, fault 8)."""
    roots = RuntimeRoots.with_added([("docker", "/srv/docker/containers"), ("cri-o", "/srv/crio")])
    assert roots.docker == (Path("/srv/docker/containers"), Path("/var/lib/docker/containers"))
    assert roots.crio[0] == Path("/srv/crio") and roots.crio[1:] == RuntimeRoots().crio
    assert roots.lxc == RuntimeRoots().lxc
    assert RuntimeRoots.with_added({}) == RuntimeRoots()
    twice = RuntimeRoots.with_added([("lxc", "/a"), ("lxc", "/b")])
    assert twice.lxc == (Path("/a"), Path("/b"), Path("/var/lib/lxc"))
    # A state root is taken down to the per-container directories inside it.
    (tmp_path / "containers").mkdir()
    (tmp_path / "vfs-containers").mkdir()
    assert RuntimeRoots.only({"docker": str(tmp_path)}).docker == (tmp_path / "containers",)
    assert RuntimeRoots.only({"podman": str(tmp_path)}).podman == (tmp_path / "vfs-containers",)


def test_podman_vfs_storage_is_looked_at_by_default() -> None:
    assert Path("/var/lib/containers/storage/vfs-containers") in RuntimeRoots().podman
    assert Path("/var/lib/containers/storage/overlay-containers") in RuntimeRoots().podman


def test_runtime_roots_unknown_key_is_one_line_error() -> None:
    with pytest.raises(MemtopError) as err:
        RuntimeRoots.with_added({"rkt": "/var/lib/rkt"})
    assert "\n" not in str(err.value) and "rkt" in str(err.value)
    with pytest.raises(MemtopError):
        RuntimeRoots.only({"docker": ""})


# -- metadata from fixture trees ----------------------------------------------------------------------

DOCKER_WEB = "f31f384749f9115acf01fcf82f5a966b59dcc0a4cbd7c9740888c0bf32aa2bbb"
DOCKERSHIM_APP = "10331f84d4810bb44ec103310d55569355f57f8fb9f175d91c35d70b168eee4d"
DOCKER_CORRUPT = "913a58392f135465fc88e67ed8c54eaada494365f33c71a2c477fe8393666d47"
CONTAINERD_APP = "71c206f4b1ff6f81c8a8ec2c517dc9a23052ae34725e0c35c49a1b1f559a56d4"
CONTAINERD_PAUSE = "6f7ce9e7a35f3759080852227b1dad63aa2b9b1631ac6d2bda8652cb591e8d41"
NERDCTL_BOX = "81c1cf6531cb29f257cadbfdfcb5d3acc6ed1ed6cc8d68cc3624e7609c4f4e1e"
CRIO_APP = "610713dca419d7deb83a1246d0c1ee0ac2e23b81cbb29bba37147e88e1848cda"
CRIO_PAUSE = "61f18e8a1d0b627c2c875851c047c9191526c4d89a8b2dd646be63334764bd19"
PODMAN_DB = "cc68e1d9877507693f2627038a9947317d784e78728a2cdc290274f23414b7e0"
PODMAN_NOCONFIG = "a468e4ac87339a44113d3d62fe0036eec843c678643f7ecdeac76249a904d3bd"
MISSING = "0" * 64


def fixture_roots(base: Path = RUNTIMES_DATA) -> RuntimeRoots:
    storage = str(base / "containers-storage" / "overlay-containers")
    return RuntimeRoots.only(
        {
            "docker": str(base / "docker" / "containers"),
            "containerd": str(base / "containerd" / "io.containerd.runtime.v2.task"),
            "crio": storage,
            "podman": storage,
            "lxc": str(base / "lxc"),
        }
    )


def ref(runtime: str, cid: str) -> ContainerRef:
    return ContainerRef(runtime, cid, f"/{cid}")


@pytest.mark.parametrize(
    ("runtime", "cid", "expected"),
    [
        ("docker", DOCKER_WEB, ContainerMeta("web", "", "", "nginx:1.25", "docker")),
        (
            "docker",
            DOCKERSHIM_APP,
            ContainerMeta(
                "app",
                "checkout-7d9c5b6f8-x2x4q",
                "shop",
                "registry.example.com/shop/checkout@sha256:" + "ab" * 32,
                "docker",
            ),
        ),
        (
            "containerd",
            CONTAINERD_APP,
            ContainerMeta(
                "cart", "cart-6b7f9d8c4-9qzt2", "shop", "registry.example.com/shop/cart:2.4.1", "containerd"
            ),
        ),
        (
            "containerd",
            CONTAINERD_PAUSE,
            ContainerMeta("POD", "cart-6b7f9d8c4-9qzt2", "shop", "", "containerd"),
        ),
        ("containerd", NERDCTL_BOX, ContainerMeta("box", "", "", "", "containerd")),
        (
            "cri-o",
            CRIO_APP,
            ContainerMeta("segfaulter", "segfaulter", "default", "quay.io/example/segfaulter:1.0", "cri-o"),
        ),
        (
            "cri-o",
            CRIO_PAUSE,
            ContainerMeta("POD", "segfaulter", "default", "registry.k8s.io/pause:3.9", "cri-o"),
        ),
        ("podman", PODMAN_DB, ContainerMeta("db", "", "", "docker.io/library/postgres:16", "podman")),
        # no config.json (yet): the storage index still names it
        ("podman", PODMAN_NOCONFIG, ContainerMeta("cache", "", "", "docker.io/library/redis:7", "podman")),
        ("lxc", "web1", ContainerMeta("web1", "", "", "ubuntu:jammy", "lxc")),
        # "cri": the runtime is whichever has the id
        (
            "cri",
            CONTAINERD_APP,
            ContainerMeta(
                "cart", "cart-6b7f9d8c4-9qzt2", "shop", "registry.example.com/shop/cart:2.4.1", "containerd"
            ),
        ),
        (
            "cri",
            CRIO_APP,
            ContainerMeta("segfaulter", "segfaulter", "default", "quay.io/example/segfaulter:1.0", "cri-o"),
        ),
        (
            "cri",
            DOCKERSHIM_APP,
            ContainerMeta(
                "app",
                "checkout-7d9c5b6f8-x2x4q",
                "shop",
                "registry.example.com/shop/checkout@sha256:" + "ab" * 32,
                "docker",
            ),
        ),
    ],
)
def test_metadata_from_fixture_trees(runtime: str, cid: str, expected: ContainerMeta) -> None:
    assert MetadataReader(fixture_roots()).lookup(ref(runtime, cid), now=0.0) == expected


def test_metadata_missing_corrupt_and_wrong_runtime_are_empty() -> None:
    reader = MetadataReader(fixture_roots())
    assert reader.lookup(ref("docker", MISSING), now=0.0) == ContainerMeta()
    assert reader.lookup(ref("docker", DOCKER_CORRUPT), now=0.0) == ContainerMeta()
    assert reader.lookup(ref("containerd", DOCKER_WEB), now=0.0) == ContainerMeta()
    assert reader.lookup(ref("lxc", "nosuch"), now=0.0) == ContainerMeta()
    assert reader.lookup(ref("cri", MISSING), now=0.0) == ContainerMeta()
    assert reader.lookup(ref("no-such-runtime", DOCKER_WEB), now=0.0) == ContainerMeta()


def test_metadata_with_default_roots_on_a_host_without_runtimes_is_empty(tmp_path: Path) -> None:
    roots = RuntimeRoots.only(
        {k: str(tmp_path / k) for k in ("docker", "containerd", "crio", "podman", "lxc")}
    )
    reader = MetadataReader(roots)
    for runtime in RUNTIMES:
        assert reader.lookup(ref(runtime, ID if runtime != "lxc" else "web1"), now=0.0) == ContainerMeta()


@pytest.mark.parametrize(
    ("runtime", "evil"),
    [
        ("docker", "../../secret"),
        ("lxc", "../secret"),
        ("lxc", ".."),
        ("lxc", "/abs/path"),
        ("lxc", "web1/../../secret"),
        ("containerd", "../../../secret"),
        ("cri", "../../secret"),
        ("podman", "../../../secret"),
        ("lxc", "web1\x00"),
        ("lxc", ""),
    ],
)
def test_metadata_never_follows_unvalidated_ids(runtime: str, evil: str) -> None:
    roots = fixture_roots()
    # The files are there: joining the id unvalidated would reach them.
    assert (roots.docker[0] / "../../secret/config.v2.json").is_file()
    assert (roots.lxc[0] / "../secret/config").is_file()
    assert MetadataReader(roots).lookup(ContainerRef(runtime, evil, "/x"), now=0.0) == ContainerMeta()


def test_metadata_oversized_state_file_is_empty(tmp_path: Path) -> None:
    shutil.copytree(RUNTIMES_DATA, tmp_path / "r")
    config = tmp_path / "r" / "docker" / "containers" / DOCKER_WEB / "config.v2.json"
    original = config.read_text()
    config.write_text(original[:-2] + ", " + '"Pad": "' + "x" * (4 << 20) + '"}\n')
    assert (
        MetadataReader(fixture_roots(tmp_path / "r")).lookup(ref("docker", DOCKER_WEB), now=0.0)
        == ContainerMeta()
    )


def test_metadata_fifo_in_place_of_a_state_file_does_not_block(tmp_path: Path) -> None:
    cid_dir = tmp_path / "docker" / MISSING
    cid_dir.mkdir(parents=True)
    os.mkfifo(cid_dir / "config.v2.json")
    reader = MetadataReader(RuntimeRoots.only({"docker": str(tmp_path / "docker")}))
    assert reader.lookup(ref("docker", MISSING), now=0.0) == ContainerMeta()


def test_metadata_json_of_the_wrong_shape_is_empty_or_partial(tmp_path: Path) -> None:
    docker = tmp_path / "docker"
    for cid, text in [
        ("1" * 64, "[1, 2, 3]"),
        ("2" * 64, '{"Name": 7, "Config": "nope"}'),
        ("3" * 64, '{"Name": "/ok", "Config": {"Labels": ["x"], "Image": null}}'),
        ("4" * 64, "[" * 100_000),
    ]:
        (docker / cid).mkdir(parents=True)
        (docker / cid / "config.v2.json").write_text(text)
    reader = MetadataReader(RuntimeRoots.only({"docker": str(docker)}))
    assert reader.lookup(ref("docker", "1" * 64), now=0.0) == ContainerMeta()
    assert reader.lookup(ref("docker", "2" * 64), now=0.0) == ContainerMeta(runtime="docker")
    assert reader.lookup(ref("docker", "3" * 64), now=0.0) == ContainerMeta(name="ok", runtime="docker")
    assert reader.lookup(ref("docker", "4" * 64), now=0.0) == ContainerMeta()


def test_metadata_miss_is_retried_after_retry_s(tmp_path: Path) -> None:
    docker = tmp_path / "docker"
    docker.mkdir()
    reader = MetadataReader(RuntimeRoots.only({"docker": str(docker)}), retry_s=30.0)
    web = ref("docker", DOCKER_WEB)
    assert reader.lookup(web, now=100.0) == ContainerMeta()
    # the container's state appears just after its first sighting
    shutil.copytree(RUNTIMES_DATA / "docker" / "containers" / DOCKER_WEB, docker / DOCKER_WEB)
    assert reader.lookup(web, now=129.9) == ContainerMeta()  # still within retry_s: not re-read
    found = reader.lookup(web, now=130.0)
    assert found.name == "web"
    # a hit is cached: removing the file changes nothing
    shutil.rmtree(docker / DOCKER_WEB)
    assert reader.lookup(web, now=1000.0) == found
    reader.forget(DOCKER_WEB)
    assert reader.lookup(web, now=1001.0) == ContainerMeta()


def test_metadata_storage_index_is_reread_when_it_changes(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    shutil.copytree(RUNTIMES_DATA / "containers-storage" / "overlay-containers", storage)
    reader = MetadataReader(RuntimeRoots.only({"podman": str(storage)}), retry_s=0.0)
    assert reader.lookup(ref("podman", MISSING), now=0.0) == ContainerMeta()
    index = storage / "containers.json"
    index.write_text(index.read_text()[:-2] + ',{"id":"' + MISSING + '","names":["late"],"metadata":"{}"}]\n')
    assert reader.lookup(ref("podman", MISSING), now=1.0) == ContainerMeta(name="late", runtime="podman")


# -- cgroup memory files ------------------------------------------------------------------------------


def make_v1(tmp_path: Path, rel: str, usage: str, limit: str, oom_control: str | None = None) -> CgroupLayout:
    d = tmp_path / "memory" / rel.strip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.usage_in_bytes").write_text(usage)
    (d / "memory.limit_in_bytes").write_text(limit)
    if oom_control is not None:
        (d / "memory.oom_control").write_text(oom_control)
    return CgroupLayout("hybrid", str(tmp_path / "memory"), str(tmp_path / "unified"))


def make_v2(tmp_path: Path, rel: str, current: str, maximum: str, events: str | None = None) -> CgroupLayout:
    d = tmp_path / "cg2" / rel.strip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.current").write_text(current)
    (d / "memory.max").write_text(maximum)
    if events is not None:
        (d / "memory.events").write_text(events)
    return CgroupLayout("v2", None, str(tmp_path / "cg2"))


def test_read_cgroup_memory_v1(tmp_path: Path) -> None:
    layout = make_v1(tmp_path, f"docker/{ID}", "123456\n", "268435456\n")
    assert read_cgroup_memory(f"/docker/{ID}", layout) == CgroupMemory(123456, 268435456, 123456)
    layout = make_v1(tmp_path, "unlimited", "42\n", "9223372036854771712\n")
    assert read_cgroup_memory("/unlimited", layout) == CgroupMemory(42, None, 42)


def test_read_cgroup_memory_v2(tmp_path: Path) -> None:
    layout = make_v2(tmp_path, f"system.slice/docker-{ID}.scope", "8192\n", "1048576\n")
    assert read_cgroup_memory(f"/system.slice/docker-{ID}.scope", layout) == CgroupMemory(8192, 1048576, 8192)
    layout = make_v2(tmp_path, "free", "4096\n", "max\n")
    assert read_cgroup_memory("/free", layout) == CgroupMemory(4096, None, 4096)


def test_working_set_is_usage_minus_inactive_file(tmp_path: Path) -> None:
    """41.4 MiB of usage after a 40 MiB file write is a 1.4 MiB working set, as `docker stats` says
    (issue #13, fault 7): v1 memory.stat total_inactive_file, v2 inactive_file."""
    mib = 1 << 20
    layout = make_v1(tmp_path, f"docker/{ID}", f"{int(41.4 * mib)}\n", f"{64 * mib}\n")
    stat = f"cache {40 * mib}\ninactive_file {mib}\ntotal_inactive_file {40 * mib}\n"
    (tmp_path / "memory" / "docker" / ID / "memory.stat").write_text(stat)
    got = read_cgroup_memory(f"/docker/{ID}", layout)
    assert got.usage_bytes == int(41.4 * mib) and got.working_set_bytes == int(41.4 * mib) - 40 * mib
    layout = make_v2(tmp_path, "c", f"{10 * mib}\n", "max\n")
    (tmp_path / "cg2" / "c" / "memory.stat").write_text(f"anon {mib}\ninactive_file {12 * mib}\n")
    assert read_cgroup_memory("/c", layout).working_set_bytes == 0  # never below zero


def test_limit_set_on_a_parent_is_the_effective_limit(tmp_path: Path) -> None:
    """A container whose limit is on a parent cgroup shows that limit, not "none" (issue #13, fault 7)."""
    layout = make_v2(tmp_path, "pod", "0\n", "33554432\n")
    make_v2(tmp_path, f"pod/{ID}", "4096\n", "max\n")
    make_v2(tmp_path, f"pod/{ID}/inner", "4096\n", "67108864\n")
    assert read_cgroup_memory(f"/pod/{ID}", layout).limit_bytes == 32 << 20
    assert read_cgroup_memory(f"/pod/{ID}/inner", layout).limit_bytes == 32 << 20  # the smallest
    layout = make_v1(tmp_path, f"kubepods/{ID}", "4096\n", "9223372036854771712\n")
    stat = tmp_path / "memory" / "kubepods" / ID / "memory.stat"
    stat.write_text("cache 0\nhierarchical_memory_limit 50331648\ntotal_inactive_file 0\n")
    assert read_cgroup_memory(f"/kubepods/{ID}", layout).limit_bytes == 48 << 20
    stat.write_text("hierarchical_memory_limit 9223372036854771712\n")
    assert read_cgroup_memory(f"/kubepods/{ID}", layout).limit_bytes is None


def test_read_cgroup_memory_unreadable_or_bad(tmp_path: Path) -> None:
    layout = make_v2(tmp_path, "garbage", "lots\n", "plenty\n")
    assert read_cgroup_memory("/garbage", layout) == CgroupMemory(None, None)
    assert read_cgroup_memory("/nosuch", layout) == CgroupMemory(None, None)
    assert read_cgroup_memory("/x", CgroupLayout("none", None, None)) == CgroupMemory(None, None)
    assert read_cgroup_memory("/a\x00b", layout) == CgroupMemory(None, None)


def test_read_cgroup_memory_rejects_dotdot(tmp_path: Path) -> None:
    # A real file reachable through "..": rejected without being read.
    make_v2(tmp_path, "outside", "1\n", "2\n")
    layout = make_v2(tmp_path / "inner", "x", "1\n", "2\n")
    assert (Path(layout.v2_root or "") / "../../cg2/outside/memory.current").is_file()
    assert read_cgroup_memory("/../../cg2/outside", layout) == CgroupMemory(None, None)


# -- cgroup2 id -> path -------------------------------------------------------------------------------


def test_cgroup_id_resolver_on_a_tree(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    (root / "system.slice" / f"docker-{ID}.scope").mkdir(parents=True)
    (root / "system.slice" / "memory.current").write_text("0")  # files are not cgroups
    (root / "link").symlink_to(root / "system.slice")  # symlinks are not followed
    resolver = CgroupIdResolver(str(root), min_rescan_s=1.0)
    scope_id = os.stat(root / "system.slice" / f"docker-{ID}.scope").st_ino
    assert resolver.path(scope_id, now=0.0) == f"/system.slice/docker-{ID}.scope"
    assert resolver.path(os.stat(root).st_ino, now=0.0) == "/"
    assert resolver.scans == 1
    assert "/link" not in scan_cgroup_ids(str(root)).values()

    # a cgroup created after the scan: unknown until the next rescan is due, then found
    (root / "late").mkdir()
    late_id = os.stat(root / "late").st_ino
    assert resolver.path(late_id, now=0.5) == ""
    assert resolver.path(late_id, now=0.9) == ""
    assert resolver.scans == 1
    assert resolver.path(late_id, now=1.0) == "/late"
    assert resolver.scans == 2

    # an id that never exists costs at most one rescan per interval
    for t in (1.1, 1.2, 1.3):
        assert resolver.path(999_999_999, now=t) == ""
    assert resolver.scans == 2
    assert resolver.path(999_999_999, now=2.5) == ""
    assert resolver.scans == 3

    # a removed cgroup keeps its last known path (allocations by exited containers still resolve)
    (root / "late").rmdir()
    assert resolver.path(999_999_998, now=10.0) == ""
    assert resolver.path(late_id, now=10.1) == "/late"


def test_cgroup_id_resolver_without_v2() -> None:
    resolver = CgroupIdResolver(None)
    assert resolver.path(1) == ""
    assert CgroupIdResolver("/nonexistent/cgroup2").path(1) == ""


# -- the real hierarchies of this host -----------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creating cgroups needs root")


@needs_root
def test_real_cgroup_memory_and_id() -> None:
    from memtop.cgroups import current_layout

    layout = current_layout()
    if layout.v1_memory_root is None and layout.v2_root is None:
        pytest.skip("no memory cgroup hierarchy")
    limit = 64 << 20
    relpath = f"{unique_name()}/docker/{ID}"
    with test_cgroup(relpath, memory_limit_bytes=limit) as cg:
        ref_ = parse_cgroup_path(cg.path)
        assert ref_ is not None and ref_.container_id == ID and ref_.cgroup_path == cg.path
        memory = read_cgroup_memory(cg.path, layout)
        assert memory.limit_bytes == limit
        assert memory.usage_bytes is not None and memory.usage_bytes >= 0
        if layout.v1_memory_root is not None:
            assert Path(layout.v1_memory_root) == V1_MEMORY
        cgroup_id = cg.v2_id()
        if cgroup_id is not None:
            root = v2_root()
            resolver = CgroupIdResolver(str(root))
            assert resolver.path(cgroup_id) == cg.path
            # the inode a directory listing reports is the one stat (and the BPF helper) reports
            parent = Path(str(root) + cg.path).parent
            with os.scandir(parent) as entries:
                (entry,) = [e for e in entries if e.name == ID]
            assert entry.inode() == cgroup_id


DOCKER_ID = "a" * 64


@pytest.mark.parametrize(
    ("memory", "unified", "expected"),
    [
        (
            f"/docker/{DOCKER_ID}",
            "/user.slice/session-1.scope",
            f"/docker/{DOCKER_ID}",
        ),  # v1 only: the container
        (
            "/",
            f"/system.slice/docker-{DOCKER_ID}.scope",
            f"/system.slice/docker-{DOCKER_ID}.scope",
        ),  # v2 only
        (
            f"/docker/{DOCKER_ID}",
            f"/system.slice/docker-{DOCKER_ID}.scope",
            f"/docker/{DOCKER_ID}",
        ),  # both: memory
        (
            "/user.slice",
            "/user.slice/session-1.scope",
            "/user.slice",
        ),  # host: the memory path, like /proc rows
        ("", "/user.slice/session-1.scope", "/user.slice/session-1.scope"),  # no v1 id known
        ("", "", ""),
    ],
)
def test_kernel_cgroup_path_prefers_a_container(memory: str, unified: str, expected: str) -> None:
    assert kernel_cgroup_path(memory, unified) == expected


def test_metadata_rename_is_seen_without_restart(tmp_path: Path) -> None:
    """`docker rename` rewrites config.v2.json: the new name shows within recheck_s (issue #13, fault 2)."""
    docker = tmp_path / "docker"
    shutil.copytree(RUNTIMES_DATA / "docker" / "containers" / DOCKER_WEB, docker / DOCKER_WEB)
    reader = MetadataReader(RuntimeRoots.only({"docker": str(docker)}), recheck_s=2.0)
    web = ref("docker", DOCKER_WEB)
    assert reader.lookup(web, now=10.0).name == "web"
    config = docker / DOCKER_WEB / "config.v2.json"
    doc = json.loads(config.read_text())
    doc["Name"] = "/web-renamed"
    config.write_text(json.dumps(doc))
    os.utime(config, ns=(1, 1))  # a different mtime even on a coarse clock
    assert reader.lookup(web, now=11.0).name == "web"  # not re-checked within recheck_s
    assert reader.lookup(web, now=12.0).name == "web-renamed"
    config.unlink()  # removed with its container: the last names stay
    assert reader.lookup(web, now=20.0).name == "web-renamed"


def test_podman_rename_through_the_storage_index(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    shutil.copytree(RUNTIMES_DATA / "containers-storage" / "overlay-containers", storage)
    reader = MetadataReader(RuntimeRoots.only({"podman": str(storage)}), recheck_s=0.0)
    before = reader.lookup(ref("podman", PODMAN_DB), now=0.0).name
    index = storage / "containers.json"
    index.write_text(index.read_text().replace(f'"{before}"', '"db-renamed"'))
    os.utime(index, ns=(1, 1))
    assert before and reader.lookup(ref("podman", PODMAN_DB), now=1.0).name == "db-renamed"


def test_ctr_container_without_runtime_marker_is_found_from_containerd_state(tmp_path: Path) -> None:
    """Plain `ctr run` puts a container at /<namespace>/<id>: only containerd's task directory says it is
    one (issue #13, fault 1). Every panel's attribution (parse_cgroup_path) then sees it."""
    task = tmp_path / "containerd" / "default" / "web1"
    task.mkdir(parents=True)
    (task / "config.json").write_text(
        json.dumps({"ociVersion": "1.0.2", "linux": {"cgroupsPath": "/default/web1"}})
    )
    moby = tmp_path / "containerd" / "moby" / ID
    moby.mkdir(parents=True)
    (moby / "config.json").write_text(json.dumps({"linux": {"cgroupsPath": f"/custom-parent/{ID}"}}))
    systemd = tmp_path / "containerd" / "k8s.io" / ("e" * 64)
    systemd.mkdir(parents=True)
    (systemd / "config.json").write_text(
        json.dumps({"linux": {"cgroupsPath": f"kubepods.slice:cri-containerd:{'e' * 64}"}})
    )
    roots = RuntimeRoots.only({"containerd": str(tmp_path / "containerd")})
    assert parse_cgroup_path("/default/web1") is None  # no marker in the path
    found = RuntimeCgroupIndex(roots).scan()
    assert set(found) == {"/default/web1", f"/custom-parent/{ID}"}
    try:
        set_runtime_cgroups(found)
        web1 = parse_cgroup_path("/default/web1/sub")
        assert web1 == ContainerRef("containerd", "web1", "/default/web1")
        assert web1.short_id == "web1"
        assert parse_cgroup_path(f"/custom-parent/{ID}") == ContainerRef("docker", ID, f"/custom-parent/{ID}")
        assert parse_cgroup_path("/default") is None and parse_cgroup_path("/default/web2") is None
        # a marker inside still wins (docker in a ctr container)
        assert parse_cgroup_path(f"/default/web1/docker/{ID}") == ContainerRef(
            "docker", ID, f"/default/web1/docker/{ID}"
        )
        meta = MetadataReader(roots).lookup(web1, now=0.0)
        assert meta.name == "web1" and meta.runtime == "containerd"
    finally:
        set_runtime_cgroups({})
    assert parse_cgroup_path("/default/web1") is None


def test_container_details_show_working_set_and_raw_usage() -> None:
    from rich.console import Console

    from memtop.screens.container import container_details
    from memtop.store import ContainerRow

    row = ContainerRow(
        id=ID,
        runtime="docker",
        cgroup_path=f"/docker/{ID}",
        name="web",
        memory_bytes=3 << 20,
        memory_limit_bytes=64 << 20,
        memory_usage_bytes=43 << 20,
    )
    console = Console(width=200, record=True)
    console.print(container_details(row, ID))
    text = console.export_text()
    assert "3.0 MiB" in text and "working set" in text and "43.0 MiB" in text and "4.7%" in text, text
