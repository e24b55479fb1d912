"""Which container (and Kubernetes pod) a cgroup belongs to, what the runtime calls it, and its memory.

Everything here works from plain text and plain files, so it is testable anywhere:

- `parse_cgroup_path` turns a cgroup path (as /proc/PID/cgroup shows it) into a `ContainerRef`, or None for
  the host. It is called for every process on every tick, so it is a cached, regex-free scan of the path's
  components from the innermost outwards: the innermost recognised container wins, which is what a
  container nested in another one (kind, docker-in-docker) needs.
- `MetadataReader` finds names in the runtimes' own state files (no daemon or API server is asked), with
  every id validated before it becomes part of a file path.
- `read_cgroup_memory` reads the memory controller's usage and limit of a cgroup (v1 or v2).
- `CgroupIdResolver` maps a cgroup2 id (what `bpf_get_current_cgroup_id()` returns: the directory's inode
  number) back to its path, so allocations by processes that already exited still find their container.

Path forms recognised (each has a test in tests/test_containers.py):

- Docker: cgroupfs `/docker/<id>`, systemd `.../docker-<id>.scope` (also under kubepods: dockershim).
- Kubernetes, cgroupfs: `/kubepods[/<qos>]/pod<uid>/<id>` (runtime "cri": the path cannot tell containerd
  from CRI-O or Docker; the metadata can) and CRI-O's `.../pod<uid>/crio-<id>`.
- Kubernetes, systemd: `.../kubepods[-<qos>]-pod<uid_with_underscores>.slice/<prefix>-<id>.scope` where
  prefix is cri-containerd, crio or docker (dockershim), also below a prefixed slice such as kind's
  `kubelet-kubepods-...`; and the systemd cgroupsPath written out literally as one directory
  (`kubepods-...-pod<uid>.slice:cri-containerd:<id>`) when a runtime uses the cgroupfs driver with
  systemd-style paths.
- Podman: `libpod-<id>.scope` (machine.slice, rootless under user@UID.service) and cgroupfs
  `/libpod_parent/libpod-<id>`. nerdctl: `nerdctl-<id>.scope` (containerd).
- LXC/LXD: `lxc.payload.<name>` (LXC >= 4), `lxc.payload/<name>` (3.1-3.2), `lxc/<name>` (older).

Not containers (host infrastructure, resolved to whatever encloses them): conmon scopes
(`libpod-conmon-<id>.scope`, `crio-conmon-<id>.scope`, `/libpod_parent/conmon`), LXC monitors
(`lxc.monitor.<name>`, `lxc.monitor/<name>`, `lxc.pivot`), and a process sitting in a pod's own cgroup
outside any container (a pod slice has no processes of its own in a healthy cluster; on the host it is
grouped by `host_unit`, which for the systemd driver is the pod slice itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from memtop.cgroups import CgroupLayout
from memtop.errors import MemtopError

RUNTIMES = ("docker", "containerd", "cri-o", "podman", "lxc", "cri")

_HEX = "0123456789abcdef"
_MAX_PARSE_CHARS = 16384  # longer paths are still parsed, but not cached
_DELETED = " (deleted)"  # cgroup2 appends this in /proc/PID/cgroup once the cgroup has been removed

# `<prefix><64 hex>.scope` as systemd-driven runtimes name a container's scope.
_SCOPE_PREFIXES = (
    ("cri-containerd-", "containerd"),
    ("docker-", "docker"),
    ("crio-", "cri-o"),
    ("libpod-", "podman"),
    ("nerdctl-", "containerd"),
)
# `<prefix><64 hex>` without ".scope": the cgroupfs drivers of CRI-O and Podman.
_DIR_PREFIXES = (("crio-", "cri-o"), ("libpod-", "podman"))
# `<slice>:<prefix>:<64 hex>`: a systemd cgroupsPath created literally by a cgroupfs driver.
_COLON_PREFIXES = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker", "libpod": "podman"}
_QOS_CLASSES = ("burstable", "besteffort")
_UNIT_SUFFIXES = (".service", ".scope", ".slice", ".socket", ".mount", ".swap")
_LXC_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.+")


@dataclass(frozen=True)
class ContainerRef:
    """A container as its cgroup path tells it: enough to group processes and find names later."""

    runtime: str  # one of RUNTIMES
    container_id: str  # 64 lower-case hex; for LXC/LXD the container's name
    cgroup_path: str  # the container's own cgroup (the path up to and including its scope/dir)
    pod_uid: str = ""  # Kubernetes pod UID with dashes ("" outside Kubernetes)
    qos: str = ""  # "guaranteed" | "burstable" | "besteffort" under kubepods, else ""

    @property
    def short_id(self) -> str:
        """What `docker ps` shows: the first 12 hex digits (an LXC name or a `ctr run` id as it is)."""
        return self.container_id[:12] if is_container_id(self.container_id) else self.container_id


def is_container_id(text: str) -> bool:
    """64 lower-case hex digits: the only shape of id that is ever joined into a state-file path."""
    return len(text) == 64 and not text.strip(_HEX)


def is_safe_lxc_name(text: str) -> bool:
    """An LXC/LXD name that is safe as one path component (no "/", no leading dot, no "..")."""
    return 0 < len(text) <= 255 and text[0] != "." and all(c in _LXC_NAME_CHARS for c in text)


def _pod_uid(text: str) -> str:
    """A pod UID in canonical form (dashes), or "" if `text` is not one.

    UUIDs are the common case; static (mirror) pods have a 32-hex-digit hash instead.
    """
    text = text.replace("_", "-")
    if len(text) == 36:
        if text[8] == text[13] == text[18] == text[23] == "-" and not text.replace("-", "").strip(_HEX):
            return text if text.count("-") == 4 else ""
        return ""
    if len(text) == 32 and not text.strip(_HEX):
        return text
    return ""


def _pod_of_slice(name: str) -> tuple[str, str] | None:
    """(pod_uid, qos) of a systemd pod slice such as `kubepods-burstable-pod<uid>.slice`."""
    if not name.endswith(".slice"):
        return None
    tokens = name[: -len(".slice")].split("-")
    if len(tokens) < 2 or not tokens[-1].startswith("pod") or "kubepods" not in tokens:
        return None
    uid = _pod_uid(tokens[-1][3:])
    if not uid:
        return None
    level = tokens[-2]
    if level in _QOS_CLASSES:
        return uid, level
    if level == "kubepods":
        return uid, "guaranteed"
    return None


def _pod_of_parent(parts: list[str], parent: int) -> tuple[str, str] | None:
    """(pod_uid, qos) when parts[parent] is a pod's cgroup (systemd slice or cgroupfs `pod<uid>`)."""
    if parent < 0:
        return None
    name = parts[parent]
    if name.endswith(".slice"):
        return _pod_of_slice(name)
    if not name.startswith("pod"):
        return None
    uid = _pod_uid(name[3:])
    if not uid or parent < 1:
        return None
    above = parts[parent - 1]
    if above == "kubepods":
        return uid, "guaranteed"
    if above in _QOS_CLASSES and parent >= 2 and parts[parent - 2] == "kubepods":
        return uid, above
    return None


def _container_at(parts: list[str], i: int) -> tuple[str, str, tuple[str, str] | None] | None:
    """(runtime, container_id, pod) if component i is a container's own cgroup, else None."""
    name = parts[i]
    if is_container_id(name):
        if i > 0 and parts[i - 1] == "docker":
            return "docker", name, None
        pod = _pod_of_parent(parts, i - 1)
        return ("cri", name, pod) if pod is not None else None
    if name.endswith(".scope"):
        stem = name[: -len(".scope")]
        for prefix, runtime in _SCOPE_PREFIXES:
            if stem.startswith(prefix) and is_container_id(stem[len(prefix) :]):
                return runtime, stem[len(prefix) :], _pod_of_parent(parts, i - 1)
        return None  # includes libpod-conmon-<id>.scope and crio-conmon-<id>.scope
    if name.startswith("lxc.payload.") and len(name) > len("lxc.payload."):
        return "lxc", name[len("lxc.payload.") :], None
    if i > 0 and parts[i - 1] in ("lxc.payload", "lxc"):
        return "lxc", name, None
    for prefix, runtime in _DIR_PREFIXES:
        if name.startswith(prefix) and is_container_id(name[len(prefix) :]):
            return runtime, name[len(prefix) :], _pod_of_parent(parts, i - 1)
    if ":" in name:
        fields_ = name.split(":")
        if len(fields_) == 3 and fields_[1] in _COLON_PREFIXES and is_container_id(fields_[2]):
            return _COLON_PREFIXES[fields_[1]], fields_[2], _pod_of_slice(fields_[0])
    return None


def _components(path: str) -> list[str] | None:
    """The path's components, or None when it cannot be a real cgroup path ("." or ".." in it)."""
    if path.endswith(_DELETED):
        path = path[: -len(_DELETED)]
    parts = [p for p in path.split("/") if p]
    if "." in parts or ".." in parts:
        return None
    return parts


# Container cgroups the runtimes' own state names (cgroup path -> ref), for paths with no runtime marker
# such as plain `ctr run`'s `/<namespace>/<id>`. Set by the live source from `RuntimeCgroupIndex`.
_runtime_cgroups: dict[str, ContainerRef] = {}
_runtime_generation = 0  # bumped whenever that set changes: placements made before may be stale


def runtime_cgroups_generation() -> int:
    """Changes whenever the set of runtime-named container cgroups does (callers re-place their rows)."""
    return _runtime_generation


def set_runtime_cgroups(refs: Mapping[str, ContainerRef]) -> None:
    """Make `parse_cgroup_path` (every panel's attribution) also recognise these container cgroups, found in
    the runtimes' state (path -> ref). A path's runtime marker, where it has one, still decides first."""
    global _runtime_cgroups, _runtime_generation
    fresh = {path.rstrip("/") or "/": ref for path, ref in refs.items()}
    if fresh != _runtime_cgroups:
        _runtime_cgroups = fresh
        _runtime_generation += 1
        _parse_cached.cache_clear()


def _parse_cgroup_path(path: str) -> ContainerRef | None:
    parts = _components(path)
    if not parts:
        return None
    known = _runtime_cgroups
    for i in range(len(parts) - 1, -1, -1):
        found = _container_at(parts, i)
        if found is not None:
            runtime, container_id, pod = found
            uid, qos = pod if pod is not None else ("", "")
            return ContainerRef(runtime, container_id, "/" + "/".join(parts[: i + 1]), uid, qos)
        if known:
            ref = known.get("/" + "/".join(parts[: i + 1]))
            if ref is not None:
                return ref
    return None


_parse_cached = lru_cache(maxsize=8192)(_parse_cgroup_path)


def parse_cgroup_path(path: str) -> ContainerRef | None:
    """The container whose cgroup `path` is in (or below), or None for the host. Never raises."""
    if not isinstance(path, str):
        return None
    if len(path) > _MAX_PARSE_CHARS:
        return _parse_cgroup_path(path)
    return _parse_cached(path)


def _host_unit(path: str) -> str:
    parts = _components(path)
    for name in reversed(parts or ()):
        for suffix in _UNIT_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                return name
    return ""


_host_unit_cached = lru_cache(maxsize=4096)(_host_unit)


def host_unit(path: str) -> str:
    """The innermost systemd unit of a host cgroup ("ssh.service", "session-3.scope"), "" if none."""
    if not isinstance(path, str):
        return ""
    if len(path) > _MAX_PARSE_CHARS:
        return _host_unit(path)
    return _host_unit_cached(path)


def container_of_proc_cgroup(text: str) -> ContainerRef | None:
    """The container of a process from its /proc/PID/cgroup text (v1, v2 or hybrid).

    Tries the memory controller's line first (where memtop reads usage on v1), then the unified line,
    then name=systemd, then the rest: the first that resolves to a container wins.
    """
    if not isinstance(text, str):
        return None
    memory: list[str] = []
    unified: list[str] = []
    systemd: list[str] = []
    others: list[str] = []
    for line in text.splitlines():
        fields_ = line.split(":", 2)
        if len(fields_) != 3:
            continue
        _, controllers, path = fields_
        names = controllers.split(",")
        if "memory" in names:
            memory.append(path)
        elif controllers == "":
            unified.append(path)
        elif "name=systemd" in names:
            systemd.append(path)
        else:
            others.append(path)
    for path in (*memory, *unified, *systemd, *others):
        ref = parse_cgroup_path(path)
        if ref is not None:
            return ref
    return None


def kernel_cgroup_path(memory_path: str, unified_path: str) -> str:
    """The path to attribute a process by, from what the kernel told the probe: its cgroup v1 memory
    cgroup's path and its cgroup2 path ("" where unknown). Like `container_of_proc_cgroup`, the first
    that is a container's wins; otherwise the memory path, as `procinfo.parse_proc_cgroup` prefers."""
    for path in (memory_path, unified_path):
        if path and parse_cgroup_path(path) is not None:
            return path
    return memory_path or unified_path


# -- names from the runtimes' state files ---------------------------------------------------------

MAX_STATE_FILE_BYTES = 4 << 20  # a config.json is a few KiB; anything this big is not one
MAX_INDEX_FILE_BYTES = 32 << 20  # containers/storage's containers.json lists every container
MAX_CONTAINERD_NAMESPACES = 64
MAX_CACHED_META = 4096


@dataclass(frozen=True)
class ContainerMeta:
    """What the runtime calls a container; every field may be empty."""

    name: str = ""  # docker Name (no leading "/"), k8s container name, podman name, lxc name
    pod_name: str = ""
    namespace: str = ""
    image: str = ""
    runtime: str = ""  # the runtime whose state files had this id (resolves "cri")


EMPTY_META = ContainerMeta()


_STORAGE = Path("/var/lib/containers/storage")


@dataclass(frozen=True)
class RuntimeRoots:
    """Where each runtime keeps its per-container state, searched in order (the first that has a container
    wins). `with_added` puts a user's directories before the defaults; `only` (tests, fixture trees) uses
    nothing else."""

    docker: tuple[Path, ...] = (Path("/var/lib/docker/containers"),)  # <id>/config.v2.json
    containerd: tuple[Path, ...] = (  # <namespace>/<id>/config.json
        Path("/run/containerd/io.containerd.runtime.v2.task"),
        Path("/run/docker/containerd/daemon/io.containerd.runtime.v2.task"),  # dockerd's own containerd
    )
    crio: tuple[Path, ...] = (_STORAGE / "overlay-containers",)  # <id>/userdata/config.json
    # + containers.json for names; vfs-containers/ when the overlay driver is unavailable
    podman: tuple[Path, ...] = (_STORAGE / "overlay-containers", _STORAGE / "vfs-containers")
    lxc: tuple[Path, ...] = (Path("/var/lib/lxc"),)  # <name>/config

    @classmethod
    def with_added(cls, pairs: Mapping[str, str] | Iterable[tuple[str, str]]) -> RuntimeRoots:
        """The defaults, with each (runtime, directory) searched before them, e.g. ("docker", "/srv/docker").

        A directory may be the runtime's own state root (/srv/docker, a containers/storage graph root, a
        containerd state dir) or the per-container directory inside it (.../containers,
        .../overlay-containers, .../io.containerd.runtime.v2.task). Raises MemtopError (one line) for an
        unknown runtime or an empty directory.
        """
        added = cls._parse(pairs)
        base = cls()
        return cls(**{name: (*added.get(name, ()), *getattr(base, name)) for name in _ROOT_FIELDS})

    @classmethod
    def only(cls, pairs: Mapping[str, str] | Iterable[tuple[str, str]]) -> RuntimeRoots:
        """Just these directories (no defaults): for fixture trees."""
        added = cls._parse(pairs)
        return cls(**{name: added.get(name, ()) for name in _ROOT_FIELDS})

    @staticmethod
    def _parse(pairs: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, tuple[Path, ...]]:
        items = pairs.items() if isinstance(pairs, Mapping) else pairs
        out: dict[str, tuple[Path, ...]] = {}
        for key, value in items:
            field = "crio" if key == "cri-o" else key
            if field not in _ROOT_FIELDS:
                raise MemtopError(
                    f"unknown container runtime {key!r} (expected one of: {', '.join(_ROOT_FIELDS)})"
                )
            if not value:
                raise MemtopError(f"empty state directory for container runtime {key!r}")
            out[field] = (*out.get(field, ()), *_expand_root(field, Path(value)))
        return out


def _expand_root(field: str, root: Path) -> tuple[Path, ...]:
    """A runtime's state root -> the per-container directories inside it (or `root` itself)."""
    inner = {
        "docker": ("containers",),
        "containerd": ("io.containerd.runtime.v2.task",),
        "crio": ("overlay-containers", "vfs-containers"),
        "podman": ("overlay-containers", "vfs-containers"),
    }.get(field, ())
    found = tuple(root / name for name in inner if (root / name).is_dir())
    return found or (root,)


_ROOT_FIELDS = tuple(f.name for f in fields(RuntimeRoots))


def _read_capped(path: Path, cap: int) -> bytes | None:
    """The bytes of a regular file, or None if missing, unreadable, not a regular file or over `cap`.

    O_NONBLOCK keeps a FIFO planted in a state directory from hanging the collector.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                return None
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_json(path: Path, cap: int = MAX_STATE_FILE_BYTES) -> Any:
    """Parsed JSON, or None when the file is missing, unreadable, oversized or not valid JSON."""
    data = _read_capped(path, cap)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _str_map(value: Any) -> dict[str, str]:
    """The string-to-string entries of a JSON object (labels, annotations); anything else is dropped."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def parse_k8s_name(name: str) -> tuple[str, str, str] | None:
    """(container, pod, namespace) from a `k8s_<container>_<pod>_<namespace>_<uid>_<attempt>` name.

    Dockershim and CRI-O name containers this way; none of the parts may contain "_" in Kubernetes.
    """
    parts = name.lstrip("/").split("_")
    if len(parts) != 6 or parts[0] != "k8s" or not all(parts[1:4]):
        return None
    return parts[1], parts[2], parts[3]


def _docker_meta(config: Any) -> ContainerMeta | None:
    """Docker's config.v2.json: Name, Config.Image, Config.Labels (dockershim adds io.kubernetes.*)."""
    if not isinstance(config, dict):
        return None
    inner = config.get("Config")
    inner = inner if isinstance(inner, dict) else {}
    labels = _str_map(inner.get("Labels"))
    name = _str(config.get("Name")).lstrip("/")
    pod_name = labels.get("io.kubernetes.pod.name", "")
    namespace = labels.get("io.kubernetes.pod.namespace", "")
    k8s_name = labels.get("io.kubernetes.container.name", "")
    if not k8s_name and (parsed := parse_k8s_name(name)) is not None:
        k8s_name, pod_name, namespace = parsed
    image = _str(inner.get("Image")) or _str(config.get("Image"))
    return ContainerMeta(k8s_name or name, pod_name, namespace, image, "docker")


def _containerd_meta(spec: Any) -> ContainerMeta | None:
    """containerd's task bundle config.json: an OCI spec whose annotations the CRI plugin fills in."""
    if not isinstance(spec, dict):
        return None
    notes = _str_map(spec.get("annotations"))
    kind = notes.get("io.kubernetes.cri.container-type", "")
    name = notes.get("io.kubernetes.cri.container-name", "")
    if kind == "sandbox" and not name:
        name = "POD"  # the pause container, named as dockershim and CRI-O name theirs
    if not name:
        name = notes.get("nerdctl/name", "")
    return ContainerMeta(
        name=name,
        pod_name=notes.get("io.kubernetes.cri.sandbox-name", ""),
        namespace=notes.get("io.kubernetes.cri.sandbox-namespace", ""),
        image=notes.get("io.kubernetes.cri.image-name", ""),
        runtime="containerd",
    )


def _storage_meta(spec: Any, entry: Mapping[str, Any] | None) -> ContainerMeta | None:
    """CRI-O or Podman (both keep containers in containers/storage): userdata/config.json annotations
    plus, for names, the storage index entry (containers.json)."""
    notes = _str_map(spec.get("annotations")) if isinstance(spec, dict) else {}
    if not notes and entry is None:
        return None
    manager = notes.get("io.container.manager", "")
    names = entry.get("names") if entry is not None else None
    index_name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else ""
    index_meta: dict[str, Any] = {}
    if entry is not None and isinstance(entry.get("metadata"), str):
        with contextlib.suppress(ValueError, RecursionError):
            loaded = json.loads(entry["metadata"])
            if isinstance(loaded, dict):
                index_meta = loaded
    if manager in ("cri-o", "libpod"):
        is_crio = manager == "cri-o"
    elif notes:  # older CRI-O wrote no io.container.manager
        is_crio = "io.kubernetes.pod.name" in notes or any(
            k.startswith("io.kubernetes.cri-o.") for k in notes
        )
    else:
        is_crio = "pod-name" in index_meta or index_name.startswith("k8s_")
    image = notes.get("io.kubernetes.cri-o.ImageName", "") or _str(index_meta.get("image-name"))
    if not is_crio:
        return ContainerMeta(name=index_name or _str(index_meta.get("name")), image=image, runtime="podman")
    name = notes.get("io.kubernetes.container.name", "")
    pod_name = notes.get("io.kubernetes.pod.name", "")
    namespace = notes.get("io.kubernetes.pod.namespace", "")
    if not name and notes.get("io.kubernetes.cri-o.ContainerType") == "sandbox":
        name = "POD"
    for fallback in (notes.get("io.kubernetes.cri-o.ContainerName", ""), index_name):
        parsed = parse_k8s_name(fallback) if not (name and pod_name and namespace) else None
        if parsed is not None:
            name, pod_name, namespace = name or parsed[0], pod_name or parsed[1], namespace or parsed[2]
    return ContainerMeta(name, pod_name, namespace, image, "cri-o")


def _lxc_meta(config: bytes, name: str) -> ContainerMeta:
    """LXC's <name>/config: key = value lines; the template comment says which image it came from."""
    text = config.decode("utf-8", "replace")
    image = ""
    for line in text.splitlines():
        if line.startswith("# Parameters passed to the template:"):
            args = line.split(":", 1)[1].split()
            opts = {args[k]: args[k + 1] for k in range(len(args) - 1) if args[k].startswith("-")}
            dist = opts.get("--dist") or opts.get("-d", "")
            release = opts.get("--release") or opts.get("-r", "")
            image = f"{dist}:{release}" if dist and release else dist
            break
    return ContainerMeta(name=name, image=image, runtime="lxc")


_Signature = tuple[tuple[str, int, int] | None, ...]


@dataclass
class _Known:
    meta: ContainerMeta
    files: tuple[Path, ...]  # the state files the names came from
    signature: _Signature  # their (path, mtime_ns, size) when read
    checked_at: float


def _signature(files: Iterable[Path]) -> _Signature:
    out: list[tuple[str, int, int] | None] = []
    for path in files:
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            out.append(None)
            continue
        out.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(out)


class MetadataReader:
    """Names for containers from runtime state files, cached per container id.

    A miss (no state file yet, unreadable, corrupt) is remembered for `retry_s` seconds and then tried
    again, since a container seen in its first moments may not have its state written yet. A hit is
    checked again every `recheck_s` seconds: one stat of each state file it came from, and a re-read when
    one changed (`docker rename` rewrites config.v2.json, `podman rename` containers.json).
    """

    def __init__(
        self, roots: RuntimeRoots = RuntimeRoots(), retry_s: float = 30.0, recheck_s: float = 2.0
    ) -> None:
        self.roots = roots
        self.retry_s = retry_s
        self.recheck_s = recheck_s
        self._found: OrderedDict[tuple[str, str], _Known] = OrderedDict()
        self._missed: dict[tuple[str, str], float] = {}
        self._index_cache: dict[Path, tuple[tuple[int, int], dict[str, Mapping[str, Any]]]] = {}
        self._files: list[Path] = []  # the state files the read in progress looked at
        self._lock = threading.Lock()  # the OOM probe's thread looks names up too

    def lookup(self, ref: ContainerRef, now: float | None = None, fresh: bool = False) -> ContainerMeta:
        """Names for `ref`, or an empty ContainerMeta when the host has none (yet). Never raises.
        Thread-safe. `fresh`: a remembered miss is tried again now (an OOM victim's container)."""
        with self._lock:
            return self._lookup(ref, time.monotonic() if now is None else now, fresh)

    def _lookup(self, ref: ContainerRef, now: float, fresh: bool) -> ContainerMeta:
        key = (ref.runtime, ref.container_id)
        found = self._found.get(key)
        if found is not None:
            self._found.move_to_end(key)  # least recently seen containers are evicted first
            if now - found.checked_at < self.recheck_s:
                return found.meta
            found.checked_at = now
            signature = _signature(found.files)
            if signature == found.signature or None in signature:
                return found.meta  # unchanged, or being removed: the names it had stay
            del self._found[key]  # a state file changed (`docker rename`?): read again
        else:
            missed_at = self._missed.get(key)
            if missed_at is not None and now - missed_at < self.retry_s and not fresh:
                return EMPTY_META
        self._files = []
        try:
            meta = self._read(ref)
        except Exception:  # a bad state file must never take the collector down
            meta = None
        if meta is None:
            self._missed.pop(key, None)  # re-insert: the oldest misses are dropped first
            self._missed[key] = now
            if len(self._missed) > MAX_CACHED_META:
                self._missed.pop(next(iter(self._missed)))
            return EMPTY_META
        self._missed.pop(key, None)
        files = tuple(dict.fromkeys(self._files))
        self._found[key] = _Known(meta, files, _signature(files), now)
        if len(self._found) > MAX_CACHED_META:
            self._found.popitem(last=False)
        return meta

    def forget(self, container_id: str) -> None:
        """Drop what is known of a container that is gone (its id may come back with other names)."""
        for key in [k for k in (*self._found, *self._missed) if k[1] == container_id]:
            self._found.pop(key, None)
            self._missed.pop(key, None)

    def _json(self, path: Path, cap: int = MAX_STATE_FILE_BYTES) -> Any:
        loaded = _read_json(path, cap)
        if loaded is not None:
            self._files.append(path)
        return loaded

    def _read(self, ref: ContainerRef) -> ContainerMeta | None:
        if ref.runtime == "lxc":
            return self._read_lxc(ref.container_id)
        cid = ref.container_id
        if ref.runtime == "containerd" and is_safe_lxc_name(cid) and not is_container_id(cid):
            return self._read_containerd(cid)  # `ctr run` takes any name as the id
        if not is_container_id(cid):
            return None
        readers = {
            "docker": (self._read_docker,),
            "containerd": (self._read_containerd,),
            "cri-o": (self._read_crio,),
            "podman": (self._read_podman,),
            "cri": (self._read_containerd, self._read_crio, self._read_docker),
        }.get(ref.runtime, ())
        for read in readers:
            meta = read(cid)
            if meta is not None:
                return meta
        return None

    def _read_docker(self, cid: str) -> ContainerMeta | None:
        for root in self.roots.docker:
            meta = _docker_meta(self._json(root / cid / "config.v2.json"))
            if meta is not None:
                return meta
        return None

    def _read_containerd(self, cid: str) -> ContainerMeta | None:
        for root in self.roots.containerd:
            for namespace in containerd_namespaces(root):
                spec = self._json(root / namespace / cid / "config.json")
                if spec is not None:
                    meta = _containerd_meta(spec)
                    if meta is not None and not meta.name and not is_container_id(cid):
                        meta = replace(meta, name=cid)  # plain `ctr run`: the id is the name `ctr c ls` shows
                    return meta
        return None

    def _storage_index(self, root: Path) -> dict[str, Mapping[str, Any]]:
        """containers/storage's containers.json by id, re-read only when the file changes."""
        path = root / "containers.json"
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return {}
        self._files.append(path)
        signature = (st.st_mtime_ns, st.st_size)
        cached = self._index_cache.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        loaded = _read_json(path, MAX_INDEX_FILE_BYTES)
        index: dict[str, Mapping[str, Any]] = {}
        if isinstance(loaded, list):
            for entry in loaded:
                if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                    index[entry["id"]] = entry
        self._index_cache[path] = (signature, index)
        return index

    def _read_storage(self, roots: tuple[Path, ...], cid: str) -> ContainerMeta | None:
        for root in roots:
            entry = self._storage_index(root).get(cid)
            spec = self._json(root / cid / "userdata" / "config.json")
            if spec is None and entry is None:
                continue
            return _storage_meta(spec, entry)
        return None

    def _read_crio(self, cid: str) -> ContainerMeta | None:
        return self._read_storage(self.roots.crio, cid)

    def _read_podman(self, cid: str) -> ContainerMeta | None:
        return self._read_storage(self.roots.podman, cid)

    def _read_lxc(self, name: str) -> ContainerMeta | None:
        if not is_safe_lxc_name(name):
            return None
        for root in self.roots.lxc:
            config = _read_capped(root / name / "config", MAX_STATE_FILE_BYTES)
            if config is not None:
                self._files.append(root / name / "config")
                return _lxc_meta(config, name)
        return None


def containerd_namespaces(root: Path) -> list[str]:
    """The namespaces under a containerd task root: k8s.io first (the CRI plugin's), then moby (Docker
    >= 23), then the rest, sorted; at most MAX_CONTAINERD_NAMESPACES."""
    try:
        with os.scandir(root) as entries:
            names = sorted(
                e.name for e in entries if is_safe_lxc_name(e.name) and e.is_dir(follow_symlinks=False)
            )
    except (OSError, ValueError):
        return []
    names = names[:MAX_CONTAINERD_NAMESPACES]
    preferred = [n for n in ("k8s.io", "moby") if n in names]
    return preferred + [n for n in names if n not in preferred]


class RuntimeCgroupIndex:
    """The container cgroups the runtimes' own state says exist, whatever their paths look like.

    containerd's task bundles (`<root>/<namespace>/<id>/config.json`, one per running task: plain `ctr run`,
    nerdctl, Docker's `moby` namespace, the CRI plugin's `k8s.io`) and containers/storage's
    `<id>/userdata/config.json` (Podman, CRI-O) are OCI specs whose `linux.cgroupsPath` is the container's
    cgroup. Only absolute paths (the cgroupfs drivers') are taken: a systemd `slice:prefix:id` path always
    carries its runtime's marker. Each spec is re-read only when its (mtime, size) changes.
    """

    def __init__(self, roots: RuntimeRoots) -> None:
        self.roots = roots
        self._specs: dict[Path, tuple[tuple[int, int], str]] = {}

    def scan(self) -> dict[str, ContainerRef]:
        """cgroup path -> ref of every container found now. Never raises."""
        found: dict[str, ContainerRef] = {}
        seen: set[Path] = set()
        for root in self.roots.containerd:
            for namespace in containerd_namespaces(root):
                for cid in _safe_subdirs(root / namespace):
                    spec = root / namespace / cid / "config.json"
                    seen.add(spec)
                    path = self._cgroups_path(spec)
                    if path:
                        runtime = "docker" if namespace == "moby" else "containerd"
                        found.setdefault(path, ContainerRef(runtime, cid, path))
        for runtime, roots in (("podman", self.roots.podman), ("cri-o", self.roots.crio)):
            for root in roots:
                for cid in _safe_subdirs(root):
                    spec = root / cid / "userdata" / "config.json"
                    if not is_container_id(cid) or spec in seen:
                        continue
                    seen.add(spec)
                    path = self._cgroups_path(spec)
                    if path:
                        found.setdefault(path, ContainerRef(runtime, cid, path))
        for gone in [p for p in self._specs if p not in seen]:
            del self._specs[gone]
        return found

    def _cgroups_path(self, spec: Path) -> str:
        try:
            st = os.stat(spec)
        except (OSError, ValueError):
            return ""
        signature = (st.st_mtime_ns, st.st_size)
        cached = self._specs.get(spec)
        if cached is not None and cached[0] == signature:
            return cached[1]
        loaded = _read_json(spec)
        linux = loaded.get("linux") if isinstance(loaded, dict) else None
        path = _str(linux.get("cgroupsPath")) if isinstance(linux, dict) else ""
        parts = _components(path) if path.startswith("/") else None
        path = "/" + "/".join(parts) if parts else ""
        self._specs[spec] = (signature, path)
        return path


def _safe_subdirs(directory: Path, limit: int = MAX_CACHED_META) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return [e.name for e in entries if is_safe_lxc_name(e.name) and e.is_dir(follow_symlinks=False)][
                :limit
            ]
    except (OSError, ValueError):
        return []


# -- a cgroup's memory ------------------------------------------------------------------------------

V1_UNLIMITED = 1 << 62  # v1 reports "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE (about 2**63)


@dataclass(frozen=True)
class CgroupMemory:
    """A cgroup's memory as the memory controller reports it (bytes; None where unknown or unlimited)."""

    usage_bytes: int | None  # raw usage, page cache included (v1 memory.usage_in_bytes, v2 memory.current)
    limit_bytes: int | None  # the effective limit: the smallest of its own and its ancestors'; None = none
    working_set_bytes: int | None = None  # usage - inactive_file, as kubelet and `docker stats` report it


def _cgroup_dir(cgroup_path: str, layout: CgroupLayout) -> tuple[Path, bool] | None:
    """(directory, is_v1) of a cgroup in the hierarchy that has the memory controller."""
    parts = [p for p in cgroup_path.split("/") if p]
    if ".." in parts or "." in parts or any("\0" in p for p in parts):
        return None
    if layout.v1_memory_root:
        return Path(layout.v1_memory_root, *parts), True
    if layout.v2_root:
        return Path(layout.v2_root, *parts), False
    return None


def _read_small(path: Path) -> str | None:
    data = _read_capped(path, 1 << 16)
    return data.decode("ascii", "replace") if data is not None else None


def _read_int(path: Path) -> int | None:
    text = _read_small(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _stat_fields(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _v2_limit(directory: Path, root: Path) -> int | None:
    """The smallest memory.max from `directory` up to (not including) the root: the effective limit."""
    limit: int | None = None
    while directory != root and root in directory.parents:
        text = _read_small(directory / "memory.max")
        if text is not None and text.strip().isdigit():
            value = int(text.strip())
            limit = value if limit is None else min(limit, value)
        directory = directory.parent
    return limit


def read_cgroup_memory(cgroup_path: str, layout: CgroupLayout) -> CgroupMemory:
    """Usage, working set and effective limit of a cgroup.

    v1: memory.usage_in_bytes, memory.stat's `total_inactive_file` and `hierarchical_memory_limit` (the
    smallest limit of the cgroup and its ancestors). v2: memory.current, memory.stat's `inactive_file`, and
    the smallest memory.max of the cgroup and its ancestors. Working set = usage - inactive file (never
    below 0): what kubelet and `docker stats` show, and what the OOM killer effectively competes for.
    """
    where = _cgroup_dir(cgroup_path, layout)
    if where is None:
        return CgroupMemory(None, None)
    directory, is_v1 = where
    stat = _stat_fields(_read_small(directory / "memory.stat"))
    if is_v1:
        usage = _read_int(directory / "memory.usage_in_bytes")
        limit = stat.get("hierarchical_memory_limit")
        if limit is None:
            limit = _read_int(directory / "memory.limit_in_bytes")
        inactive = stat.get("total_inactive_file")
        limit = limit if limit is not None and limit < V1_UNLIMITED else None
    else:
        usage = _read_int(directory / "memory.current")
        assert layout.v2_root is not None
        limit = _v2_limit(directory, Path(layout.v2_root))
        inactive = stat.get("inactive_file")
    working_set = None if usage is None else max(0, usage - (inactive or 0))
    return CgroupMemory(usage, limit, working_set)


# -- cgroup2 id -> path ----------------------------------------------------------------------------

MAX_CGROUPS_SCANNED = 200_000
MAX_STALE_IDS = 65_536


class CgroupIdResolver:
    """cgroup2 id (= the directory's inode number, what bpf_get_current_cgroup_id() returns) -> path.

    Ids are never reused while the system runs, so a cgroup that disappeared keeps its last known path
    (bounded): allocations by a container that just exited still resolve to it.
    """

    def __init__(self, v2_root: str | None, min_rescan_s: float = 1.0) -> None:
        self.v2_root = v2_root
        self.min_rescan_s = min_rescan_s
        self._paths: dict[int, str] = {}
        self._last_scan: float | None = None
        self.scans = 0  # how many times the hierarchy was walked (for tests and the doctor)

    def path(self, cgroup_id: int, now: float | None = None) -> str:
        """The cgroup path ("/" for the root, "/a/b" below it), or "" when unknown."""
        if self.v2_root is None:
            return ""
        known = self._paths.get(cgroup_id)
        if known is not None:
            return known
        now = time.monotonic() if now is None else now
        if self._last_scan is not None and now - self._last_scan < self.min_rescan_s:
            return ""  # unknown until the next rescan is due
        self._rescan(now)
        return self._paths.get(cgroup_id, "")

    def _rescan(self, now: float) -> None:
        self._last_scan = now
        self.scans += 1
        fresh = scan_cgroup_ids(self.v2_root) if self.v2_root is not None else {}
        stale = {k: v for k, v in self._paths.items() if k not in fresh}
        if len(stale) > MAX_STALE_IDS:
            stale = dict(list(stale.items())[-MAX_STALE_IDS:])
        stale.update(fresh)
        self._paths = stale


def scan_cgroup_ids(v2_root: str) -> dict[int, str]:
    """Every cgroup directory below `v2_root` by inode number, walked without following symlinks."""
    ids: dict[int, str] = {}
    try:
        ids[os.stat(v2_root, follow_symlinks=False).st_ino] = "/"
    except (OSError, ValueError):
        return ids
    stack: list[tuple[str, str]] = [(v2_root, "")]
    while stack and len(ids) < MAX_CGROUPS_SCANNED:
        directory, relative = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    path = f"{relative}/{entry.name}"
                    try:
                        ids[entry.stat(follow_symlinks=False).st_ino] = path
                    except OSError:
                        continue  # removed while we looked
                    stack.append((entry.path, path))
        except OSError:
            continue
    return ids
