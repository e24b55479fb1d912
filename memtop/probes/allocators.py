"""Which object of a process provides each allocator entry point: the process's own link map, searched in
the dynamic linker's order (the executable, LD_PRELOAD, then DT_NEEDED breadth first, then what was
dlopen'ed), choosing by the functions each object defines in its dynamic symbol table (its full symbol table
for a static executable), never by file name.

Files are opened through /proc/PID/map_files, so a process in another mount namespace (a container, a
chroot) gets its own copies read and probed. Pure apart from reading /proc and the mapped files: no bcc.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from memtop.errors import MemtopError
from memtop.probes.elf import ElfError, ElfInfo, Symbol, read_elf

HEAP, CXX, MAPPING = "heap", "c++", "mapping"

# (symbol, family, entry program, return program or None)
ENTRY_POINTS: tuple[tuple[str, str, str, str | None], ...] = (
    ("malloc", HEAP, "malloc_enter", "alloc_return"),
    ("calloc", HEAP, "calloc_enter", "alloc_return"),
    ("realloc", HEAP, "realloc_enter", "alloc_return"),
    ("reallocarray", HEAP, "reallocarray_enter", "alloc_return"),
    ("posix_memalign", HEAP, "posix_memalign_enter", "alloc_return"),
    ("aligned_alloc", HEAP, "aligned_alloc_enter", "alloc_return"),
    ("memalign", HEAP, "aligned_alloc_enter", "alloc_return"),
    ("valloc", HEAP, "malloc_enter", "alloc_return"),
    ("pvalloc", HEAP, "malloc_enter", "alloc_return"),
    ("free", HEAP, "free_enter", None),
    ("cfree", HEAP, "free_enter", None),
    # C++ operator new (size first in every variant) and operator delete (pointer first), plain, array,
    # nothrow, sized and aligned. A throwing new gets no uretprobe (an exception could not unwind through
    # it): its returns are hooked at each call site (UserLeakProbe.hook_new_sites).
    ("_Znwm", CXX, "cxx_new_enter", None),  # throws: no uretprobe (see leaks_user.c)
    ("_Znam", CXX, "cxx_new_enter", None),  # throws: no uretprobe (see leaks_user.c)
    ("_ZnwmRKSt9nothrow_t", CXX, "malloc_enter", "alloc_return"),
    ("_ZnamRKSt9nothrow_t", CXX, "malloc_enter", "alloc_return"),
    ("_ZnwmSt11align_val_t", CXX, "cxx_new_enter", None),  # throws: no uretprobe (see leaks_user.c)
    ("_ZnamSt11align_val_t", CXX, "cxx_new_enter", None),  # throws: no uretprobe (see leaks_user.c)
    ("_ZnwmSt11align_val_tRKSt9nothrow_t", CXX, "malloc_enter", "alloc_return"),
    ("_ZnamSt11align_val_tRKSt9nothrow_t", CXX, "malloc_enter", "alloc_return"),
    ("_ZdlPv", CXX, "free_enter", None),
    ("_ZdaPv", CXX, "free_enter", None),
    ("_ZdlPvm", CXX, "free_enter", None),
    ("_ZdaPvm", CXX, "free_enter", None),
    ("_ZdlPvRKSt9nothrow_t", CXX, "free_enter", None),
    ("_ZdaPvRKSt9nothrow_t", CXX, "free_enter", None),
    ("_ZdlPvSt11align_val_t", CXX, "free_enter", None),
    ("_ZdaPvSt11align_val_t", CXX, "free_enter", None),
    ("_ZdlPvmSt11align_val_t", CXX, "free_enter", None),
    ("_ZdaPvmSt11align_val_t", CXX, "free_enter", None),
    ("_ZdlPvSt11align_val_tRKSt9nothrow_t", CXX, "free_enter", None),
    ("_ZdaPvSt11align_val_tRKSt9nothrow_t", CXX, "free_enter", None),
    ("mmap", MAPPING, "mmap_enter", "mmap_return"),
    ("mmap64", MAPPING, "mmap_enter", "mmap_return"),
    ("mremap", MAPPING, "mremap_enter", "mmap_return"),
    ("munmap", MAPPING, "munmap_enter", "mmap_return"),
)
ENTRY_NAMES = tuple(name for name, _, _, _ in ENTRY_POINTS)


@dataclass(frozen=True)
class MappedObject:
    path: str  # as /proc/PID/maps names it (without " (deleted)")
    open_path: str  # /proc/PID/map_files/<range> of one of its mappings: the very file the process mapped
    deleted: bool = False


@dataclass(frozen=True)
class Hook:
    """One uprobe (and uretprobe) to attach."""

    symbol: str
    obj: MappedObject
    address: int  # the symbol's value: a virtual address in the object's own terms
    entry: str
    ret: str | None


@dataclass
class Resolution:
    """Where the process's allocator entry points come from."""

    order: list[MappedObject]  # the link map, in lookup order
    providers: dict[str, tuple[MappedObject, Symbol]] = field(default_factory=dict)
    hooks: list[Hook] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # symbol -> why it is not hooked

    @property
    def malloc_provider(self) -> MappedObject | None:
        found = self.providers.get("malloc")
        return found[0] if found else None


def map_file(pid: int, address_range: str) -> str:
    """/proc/PID/map_files/<start>-<end> of a mapping named as in /proc/PID/maps (which pads the addresses
    with zeros; map_files does not)."""
    start, end = (int(x, 16) for x in address_range.split("-"))
    return f"/proc/{pid}/map_files/{start:x}-{end:x}"


def mapped_objects(pid: int) -> list[MappedObject]:
    """Every file mapped executable into the process, in /proc/PID/maps order, one entry per file.
    Raises MemtopError when the maps cannot be read (the process is gone, or not ours to see)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError as exc:
        raise MemtopError(f"cannot read /proc/{pid}/maps: {exc.strerror}") from None
    objects: dict[str, MappedObject] = {}
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
            continue
        path, deleted = parts[5], parts[5].endswith(" (deleted)")
        if deleted:
            path = path[: -len(" (deleted)")]
        if path not in objects:
            objects[path] = MappedObject(path, map_file(pid, parts[0]), deleted)
    return list(objects.values())


def _preloads(pid: int) -> list[str]:
    """LD_PRELOAD of the process, then its root's /etc/ld.so.preload (what ld.so reads, in that order)."""
    names: list[str] = []
    with contextlib.suppress(OSError):
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if entry.startswith(b"LD_PRELOAD="):
                names += entry[len(b"LD_PRELOAD=") :].decode("utf-8", "replace").replace(":", " ").split()
    with contextlib.suppress(OSError):
        names += Path(f"/proc/{pid}/root/etc/ld.so.preload").read_text().replace(":", " ").split()
    return names


class LinkMap:
    """The process's mapped objects, their ELF facts (read once each), and the lookup order."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.objects = mapped_objects(pid)
        self._elf: dict[str, ElfInfo | None] = {}
        try:
            self.exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
        except OSError:
            self.exe = ""

    def elf(self, obj: MappedObject) -> ElfInfo | None:
        if obj.path not in self._elf:
            try:
                self._elf[obj.path] = read_elf(obj.open_path)
            except (OSError, ElfError):
                self._elf[obj.path] = None
        return self._elf[obj.path]

    def order(self) -> list[MappedObject]:
        """The dynamic linker's symbol lookup order: the executable, LD_PRELOAD objects, then DT_NEEDED
        breadth first (matched to mapped objects by DT_SONAME, else file name), then the rest (dlopen)."""
        by_path = {o.path: o for o in self.objects}
        exe = by_path.get(self.exe) or (self.objects[0] if self.objects else None)
        if exe is None:
            return []
        by_name: dict[str, MappedObject] = {}
        for obj in self.objects:
            by_name.setdefault(os.path.basename(obj.path), obj)
        for obj in self.objects:  # a soname wins over a file name
            info = self.elf(obj) if obj is not exe else None
            if info is not None and info.soname:
                by_name[info.soname] = obj
        ordered: list[MappedObject] = [exe]
        for name in _preloads(self.pid):
            preloaded = by_path.get(name) or by_name.get(os.path.basename(name))
            if preloaded is not None and preloaded not in ordered:
                ordered.append(preloaded)
        queue = deque(ordered)
        while queue:
            info = self.elf(queue.popleft())
            for needed in info.needed if info else ():
                dep = by_name.get(needed) or by_name.get(os.path.basename(needed))
                if dep is not None and dep not in ordered:
                    ordered.append(dep)
                    queue.append(dep)
        ordered += [o for o in self.objects if o not in ordered]
        return ordered


def resolve(pid: int) -> Resolution:
    """The hooks to attach for `pid`: each entry point at the first object in lookup order that defines it.

    operator new/delete are hooked only where the object defining them also defines malloc (an allocator's
    own, such as tcmalloc's or jemalloc's); libstdc++'s call malloc, which is hooked already. Symbols at
    one address of one object (glibc's memalign is aligned_alloc) are hooked once.
    """
    link_map = LinkMap(pid)
    resolution = Resolution(order=link_map.order())
    for obj in resolution.order:
        info = link_map.elf(obj)
        if info is None:
            continue
        for name in ENTRY_NAMES:
            if name not in resolution.providers and name in info.exports:
                resolution.providers[name] = (obj, info.exports[name])
    seen: set[tuple[str, int]] = set()
    for name, family, entry, ret in ENTRY_POINTS:
        found = resolution.providers.get(name)
        if found is None:
            continue
        obj, symbol = found
        if family == CXX:
            info = link_map.elf(obj)
            if info is None or "malloc" not in info.exports:
                resolution.skipped[name] = f"{os.path.basename(obj.path)} (calls malloc)"
                continue
        if (obj.path, symbol.value) in seen:
            continue
        seen.add((obj.path, symbol.value))
        resolution.hooks.append(Hook(name, obj, symbol.value, entry, ret))
    return resolution


def not_followed_reason(pid: int, resolution: Resolution) -> str | None:
    """Why the process's allocations cannot be followed (one line), None when malloc and free are hooked."""
    hooked = {hook.symbol for hook in resolution.hooks}
    if {"malloc", "free"} <= hooked:
        return None
    exe = resolution.order[0] if resolution.order else None
    if exe is None:
        return f"PID {pid} maps no executable file: its allocations are not followed"
    provider = resolution.malloc_provider
    if provider is None:
        static = "a static executable without symbols" if _static(exe) else "no mapped object defines it"
        return (
            f"PID {pid}: no object exports malloc ({static}; {os.path.basename(exe.path)} may use its own "
            "allocator): its allocations are not followed"
        )
    return f"PID {pid}: malloc comes from {provider.path}, which has no free: not followed"


def _static(obj: MappedObject) -> bool:
    with contextlib.suppress(OSError, ElfError):
        return read_elf(obj.open_path).is_static
    return False
